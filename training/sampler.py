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
"""The original `LengthGroupedSampler` with `group_by_modality=True` (LLaVA-1.5 `llava/train/llava_trainer.py`):
batches hold only image records or only text-only records, grouped by length inside megabatches of
`batch_size * world_size` indices, in a random megabatch order; the leftovers of both modalities form the last one.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


def split_to_even_chunks(indices: list[int], lengths: list[int], num_chunks: int) -> list[list[int]]:
    """Splits `indices` into `num_chunks` chunks of equal size and similar total length (greedy, longest first)."""
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def length_grouped_indices(
    lengths: list[int], batch_size: int, world_size: int, generator: torch.Generator | None = None
) -> list[int]:
    """A random permutation, sorted by length (longest first) within each megabatch and split evenly across ranks."""
    indices = torch.randperm(len(lengths), generator=generator)
    size = world_size * batch_size
    megabatches = [indices[i : i + size].tolist() for i in range(0, len(lengths), size)]
    megabatches = [sorted(megabatch, key=lambda i: lengths[i], reverse=True) for megabatch in megabatches]
    return [
        i for megabatch in megabatches for chunk in split_to_even_chunks(megabatch, lengths, world_size) for i in chunk
    ]


def modality_length_grouped_indices(
    lengths: list[int], batch_size: int, world_size: int, generator: torch.Generator | None = None
) -> list[int]:
    """The original order for `modality_lengths` (positive: image records, negative: text-only records)."""
    if any(length == 0 for length in lengths):
        raise ValueError("modality lengths must not be 0 (a record without words).")
    if all(length > 0 for length in lengths) or all(length < 0 for length in lengths):
        return length_grouped_indices(lengths, batch_size, world_size, generator)
    mm_indices, mm_lengths = zip(*[(i, length) for i, length in enumerate(lengths) if length > 0])
    lang_indices, lang_lengths = zip(*[(i, -length) for i, length in enumerate(lengths) if length < 0])
    # As the original, the two inner permutations use the global generator.
    mm_order = [mm_indices[i] for i in length_grouped_indices(mm_lengths, batch_size, world_size)]
    lang_order = [lang_indices[i] for i in length_grouped_indices(lang_lengths, batch_size, world_size)]
    size = world_size * batch_size
    mm_megabatches = [mm_order[i : i + size] for i in range(0, len(mm_order), size)]
    lang_megabatches = [lang_order[i : i + size] for i in range(0, len(lang_order), size)]
    additional = mm_megabatches[-1] + lang_megabatches[-1]
    megabatches = mm_megabatches[:-1] + lang_megabatches[:-1]
    megabatches = [megabatches[i] for i in torch.randperm(len(megabatches), generator=generator)]
    if additional:
        megabatches.append(sorted(additional))
    return [i for megabatch in megabatches for i in megabatch]


class ModalityLengthGroupedSampler(Sampler):
    """Yields [`modality_length_grouped_indices`] of `lengths`; `world_size` is the original's
    `world_size * gradient_accumulation_steps`."""

    def __init__(self, lengths: list[int], batch_size: int, world_size: int, generator: torch.Generator | None = None):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.generator = generator

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, self.generator))


__all__ = [
    "ModalityLengthGroupedSampler",
    "length_grouped_indices",
    "modality_length_grouped_indices",
    "split_to_even_chunks",
]
