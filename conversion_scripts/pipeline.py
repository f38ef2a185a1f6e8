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
"""The conversion pipeline: strict key accounting and the atomic output directory.

[`run_conversion`] streams every `(reader, mapping)` source through its [`KeyMapping`] and guarantees that every
source tensor was converted or deliberately dropped (with the reason, listed in the model card), that every
parameter of the converted model was filled with the expected shape and a dtype of the right kind, and that the
output directory appears only when everything succeeded (`--verify` and the parity check included).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedConfig

import llava_multilayer
from llava_multilayer import LlavaMultiLayerConfig, LlavaMultiLayerForConditionalGeneration, LlavaMultiLayerProcessor
from llava_multilayer.compatibility_llava_multilayer import custom_object_save

from .checks import verify_checkpoint
from .key_rules import Drop, KeyMapping, describe_keys
from .model_card import write_model_card
from .output_dir import atomic_output_dir
from .reading import ConversionError
from .writing import CAST_DTYPES, DEFAULT_MAX_SHARD_SIZE, ShardedSafetensorsWriter


logger = logging.getLogger(__name__)


def describe_location(name_or_path: str | os.PathLike, flag: str, known_as: str | None = None) -> str:
    """How a component named by a hub id or a local path is recorded in files meant for the Hub (report, card):
    a hub id as it is; a local directory by its meaning, never by its absolute path.

    Args:
        name_or_path: The hub id or local directory that was used.
        flag: Where it was given (e.g. `"--vision-tower"` or `"the config's mm_vision_tower"`).
        known_as: The hub id the directory is a copy of, when known (e.g. the original config's `mm_vision_tower`).
    """
    name = str(name_or_path)
    if not Path(name).exists():
        return name
    if known_as and re.fullmatch(r"[\w.-]+/[\w.-]+", str(known_as)) and not Path(str(known_as)).exists():
        return f"given with {flag}, a local copy of {known_as}"
    return f"given with {flag}, a local directory named {Path(name).resolve().name!r}"


def public_file_name(path: str | os.PathLike) -> str:
    """`parent/name` of a local file: enough to tell sources apart, without the machine's absolute path."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


@dataclass
class ConversionReport:
    """What a conversion did; stored as `conversion_report.json` and used to fill the model card."""

    family: str
    source_dir: str
    source_format: str
    source_files: list[str]
    num_source_tensors: int
    num_target_tensors: int
    dtype: str
    settings: dict
    dropped: dict[str, str] = field(default_factory=dict)
    parity: dict | None = None
    verified: bool = False
    num_verified_tensors: int = 0
    base_model: list[str] = field(default_factory=list)
    license: str | None = None
    converter_version: str = llava_multilayer.__version__
    date: str = field(default_factory=lambda: datetime.date.today().isoformat())


def expected_target_tensors(config: LlavaMultiLayerConfig) -> dict[str, torch.Tensor]:
    """Every tensor the converted checkpoint must contain, as meta tensors (name -> shape and dtype)."""
    with torch.device("meta"):
        model = LlavaMultiLayerForConditionalGeneration(config)
    tied = set(model._tied_weights_keys or {}) if config.tie_word_embeddings else set()
    return {key: tensor for key, tensor in model.state_dict().items() if key not in tied}


def expected_target_shapes(config: LlavaMultiLayerConfig) -> dict[str, torch.Size]:
    """Names and shapes of every tensor the converted checkpoint must contain (model built on the meta device)."""
    return {key: tensor.shape for key, tensor in expected_target_tensors(config).items()}


def _check_output_dir_is_not_a_source(output_dir: Path, sources: list[tuple[object, KeyMapping]], source_dir) -> None:
    """Refuses an `output_dir` that is, or contains, a source: replacing it would delete the checkpoint."""
    output = output_dir.resolve()
    paths = [Path(source_dir)] if source_dir and Path(source_dir).exists() else []
    for reader, _ in sources:
        paths += [Path(path) for path in reader.files]
        if getattr(reader, "input_dir", None) is not None:
            paths.append(reader.input_dir)
    for path in paths:
        resolved = path.resolve()
        if resolved == output or output in resolved.parents:
            raise ConversionError(
                f"--output-dir {output_dir} contains the source {path}: writing there would replace the checkpoint "
                "being converted. Choose another --output-dir."
            )


def run_conversion(
    *,
    family: str,
    config: LlavaMultiLayerConfig,
    sources: list[tuple[object, KeyMapping]],
    output_dir: str | os.PathLike,
    processor: LlavaMultiLayerProcessor,
    generation_config: GenerationConfig,
    dtype: str | None = None,
    overwrite: bool = False,
    verify: bool = False,
    parity_check: Callable[[Path], dict] | None = None,
    settings: dict | None = None,
    base_model: list[str] | None = None,
    license: str | None = None,
    source_dir: str | os.PathLike = "",
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> ConversionReport:
    """Converts `sources` into a Hub-format directory at `output_dir`, atomically.

    Args:
        sources: `(reader, mapping)` pairs; `mapping(key)` returns the target key, a [`Drop`] with the reason, or
            `None` for a key it does not know (an error: no source tensor is silently ignored).
        dtype: `"float32"`, `"bfloat16"`, `"float16"`, or `None` to keep each tensor's dtype.
        parity_check: called with the written (temporary) directory; returns measured numbers for the report/card.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise ConversionError(f"--output-dir {output_dir} exists and is not empty; pass --overwrite to replace it.")
    if dtype is not None and dtype not in CAST_DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(CAST_DTYPES)}, got {dtype!r}.")
    _check_output_dir_is_not_a_source(output_dir, sources, source_dir)
    expected = expected_target_tensors(config)
    with atomic_output_dir(output_dir) as staging:
        report = _write_checkpoint(
            family, config, sources, staging, expected, processor, generation_config, dtype, max_shard_size, progress
        )
        report.source_dir = _public_source_dir(str(source_dir))
        report.settings = {key: _public_setting(value) for key, value in (settings or {}).items()}
        report.base_model = base_model or []
        report.license = license
        if verify:
            report.num_verified_tensors = verify_checkpoint(staging, sources, dtype)
            report.verified = True
        if parity_check is not None:
            report.parity = parity_check(staging)
        (staging / "conversion_report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
        write_model_card(staging, report)
    return report


def _public_source_dir(source_dir: str) -> str:
    """`source_dir` ("INPUT" or "BASE + PRETRAIN") as recorded in the report and card: without local paths."""
    parts = source_dir.split(" + ") if source_dir else []
    flags = ["--input-dir"] if len(parts) == 1 else ["--input-dir", "--pretrain-dir"]
    return " + ".join(describe_location(part, flag) for part, flag in zip(parts, flags))


def _public_setting(value):
    """A setting as recorded for the Hub: a string naming a local path is replaced by its description."""
    if isinstance(value, str) and value and (Path(value).is_absolute() or Path(value).exists()):
        return describe_location(value, "a local path")
    return value


def _public_name_or_path(config: PreTrainedConfig) -> None:
    """Clears the `_name_or_path` of `config` and its sub-configs where it is a local path (the vision tower's and
    instruction encoder's are the directories they were read from): `config.json` travels to the Hub."""
    for sub_config in [config, *(getattr(config, key, None) for key in getattr(config, "sub_configs", {}))]:
        name = getattr(sub_config, "_name_or_path", "") if sub_config is not None else ""
        if name and (Path(name).is_absolute() or Path(name).exists()):
            sub_config._name_or_path = ""


def _write_checkpoint(
    family, config, sources, staging, expected, processor, generation_config, dtype, max_shard_size, progress
) -> ConversionReport:
    writer = ShardedSafetensorsWriter(staging, max_shard_size)
    written: dict[str, str] = {}
    dropped: dict[str, str] = {}
    unknown: list[str] = []
    unexpected: list[str] = []
    num_source = 0
    written_dtypes: set[torch.dtype] = set()
    source_formats, source_files = [], []
    target_dtype = CAST_DTYPES.get(dtype) if dtype else None
    for reader, mapping in sources:
        source_formats.append(reader.format)
        source_files.extend(public_file_name(path) for path in reader.files)
        for key, tensor in reader.iter_tensors(progress=progress):
            num_source += 1
            target = mapping(key)
            if target is None:
                unknown.append(key)
                continue
            if isinstance(target, Drop):
                dropped[key] = target.reason
                continue
            if target not in expected:
                unexpected.append(f"{key} -> {target}")
                continue
            if target in written:
                raise ConversionError(f"Source keys {written[target]!r} and {key!r} both map to {target!r}.")
            if tensor.shape != expected[target].shape:
                raise ConversionError(
                    f"Source tensor {key!r} has shape {tuple(tensor.shape)}, but {target!r} needs "
                    f"{tuple(expected[target].shape)}: the checkpoint does not match its config."
                )
            tensor = _cast_checked(key, tensor, target, expected[target].dtype, target_dtype)
            if tensor.is_floating_point():
                written_dtypes.add(tensor.dtype)
            writer.add(target, tensor)
            written[target] = key
    if unknown:
        raise ConversionError(f"{len(unknown)} source tensor(s) have no known target: {describe_keys(unknown)}.")
    if unexpected:
        raise ConversionError(f"Source tensors map to names the model does not have: {describe_keys(unexpected)}.")
    missing = set(expected) - set(written)
    if missing:
        raise ConversionError(
            f"{len(missing)} parameter(s) of the converted model would be left uninitialised (no source tensor): "
            f"{describe_keys(missing)}."
        )
    writer.finish()

    if dtype is None and len(written_dtypes) > 1:
        logger.warning(
            "The sources hold %s tensors, so the converted checkpoint mixes dtypes (loaded as %s); pass --dtype to "
            "cast everything to one.",
            sorted(str(written).removeprefix("torch.") for written in written_dtypes),
            str(_lossless_dtype(written_dtypes)).removeprefix("torch."),
        )
    config.dtype = dtype or str(_lossless_dtype(written_dtypes)).replace("torch.", "")
    _public_name_or_path(config)
    config.architectures = [LlavaMultiLayerForConditionalGeneration.__name__]
    with torch.device("meta"):
        model = LlavaMultiLayerForConditionalGeneration(config)
    model.config.auto_map = {
        "AutoConfig": "configuration_llava_multilayer.LlavaMultiLayerConfig",
        "AutoModel": "modeling_llava_multilayer.LlavaMultiLayerModel",
    }
    custom_object_save(model, staging, config=model.config)
    model.config.save_pretrained(staging)
    generation_config.save_pretrained(staging)
    processor.save_pretrained(staging)
    return ConversionReport(
        family=family,
        source_dir="",
        source_format="+".join(sorted(set(source_formats))),
        source_files=source_files,
        num_source_tensors=num_source,
        num_target_tensors=len(written),
        dtype=str(config.dtype),
        settings={},
        dropped=dropped,
    )


def _cast_checked(
    key: str, tensor: torch.Tensor, target: str, expected_dtype: torch.dtype, target_dtype: torch.dtype | None
) -> torch.Tensor:
    """Checks that `tensor` has the kind of dtype `target` needs and casts it to `target_dtype` (floating tensors,
    when given) without turning finite values into infinities."""
    if tensor.is_floating_point() != expected_dtype.is_floating_point or (
        not expected_dtype.is_floating_point and tensor.dtype != expected_dtype
    ):
        raise ConversionError(
            f"Source tensor {key!r} has dtype {tensor.dtype}, but {target!r} is a {expected_dtype} parameter: the "
            "checkpoint is corrupt or was not written by the original training code."
        )
    if target_dtype is None or not tensor.is_floating_point() or tensor.dtype == target_dtype:
        return tensor
    cast = tensor.to(target_dtype)
    overflow = torch.isfinite(tensor) & ~torch.isfinite(cast)
    if overflow.any():
        raise ConversionError(
            f"Source tensor {key!r} holds {int(overflow.sum())} finite value(s) (largest magnitude "
            f"{float(tensor[overflow].abs().max()):.4g}) that overflow to infinity in {target_dtype}: choose another "
            "--dtype (bfloat16 keeps float32's range) or keep the source dtype."
        )
    return cast


def _lossless_dtype(dtypes: set[torch.dtype]) -> torch.dtype:
    """The dtype every one of `dtypes` converts to exactly: the shared one, else float32 (float64 if present)."""
    if len(dtypes) == 1:
        return next(iter(dtypes))
    return torch.float64 if torch.float64 in dtypes else torch.float32
