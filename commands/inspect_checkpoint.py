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
"""`llava-multilayer inspect PATH`: what a checkpoint is, without loading its weights.

- A converted checkpoint (directory or Hub repo id): family, fusion strategy, the vision layers each fuser uses,
  parameter counts per component, dtype and weight files.
- An original checkpoint directory (written by the MMFuser / Layer_Select_Fuse / IGVA training code): what
  `llava-multilayer convert` would do with it: the detected family, the fusion settings of its config, tensor counts
  per group, dtypes and shards, and the overrides the conversion needs.

`--json` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

from .errors import CommandError, is_repo_id


#: Components of a converted model, by parameter-name pattern (first match wins).
CONVERTED_COMPONENTS = [
    ("vision tower", r"model\.vision_tower\."),
    ("fuser / projector", r"model\.multi_modal_projector\."),
    ("internal projectors", r"model\.internal_projectors\."),
    ("internal cross-attention", r"model\.language_model\.layers\.\d+\.cross_"),
    ("instruction encoder", r"model\.instruction_encoder\."),
    ("language model", r"model\.language_model\."),
    ("lm_head", r"lm_head\."),
]

#: The same components in the key names of the original codebases.
ORIGINAL_COMPONENTS = [
    ("vision tower", r"model\.vision_tower\."),
    ("fuser / projector", r"model\.(mm_projector|mm_projector_f|vision_aggregator)\."),
    ("internal projectors", r"model\.mm_projectors\."),
    ("internal cross-attention", r"model\.layers\.\d+\.ucross_"),
    ("language model", r"model\.(embed_tokens|layers|norm)\."),
    ("lm_head", r"lm_head\."),
]

PRETRAIN_FORMAT = "pretraining-stage module files (bin)"

#: Config fields of an original checkpoint naming a component that is not in its weights, and the flag to override it.
EXTERNAL_COMPONENTS = {"mm_vision_tower": "--vision-tower", "sentence_embedder": "--sentence-encoder"}

#: Original config fields that are neither LLaMA's (in transformers 5.x) nor fusion settings.
_NOT_SETTINGS = {
    "architectures",
    "model_type",
    "torch_dtype",
    "transformers_version",
    "_name_or_path",
    "use_cache",
    "rope_scaling",
    "rope_theta",
    "pretraining_tp",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
}

#: safetensors dtype names -> torch dtype names.
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _component(name: str, components: list[tuple[str, str]]) -> str:
    for component, pattern in components:
        if re.match(pattern, name):
            return component
    return "other"


def _format_size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{num_bytes} B"
        num_bytes /= 1024
    return f"{num_bytes:.1f} GB"


def _safetensors_metadata(path: Path) -> dict[str, tuple[list[int], str]]:
    """`{key: (shape, dtype)}` of a safetensors file, read from its header only."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = {}
        for key in handle.keys():
            tensor_slice = handle.get_slice(key)
            dtype = tensor_slice.get_dtype()
            metadata[key] = (tensor_slice.get_shape(), _SAFETENSORS_DTYPES.get(dtype, dtype.lower()))
        return metadata


def _torch_file_metadata(path: Path) -> dict[str, tuple[list[int], str]]:
    from llava_multilayer.conversion.reading import load_torch_file

    return {
        key: (list(tensor.shape), str(tensor.dtype).replace("torch.", ""))
        for key, tensor in load_torch_file(path).items()
    }


# --------------------------------------------------------------------------------------------------------------
# Converted checkpoints
# --------------------------------------------------------------------------------------------------------------


def _local_files(path: str) -> Path:
    """A local directory with the JSON files of `path` (a directory, or a Hub repo id: its JSON files only)."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=["*.json"]))
    except Exception as error:  # offline, no network, no such repo, no access
        raise CommandError.of(
            "PATH",
            "a local checkpoint directory or a Hub repo id",
            f"{path!r}, which is no local directory and could not be fetched from the Hub ({type(error).__name__})",
            "check the path or the repo id; a Hub repo needs network access (HF_HUB_OFFLINE unset).",
        ) from error


def describe_converted(path: str) -> dict:
    """The description of a converted (llava_multilayer) checkpoint; weights are not loaded."""
    import torch

    from llava_multilayer import LlavaMultiLayerConfig, LlavaMultiLayerForConditionalGeneration
    from llava_multilayer.fusion_registry_llava_multilayer import fusion_projector_class
    from llava_multilayer.internal_fusion_llava_multilayer import internal_fusion_layer_class

    directory = _local_files(path)
    config = LlavaMultiLayerConfig.from_pretrained(directory)
    report_path = directory / "conversion_report.json"
    merge_path = directory / "merge_report.json"  # written by `merge-lora`
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    merge = json.loads(merge_path.read_text()) if merge_path.is_file() else {}

    with torch.device("meta"):
        model = LlavaMultiLayerForConditionalGeneration(config)
    parameters = dict.fromkeys([name for name, _ in CONVERTED_COMPONENTS], 0)
    for name, parameter in model.named_parameters():
        component = _component(name, CONVERTED_COMPONENTS)
        parameters[component] = parameters.get(component, 0) + parameter.numel()

    strategy = {"fusion_type": config.fusion_type, "internal_fusion_type": config.internal_fusion_type}
    layers = {
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
    }
    fuser = fusion_projector_class(config.fusion_type)
    layers.update({name: getattr(config, name) for name in fuser.layer_config_fields})
    strategy.update({name: getattr(config, name) for name in fuser.strategy_config_fields})
    if config.internal_fusion_type is not None:
        layers["internal_feature_layers"] = config.internal_feature_layers
        layers["internal_layer_map"] = config.internal_layer_map
        wrapper = internal_fusion_layer_class(config.internal_fusion_type)
        strategy.update({name: getattr(config, name) for name in wrapper.strategy_config_fields})

    files, stored_dtypes = [], Counter()
    for weights in sorted(Path(directory).glob("*.safetensors")):
        files.append({"name": weights.name, "size": weights.stat().st_size})
        for _, dtype in _safetensors_metadata(weights).values():
            stored_dtypes[dtype] += 1
    index_path = directory / "model.safetensors.index.json"
    if not files and index_path.is_file():
        files = [
            {"name": name, "size": None}
            for name in sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
        ]

    vision, text = config.vision_config, config.text_config
    return {
        "kind": "converted",
        "path": str(path),
        "family": report.get("family") or merge.get("family"),
        "merge": merge or None,
        "strategy": strategy,
        "layers": layers,
        "vision_tower": {
            "model_type": vision.model_type,
            "num_hidden_layers": vision.num_hidden_layers,
            "hidden_size": vision.hidden_size,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "image_tokens": config.image_seq_length,
        },
        "language_model": {
            "model_type": text.model_type,
            "num_hidden_layers": text.num_hidden_layers,
            "hidden_size": text.hidden_size,
            "vocab_size": text.vocab_size,
        },
        "parameters": parameters,
        "total_parameters": sum(parameters.values()),
        "lm_head_tied": bool(config.tie_word_embeddings),
        "dtype": str(config.dtype).replace("torch.", "") if config.dtype is not None else None,
        "stored_dtypes": dict(stored_dtypes),
        "files": files,
        "family_settings": report.get("settings", {}),
        "conversion": {
            key: report[key] for key in ("source_format", "converter_version", "date", "verified") if key in report
        },
        "parity": report.get("parity"),
    }


# --------------------------------------------------------------------------------------------------------------
# Original checkpoints
# --------------------------------------------------------------------------------------------------------------


def _original_tensors(directory: Path) -> tuple[str, list[Path], dict[str, tuple[list[int], str]]]:
    """Format, weight files and `{key: (shape, dtype)}` of an original checkpoint directory.

    A full checkpoint is read like the converters read it; a pretraining-stage directory (no language model, only
    `*.bin` module files such as `mm_projector.bin`) is read file by file.
    """
    from llava_multilayer.conversion.reading import CheckpointReader, ConversionError

    try:
        reader = CheckpointReader(directory)
    except ConversionError:
        stage_files = sorted(path for path in directory.glob("*.bin") if path.name != "training_args.bin")
        if not stage_files:
            raise
        tensors = {}
        for path in stage_files:
            tensors.update(_torch_file_metadata(path))
        return PRETRAIN_FORMAT, stage_files, tensors
    tensors = {}
    for path in reader.files:
        tensors.update(_safetensors_metadata(path) if reader.format == "safetensors" else _torch_file_metadata(path))
    return reader.format, list(reader.files), tensors


def describe_original(path: str | Path) -> dict:
    """What `llava-multilayer convert` would do with an original checkpoint directory; weights are not loaded
    (safetensors headers only)."""
    from transformers import AutoConfig

    from llava_multilayer.conversion.reading import load_original_config

    from .convert import FAMILY_MODULES, family_of_directory

    directory = Path(path)
    original = load_original_config(directory)
    family = family_of_directory(directory)
    source_format, files, tensors = _original_tensors(directory)

    groups: dict[str, dict] = {name: {"tensors": 0, "parameters": 0} for name, _ in ORIGINAL_COMPONENTS}
    other_prefixes = Counter()
    dtypes = Counter()
    for key, (shape, dtype) in tensors.items():
        component = _component(key, ORIGINAL_COMPONENTS)
        group = groups.setdefault(component, {"tensors": 0, "parameters": 0})
        group["tensors"] += 1
        numel = 1
        for size in shape:
            numel *= size
        group["parameters"] += numel
        dtypes[dtype] += 1
        if component == "other":
            other_prefixes[".".join(key.split(".")[:2])] += 1

    llama_keys = set(AutoConfig.for_model("llama").to_dict())
    settings = {
        key: value for key, value in sorted(original.items()) if key not in llama_keys and key not in _NOT_SETTINGS
    }
    needs = []
    for key, flag in EXTERNAL_COMPONENTS.items():
        name = original.get(key)
        if name and not Path(name).is_dir():
            needs.append(f"{flag}: the config names {name!r}, which is not a local directory here")
    return {
        "kind": "original",
        "path": str(directory),
        "family": family,
        "converter": FAMILY_MODULES[family],
        "model_type": original.get("model_type"),
        "base_model": original.get("_name_or_path"),
        "settings": settings,
        "language_model": {key: original.get(key) for key in ("hidden_size", "num_hidden_layers", "vocab_size")},
        "tensor_groups": groups,
        "other_key_prefixes": dict(other_prefixes),
        "num_tensors": len(tensors),
        "config_dtype": original.get("torch_dtype"),
        "stored_dtypes": dict(dtypes),
        "format": source_format,
        "stage": "pretrain" if source_format == PRETRAIN_FORMAT else "finetune",
        "files": [{"name": file.name, "size": file.stat().st_size} for file in files],
        "needs": needs,
    }


def check_path(path: str) -> None:
    """Refuses a `path` that is neither a checkpoint directory nor a Hub repo id (cheap: reads no model)."""
    if (Path(path) / "config.json").is_file():
        return
    if Path(path).exists():
        raise CommandError.of(
            "PATH",
            "a converted or original checkpoint directory (with config.json)",
            f"{path}, which has no config.json",
            "pass the --output-dir of `llava-multilayer convert`, or the directory the original training wrote.",
        )
    if not is_repo_id(path):
        raise CommandError.of(
            "PATH",
            "a converted or original checkpoint directory, or a Hub repo id",
            f"{path}, which does not exist",
            "check the path, e.g. `llava-multilayer inspect CONVERTED_DIR`.",
        )


def describe(path: str) -> dict:
    """[`describe_converted`] or [`describe_original`], whichever `path` is."""
    check_path(path)
    config_path = Path(path) / "config.json"
    if config_path.is_file():
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
        return describe_converted(path) if model_type == "llava_multilayer" else describe_original(path)
    return describe_converted(path)


# --------------------------------------------------------------------------------------------------------------
# Text output
# --------------------------------------------------------------------------------------------------------------


def _table(rows: list[tuple[str, str]], indent: str = "  ") -> list[str]:
    width = max(len(label) for label, _ in rows)
    return [f"{indent}{label:<{width}}  {value}" for label, value in rows]


def format_converted(info: dict) -> str:
    strategy = ", ".join(f"{key}={value}" for key, value in info["strategy"].items())
    vision, text = info["vision_tower"], info["language_model"]
    files = ", ".join(
        f"{file['name']} ({_format_size(file['size'])})" if file["size"] is not None else file["name"]
        for file in info["files"]
    )
    stored = ", ".join(f"{dtype} x{count}" for dtype, count in info["stored_dtypes"].items())
    conversion = info["conversion"]
    lines = [f"Converted llava-multilayer checkpoint: {info['path']}"]
    lines += _table(
        [
            ("family", info["family"] or "not recorded (no conversion_report.json or merge_report.json)"),
            *(
                [("merged", f"adapter {info['merge']['adapter']} into {info['merge']['base_model']}")]
                if info.get("merge")
                else []
            ),
            ("strategy", strategy),
            *((f"layers: {key}", json.dumps(value)) for key, value in info["layers"].items()),
            (
                "vision tower",
                f"{vision['model_type']}, {vision['num_hidden_layers']} layers, hidden {vision['hidden_size']}, "
                f"{vision['image_size']}px / patch {vision['patch_size']} -> {vision['image_tokens']} image tokens",
            ),
            (
                "language model",
                f"{text['model_type']}, {text['num_hidden_layers']} layers, hidden {text['hidden_size']}, "
                f"vocab {text['vocab_size']}",
            ),
            ("dtype", f"{info['dtype']}" + (f" (stored tensors: {stored})" if stored else "")),
            ("files", files or "-"),
            *(
                [
                    (
                        "converted",
                        f"from {conversion.get('source_format')} by llava-multilayer "
                        f"{conversion.get('converter_version')} on {conversion.get('date')}",
                    )
                ]
                if conversion
                else []
            ),
        ]
    )
    if info["family_settings"]:
        lines.append("Family settings (recorded at conversion):")
        lines += _table([(key, json.dumps(value)) for key, value in info["family_settings"].items()])
    lines.append("Parameters:")
    rows = []
    for component, count in info["parameters"].items():
        if component == "lm_head" and info["lm_head_tied"]:
            rows.append((component, "tied to the input embeddings"))
        else:
            rows.append((component, f"{count:>15,}" if count else f"{'-':>15}"))
    rows.append(("total", f"{info['total_parameters']:>15,}"))
    lines += _table(rows)
    if info["parity"]:
        lines.append("Parity with the original implementation (recorded at conversion):")
        for prompt, numbers in info["parity"].items():
            lines.append(f"  {prompt}: " + ", ".join(f"{key}={value}" for key, value in numbers.items()))
    return "\n".join(lines)


def format_original(info: dict) -> str:
    files = ", ".join(f"{file['name']} ({_format_size(file['size'])})" for file in info["files"])
    stored = ", ".join(f"{dtype} x{count}" for dtype, count in info["stored_dtypes"].items())
    text = info["language_model"]
    lines = [f"Original checkpoint: {info['path']}"]
    lines += _table(
        [
            ("detected family", f"{info['family']} (converter: {info['converter']})"),
            ("model_type", str(info["model_type"])),
            ("base model", str(info["base_model"])),
            (
                "language model",
                f"{text['num_hidden_layers']} layers, hidden {text['hidden_size']}, vocab {text['vocab_size']}",
            ),
            ("dtype", f"config {info['config_dtype']}; stored tensors: {stored or '-'}"),
            ("format", info["format"]),
            ("files", f"{files} ({len(info['files'])} file(s), {info['num_tensors']} tensors)"),
        ]
    )
    lines.append("Fusion settings (config fields beyond LLaMA's):")
    lines += _table([(key, json.dumps(value)) for key, value in info["settings"].items()] or [("(none)", "")])
    lines.append("Tensors by group:")
    rows = [
        (
            group,
            f"{numbers['tensors']:>6} tensors {numbers['parameters']:>15,} parameters" if numbers["tensors"] else "-",
        )
        for group, numbers in info["tensor_groups"].items()
        if numbers["tensors"] or group != "other"
    ]
    lines += _table(rows)
    if info["other_key_prefixes"]:
        lines.append("  other key prefixes: " + ", ".join(f"{k} x{v}" for k, v in info["other_key_prefixes"].items()))
    lines.append("Conversion:")
    if info["stage"] == "pretrain":
        lines.append(
            f"  llava-multilayer convert --input-dir BASE_LANGUAGE_MODEL --pretrain-dir {info['path']} "
            "--output-dir OUTPUT_DIR"
        )
    else:
        lines.append(f"  llava-multilayer convert --input-dir {info['path']} --output-dir OUTPUT_DIR")
    for need in info["needs"]:
        lines.append(f"  needs {need} (or network access to the Hub)")
    return "\n".join(lines)


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path", help="Converted checkpoint (directory or Hub repo id) or original checkpoint directory."
    )
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of text.")


def run_inspect(args: argparse.Namespace) -> int:
    check_path(args.path)
    from llava_multilayer.conversion.reading import ConversionError

    from .convert import UnknownFamilyError

    try:
        info = describe(args.path)
    except (ConversionError, UnknownFamilyError) as error:
        raise CommandError(str(error)) from error
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_converted(info) if info["kind"] == "converted" else format_original(info))
    return 0


__all__ = ["add_inspect_arguments", "describe", "describe_converted", "describe_original", "run_inspect"]
