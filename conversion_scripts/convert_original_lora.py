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
"""Converts the LoRA output of the original training code (LLaVA's `--lora_enable True` path, which MMFuser,
Layer_Select_Fuse and IGVA inherit) into a full llava-multilayer checkpoint.

A LoRA run of the original code writes, instead of a full checkpoint:

- `config.json`: the full model config (`mm_*` and family fields), as a full finetune writes it;
- `adapter_config.json` + `adapter_model.safetensors` (or `.bin`): the LoRA weights, PEFT naming
  `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (an optional `.default` before `.weight`);
- `non_lora_trainables.bin`: every other trained parameter (the projector/fuser, gates), prefixed `base_model.model.`;
  modules that also carry LoRA appear with PEFT's `.base_layer.` in their names;
- `ucross.bin` (Layer_Select_Fuse I_M only): every parameter with `ucross` in its name (cross-fusion modules).

This script does what the original builder (`load_pretrained_model(model_path=LORA_DIR, model_base=BASE_LLM)`) does,
without the original code: it loads the base language model's weights, lays `non_lora_trainables.bin` and
`ucross.bin` over them (prefix and `.base_layer` removed, the LoRA tensors they repeat skipped), and merges every
LoRA pair into its weight, `W += scale * B @ A` with `scale = lora_alpha / r` (`lora_alpha / sqrt(r)` with rsLoRA),
in float32. The result is exactly the original full-finetune layout, so it is written, with the LoRA directory's
`config.json` and the tokenizer, to a temporary directory and converted by the family's own converter (detected
from `config.json`, as `llava-multilayer convert` does), which checks every tensor and writes the output atomically.

    python conversion_scripts/convert_original_lora.py --lora-dir checkpoints/llava-mmfuser-7b-lora \\
        --base-model lmsys/vicuna-7b-v1.5 --output-dir mmfuser-7b-lora-merged-hf \\
        [--vision-tower openai/clip-vit-large-patch14-336] [--dtype bfloat16] [--verify] [family flags ...]

Every flag other than `--lora-dir`, `--base-model`, `--family` and `--output-dir` goes to the family converter
(e.g. IGVA's `--sentence-encoder`). `--base-model` defaults to the adapter's `base_model_name_or_path`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llava_multilayer.conversion.families import FAMILIES, detect_family, load_family_module
from llava_multilayer.conversion.pipeline import ConversionReport
from llava_multilayer.conversion.reading import (
    CheckpointReader,
    ConversionError,
    load_original_config,
    load_torch_file,
    resolve_local_dir,
)


NON_LORA_FILES = ("non_lora_trainables.bin", "ucross.bin")
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")
_PEFT_PREFIX = "base_model.model."


def _strip_prefix(key: str) -> str:
    return key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key


def read_adapter(lora_dir: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """`adapter_config.json` and the LoRA pairs of `adapter_model.*`, by the original name of the adapted weight.

    Returns:
        `(adapter_config, pairs)` with `pairs["model.layers.0.self_attn.q_proj.weight"] = (lora_A, lora_B)`,
        `lora_A` of shape `(r, in_features)` and `lora_B` of shape `(out_features, r)`.
    """
    config_path = lora_dir / "adapter_config.json"
    if not config_path.is_file():
        raise ConversionError(f"--lora-dir {lora_dir} has no adapter_config.json: it is not a LoRA output directory.")
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    peft_type = adapter_config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ConversionError(f"{config_path} describes a {peft_type} adapter; only LoRA adapters are supported.")
    for field, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D) layers")):
        if adapter_config.get(field):
            raise ConversionError(f"{config_path}: {what} is not supported (the original code trains plain LoRA).")
    for field in ("rank_pattern", "alpha_pattern"):
        if adapter_config.get(field):
            raise ConversionError(f"{config_path}: a per-module `{field}` is not supported.")

    safetensors_path, bin_path = lora_dir / "adapter_model.safetensors", lora_dir / "adapter_model.bin"
    if safetensors_path.is_file():
        tensors = load_file(safetensors_path)
    elif bin_path.is_file():
        tensors = load_torch_file(bin_path)
    else:
        raise ConversionError(f"--lora-dir {lora_dir} has no adapter_model.safetensors or adapter_model.bin.")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(_strip_prefix(key))
        if match is None:
            raise ConversionError(
                f"The adapter holds {key!r}, which is not a LoRA A/B weight (LoRA biases, embeddings and trained "
                "modules saved inside the adapter are not supported)."
            )
        parts.setdefault(match["module"] + ".weight", {})[match["part"]] = tensor
    pairs = {}
    for weight, found in parts.items():
        if set(found) != {"A", "B"}:
            raise ConversionError(
                f"The adapter has lora_{''.join(found)} but not both lora_A and lora_B for {weight}."
            )
        pairs[weight] = (found["A"], found["B"])
    if not pairs:
        raise ConversionError(f"{lora_dir} holds no LoRA weights.")
    return adapter_config, pairs


def lora_scale(adapter_config: dict) -> float:
    """The factor of `B @ A`: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA."""
    r, alpha = adapter_config["r"], adapter_config["lora_alpha"]
    return alpha / math.sqrt(r) if adapter_config.get("use_rslora") else alpha / r


def read_non_lora_trainables(lora_dir: Path) -> dict[str, torch.Tensor]:
    """`non_lora_trainables.bin` and `ucross.bin` with their original names: `base_model.model.` and PEFT's
    `.base_layer` removed, the LoRA tensors (also in the adapter) skipped."""
    state: dict[str, torch.Tensor] = {}
    for name in NON_LORA_FILES:
        path = lora_dir / name
        if not path.is_file():
            continue
        for key, tensor in load_torch_file(path).items():
            key = _strip_prefix(key)
            if ".lora_" in key:
                continue
            key = key.replace(".base_layer.", ".")
            if key in state and not torch.equal(state[key], tensor):
                raise ConversionError(f"{key!r} has different values in {NON_LORA_FILES[0]} and {name}.")
            state[key] = tensor
    return state


def merge_original_lora(lora_dir: str | Path, base_model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The full original-format state dict of a LoRA run: base LLM, non-LoRA trainables, LoRA merged in float32.

    Raises:
        ConversionError: a LoRA pair whose weight is in neither the base model nor the non-LoRA files, or whose
            shapes do not fit it.
    """
    lora_dir = Path(lora_dir)
    adapter_config, pairs = read_adapter(lora_dir)
    scale = lora_scale(adapter_config)
    base = CheckpointReader(base_model_dir)
    state = {key: tensor for key, tensor in base.iter_tensors()}
    state.update(read_non_lora_trainables(lora_dir))
    for weight_name, (lora_a, lora_b) in pairs.items():
        if weight_name not in state:
            raise ConversionError(
                f"The adapter adapts {weight_name!r}, which is neither in the base model ({base_model_dir}) nor in "
                f"{' / '.join(NON_LORA_FILES)}: pass the base language model the LoRA run started from (--base-model)."
            )
        weight = state[weight_name]
        fits = lora_b.shape[0] == weight.shape[0] and lora_a.shape[1] == weight.shape[1]
        if not fits or lora_a.shape[0] != lora_b.shape[1]:
            raise ConversionError(
                f"LoRA shapes A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} do not fit {weight_name!r} of shape "
                f"{tuple(weight.shape)}."
            )
        delta = lora_b.float() @ lora_a.float() * scale
        state[weight_name] = (weight.float() + delta).to(weight.dtype)
    return state


def write_merged_checkpoint(lora_dir: str | Path, base_model_dir: str | Path, output_dir: str | Path) -> Path:
    """Writes the merged LoRA run as an original full checkpoint (`config.json` of the LoRA run, `model.safetensors`,
    tokenizer and generation config) to `output_dir`, which the family converters read like any other."""
    lora_dir, base_model_dir, output_dir = Path(lora_dir), Path(base_model_dir), Path(output_dir)
    state = merge_original_lora(lora_dir, base_model_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, output_dir / "model.safetensors")
    shutil.copyfile(lora_dir / "config.json", output_dir / "config.json")
    tokenizer_dir = lora_dir if (lora_dir / "tokenizer_config.json").is_file() else base_model_dir
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, output_dir / name)
    for directory in (lora_dir, base_model_dir):
        if (directory / "generation_config.json").is_file():
            shutil.copyfile(directory / "generation_config.json", output_dir / "generation_config.json")
            break
    return output_dir


def _resolve_inputs(lora_dir, base_model, family) -> tuple[Path, Path, str]:
    lora_dir = Path(lora_dir)
    if not lora_dir.is_dir():
        raise ConversionError(f"--lora-dir {lora_dir} is not a directory.")
    if family is not None and family not in FAMILIES:
        raise ConversionError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}.")
    if family is None:
        try:
            family = detect_family(load_original_config(lora_dir), f"The LoRA directory's {lora_dir / 'config.json'}")
        except ValueError as error:
            raise ConversionError(str(error)) from error
    if base_model is None:
        adapter_config_path = lora_dir / "adapter_config.json"
        if adapter_config_path.is_file():
            base_model = json.loads(adapter_config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    base_model_dir = resolve_local_dir(base_model, "base language model", "--base-model")
    return lora_dir, base_model_dir, family


@contextlib.contextmanager
def merged_lora_run(lora_dir, output_dir, base_model=None, family=None) -> Iterator[tuple[Path, str]]:
    """`(merged_dir, family)`: the LoRA run written as an original full checkpoint into a temporary directory next
    to `output_dir` (removed on exit), and its family (`family`, or detected from `config.json`)."""
    lora_dir, base_model_dir, family = _resolve_inputs(lora_dir, base_model, family)
    work_parent = Path(output_dir).resolve().parent
    work_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".lora-merged-", dir=work_parent) as work_dir:
        yield write_merged_checkpoint(lora_dir, base_model_dir, Path(work_dir) / "merged"), family


def convert_original_lora(
    lora_dir: str | Path,
    output_dir: str | Path,
    base_model: str | Path | None = None,
    family: str | None = None,
    **converter_kwargs,
) -> ConversionReport:
    """Merges an original LoRA run into its base model and converts it; see the module docstring.

    Args:
        lora_dir: The LoRA run's output directory.
        output_dir: Where the converted checkpoint is written (atomically, by the family converter).
        base_model: Directory / hub id of the base language model (default: the adapter's `base_model_name_or_path`).
        family: a family of [`FAMILIES`] (default: detected from `config.json`).
        converter_kwargs: Keyword arguments of the family's `convert_<family>` function (`vision_tower`, `dtype`,
            `verify`, `parity_fixture`, `sentence_encoder`, ...).
    """
    with merged_lora_run(lora_dir, output_dir, base_model, family) as (merged_dir, family):
        convert = getattr(load_family_module(family), f"convert_{family}")
        return convert(merged_dir, output_dir, **converter_kwargs)


def main(argv: list[str] | None = None) -> None:
    """The command line: the LoRA flags here; every other flag goes to the family converter's `main`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora-dir", required=True, help="Output directory of the original LoRA run.")
    parser.add_argument("--base-model", help="Base LLM directory / hub id (default: from adapter_config.json).")
    parser.add_argument("--family", choices=tuple(FAMILIES), help="Skip detection from config.json.")
    parser.add_argument("--output-dir", required=True, help="Where to write the converted checkpoint.")
    args, forwarded = parser.parse_known_args(argv)
    try:
        with merged_lora_run(args.lora_dir, args.output_dir, args.base_model, args.family) as (merged_dir, family):
            converter_argv = ["--input-dir", str(merged_dir), "--output-dir", args.output_dir, *forwarded]
            load_family_module(family).main(converter_argv)
    except ConversionError as error:
        parser.exit(1, f"error: {error}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
