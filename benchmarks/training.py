# Copyright 2026 The llava-multilayer authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Training speed: is the data pipeline the bottleneck, and what does fusion cost per training step?

1. Data: records/s of the training dataset + collator (`llava_multilayer.training`, finetune recipe, vicuna_v1
   two-turn conversations) on 640x480 JPEG images resized to the tower's 336 px (84 px with `--quick`), read from
   disk, tokenized and collated, in this process (no worker processes). Reported against the model's step time:
   `data_share` = data time of one batch / training step time of one batch (below 1: one data worker keeps up).
2. Model: one training step (forward with labels, backward) of every fusion type with the finetune recipe's
   trainable set (LLM, fuser, projector(s); tower frozen), against transformers' `LlavaForConditionalGeneration`
   with the same CLIP ViT-L/14-336 tower and LLM (LLM + projector trained, tower frozen), interleaved rounds, median
   ratio. Target: ratio <= 1.05 for the external fusers. Random weights; nothing is downloaded.

    python benchmarks/training.py --quick                          # seconds
    python benchmarks/training.py --llm-layers 2                   # real widths on CPU (minutes)
    python benchmarks/training.py --device cuda --dtype bfloat16   # 7B-wide LLM, 32 layers by default on CUDA
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import LlavaImageProcessorPil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import end_to_end

from llava_multilayer import LlavaMultiLayerProcessor
from llava_multilayer.conversion.components import load_tokenizer_with_image_token
from llava_multilayer.training import load_recipe

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "commands" / "demo_data" / "original"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
FAMILIES = {"concat": "layer_select_fuse", "mmfuser": "mmfuser", "igva": "igva", "I_D": "layer_select_fuse"}
FAMILIES["I_M"] = "layer_select_fuse"
EXTERNAL = ("concat", "mmfuser", "igva")
TRAINED_FUSION_TYPES = ("concat", "mmfuser", "igva", "I_D", "I_M")
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "near",
    "the",
    "river",
    "bank",
    "while",
    "birds",
    "sing",
]


def make_records(folder: Path, count: int, seed: int) -> list[dict]:
    """`count` two-turn LLaVA records, each with its own 640x480 JPEG image written to `folder`."""
    generator = np.random.default_rng(seed)
    records = []
    for index in range(count):
        pixels = generator.integers(0, 256, (480, 640, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=90)
        text = " ".join(generator.choice(WORDS, 40))
        records.append(
            {
                "id": str(index),
                "image": f"{index}.jpg",
                "conversations": [
                    {"from": "human", "value": f"<image>\nDescribe the picture: {text[:60]}?"},
                    {"from": "gpt", "value": text},
                    {"from": "human", "value": "And the colours?"},
                    {"from": "gpt", "value": text[:80]},
                ],
            }
        )
    return records


def make_processor(image_size: int, patch_size: int) -> LlavaMultiLayerProcessor:
    tokenizer, _ = load_tokenizer_with_image_token(TOKENIZER_DIR)
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_pad=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return LlavaMultiLayerProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def data_seconds_per_record(model, args) -> float:
    """Seconds per record of dataset + collator (median over rounds of `args.data_records` records)."""
    vision = model.config.vision_config
    processor = make_processor(vision.image_size, vision.patch_size)
    recipe = load_recipe("finetune", family="mmfuser")
    with tempfile.TemporaryDirectory() as folder:
        records = make_records(Path(folder), args.data_records, args.seed)
        dataset = recipe.dataset(records, processor, image_folder=folder)
        rounds = []
        for round_index in range(args.warmup + args.repeats):
            start = time.perf_counter()
            for first in range(0, len(dataset), args.batch_size):
                recipe.collate([dataset[i] for i in range(first, min(first + args.batch_size, len(dataset)))])
            if round_index >= args.warmup:
                rounds.append((time.perf_counter() - start) / len(dataset))
    return statistics.median(rounds)


def training_batch(model, args, device, dtype, num_image_tokens: int) -> dict:
    """A batch of `args.batch_size` rows: BOS, the image, `args.prompt_tokens` text tokens, all supervised."""
    inputs = end_to_end.make_inputs(model, args, device, dtype, num_image_tokens)
    batch = {key: value.expand(args.batch_size, *value.shape[1:]).contiguous() for key, value in inputs.items()}
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == _common.IMAGE_TOKEN_ID, -100)
    batch["labels"] = labels
    return batch


def prepare_baseline(llava) -> None:
    llava.train()
    for name, parameter in llava.named_parameters():
        parameter.requires_grad_(not name.startswith("model.vision_tower."))


def step(model, batch, device) -> float:
    """Seconds of one training step (forward with labels + backward), gradients cleared before."""
    model.zero_grad(set_to_none=True)
    return _common.time_call(lambda: model(**batch).loss.backward(), device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_arguments(parser, "training", default_dtype="auto")
    parser.add_argument(
        "--llm-layers", type=int, help="Decoder layers (default: 2 on CPU, 32 on CUDA, 3 with --quick)."
    )
    parser.add_argument("--batch-size", type=int, default=2, help="Rows per training step and collated batch (2).")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="Text tokens after the image (default: 128).")
    parser.add_argument("--data-records", type=int, default=32, help="Records timed per data round (default: 32).")
    parser.add_argument("--fusion-types", nargs="+", choices=TRAINED_FUSION_TYPES, default=list(TRAINED_FUSION_TYPES))
    parser.add_argument("--attn", default="sdpa", help="attn_implementation of the language models (default: sdpa).")
    args = parser.parse_args(argv)
    device, dtype = _common.setup(args)
    machine = _common.machine_info(device)
    if args.llm_layers is None:
        args.llm_layers = 3 if args.quick else (32 if device.type == "cuda" else 2)
    llava, models = end_to_end.build_models(args, device, dtype)
    vision = llava.config.vision_config
    num_image_tokens = (vision.image_size // vision.patch_size) ** 2
    prepare_baseline(llava)
    prepared = {}
    for name, model in models.items():
        recipe = load_recipe("finetune", model, family=FAMILIES[name])
        prepared[name] = recipe.prepare_model(model).train()
    batches = {name: training_batch(model, args, device, dtype, num_image_tokens) for name, model in models.items()}
    baseline_batch = training_batch(llava, args, device, dtype, num_image_tokens)

    times = {name: [] for name in ["llava", *prepared]}
    order = list(times)
    for round_index in range(args.warmup + args.repeats):
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            seconds = (
                step(llava, baseline_batch, device) if name == "llava" else step(prepared[name], batches[name], device)
            )
            if round_index >= args.warmup:
                times[name].append(seconds)
    baseline = _common.median(times["llava"])
    data_per_record = data_seconds_per_record(llava, args)
    data_per_batch = data_per_record * args.batch_size
    rows = [
        {"name": "llava (transformers)", "step_s": baseline, "ratio": 1.0, "data_share": data_per_batch / baseline}
    ]
    targets = []
    for name in prepared:
        ratio = _common.ratio_of_rounds(times[name], times["llava"])
        step_seconds = _common.median(times[name])
        rows.append(
            {"name": name, "step_s": step_seconds, "ratio": ratio, "data_share": data_per_batch / step_seconds}
        )
        if name in EXTERNAL:
            targets.append(_common.check_target(f"training step ratio {name} / llava", ratio, 1.05))
    targets.append(_common.check_target("data time per batch / llava step time", data_per_batch / baseline, 1.0))
    _common.print_table(
        f"Training step (batch {args.batch_size}, {num_image_tokens} image + {args.prompt_tokens} text tokens, "
        f"{args.llm_layers} LLM layers, {dtype}) and data pipeline ({1 / data_per_record:.1f} records/s)",
        rows,
        [
            ("name", "model", "s"),
            ("step_s", "step (s)", ".4f"),
            ("ratio", "vs llava", ".3f"),
            ("data_share", "data / step", ".3f"),
        ],
    )
    _common.print_targets(targets)
    payload = {
        "benchmark": "training",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine,
        "data_records_per_second": 1 / data_per_record,
        "rows": rows,
        "targets": targets,
        "rounds": times,
    }
    _common.write_results(args.output, payload)
    return payload


if __name__ == "__main__":
    main()
