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
"""The training dataset and collator: LLaVA-format records -> what the original `LazySupervisedDataset` and
`DataCollatorForSupervisedDataset` produce, with the single image placeholder expanded into this package's image
tokens, and the truncation the original model applies after that expansion.

Records (LLaVA format): `{"id": ..., "image": "rel/path.jpg" (absent or None: text-only), "conversations":
[{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...], "sentence_embed": "x.pt" (IGVA)}`, from a
list, a `.json`/`.jsonl` file or a `datasets` dataset ([`load_records`]). Images are opened when an item is read.
A record that cannot be used raises [`RecordError`] naming its id and index; nothing is silently replaced (the
original catches any error and trains on a random other record instead).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER_ID, preprocess


class RecordError(ValueError):
    """A training record that cannot be used (malformed, missing image, missing instruction embedding)."""

    def __init__(self, index: int, record_id: Any, reason: str):
        super().__init__(f"record {record_id!r} (index {index}): {reason}")
        self.index = index
        self.record_id = record_id


def load_records(data: str | os.PathLike | Any, split: str = "train", streaming: bool = False) -> Any:
    """Records from a `.json` list or `.jsonl` file, a list of dicts, a `datasets.Dataset` / `IterableDataset`, or
    a name / directory `datasets.load_dataset` loads (`split`, `streaming`)."""
    if not isinstance(data, (str, os.PathLike)):
        return data
    path = Path(data)
    if path.is_file() and path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as lines:
            return [json.loads(line) for line in lines if line.strip()]
    if path.is_file() and path.suffix == ".json":
        records = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(records, list):
            raise ValueError(f"{path} must hold a JSON list of records, got a {type(records).__name__}.")
        return records
    import datasets

    return datasets.load_dataset(str(data), split=split, streaming=streaming)


def modality_length(record: dict) -> int:
    """The original `modality_lengths` entry: the record's word count, negative for text-only records."""
    words = sum(len(turn["value"].split()) for turn in record["conversations"])
    return words if has_image(record) else -words


def has_image(record: dict) -> bool:
    """Whether the record has an image (`image` key present and not `None`, as a `datasets` column gives it)."""
    return record.get("image") is not None


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """The original `expand2square`: pads to a square with `background`, the image centred."""
    width, height = image.size
    if width == height:
        return image
    size = max(width, height)
    result = Image.new(image.mode, (size, size), background)
    result.paste(image, ((size - width) // 2, 0) if width < height else (0, (size - height) // 2))
    return result


class SupervisedDataset(torch.utils.data.Dataset):
    """One training stage's view of the records.

    Each item: `input_ids`, `labels` (`(seq_len,)`, the image as `num_image_tokens` image tokens, labelled -100),
    and for image records `pixel_values` (`(1, 3, H, W)`) and, for instruction-guided fusion, `instruction_embeds`
    (`(1, E)`, from `instruction_embeds_folder`) or `instruction_input_ids` / `instruction_attention_mask`
    (`(1, L)`, from the processor's instruction tokenizer). Image records are not truncated here (the collator
    does it, as the original); text-only records are.

    Args:
        records: A list / `datasets.Dataset` of LLaVA-format records.
        processor: The model's processor (tokenizer, image processor, image token).
        template: `"plain"` (stage 1) or `"vicuna_v1"` (stage 2).
        model_max_length: The original `--model_max_length`.
        image_folder: Root of the records' relative image paths.
        image_aspect_ratio: `"pad"` (pad to a square with the mean colour, stage 2) or `"square"` (stage 1).
        instruction_embeds_folder: IGVA: folder of the `.pt` files named by each record's `sentence_embed`.
        instruction_source: IGVA: `"folder"`, `"encoder"` (tokenize the instruction for the model's encoder) or
            `None` (no instructions: stage 1 with uniform averaging, or another family).
    """

    def __init__(
        self,
        records,
        processor,
        template: str,
        model_max_length: int,
        image_folder: str | os.PathLike | None = None,
        image_aspect_ratio: str = "pad",
        instruction_embeds_folder: str | os.PathLike | None = None,
        instruction_source: str | None = None,
    ):
        if image_aspect_ratio not in ("pad", "square"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'square', got {image_aspect_ratio!r}.")
        if instruction_source not in (None, "folder", "encoder"):
            raise ValueError(f"instruction_source must be None, 'folder' or 'encoder', got {instruction_source!r}.")
        if instruction_source == "folder" and instruction_embeds_folder is None:
            raise ValueError("instruction_source='folder' needs instruction_embeds_folder (--sentence_embed_folder).")
        if instruction_source == "encoder" and getattr(processor, "instruction_tokenizer", None) is None:
            raise ValueError(
                "instruction_source='encoder' needs the instruction processor of an igva model (with an "
                "instruction tokenizer); pass instruction_embeds_folder to use precomputed embeddings instead."
            )
        self.records = records
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = template
        self.model_max_length = model_max_length
        self.image_folder = image_folder
        self.image_aspect_ratio = image_aspect_ratio
        self.instruction_embeds_folder = instruction_embeds_folder
        self.instruction_source = instruction_source
        self.image_token_id = processor.image_token_id

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modality_lengths(self) -> list[int]:
        """Word counts, negative for text-only records (the `group_by_modality_length` sampler's input)."""
        return [modality_length(record) for record in self.records]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.item(self.records[index], index)

    def item(self, record: dict, index: int) -> dict[str, torch.Tensor]:
        """The item of `record`, the `index`-th record (named in errors)."""
        record_id = record.get("id") if isinstance(record, dict) else None
        try:
            return self._item(record, index)
        except RecordError:
            raise
        except (KeyError, TypeError, ValueError, OSError) as error:
            raise RecordError(index, record_id, f"{type(error).__name__}: {error}") from error

    def _item(self, record: dict, index: int) -> dict[str, torch.Tensor]:
        if "conversations" not in record:
            raise RecordError(index, record.get("id"), f"no `conversations` (keys: {sorted(record)}).")
        with_image = has_image(record)
        tokenized = preprocess(
            record["conversations"], self.tokenizer, self.template, with_image, self.model_max_length
        )
        input_ids, labels = tokenized.input_ids, tokenized.labels
        num_placeholders = int((input_ids == IMAGE_PLACEHOLDER_ID).sum())
        if num_placeholders > 1:
            raise RecordError(
                index,
                record.get("id"),
                f"{num_placeholders} turns hold {IMAGE_PLACEHOLDER} for one image (the original would pair the "
                "extra placeholders with other records' images).",
            )
        item = {}
        if num_placeholders:
            pixel_values = self._pixel_values(record, index)
            num_tokens = self.processor.num_image_tokens(*pixel_values.shape[-2:])
            input_ids, labels = expand_placeholder(input_ids, labels, self.image_token_id, num_tokens)
            item["pixel_values"] = pixel_values
            item.update(self._instruction(record, index))
        elif with_image:
            # An image without `<image>` in the text: the original encodes it and splices none of its features.
            self._pixel_values(record, index)
        item["input_ids"], item["labels"] = input_ids, labels
        return item

    def _pixel_values(self, record: dict, index: int) -> torch.Tensor:
        image = record["image"]
        if isinstance(image, Image.Image):
            image = image.convert("RGB")
        else:
            path = Path(image) if self.image_folder is None else Path(self.image_folder) / image
            try:
                with Image.open(path) as opened:
                    image = opened.convert("RGB")
            except OSError as error:
                raise RecordError(index, record.get("id"), f"cannot read image {str(path)!r}: {error}") from error
        image_processor = self.processor.image_processor
        if self.image_aspect_ratio == "pad":
            image = expand2square(image, tuple(int(mean * 255) for mean in image_processor.image_mean))
        return image_processor(image, do_pad=False, return_tensors="pt")["pixel_values"]

    def _instruction(self, record: dict, index: int) -> dict[str, torch.Tensor]:
        if self.instruction_source == "folder":
            name = record.get("sentence_embed")
            if name is None:
                raise RecordError(index, record.get("id"), "no `sentence_embed` key naming its instruction embedding.")
            path = Path(self.instruction_embeds_folder) / name
            if not path.is_file():
                raise RecordError(index, record.get("id"), f"instruction embedding {str(path)!r} does not exist.")
            embedding = torch.load(path, map_location="cpu", weights_only=True)
            if embedding.dim() != 1 or not embedding.is_floating_point():
                raise RecordError(
                    index, record.get("id"), f"{path} must hold a 1-D float tensor, got {tuple(embedding.shape)}."
                )
            return {"instruction_embeds": embedding.float()[None]}
        if self.instruction_source == "encoder":
            encoded = self.processor.instruction_tokenizer(
                [instruction_text(record)],
                truncation=True,
                max_length=self.processor.instruction_max_length,
                return_tensors="pt",
            )
            return {
                "instruction_input_ids": encoded["input_ids"],
                "instruction_attention_mask": encoded["attention_mask"],
            }
        return {}


class IterableSupervisedDataset(torch.utils.data.IterableDataset):
    """[`SupervisedDataset`] items of records that are streamed (e.g. a `datasets.IterableDataset`), in order."""

    def __init__(self, records, items: SupervisedDataset):
        self.records = records
        self.items = items

    def __iter__(self):
        for index, record in enumerate(self.records):
            yield self.items.item(record, index)


def instruction_text(record: dict) -> str:
    """IGVA's instruction when it is computed here: the text of the first human turn holding `<image>`, without it."""
    for turn in record["conversations"]:
        if turn["from"] == "human" and IMAGE_PLACEHOLDER in turn["value"]:
            return turn["value"].replace(IMAGE_PLACEHOLDER, "").strip()
    raise ValueError(f"no human turn holds {IMAGE_PLACEHOLDER}, so there is no instruction.")


def expand_placeholder(
    input_ids: torch.Tensor, labels: torch.Tensor, image_token_id: int, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replaces each [`IMAGE_PLACEHOLDER_ID`] by `num_tokens` image tokens (labels -100), `(seq_len,)` tensors."""
    ids, targets = [], []
    for token, label in zip(input_ids.tolist(), labels.tolist()):
        if token == IMAGE_PLACEHOLDER_ID:
            ids += [image_token_id] * num_tokens
            targets += [IGNORE_INDEX] * num_tokens
        else:
            ids.append(token)
            targets.append(label)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(targets, dtype=torch.long)


def collapse_image_tokens(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """The inverse of [`expand_placeholder`] on ids: each run of image tokens becomes one placeholder, `(seq_len,)`."""
    is_image = input_ids == image_token_id
    return input_ids.masked_fill(is_image, IMAGE_PLACEHOLDER_ID)[_collapse_keep(input_ids, image_token_id)]


@dataclass
class SupervisedCollator:
    """Batches [`SupervisedDataset`] items as the original collator + `prepare_inputs_labels_for_multimodal` do.

    Per record, in the original's units (one placeholder per image): right-pad, truncate to `model_max_length`,
    drop every position whose id is the pad id (the original removes all masked positions, so a real `<unk>` token
    vanishes too); then expand the image, truncate again to `model_max_length` and right-pad. Returns `input_ids`,
    `attention_mask`, `labels` (`(batch, seq_len)`), `pixel_values` (`(num_images, 3, H, W)`, the images that still
    have their placeholder) and the matching instruction inputs.

    A truncation that cuts through an image's tokens raises (the original would keep part of the image; this
    model needs whole images).
    """

    pad_token_id: int
    image_token_id: int
    model_max_length: int
    instruction_pad_token_id: int = 0

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        rows, images, instruction_rows = [], [], []
        for feature in features:
            ids, labels = feature["input_ids"], feature["labels"]
            num_tokens = int((ids == self.image_token_id).sum())
            ids_collapsed = collapse_image_tokens(ids, self.image_token_id)
            labels_collapsed = labels[_collapse_keep(ids, self.image_token_id)]
            ids_collapsed = ids_collapsed[: self.model_max_length]
            labels_collapsed = labels_collapsed[: self.model_max_length]
            keep = ids_collapsed != self.pad_token_id
            ids_collapsed, labels_collapsed = ids_collapsed[keep], labels_collapsed[keep]
            placeholders = int((ids_collapsed == IMAGE_PLACEHOLDER_ID).sum())
            ids_expanded, labels_expanded = expand_placeholder(
                ids_collapsed, labels_collapsed, self.image_token_id, num_tokens
            )
            ids_expanded = ids_expanded[: self.model_max_length]
            labels_expanded = labels_expanded[: self.model_max_length]
            if placeholders and int((ids_expanded == self.image_token_id).sum()) != num_tokens:
                raise ValueError(
                    f"model_max_length={self.model_max_length} cuts through the image tokens of a record (its image "
                    "starts too close to the limit): raise model_max_length or shorten the record."
                )
            if placeholders:
                images.append(feature["pixel_values"])
                instruction_rows.append(feature)
            rows.append((ids_expanded, labels_expanded))
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, (ids, targets) in enumerate(rows):
            input_ids[row, : len(ids)] = ids
            labels[row, : len(ids)] = targets
            attention_mask[row, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if images:
            batch["pixel_values"] = torch.cat(images)
        batch.update(self._instructions(instruction_rows))
        return batch

    def _instructions(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if features and "instruction_embeds" in features[0]:
            return {"instruction_embeds": torch.cat([feature["instruction_embeds"] for feature in features])}
        if features and "instruction_input_ids" in features[0]:
            width = max(feature["instruction_input_ids"].shape[1] for feature in features)
            ids, masks = [], []
            for feature in features:
                pad = width - feature["instruction_input_ids"].shape[1]
                ids.append(
                    torch.nn.functional.pad(
                        feature["instruction_input_ids"], (0, pad), value=self.instruction_pad_token_id
                    )
                )
                masks.append(torch.nn.functional.pad(feature["instruction_attention_mask"], (0, pad), value=0))
            return {"instruction_input_ids": torch.cat(ids), "instruction_attention_mask": torch.cat(masks)}
        return {}


def _collapse_keep(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    is_image = input_ids == image_token_id
    run_start = is_image & ~torch.cat([is_image.new_zeros(1), is_image[:-1]])
    return ~is_image | run_start


__all__ = [
    "IterableSupervisedDataset",
    "RecordError",
    "SupervisedCollator",
    "SupervisedDataset",
    "collapse_image_tokens",
    "expand2square",
    "expand_placeholder",
    "has_image",
    "instruction_text",
    "load_records",
    "modality_length",
]
