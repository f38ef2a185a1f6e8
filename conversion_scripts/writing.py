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
"""Writing converted tensors: a streaming writer of sharded safetensors files, and the dtype table shared by the
writer, `--dtype` and `--verify`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from .reading import ConversionError


DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3

#: Every dtype safetensors stores, with its code in the file header.
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

#: The floating-point dtypes `--dtype` casts to, by name.
CAST_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in (torch.float32, torch.bfloat16, torch.float16)}


def stored_dtypes(directory: Path) -> dict[str, torch.dtype]:
    """The dtype of every tensor in the safetensors file(s) of a written checkpoint, read from the headers."""
    by_code = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
    dtypes = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                dtypes[key] = by_code[handle.get_slice(key).get_dtype()]
    return dtypes


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
        index_path = self.directory / "model.safetensors.index.json"
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
