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
"""Shared machinery of the converters: reading original checkpoints, strict key accounting, streaming sharded
safetensors output, tokenizer/processor set-up and atomic output directories.

A family converter (`convert_<family>_to_hf.py`) only states what is specific to its family: how to read the
original config into a [`LlavaMultiLayerConfig`], and how each original key maps to a target key (or is dropped
for a stated reason). [`run_conversion`] then guarantees that every source tensor was consumed or deliberately
dropped, every target parameter was filled with the expected shape, and the output directory appears only when
everything succeeded.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import pickle
import re
import shutil
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    LlavaImageProcessorPil,
    PreTrainedConfig,
)

import llava_multilayer
from llava_multilayer import (
    LlavaMultiLayerConfig,
    LlavaMultiLayerForConditionalGeneration,
    LlavaMultiLayerProcessor,
    add_image_token,
)
from llava_multilayer.compatibility_llava_multilayer import custom_object_save

from .model_card import MODEL_ID_PLACEHOLDER, write_model_card
from .output_dir import atomic_output_dir


logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ORIGINAL_VISION_TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3


class ConversionError(ValueError):
    """A checkpoint cannot be converted faithfully; the message says which file, key or setting is at fault."""


@dataclass(frozen=True)
class Drop:
    """Marks a source key that is deliberately not converted, with the reason (listed in the model card)."""

    reason: str


KeyMapping = Callable[[str], "str | Drop | None"]


# --------------------------------------------------------------------------------------------------------------
# Reading original checkpoints
# --------------------------------------------------------------------------------------------------------------


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_reject_duplicate_keys(path))
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from error


def _reject_duplicate_keys(path: Path):
    def hook(pairs):
        keys = [key for key, _ in pairs]
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        if duplicates:
            raise ConversionError(f"{path} lists {duplicates[:5]} more than once.")
        return dict(pairs)

    return hook


def load_original_config(input_dir: str | os.PathLike) -> dict:
    """Reads `config.json` of an original checkpoint directory."""
    path = Path(input_dir) / "config.json"
    if not Path(input_dir).exists():
        raise ConversionError(f"{input_dir} does not exist: pass the directory the original training wrote.")
    if not path.is_file():
        raise ConversionError(f"{input_dir} has no config.json: pass the directory the original training wrote.")
    config = _load_json(path)
    if not isinstance(config, dict):
        raise ConversionError(f"{path} must hold a JSON object, got {type(config).__name__}.")
    return config


@lru_cache(maxsize=None)
def _check_zip_records(path: Path, size: int, mtime_ns: int) -> None:
    """Checks the CRC-32 of every record of a zip-format `torch.save` file (`torch.load` does not), once per file
    version: a flipped byte in the tensor data would otherwise load silently."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ConversionError(f"Could not read {path} (truncated or corrupt?): {error}") from error
    if bad is not None:
        raise ConversionError(f"{path} is corrupt: the checksum of its record {bad!r} does not match its data.")


def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """Loads a `torch.save` file with `weights_only=True` (never executes pickled code), memory-mapped if possible.

    The checksums of a zip-format file are verified first."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        stat = path.stat()
        _check_zip_records(path.resolve(), stat.st_size, stat.st_mtime_ns)
    try:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConversionError(
            f"{path} contains pickled objects other than tensors; refusing to load it, since unpickling could run "
            f"arbitrary code. Re-save it as plain tensors (or safetensors). Details: {error}"
        ) from error
    except Exception as error:
        raise ConversionError(f"Could not read {path} (truncated or corrupt?): {error}") from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ConversionError(f"{path} does not hold a flat dict of tensors.")
    return state_dict


class CheckpointReader:
    """The tensors of an original checkpoint: single or sharded safetensors, or `pytorch_model*.bin`.

    The shard index (if any) is checked against the files: a shard it names must exist, every weight file in the
    directory must be named by it, and every tensor must live in exactly the shard the index says.
    """

    def __init__(self, input_dir: str | os.PathLike):
        self.input_dir = Path(input_dir)
        if not self.input_dir.is_dir():
            raise ConversionError(f"--input-dir {input_dir} is not a directory.")
        self.format, self.files, index = self._discover()
        self._key_to_file: dict[str, Path] = {}
        for path in self.files:
            for key in self._file_keys(path):
                if key in self._key_to_file:
                    raise ConversionError(f"Tensor {key!r} is stored twice: in {self._key_to_file[key].name} and {path.name}.")
                self._key_to_file[key] = path
        if index is not None:
            for key, filename in index.items():
                actual = self._key_to_file.get(key)
                if actual is None:
                    raise ConversionError(f"The shard index lists {key!r} in {filename}, but no shard contains it.")
                if actual.name != filename:
                    raise ConversionError(f"The shard index lists {key!r} in {filename}, but it is in {actual.name}.")
            unlisted = sorted(set(self._key_to_file) - set(index))
            if unlisted:
                raise ConversionError(f"Tensors missing from the shard index: {unlisted[:10]} ({len(unlisted)} in all).")

    def _discover(self) -> tuple[str, list[Path], dict[str, str] | None]:
        for fmt, single, pattern in (
            ("safetensors", "model.safetensors", r"model-\d+-of-\d+\.safetensors"),
            ("bin", "pytorch_model.bin", r"pytorch_model-\d+-of-\d+\.bin"),
        ):
            index_path = self.input_dir / f"{single}.index.json"
            shards = sorted(p for p in self.input_dir.iterdir() if re.fullmatch(pattern, p.name))
            if index_path.is_file():
                if (self.input_dir / single).is_file():
                    raise ConversionError(
                        f"{self.input_dir} holds both {single} and {index_path.name}: it is ambiguous which weights are "
                        "current. Remove the stale one."
                    )
                index = _load_json(index_path)
                weight_map = index.get("weight_map") if isinstance(index, dict) else None
                if not isinstance(weight_map, dict) or not weight_map:
                    raise ConversionError(f"{index_path} has no `weight_map`.")
                bad = [
                    f"{key!r}: {name!r}"
                    for key, name in weight_map.items()
                    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..")
                ]
                if bad:
                    raise ConversionError(
                        f"{index_path} must map tensor names to shard file names in the same directory, got "
                        f"{', '.join(bad[:5])}."
                    )
                named = sorted(set(weight_map.values()))
                missing = [name for name in named if not (self.input_dir / name).is_file()]
                if missing:
                    raise ConversionError(f"{index_path.name} names shard(s) that do not exist: {missing}.")
                extra = sorted({p.name for p in shards} - set(named))
                if extra:
                    raise ConversionError(f"Shard file(s) {extra} are not named by {index_path.name}.")
                return fmt, [self.input_dir / name for name in named], weight_map
            if (self.input_dir / single).is_file():
                if shards:
                    raise ConversionError(
                        f"{self.input_dir} holds both {single} and the shards {[p.name for p in shards]} (without "
                        f"{index_path.name}): it is ambiguous which weights are current. Remove the stale ones."
                    )
                return fmt, [self.input_dir / single], None
            if shards:
                raise ConversionError(f"Found shards {[p.name for p in shards]} but no {index_path.name}.")
        raise ConversionError(
            f"No weights found in {self.input_dir}: expected model.safetensors, model-*-of-*.safetensors + index, "
            "pytorch_model.bin or pytorch_model-*-of-*.bin + index."
        )

    def _file_keys(self, path: Path) -> list[str]:
        if self.format == "safetensors":
            try:
                with safe_open(path, framework="pt") as handle:
                    return list(handle.keys())
            except (SafetensorError, OSError) as error:
                raise ConversionError(f"Could not read {path} (truncated or corrupt safetensors?): {error}") from error
        return list(load_torch_file(path))

    def keys(self) -> list[str]:
        return list(self._key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self._key_to_file

    def get_tensor(self, key: str) -> torch.Tensor:
        path = self._key_to_file[key]
        if self.format == "safetensors":
            with safe_open(path, framework="pt") as handle:
                return handle.get_tensor(key)
        return load_torch_file(path)[key]

    def iter_tensors(self, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields `(key, tensor)` shard by shard.

        A safetensors tensor is memory-mapped, and the file is opened anew for each tensor: its pages are released
        as soon as the caller drops it, so streaming a checkpoint keeps about one tensor resident, not a shard.
        """
        for path in tqdm(self.files, desc="Converting shards", unit="shard", disable=not progress or len(self.files) < 2):
            if self.format == "safetensors":
                try:
                    with safe_open(path, framework="pt") as handle:
                        keys = list(handle.keys())
                    for key in keys:
                        with safe_open(path, framework="pt") as handle:
                            tensor = handle.get_tensor(key)
                        yield key, tensor
                        del tensor
                except SafetensorError as error:
                    raise ConversionError(f"Could not read {path}: {error}") from error
            else:
                yield from load_torch_file(path).items()


class TensorDictReader:
    """A [`CheckpointReader`]-like view of an in-memory dict (pretrain-stage `*.bin` files, extra weights)."""

    def __init__(self, tensors: dict[str, torch.Tensor], description: str):
        self.tensors = tensors
        self.description = description
        self.format = "bin"
        self.files = []

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def iter_tensors(self, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.tensors.items()


# --------------------------------------------------------------------------------------------------------------
# Vision tower, tokenizer, processor
# --------------------------------------------------------------------------------------------------------------


def resolve_local_dir(name_or_path: str | None, what: str, flag: str) -> Path:
    """A local directory for a component the original config names by hub id or path; downloads from the Hub
    unless `HF_HUB_OFFLINE=1`."""
    if not name_or_path:
        raise ConversionError(f"No {what} given: pass {flag}.")
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path))
    except Exception as error:
        raise ConversionError(
            f"The {what} {name_or_path!r} is neither a local directory nor downloadable here ({type(error).__name__}). "
            f"Pass {flag} with a local copy."
        ) from error


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


def load_vision_config(vision_tower_dir: Path) -> PreTrainedConfig:
    """The vision config of a tower directory (a full CLIP/SigLIP config contributes its `vision_config`)."""
    try:
        config = AutoConfig.from_pretrained(vision_tower_dir)
    except Exception as error:
        raise ConversionError(f"Could not read the vision tower config of {vision_tower_dir}: {error}") from error
    return getattr(config, "vision_config", None) or config


def vision_tower_reader(vision_tower_dir: Path) -> CheckpointReader:
    return CheckpointReader(vision_tower_dir)


def strip_vision_prefix(key: str, prefix: str) -> str | None:
    """`<prefix>vision_model.x` or `<prefix>x` -> `model.vision_tower.x` (transformers 5.x tower keys); else None."""
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix) :]
    if rest.startswith("vision_model."):
        rest = rest[len("vision_model.") :]
    return "model.vision_tower." + rest


@contextlib.contextmanager
def quiet_original_config() -> Iterator[None]:
    """Silences the two warnings transformers prints for every original checkpoint, which are expected here:
    `AutoTokenizer` reads the original `config.json` with the base config class, which warns "You are using a model
    of type `llava_llama` to instantiate a model of type ``" (the original model types are not transformers ones),
    and sets its `rope_scaling: null`, which transformers 5 deprecates with a FutureWarning. Neither affects the
    tokenizer, the only thing read there."""
    config_logger = logging.getLogger("transformers.configuration_utils")
    level = config_logger.level
    config_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`rope_scaling` is deprecated", category=FutureWarning)
            yield
    finally:
        config_logger.setLevel(level)


def load_tokenizer_with_image_token(tokenizer_dir: Path):
    """The original (LLaMA SentencePiece) tokenizer as a fast tokenizer, plus the `<image>` token.

    The image token gets the next free id (= the original vocabulary size when no tokens were added), which lies
    outside the language model's vocabulary: the original logits are unchanged and it can never be generated.
    """
    try:
        with quiet_original_config():
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as error:
        raise ConversionError(
            f"Could not load the tokenizer of {tokenizer_dir}: {error}. Reading a SentencePiece tokenizer.model "
            "needs `pip install sentencepiece protobuf`."
        ) from error
    tokenizer = add_image_token(tokenizer, IMAGE_TOKEN)
    return tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def build_image_processor(vision_tower_dir: Path, pad_to_square: bool) -> LlavaImageProcessorPil:
    """LLaVA's image processor with the tower's size and normalisation; `pad_to_square` pads with the mean colour
    (the originals' `image_aspect_ratio="pad"`)."""
    path = vision_tower_dir / "preprocessor_config.json"
    if not path.is_file():
        raise ConversionError(f"{vision_tower_dir} has no preprocessor_config.json (the tower's image processor).")
    settings = _load_json(path)
    missing = [key for key in ("size", "image_mean", "image_std") if key not in settings]
    if missing:
        raise ConversionError(f"{path} lacks {missing}: the converted processor cannot reproduce the preprocessing.")
    crop_size = settings.get("crop_size")
    do_center_crop = settings.get("do_center_crop", crop_size is not None)
    kwargs = {
        "size": settings["size"],
        "do_center_crop": do_center_crop,
        "image_mean": settings["image_mean"],
        "image_std": settings["image_std"],
        "resample": settings.get("resample", 3),
        "rescale_factor": settings.get("rescale_factor", 1 / 255),
        "do_pad": pad_to_square,
    }
    if do_center_crop:
        kwargs["crop_size"] = crop_size
    return LlavaImageProcessorPil(**kwargs)


def build_processor(config: LlavaMultiLayerConfig, tokenizer, image_processor, **kwargs) -> LlavaMultiLayerProcessor:
    """The processor matching `config` (patch size, CLS token, selection strategy)."""
    vision_config = config.vision_config
    has_cls = vision_config.model_type == "clip_vision_model"
    processor_class = kwargs.pop("processor_class", LlavaMultiLayerProcessor)
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if has_cls else 0,
        image_token=IMAGE_TOKEN,
        **kwargs,
    )


def num_image_tokens(vision_config: PreTrainedConfig, select_strategy: str) -> int:
    """Visual tokens per image: the patch grid, plus CLIP's CLS, minus the first token with strategy "default"."""
    count = (vision_config.image_size // vision_config.patch_size) ** 2
    count += 1 if vision_config.model_type == "clip_vision_model" else 0
    return count - 1 if select_strategy == "default" else count


def text_config_from_original(original: dict) -> dict:
    """The LLaMA config embedded in an original LLaVA-style config.json (its non-`mm_*` LLaMA fields)."""
    text_keys = set(AutoConfig.for_model("llama").to_dict()) | {"rope_scaling", "rope_theta", "pretraining_tp"}
    text = {key: value for key, value in original.items() if key in text_keys}
    for key in ("architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype", "auto_map"):
        text.pop(key, None)
    text["model_type"] = "llama"
    return text


def generation_config_from_original(input_dir: Path, image_token_id: int) -> GenerationConfig:
    path = input_dir / "generation_config.json"
    settings = _load_json(path) if path.is_file() else {}
    settings = {k: v for k, v in settings.items() if not k.startswith("_") and k not in ("transformers_version", "attn_implementation")}
    try:
        return GenerationConfig(**settings)
    except (ValueError, TypeError) as error:
        raise ConversionError(f"{path} does not hold a valid generation config: {error}") from error


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


class ShardedSafetensorsWriter:
    """Writes tensors to `model-0000k-of-0000n.safetensors` shards as they arrive, starting a new shard at
    `max_shard_size`.

    Each tensor's bytes go to the open shard file at once, behind room reserved for the safetensors header, which is
    written (padded with spaces, as the format allows) when the shard is complete. Memory therefore holds the tensor
    being written, never a shard. A header that outgrows the reserved room (more than ~1000 tensors in one shard) is
    handled by rewriting that shard with a larger header.
    """

    header_room = 128 * 1024

    def __init__(self, directory: Path, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE):
        self.directory = directory
        self.max_shard_size = max_shard_size
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_size = 0
        self._file = None
        self._entries: dict[str, dict] = {}
        self._data_size = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ConversionError(f"Tensor {key!r} has dtype {tensor.dtype}, which safetensors cannot store.")
        size = tensor.numel() * tensor.element_size()
        if self._entries and self._data_size + size > self.max_shard_size:
            self._flush()
        if self._file is None:
            self._open_shard()
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._entries[key] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._data_size, self._data_size + size],
        }
        self._data_size += size
        self.total_size += size

    def _open_shard(self) -> None:
        self._path = self.directory / f"shard-{len(self.shards):05d}.tmp"
        self._file = open(self._path, "wb")
        self._file.seek(8 + self.header_room)

    def _flush(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        if len(header) <= self.header_room:
            header = header.ljust(self.header_room)
            self._file.seek(0)
            self._file.write(len(header).to_bytes(8, "little") + header)
            self._file.close()
        else:
            self._file.close()
            self._rewrite_with_header(header)
        self.shards.append((self._path, list(self._entries)))
        self._file, self._entries, self._data_size = None, {}, 0

    def _rewrite_with_header(self, header: bytes) -> None:
        header = header.ljust(-(-len(header) // 8) * 8)  # keep the data 8-byte aligned
        rewritten = self._path.with_suffix(".rewrite")
        with open(self._path, "rb") as source, open(rewritten, "wb") as target:
            target.write(len(header).to_bytes(8, "little") + header)
            source.seek(8 + self.header_room)
            shutil.copyfileobj(source, target, 64 * 1024 * 1024)
        rewritten.replace(self._path)

    def finish(self) -> None:
        if self._file is None and not self.shards:
            self._open_shard()
        if self._file is not None:
            self._flush()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.directory / "model.safetensors")
            return
        weight_map = {}
        count = len(self.shards)
        for number, (path, keys) in enumerate(self.shards, start=1):
            name = f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(self.directory / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


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


def _describe(keys, limit: int = 15) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


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
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
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
    target_dtype = DTYPES.get(dtype) if dtype else None
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
        raise ConversionError(f"{len(unknown)} source tensor(s) have no known target: {_describe(unknown)}.")
    if unexpected:
        raise ConversionError(f"Source tensors map to names the model does not have: {_describe(unexpected)}.")
    missing = set(expected) - set(written)
    if missing:
        raise ConversionError(
            f"{len(missing)} parameter(s) of the converted model would be left uninitialised (no source tensor): "
            f"{_describe(missing)}."
        )
    writer.finish()

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


def verify_checkpoint(directory: Path, sources: list[tuple[object, KeyMapping]], dtype: str | None) -> int:
    """Reloads the written checkpoint with `from_pretrained` and checks every tensor against its source; returns
    the number of tensors compared.

    The reload must report no missing, unexpected or mismatched keys; each reloaded tensor must equal its source
    (cast to `dtype` when given), and each stored tensor must have the source dtype (or `dtype`).
    """
    from transformers.utils import logging as transformers_logging

    progress = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # the reload is a step of the conversion, not a load to watch
    try:
        model, loading_info = LlavaMultiLayerForConditionalGeneration.from_pretrained(
            directory, dtype="auto", output_loading_info=True
        )
    finally:
        if progress:
            transformers_logging.enable_progress_bar()
    problems = {name: sorted(loading_info.get(name) or []) for name in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {name: keys for name, keys in problems.items() if keys}
    if problems:
        raise ConversionError(f"--verify: reloading {directory} reports {problems}.")
    stored_dtypes = _stored_dtypes(directory)
    state = model.state_dict()
    target_dtype = DTYPES.get(dtype) if dtype else None
    mismatched, compared = [], 0
    for reader, mapping in sources:
        for key in reader.keys():
            target = mapping(key)
            if not isinstance(target, str):
                continue
            compared += 1
            source = reader.get_tensor(key)
            if target_dtype is not None and source.is_floating_point():
                source = source.to(target_dtype)
            if (
                target not in state
                or stored_dtypes.get(target) != source.dtype
                or state[target].shape != source.shape
                or not torch.equal(state[target], source.to(state[target].dtype))
            ):
                mismatched.append(target)
    if mismatched:
        raise ConversionError(f"--verify: reloaded tensors differ from the source: {_describe(mismatched)}.")
    return compared


def _stored_dtypes(directory: Path) -> dict[str, torch.dtype]:
    """The dtype of every tensor in the safetensors file(s) of a written checkpoint."""
    dtypes = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                dtypes[key] = handle.get_slice(key).get_dtype()
    return {key: getattr(torch, _SAFETENSORS_DTYPES.get(name, name.lower())) for key, name in dtypes.items()}


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def fixture_parity_check(fixture_dir: str | os.PathLike) -> Callable[[Path], dict]:
    """A `parity_check` for [`run_conversion`] against golden data produced by the original code.

    The fixture holds `image.png`, `prompt.json` (`prompt`, and `instruction` for instruction-guided models; `_2`
    suffixed keys for a second prompt), `inputs.safetensors` and `expected.safetensors` (`logits`,
    `image_features`, `generated_ids` = `[bos] + new tokens`, optionally `fusion_weights`). Returns the measured
    maximum absolute differences (float32 forward) and whether the greedy tokens are identical.
    """
    from PIL import Image
    from safetensors.torch import load_file

    fixture_dir = Path(fixture_dir)

    def check(model_dir: Path) -> dict:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model_dir)
        model = LlavaMultiLayerForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        prompts = _load_json(fixture_dir / "prompt.json")
        inputs = load_file(fixture_dir / "inputs.safetensors")
        expected = load_file(fixture_dir / "expected.safetensors")
        image = Image.open(fixture_dir / "image.png").convert("RGB")
        results = {}
        for suffix in ("", "_2"):
            if "prompt" + suffix not in prompts:
                continue
            extra = {"instructions": [prompts["instruction" + suffix]]} if "instruction" + suffix in prompts else {}
            batch = processor(images=image, text=prompts["prompt" + suffix], return_tensors="pt", **extra)
            original_ids = inputs["input_ids" + suffix][0]
            expanded = []
            for token in original_ids.tolist():
                expanded += [model.config.image_token_id] * model.config.image_seq_length if token == -200 else [token]
            with torch.no_grad():
                output = model(**batch)
                generated = model.generate(**batch, max_new_tokens=expected["generated_ids" + suffix].shape[1] - 1, do_sample=False)
            vocab = expected["logits" + suffix].shape[-1]
            name = f"prompt{suffix or '_1'}"
            results[name] = {
                "pixel_values_max_abs_diff": float((batch["pixel_values"] - inputs["pixel_values"]).abs().max()),
                "input_ids_equal": batch["input_ids"][0].tolist() == expanded,
                "image_features_max_abs_diff": float(
                    (output.image_hidden_states - expected["image_features" + suffix]).abs().max()
                ),
                "logits_max_abs_diff": float((output.logits[..., :vocab] - expected["logits" + suffix]).abs().max()),
                "greedy_tokens_equal": generated[0, batch["input_ids"].shape[1] :].tolist()
                == expected["generated_ids" + suffix][0, 1:].tolist(),
            }
            if "fusion_weights" + suffix in expected:
                results[name]["fusion_weights_max_abs_diff"] = float(
                    (output.fusion_weights - expected["fusion_weights" + suffix]).abs().max()
                )
        return results

    return check


def push_to_hub(
    directory: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Uploads a converted directory to the Hub model repo `repo_id`; returns the repo URL.

    The repo is created if needed (`private` applies to a new repo only). Everything in the directory is uploaded in
    one commit, with huggingface_hub's progress bars: `config.json`, `generation_config.json`, the weights
    (`model*.safetensors` and index), the remote code (`*.py`), tokenizer and processor files (`tokenizer*.json`,
    `processor_config.json`, `chat_template.jinja`, `instruction_tokenizer/`), the model card `README.md` (its
    `REPO_OR_DIR` placeholders are first replaced by `repo_id`, in the local copy too) and `conversion_report.json`.
    Python caches and hidden files are left out.
    """
    from huggingface_hub import HfApi

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ConversionError(f"{directory} is not a converted checkpoint (no config.json); nothing to upload.")
    card = directory / "README.md"
    if card.is_file():
        card.write_text(card.read_text(encoding="utf-8").replace(MODEL_ID_PLACEHOLDER, repo_id), encoding="utf-8")
    if commit_message is None:
        report_path = directory / "conversion_report.json"
        family = _load_json(report_path).get("family") if report_path.is_file() else None
        what = f"{family} checkpoint" if family else "checkpoint"
        commit_message = f"Upload {what} converted by llava-multilayer {llava_multilayer.__version__}"
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(
        folder_path=str(directory),
        repo_id=repo_id,
        repo_type="model",
        commit_message=commit_message,
        ignore_patterns=["__pycache__", "*/__pycache__/*", "*.pyc", ".*", "*/.*"],
    )
    return str(url)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def finish_command(args: argparse.Namespace, report: ConversionReport) -> None:
    """The end of every converter's command line: the verification and parity results, the upload with
    --push-to-hub, and the output path, last."""
    from llava_multilayer.commands.push import upload

    if report.verified:
        print(f"Verified {report.num_verified_tensors} tensors: each reloaded tensor equals its source.")
    if report.parity:
        logger.info("Parity: %s", report.parity)
    if args.push_to_hub:
        print(f"Uploaded to {upload(args.output_dir, args.push_to_hub, private=args.private)}")
    print(f"Wrote {args.output_dir}")


def converter_parser(
    description: str, add_family_arguments: Callable[[argparse.ArgumentParser], None] | None, prog: str | None
) -> argparse.ArgumentParser:
    """The command line of a family converter: the common flags, then the family's own."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser)
    if add_family_arguments is not None:
        add_family_arguments(parser.add_argument_group("flags of this family"))
    return parser


def add_common_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The flags every family converter shares (`required=False`: `--input-dir` / `--output-dir` are checked by the
    caller)."""
    parser.add_argument(
        "--input-dir", required=required, help="Checkpoint directory written by the original training code."
    )
    parser.add_argument("--output-dir", required=required, help="Where to write the Hub-format checkpoint.")
    parser.add_argument(
        "--pretrain-dir",
        help="Pretraining-stage output directory (config.json + the stage's module files, e.g. mm_projector.bin); "
        "--input-dir is then the base language model.",
    )
    parser.add_argument(
        "--vision-tower",
        help="Local directory or hub id of the vision tower (overrides the config's `mm_vision_tower`).",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="Cast floating-point weights (default: keep).")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="Upload the converted checkpoint to this repo.")
    parser.add_argument("--private", action="store_true", help="With --push-to-hub: create a private repo.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output-dir.")
    parser.add_argument("--verify", action="store_true", help="Reload the output and compare every tensor to the source.")
    parser.add_argument(
        "--parity-fixture",
        help="Directory with inputs.safetensors/expected.safetensors/image.png/prompt.json from the original code; "
        "the converter checks the converted model against it and records the numbers in the model card.",
    )
    parser.add_argument("--max-shard-size", type=int, default=DEFAULT_MAX_SHARD_SIZE, help="Bytes per output shard.")


__all__ = [
    "CheckpointReader",
    "ConversionError",
    "ConversionReport",
    "Drop",
    "ShardedSafetensorsWriter",
    "TensorDictReader",
    "add_common_arguments",
    "converter_parser",
    "describe_location",
    "build_image_processor",
    "build_processor",
    "expected_target_shapes",
    "expected_target_tensors",
    "finish_command",
    "fixture_parity_check",
    "generation_config_from_original",
    "load_original_config",
    "load_tokenizer_with_image_token",
    "load_torch_file",
    "load_vision_config",
    "num_image_tokens",
    "public_file_name",
    "push_to_hub",
    "quiet_original_config",
    "resolve_local_dir",
    "run_conversion",
    "strip_vision_prefix",
    "text_config_from_original",
    "verify_checkpoint",
]
