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
   two-turn conversations) on 640x480 JPEG images resized to 336 px (`--data-image-size`, the real CLIP size, also
   with `--quick`), read from disk, tokenized and collated, in this process (no worker processes). Reported against
   the model's step time: `data_share` = data time of one batch / training step time of one batch (below 1: one
   data worker keeps up).
2. Model: one training step (forward with labels, backward) of every fusion type with the finetune recipe's
   trainable set (LLM, fuser, projector(s); tower frozen), against transformers' `LlavaForConditionalGeneration`
   with the same CLIP ViT-L/14 tower and LLM (LLM + projector trained, tower frozen), on the same input ids and
   pixels. Target: ratio <= 1.05 for the external fusers. Random weights; nothing is downloaded.

How the ratio is made credible on a shared machine: after `--warmup` untimed rounds, every round runs the baseline
between every two candidate steps (L c1 L c2 L c3 ... L, the candidates' order rotating every round), and each
candidate step is divided by the mean of the two baseline steps around it; the median of those `--repeats` ratios
is reported with their interquartile range. On CPU the clock is the process's CPU time (`time.process_time`) at a
fixed thread count (`--threads`, default 1): other jobs on the machine delay a step but do not add to its CPU time,
which wall time would count. On CUDA the clock is wall time, synchronised.

    python benchmarks/training.py --quick                           # seconds
    python benchmarks/training.py --llm-layers 1 --image-size 168   # real widths on CPU, a quarter of the tokens
    python benchmarks/training.py --device cuda --dtype bfloat16    # 7B-wide LLM, 32 layers by default on CUDA
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
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


def data_seconds_per_record(args) -> float:
    """Seconds per record of dataset + collator (median over rounds of `args.data_records` records), at
    `args.data_image_size` px."""
    processor = make_processor(args.data_image_size, 14)
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


def step(model, batch, device: torch.device) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one training step: forward with labels + backward, gradients
    cleared before. The device is synchronised before and after."""
    model.zero_grad(set_to_none=True)
    _common.synchronize(device)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    model(**batch).loss.backward()
    _common.synchronize(device)
    return time.process_time() - cpu_start, time.perf_counter() - wall_start


def step_flops(model, batch) -> int:
    """FLOPs of one training step (forward with labels + backward) as `torch.utils.flop_counter.FlopCounterMode`
    counts them: matmuls, convolutions and attention (element-wise ops, normalisation and `grid_sample` are not
    counted). Independent of the machine's load: the noise-free part of the comparison."""
    from torch.utils.flop_counter import FlopCounterMode

    model.zero_grad(set_to_none=True)
    counter = FlopCounterMode(display=False)
    with counter:
        model(**batch).loss.backward()
    return int(counter.get_total_flops())


def bracketed_rounds(steps: dict, baseline: str, rounds: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Runs `baseline` before, between and after the candidates of every round (L c1 L c2 ... L, the candidates'
    order rotating every round); `steps[name]()` returns `(cpu_s, wall_s)`.

    Returns per name its timed `cpu` and `wall` seconds, and per candidate `cpu_ratio` / `wall_ratio`: each of its
    steps divided by the mean of the two baseline steps around it (`rounds` values each).
    """
    candidates = [name for name in steps if name != baseline]
    results = {name: {"cpu": [], "wall": []} for name in steps}
    for name in candidates:
        results[name].update(cpu_ratio=[], wall_ratio=[])
    for round_index in range(warmup + rounds):
        shift = round_index % len(candidates)
        before = steps[baseline]()
        for name in candidates[shift:] + candidates[:shift]:
            seconds = steps[name]()
            after = steps[baseline]()
            if round_index >= warmup:
                for clock, index in (("cpu", 0), ("wall", 1)):
                    results[name][clock].append(seconds[index])
                    results[baseline][clock].append(before[index])
                    results[name][f"{clock}_ratio"].append(2 * seconds[index] / (before[index] + after[index]))
            before = after
    return results


def quartiles(values: list[float]) -> tuple[float, float]:
    """(25th, 75th) percentiles; both the value itself for one value."""
    if len(values) == 1:
        return values[0], values[0]
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, high


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
    parser.add_argument(
        "--image-size", type=int, help="Tower input size of the timed models (default: 336; 84 with --quick)."
    )
    parser.add_argument(
        "--data-image-size",
        type=int,
        default=336,
        help="Image size of the data pipeline (default: 336, also --quick).",
    )
    parser.add_argument(
        "--clock",
        choices=["auto", "cpu", "wall"],
        default="auto",
        help="Clock of the reported ratios (default auto: process CPU time on CPU, wall time on CUDA).",
    )
    args = parser.parse_args(argv)
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    device, dtype = _common.setup(args)
    machine = _common.machine_info(device)
    clock = ("wall" if device.type == "cuda" else "cpu") if args.clock == "auto" else args.clock
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
    baseline_batch = training_batch(llava, args, device, dtype, num_image_tokens)
    batches = {}
    for name, model in models.items():
        # The same ids and pixels as the baseline; IGVA adds its instruction.
        batches[name] = {**training_batch(model, args, device, dtype, num_image_tokens), **baseline_batch}

    steps = {"llava": lambda: step(llava, baseline_batch, device)}
    for name in prepared:
        steps[name] = lambda name=name: step(prepared[name], batches[name], device)
    times = bracketed_rounds(steps, "llava", args.repeats, args.warmup)
    flops = {"llava": step_flops(llava, baseline_batch)}
    flops.update({name: step_flops(prepared[name], batches[name]) for name in prepared})
    baseline = _common.median(times["llava"][clock])
    data_per_record = data_seconds_per_record(args)
    data_per_batch = data_per_record * args.batch_size
    rows = [
        {
            "name": "llava (transformers)",
            "step_s": baseline,
            "ratio": 1.0,
            "gflops": flops["llava"] / 1e9,
            "flop_ratio": 1.0,
            "data_share": data_per_batch / baseline,
        }
    ]
    targets = []
    for name in prepared:
        ratios = times[name][f"{clock}_ratio"]
        ratio = _common.median(ratios)
        low, high = quartiles(ratios)
        step_seconds = _common.median(times[name][clock])
        rows.append(
            {
                "name": name,
                "step_s": step_seconds,
                "ratio": ratio,
                "ratio_p25": low,
                "ratio_p75": high,
                "wall_ratio": _common.median(times[name]["wall_ratio"]),
                "gflops": flops[name] / 1e9,
                "flop_ratio": flops[name] / flops["llava"],
                "data_share": data_per_batch / step_seconds,
            }
        )
        if name in EXTERNAL:
            targets.append(_common.check_target(f"training step ratio {name} / llava", ratio, 1.05))
    targets.append(_common.check_target("data time per batch / llava step time", data_per_batch / baseline, 1.0))
    _common.print_table(
        f"Training step (batch {args.batch_size}, {num_image_tokens} image + {args.prompt_tokens} text tokens, "
        f"{args.llm_layers} LLM layers, {dtype}, {args.repeats} bracketed ratios, {clock} clock) and data pipeline "
        f"({1 / data_per_record:.1f} records/s at {args.data_image_size} px)",
        rows,
        [
            ("name", "model", "s"),
            ("step_s", f"step ({clock} s)", ".4f"),
            ("ratio", "vs llava (median)", ".3f"),
            ("ratio_p25", "p25", ".3f"),
            ("ratio_p75", "p75", ".3f"),
            ("wall_ratio", "wall-clock ratio", ".3f"),
            ("gflops", "GFLOP", ".1f"),
            ("flop_ratio", "FLOP ratio", ".4f"),
            ("data_share", "data / step", ".4f"),
        ],
    )
    _common.print_targets(targets)
    payload = {
        "benchmark": "training",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "clock": clock,
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
