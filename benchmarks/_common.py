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
"""Timing, reporting and model-building helpers shared by the benchmark scripts.

Every benchmark measures RATIOS against a baseline run in the same process: the candidates and the baseline are
timed in interleaved rounds (the order rotates every round), after warm-up rounds, and the median over rounds is
reported. Interleaving makes slow drifts of a shared machine (other jobs, frequency changes) hit all candidates
alike, which matters more for a ratio than the absolute noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import LlavaConfig

from llava_multilayer.configuration import presets


RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The real geometries come from the package's presets; the benchmarks differ in two places on purpose.
CLIP_L_336 = presets.CLIP_L_336
SIGLIP_SO400M_384 = {**presets.SIGLIP_SO400M_384, "num_hidden_layers": 27}  # the full so400m tower
# llava-hf's padded vocabulary: the image token (32000) lies inside it, as transformers' Llava requires.
VICUNA_7B = {**presets.VICUNA_7B, "vocab_size": 32064}
MPNET_BASE = presets.MPNET_BASE
IMAGE_TOKEN_ID = 32000

# --quick: the same depths (so the published layer selections stay valid), tiny widths and a 6x6 patch grid.
QUICK_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "image_size": 84}
QUICK_TEXT = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4}
QUICK_MPNET = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


def add_common_arguments(parser: argparse.ArgumentParser, name: str, default_dtype: str = "float32") -> None:
    """The flags every benchmark shares."""
    parser.add_argument("--device", default="cpu", help="Torch device, e.g. `cpu` or `cuda` (default: cpu).")
    parser.add_argument(
        "--dtype", choices=[*DTYPES, "auto"], default=default_dtype,
        help=f"Weights and activations dtype (default: {default_dtype}; `auto` = bfloat16 on CUDA, float32 on CPU).",
    )
    parser.add_argument("--repeats", type=int, default=5, help="Timed rounds after warm-up (median reported).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed warm-up rounds.")
    parser.add_argument("--quick", action="store_true", help="CI-sized settings (seconds, not minutes).")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch.set_num_threads on CPU (default: torch's default). One thread is steadier on a shared machine.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights and inputs.")
    parser.add_argument(
        "--output", type=Path, default=RESULTS_DIR / f"{name}.json", help="Where to write the JSON results.",
    )


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Seeds, sets the thread count and validates `--device`/`--dtype`/`--repeats`/`--warmup`."""
    if args.repeats < 1:
        raise SystemExit(f"error: --repeats must be >= 1, got {args.repeats}.")
    if args.warmup < 0:
        raise SystemExit(f"error: --warmup must be >= 0, got {args.warmup}.")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was given but torch sees no CUDA device.")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype_name = args.dtype
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    return device, DTYPES[dtype_name]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of `fn` in seconds (the device is synchronised before and after)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_timings(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Times every function once per round, `warmup + repeats` rounds, rotating the order each round.

    Returns the `repeats` timed seconds of each function, round by round (so that `times[a][i] / times[b][i]` is a
    ratio taken under the same conditions).
    """
    names = list(fns)
    times = {name: [] for name in names}
    with torch.inference_mode():
        for round_index in range(warmup + repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                seconds = time_call(fns[name], device)
                if round_index >= warmup:
                    times[name].append(seconds)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio_of_rounds(candidate: Sequence[float], baseline: Sequence[float]) -> float:
    """Median over rounds of `candidate[i] / baseline[i]`."""
    return median([c / b for c, b in zip(candidate, baseline)])


def spread(values: Sequence[float]) -> float:
    """Relative spread of repeated timings: (max - min) / median."""
    return (max(values) - min(values)) / median(values) if len(values) > 1 else 0.0


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call, as counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and
    attention; element-wise ops, normalisation and `grid_sample` are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        fn()
    return int(counter.get_total_flops())


def count_parameters(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on."""
    import transformers

    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(),
        "device": str(device),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 1024**3, 1)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Prints `rows` as a Markdown table; `columns` are `(key, header, format spec)`; missing values print `-`."""
    print(f"\n{title}\n")
    print("| " + " | ".join(header for _, header, _ in columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, spec))
        print("| " + " | ".join(cells) + " |")


def check_target(name: str, value: float | None, limit: float, higher_is_better: bool = False) -> dict:
    """A target record for the JSON results: `met` is None when the value was not measured."""
    met = None if value is None else (value >= limit if higher_is_better else value <= limit)
    return {"name": name, "value": value, "limit": limit, "higher_is_better": higher_is_better, "met": met}


def print_targets(targets: list[dict]) -> None:
    if not targets:
        return
    print("\nTargets\n")
    for target in targets:
        sign = ">=" if target["higher_is_better"] else "<="
        state = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
        value = "-" if target["value"] is None else f"{target['value']:.4f}"
        print(f"- {target['name']}: {value} (target {sign} {target['limit']}): {state}")


def write_results(path: Path, payload: dict) -> None:
    """Writes the JSON results (creating the directory) and says where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(os, "getloadavg"):
        payload.setdefault("machine", {})["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nResults written to {path}")


def vision_config(base: dict, quick: bool) -> dict:
    return {**base, **QUICK_VISION} if quick else dict(base)


def text_config(num_hidden_layers: int, quick: bool) -> dict:
    config = {**VICUNA_7B, "num_hidden_layers": num_hidden_layers}
    return {**config, **QUICK_TEXT} if quick else config


def llava_config(vision_config: dict, text_config: dict, **overrides) -> LlavaConfig:
    """The baseline: transformers' LLaVA-1.5 config (features of layer -2, CLS dropped) on these sub-configs."""
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        **overrides,
    )


def run_settings(args: argparse.Namespace, dtype: torch.dtype, **settings) -> dict:
    """The settings every benchmark's results record (dtype, repeats, warmup, quick), then its own `settings`."""
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "quick": args.quick,
        **settings,
    }
