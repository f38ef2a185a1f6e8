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
"""Prefill latency and decode speed of every fusion type, relative to transformers' LlavaForConditionalGeneration.

All models share the same vision tower (CLIP ViT-L/14-336) and language model (LLaMA of the 7B width: 4096 hidden,
11008 MLP, 32 heads; `--llm-layers` deep, by default 2 on CPU and the real 32 on CUDA): the candidates take the
baseline's tensors (`load_state_dict(assign=True)`), so only their fusion modules are extra. Weights are random;
nothing is downloaded.

Per fusion type, interleaved with the baseline in every round (median over rounds):

- `prefill_ratio`: latency of the first forward (image encoding + fusion + prompt) / Llava's (lower is better);
- `decode_ratio`: decode tokens/s / Llava's (higher is better), from the time between the first and the last
  generated token of a greedy `generate` (`--new-tokens` tokens, no early stop).

Self-checks: the `single` model (LLaVA-1.5 in this package) must give Llava's logits; internal cross-attention
(I_M) must compute its keys/values once per `generate` (at prefill), never during decoding.

    python benchmarks/end_to_end.py                        # CPU, float32, 2-layer LLM of the 7B width (minutes)
    python benchmarks/end_to_end.py --quick                # tiny widths (seconds)
    python benchmarks/end_to_end.py --device cuda --dtype bfloat16   # the real 7B shape
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LogitsProcessor, LogitsProcessorList


sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

from llava_multilayer import LlavaMultiLayerConfig, LlavaMultiLayerForConditionalGeneration  # noqa: E402
from llava_multilayer.internal_fusion_llava_multilayer import CrossAttentionFusionDecoderLayer  # noqa: E402


LSF_SELECTION = (3, 18, 23)  # Layer_Select_Fuse's "3-18-23"
IGVA_GROUPS = [list(range(start, start + 6)) for start in (1, 7, 13, 19)]
INSTRUCTION_LENGTH = 32
FUSION_TYPES = ("single", "concat", "mmfuser", "igva", "I_D", "I_M")
DECODE_TARGETS = {"I_M": 0.90}
DEFAULT_DECODE_TARGET = 0.97


def lsf_layer_map(num_layers: int, selection: tuple[int, ...] = LSF_SELECTION) -> list[list[int]]:
    """Layer_Select_Fuse's decoder layers for a layer selection.

    `t(v) = int(v * L / 24 - 1)`; the first occurrence wins.
    """
    layer_map = {}
    for feature, layer in enumerate(selection):
        decoder_layer = int(layer * num_layers / 24 - 1)
        if decoder_layer < num_layers:
            layer_map.setdefault(decoder_layer, feature)
    return [[layer, feature] for layer, feature in sorted(layer_map.items())]


def fusion_settings(name: str, num_layers: int, quick: bool) -> dict:
    """`LlavaMultiLayerConfig` fusion settings of each benchmarked type (the published selections)."""
    if name == "single":
        return {"fusion_type": "single", "vision_feature_layer": -2}
    if name == "concat":
        return {"fusion_type": "concat", "vision_feature_layer": list(LSF_SELECTION)}
    if name == "mmfuser":
        return {"fusion_type": "mmfuser", "vision_feature_layer": [3, 8, 13, 18, 23]}
    if name == "igva":
        encoder = {**_common.MPNET_BASE, **_common.QUICK_MPNET} if quick else dict(_common.MPNET_BASE)
        return {
            "fusion_type": "igva",
            "vision_feature_layer": -2,
            "igva_layer_groups": IGVA_GROUPS,
            "instruction_encoder_config": encoder,
            **({"igva_hidden_size": 64} if quick else {}),
        }
    internal_type = {"I_D": "add", "I_M": "cross_attention"}[name]
    return {
        "fusion_type": "single",
        "vision_feature_layer": LSF_SELECTION[-1],
        "internal_fusion_type": internal_type,
        "internal_feature_layers": list(LSF_SELECTION),
        "internal_layer_map": lsf_layer_map(num_layers),
    }


class TokenTimes(LogitsProcessor):
    """Records when each new token's logits are ready (the first right after prefill)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        _common.synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def attn_implementation(config, attn: str) -> dict:
    """`attn` for the vision tower and the language model; the instruction encoder (MPNet) only has eager attention."""
    choice = {"text_config": attn, "vision_config": attn}
    if getattr(config, "instruction_encoder_config", None) is not None:
        choice["instruction_encoder_config"] = "eager"
    return choice


def build_configs(
    fusion_types: list[str], llm_layers: int, quick: bool = False, image_size: int | None = None
) -> tuple[LlavaConfig, dict[str, LlavaMultiLayerConfig]]:
    """The Llava config and one `LlavaMultiLayerConfig` per fusion type, 7B-shaped unless `quick`."""
    vision_config = _common.vision_config(_common.CLIP_L_336, quick)
    if image_size:
        vision_config["image_size"] = image_size
    text_config = _common.text_config(llm_layers, quick)
    num_image_tokens = (vision_config["image_size"] // vision_config["patch_size"]) ** 2  # CLIP patches, CLS dropped
    llava = _common.llava_config(vision_config, text_config, image_seq_length=num_image_tokens)
    ours = {
        name: LlavaMultiLayerConfig(
            vision_config=vision_config,
            text_config=text_config,
            image_token_id=_common.IMAGE_TOKEN_ID,
            image_seq_length=num_image_tokens,
            **fusion_settings(name, llm_layers, quick),
        )
        for name in fusion_types
    }
    return llava, ours


def build_models(args, device, dtype):
    llava_config, configs = build_configs(
        args.fusion_types, args.llm_layers, args.quick, getattr(args, "image_size", None)
    )
    with torch.device(device):
        llava = LlavaForConditionalGeneration._from_config(
            llava_config, dtype=dtype, attn_implementation=attn_implementation(llava_config, args.attn)
        )
    llava.eval()
    shared = llava.state_dict()
    models = {}
    for name, config in configs.items():
        with torch.device(device):
            model = LlavaMultiLayerForConditionalGeneration._from_config(
                config, dtype=dtype, attn_implementation=attn_implementation(config, args.attn)
            )
        own = model.state_dict()
        reused = {key: value for key, value in shared.items() if key in own and own[key].shape == value.shape}
        model.load_state_dict(reused, strict=False, assign=True)
        models[name] = model.eval()
    return llava, models


def make_inputs(model, args, device, dtype, num_image_tokens: int) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    text = torch.randint(3, 32000, (1, args.prompt_tokens), generator=generator)
    image = torch.full((1, num_image_tokens), _common.IMAGE_TOKEN_ID)
    input_ids = torch.cat([torch.ones(1, 1, dtype=torch.long), image, text], dim=1)
    size = model.config.vision_config.image_size
    inputs = {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": torch.randn(1, 3, size, size, generator=generator).to(device, dtype),
    }
    if getattr(model.config, "fusion_type", None) == "igva":
        vocab = model.config.instruction_encoder_config.vocab_size
        instruction = torch.randint(3, vocab, (1, INSTRUCTION_LENGTH), generator=generator)
        inputs["instruction_input_ids"] = instruction.to(device)
        inputs["instruction_attention_mask"] = torch.ones_like(instruction).to(device)
    return inputs


def count_cross_key_value_calls(model) -> list[int]:
    """Installs hooks counting the cross-attention key projections of I_M layers; returns the live counter."""
    counter = [0]
    for layer in model.model.language_model.layers:
        if isinstance(layer, CrossAttentionFusionDecoderLayer):
            layer.cross_attn.k_proj.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    return counter


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_arguments(parser, "end_to_end", default_dtype="auto")
    parser.add_argument(
        "--llm-layers", type=int, help="Decoder layers (default: 2 on CPU, 32 on CUDA, 3 with --quick)."
    )
    parser.add_argument("--prompt-tokens", type=int, default=32, help="Text tokens after the image (default: 32).")
    parser.add_argument("--new-tokens", type=int, help="Generated tokens per run (default: 16, 4 with --quick).")
    parser.add_argument("--fusion-types", nargs="+", choices=FUSION_TYPES, default=list(FUSION_TYPES))
    parser.add_argument("--attn", default="sdpa", help="attn_implementation of the language models (default: sdpa).")
    args = parser.parse_args(argv)
    device, dtype = _common.setup(args)
    machine = _common.machine_info(device)
    if args.llm_layers is None:
        args.llm_layers = 3 if args.quick else (32 if device.type == "cuda" else 2)
    if args.new_tokens is None:
        args.new_tokens = 4 if args.quick else 16
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (decode speed is measured between the first and the last token).")

    llava, models = build_models(args, device, dtype)
    num_image_tokens = llava.config.image_seq_length
    llava_inputs = make_inputs(llava, args, device, dtype, num_image_tokens)
    inputs = {name: make_inputs(model, args, device, dtype, num_image_tokens) for name, model in models.items()}
    for name in inputs:
        inputs[name]["input_ids"] = llava_inputs["input_ids"]
        inputs[name]["attention_mask"] = llava_inputs["attention_mask"]
        inputs[name]["pixel_values"] = llava_inputs["pixel_values"]

    checks = {}
    if "single" in models:
        with torch.inference_mode():
            expected = llava(**llava_inputs).logits
            actual = models["single"](**inputs["single"]).logits
        checks["single_logits_max_abs_diff_vs_llava"] = float((actual - expected).abs().max())
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        if checks["single_logits_max_abs_diff_vs_llava"] > tolerance:
            raise SystemExit(
                f"error: the `single` model should reproduce Llava's logits but differs by "
                f"{checks['single_logits_max_abs_diff_vs_llava']:.3g} (> {tolerance})."
            )
    cross_calls = count_cross_key_value_calls(models["I_M"]) if "I_M" in models else None

    all_models = {"llava": llava, **models}
    all_inputs = {"llava": llava_inputs, **inputs}
    recorders = {name: TokenTimes(device) for name in all_models}
    generate_kwargs = {
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens,
        "do_sample": False,
        "use_cache": True,
    }

    decode_seconds: dict[str, list[float]] = {}

    def prefill(name):
        return lambda: all_models[name](**all_inputs[name], use_cache=True, logits_to_keep=1)

    def generate(name):
        def run():
            recorders[name].times.clear()
            all_models[name].generate(
                **all_inputs[name], logits_processor=LogitsProcessorList([recorders[name]]), **generate_kwargs
            )
            times = recorders[name].times
            decode_seconds.setdefault(name, []).append((times[-1] - times[0]) / (len(times) - 1))

        return run

    prefill_times = _common.interleaved_timings(
        {name: prefill(name) for name in all_models}, args.repeats, args.warmup, device
    )
    if cross_calls is not None:
        cross_calls[0] = 0
    _common.interleaved_timings({name: generate(name) for name in all_models}, args.repeats, args.warmup, device)
    if cross_calls is not None:
        runs = args.repeats + args.warmup
        fused_layers = len(models["I_M"].model.internal_fusion_layers)
        checks["I_M_cross_kv_projections_per_generate"] = cross_calls[0] / runs
        checks["I_M_fused_layers"] = fused_layers
        if cross_calls[0] != runs * fused_layers:
            raise SystemExit(
                f"error: I_M computed cross-attention keys {cross_calls[0]} times in {runs} generate calls with "
                f"{fused_layers} fused layers: they must be computed once per layer at prefill and cached."
            )
    decode_seconds = {name: seconds[args.warmup :] for name, seconds in decode_seconds.items()}

    rows = []
    for name, model in models.items():
        prefill_ratio = _common.ratio_of_rounds(prefill_times[name], prefill_times["llava"])
        decode_ratio = _common.ratio_of_rounds(decode_seconds["llava"], decode_seconds[name])
        target = DECODE_TARGETS.get(name, DEFAULT_DECODE_TARGET)
        rows.append(
            {
                "fusion": name,
                "internal_layer_map": model.config.internal_layer_map,
                "extra_parameters": (
                    sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in llava.parameters())
                ),
                "prefill_ms": _common.median(prefill_times[name]) * 1e3,
                "llava_prefill_ms": _common.median(prefill_times["llava"]) * 1e3,
                "prefill_ratio": prefill_ratio,
                "decode_tokens_per_s": 1 / _common.median(decode_seconds[name]),
                "llava_decode_tokens_per_s": 1 / _common.median(decode_seconds["llava"]),
                "decode_ratio": decode_ratio,
                "decode_target": target,
                "decode_met": decode_ratio >= target,
            }
        )

    columns = [
        ("fusion", "fusion", ""), ("extra_parameters", "extra params", ","), ("prefill_ms", "prefill ms", ".0f"),
        ("llava_prefill_ms", "Llava prefill ms", ".0f"), ("prefill_ratio", "prefill ratio", ".4f"),
        ("decode_tokens_per_s", "decode tok/s", ".2f"), ("llava_decode_tokens_per_s", "Llava tok/s", ".2f"),
        ("decode_ratio", "decode ratio", ".4f"), ("decode_target", "target", ""),
    ]
    _common.print_table(
        f"Prefill and decode vs LlavaForConditionalGeneration ({args.llm_layers}-layer LLM, {dtype}, {device})",
        rows, columns,
    )
    print("\nSelf-checks: " + ", ".join(f"{key}={value}" for key, value in checks.items()))
    targets = [
        _common.check_target(
            f"decode {row['fusion']}", row["decode_ratio"], row["decode_target"], higher_is_better=True
        )
        for row in rows
    ]
    _common.print_targets(targets)
    payload = {
        "benchmark": "end_to_end",
        "machine": machine,
        "settings": _common.run_settings(
            args, dtype, llm_layers=args.llm_layers, prompt_tokens=args.prompt_tokens, image_tokens=num_image_tokens,
            new_tokens=args.new_tokens, attn_implementation=args.attn,
        ),
        "checks": checks,
        "results": rows,
        "targets": targets,
    }
    _common.write_results(args.output, payload)
    return payload


if __name__ == "__main__":
    main()
