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
"""GPU inference of 7B-shaped models: bf16 + SDPA, `device_map="auto"`, bitsandbytes 8-bit and 4-bit loading.

For each loading mode (`--modes`: `bf16`, `8bit`, `4bit`) and fusion type, a random 7B-shaped checkpoint (CLIP
ViT-L/14-336 + LLaMA-7B) is saved once and loaded with `from_pretrained(device_map="auto", attn_implementation=
"sdpa")`, next to transformers' `LlavaForConditionalGeneration` of the same size loaded the same way. Interleaved
rounds measure prefill latency, decode tokens/s and peak GPU memory, reported as ratios to Llava.

Self-checks (the script fails if one does not hold):

- no module listed in `_no_split_modules` (the fusers, the instruction encoder, the internal-fusion decoder layers)
  is split across devices by `device_map="auto"`, also with a `--max-memory` that forces a multi-device placement;
- the `single` fusion type (LLaVA-1.5 in this package) gives Llava's logits (bf16 tolerance);
- internal cross-attention (I_M) computes its keys/values once per `generate`, at prefill.

    python benchmarks/gpu_inference.py --device cuda                       # all modes, mmfuser and I_M
    python benchmarks/gpu_inference.py --device cuda --modes bf16 --fusion-types single mmfuser igva I_M
    python benchmarks/gpu_inference.py --device cuda --max-memory 0=6GiB cpu=64GiB   # forces offloading

Needs a CUDA GPU (bitsandbytes for the quantized modes) and ~30 GB of free disk for the random checkpoints
(`--workdir`). The device-map checks run on CPU too (`device_map_report`), which the tests use.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, LogitsProcessorList


sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import end_to_end  # noqa: E402

from llava_multilayer import LlavaMultiLayerConfig, LlavaMultiLayerForConditionalGeneration  # noqa: E402


MODES = ("bf16", "8bit", "4bit")
LLAVA_SKIP_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


def split_no_split_modules(model: nn.Module, device_map: dict[str, str | int]) -> list[str]:
    """Modules of a `_no_split_modules` class whose parameters `device_map` spreads over several devices."""
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    split = []
    for name, module in model.named_modules():
        if type(module).__name__ not in no_split or not name:
            continue
        devices = set()
        for param_name, _ in module.named_parameters():
            full = f"{name}.{param_name}"
            placement = [key for key in device_map if key == "" or full == key or full.startswith(key + ".")]
            if placement:
                devices.add(device_map[max(placement, key=len)])
        if len(devices) > 1:
            split.append(f"{name} ({type(module).__name__}) on {sorted(map(str, devices))}")
    return split


def device_map_report(config, max_memory: dict, dtype: torch.dtype = torch.bfloat16) -> dict:
    """`accelerate.infer_auto_device_map` of a model of `config` built on the meta device, as `device_map="auto"`
    computes it, and the `_no_split_modules` that it split (none expected). Runs without a GPU."""
    from accelerate import infer_auto_device_map, init_empty_weights

    model_class = (
        LlavaMultiLayerForConditionalGeneration if isinstance(config, LlavaMultiLayerConfig) else
        LlavaForConditionalGeneration
    )
    with init_empty_weights():
        model = model_class(config)
    device_map = infer_auto_device_map(
        model, max_memory=max_memory, no_split_module_classes=model._no_split_modules, dtype=dtype
    )
    return {
        "device_map": device_map,
        "devices": sorted({str(device) for device in device_map.values()}),
        "split_no_split_modules": split_no_split_modules(model, device_map),
    }


def parse_max_memory(entries: list[str] | None) -> dict | None:
    """`["0=20GiB", "cpu=64GiB"]` -> `{0: "20GiB", "cpu": "64GiB"}`."""
    if not entries:
        return None
    result = {}
    for entry in entries:
        device, _, amount = entry.partition("=")
        if not amount:
            raise SystemExit(f"error: --max-memory entries look like 0=20GiB or cpu=64GiB, got {entry!r}.")
        result[int(device) if device.isdigit() else device] = amount
    return result


def quantization_config(mode: str, skip_modules: list[str]):
    if mode == "bf16":
        return None
    from transformers import BitsAndBytesConfig

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=skip_modules,
    )


def save_random_checkpoint(
    model_class, config, directory: Path, device: torch.device, shared: dict | None = None
) -> dict:
    """Saves a randomly initialised bf16 model of `config` (initialised on `device`, which is fast on a GPU); tensors
    named in `shared` are taken from it, so that every model runs the same tower and language model. Returns the
    state dict for sharing."""
    with torch.device(device):
        model = model_class._from_config(config, dtype=torch.bfloat16)
    if shared:
        own = model.state_dict()
        model.load_state_dict(
            {key: value for key, value in shared.items() if key in own and own[key].shape == value.shape},
            strict=False, assign=True,
        )
    model.save_pretrained(directory)
    return model.state_dict()


def load(model_class, directory: Path, mode: str, skip_modules: list[str], max_memory: dict | None):
    model = model_class.from_pretrained(
        directory,
        dtype=torch.bfloat16,
        device_map="auto",
        max_memory=max_memory,
        attn_implementation=end_to_end.attn_implementation(
            model_class.config_class.from_pretrained(directory), "sdpa"
        ),
        quantization_config=quantization_config(mode, skip_modules),
    )
    split = split_no_split_modules(model, getattr(model, "hf_device_map", None) or {"": model.device})
    if split and model_class is LlavaMultiLayerForConditionalGeneration:
        raise SystemExit(f"error: device_map='auto' split modules that must stay on one device: {split}")
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_arguments(parser, "gpu_inference", default_dtype="bfloat16")
    parser.set_defaults(device="cuda", repeats=3)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--fusion-types", nargs="+", choices=end_to_end.FUSION_TYPES, default=["mmfuser", "I_M"])
    parser.add_argument("--llm-layers", type=int, default=32, help="Decoder layers (default: 32, LLaMA-7B).")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-memory", nargs="+", metavar="DEVICE=SIZE", help="e.g. 0=20GiB cpu=64GiB")
    parser.add_argument(
        "--workdir", type=Path, help="Where to save the random checkpoints (default: a temporary dir)."
    )
    args = parser.parse_args(argv)
    device, dtype = _common.setup(args)
    if device.type != "cuda":
        parser.error("this benchmark needs --device cuda (use end_to_end.py on CPU).")
    if dtype != torch.bfloat16:
        parser.error("this benchmark runs bf16 (and bf16-compute 4-bit) inference: --dtype bfloat16.")
    machine = _common.machine_info(device)
    max_memory = parse_max_memory(args.max_memory)
    llava_config, configs = end_to_end.build_configs(args.fusion_types, args.llm_layers, args.quick)

    # Placement checks on the meta device: the real placement, and one squeezed onto several devices.
    gpu_bytes = torch.cuda.get_device_properties(device).total_memory
    placements = {}
    for name, config in configs.items():
        squeezed = {0: int(gpu_bytes * 0.05), 1: int(gpu_bytes * 0.05), "cpu": 10**12}
        auto = max_memory or {0: int(gpu_bytes * 0.9), "cpu": 10**12}
        for label, memory in (("auto", auto), ("squeezed", squeezed)):
            report = device_map_report(config, memory)
            if report["split_no_split_modules"]:
                raise SystemExit(f"error: {name}: infer_auto_device_map split {report['split_no_split_modules']}")
            placements[f"{name} {label}"] = report["devices"]

    from llava_multilayer.commands.finetune import quantization_skip_modules  # the QLoRA recipe's skip list

    workdir = Path(tempfile.mkdtemp(prefix="llava-multilayer-gpu-", dir=args.workdir))
    rows, checks = [], {"placements": placements}
    try:
        shared = save_random_checkpoint(LlavaForConditionalGeneration, llava_config, workdir / "llava", device)
        for name, config in configs.items():
            save_random_checkpoint(LlavaMultiLayerForConditionalGeneration, config, workdir / name, device, shared)
        del shared
        torch.cuda.empty_cache()
        for mode in args.modes:
            llava = load(LlavaForConditionalGeneration, workdir / "llava", mode, LLAVA_SKIP_MODULES, max_memory)
            llava_inputs = end_to_end.make_inputs(llava, args, llava.device, dtype, llava.config.image_seq_length)
            for name, config in configs.items():
                model = load(
                    LlavaMultiLayerForConditionalGeneration, workdir / name, mode, quantization_skip_modules(config),
                    max_memory,
                )
                rows.append(measure(args, mode, name, llava, llava_inputs, model, checks))
                del model
                torch.cuda.empty_cache()
            del llava
            torch.cuda.empty_cache()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    columns = [
        ("mode", "mode", ""), ("fusion", "fusion", ""), ("prefill_ms", "prefill ms", ".1f"),
        ("prefill_ratio", "prefill ratio", ".4f"), ("decode_tokens_per_s", "tok/s", ".1f"),
        ("llava_decode_tokens_per_s", "Llava tok/s", ".1f"), ("decode_ratio", "decode ratio", ".4f"),
        ("footprint_gib", "weights GiB", ".2f"), ("memory_ratio", "weights ratio", ".4f"),
        ("generate_peak_extra_gib", "generate +GiB", ".2f"),
    ]
    _common.print_table(f"GPU inference vs LlavaForConditionalGeneration ({args.llm_layers} layers)", rows, columns)
    targets = [
        _common.check_target(
            f"{row['mode']} decode {row['fusion']}", row["decode_ratio"],
            end_to_end.DECODE_TARGETS.get(row["fusion"], end_to_end.DEFAULT_DECODE_TARGET), higher_is_better=True,
        )
        for row in rows
    ]
    _common.print_targets(targets)
    payload = {
        "benchmark": "gpu_inference",
        "machine": machine,
        "settings": {"modes": args.modes, "llm_layers": args.llm_layers, "repeats": args.repeats,
                     "warmup": args.warmup, "new_tokens": args.new_tokens, "max_memory": args.max_memory},
        "checks": checks,
        "results": rows,
        "targets": targets,
    }
    _common.write_results(args.output, payload)
    return payload


def measure(args, mode: str, name: str, llava, llava_inputs: dict, model, checks: dict) -> dict:
    """Interleaved prefill and generate timings of `model` and `llava`, plus peak memory of each."""
    inputs = end_to_end.make_inputs(model, args, model.device, torch.bfloat16, llava.config.image_seq_length)
    inputs.update({key: llava_inputs[key].to(model.device) for key in ("input_ids", "attention_mask", "pixel_values")})
    if name == "single":
        with torch.inference_mode():
            diff = (model(**inputs).logits.float() - llava(**llava_inputs).logits.float().to(model.device)).abs().max()
        checks[f"{mode} single logits max abs diff vs llava"] = float(diff)
        if mode == "bf16" and diff > 0.05:
            raise SystemExit(
                f"error: the `single` model should reproduce Llava's logits, differs by {float(diff):.3g}."
            )
    cross_calls = end_to_end.count_cross_key_value_calls(model) if name == "I_M" else None
    models = {"llava": (llava, llava_inputs), name: (model, inputs)}
    cuda = torch.device("cuda")
    recorders = {key: end_to_end.TokenTimes(cuda) for key in models}
    decode_seconds: dict[str, list[float]] = {}
    peak = {}

    def prefill(key):
        target, batch = models[key]
        return lambda: target(**batch, use_cache=True, logits_to_keep=1)

    def generate(key):
        def run():
            target, batch = models[key]
            recorders[key].times.clear()
            torch.cuda.reset_peak_memory_stats(cuda)
            resident = torch.cuda.memory_allocated(cuda)
            target.generate(
                **batch, logits_processor=LogitsProcessorList([recorders[key]]), max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens, do_sample=False,
            )
            peak[key] = max(peak.get(key, 0), torch.cuda.max_memory_allocated(cuda) - resident)
            times = recorders[key].times
            decode_seconds.setdefault(key, []).append((times[-1] - times[0]) / (len(times) - 1))

        return run

    prefill_times = _common.interleaved_timings({key: prefill(key) for key in models}, args.repeats, args.warmup,
                                                cuda)
    if cross_calls is not None:
        cross_calls[0] = 0
    _common.interleaved_timings({key: generate(key) for key in models}, args.repeats, args.warmup, cuda)
    if cross_calls is not None:
        runs, layers = args.repeats + args.warmup, len(model.model.internal_fusion_layers)
        if cross_calls[0] != runs * layers:
            raise SystemExit(
                f"error: I_M computed cross-attention keys {cross_calls[0]} times in {runs} generate calls "
                f"with {layers} fused layers; expected once per layer per call."
            )
    decode = {key: seconds[args.warmup:] for key, seconds in decode_seconds.items()}
    # Both models are resident: each one's weights are its footprint, its generate() adds the peak measured here.
    return {
        "mode": mode,
        "fusion": name,
        "devices": sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {"": model.device}).values()}),
        "prefill_ms": _common.median(prefill_times[name]) * 1e3,
        "llava_prefill_ms": _common.median(prefill_times["llava"]) * 1e3,
        "prefill_ratio": _common.ratio_of_rounds(prefill_times[name], prefill_times["llava"]),
        "decode_tokens_per_s": 1 / _common.median(decode[name]),
        "llava_decode_tokens_per_s": 1 / _common.median(decode["llava"]),
        "decode_ratio": _common.ratio_of_rounds(decode["llava"], decode[name]),
        "footprint_gib": model.get_memory_footprint() / 1024**3,
        "llava_footprint_gib": llava.get_memory_footprint() / 1024**3,
        "memory_ratio": model.get_memory_footprint() / llava.get_memory_footprint(),
        "generate_peak_extra_gib": peak[name] / 1024**3,
        "llava_generate_peak_extra_gib": peak["llava"] / 1024**3,
    }


if __name__ == "__main__":
    main()
