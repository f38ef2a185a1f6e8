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
"""Reading original checkpoints: `config.json`, single or sharded safetensors / `pytorch_model*.bin` (with the shard
index checked against the files), `torch.save` files loaded without running pickled code, and components named by
a hub id or a local path."""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm


class ConversionError(ValueError):
    """A checkpoint cannot be converted faithfully; the message says which file, key or setting is at fault."""


def load_json(path: Path) -> dict:
    """Reads a JSON file, refusing invalid JSON and an object that repeats a key."""
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
    config = load_json(path)
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
                    raise ConversionError(
                        f"Tensor {key!r} is stored twice: in {self._key_to_file[key].name} and {path.name}."
                    )
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
                raise ConversionError(
                    f"Tensors missing from the shard index: {unlisted[:10]} ({len(unlisted)} in all)."
                )

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
                        f"{self.input_dir} holds both {single} and {index_path.name}: it is ambiguous which weights "
                        "are current. Remove the stale one."
                    )
                index = load_json(index_path)
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
        bar = tqdm(self.files, desc="Converting shards", unit="shard", disable=not progress or len(self.files) < 2)
        for path in bar:
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
            f"The {what} {name_or_path!r} is neither a local directory nor downloadable here "
            f"({type(error).__name__}). Pass {flag} with a local copy."
        ) from error
