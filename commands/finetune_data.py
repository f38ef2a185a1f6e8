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
"""Supervised finetuning data: LLaVA conversation records -> `input_ids`, `labels`, `pixel_values`.

Two record formats are accepted, in a `.json` list, a `.jsonl` file, a Python list or a `datasets.Dataset`:

- LLaVA's own (`llava_v1_5_mix665k.json`):
  `{"id": ..., "image": "coco/x.jpg", "conversations": [{"from": "human", "value": "<image>\\nQ"},
  {"from": "gpt", "value": "A"}, ...]}`; `image` is relative to the image folder (absent for text-only samples).
- Chat messages: `{"messages": [{"role": "user", "content": "<image>\\nQ" | [{"type": "image"}, {"type": "text",
  "text": "Q"}]}, {"role": "assistant", "content": "A"}, ...], "images": [...]}`; images are paths (relative to the
  image folder), PIL images, or the `image`/`path`/`url` of the content items.

The conversation is rendered with the processor's chat template (`vicuna_v1` by default), tokenized exactly as the
processor does at inference, and only the assistant answers are supervised: LLaVA's rule, where each answer and the
`</s>` that closes it get labels and everything else (system prompt, user turns, the `ASSISTANT:` headers, image
tokens, padding) is `-100`. The supervised spans are the template's `{% generation %}` blocks.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from llava_multilayer.compatibility_llava_multilayer import render_jinja_template


IGNORE_INDEX = -100
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def load_records(data: str | os.PathLike | list[dict] | Any, split: str = "train") -> Any:
    """The training records: a `.json` (list) or `.jsonl` file, a list of dicts, a `datasets.Dataset`, or the name of
    a dataset `datasets.load_dataset` can load (`split` chooses its split)."""
    if not isinstance(data, (str, os.PathLike)):
        if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
            raise TypeError(
                f"`data` must be a path, a list of records or a datasets.Dataset, got {type(data).__name__}."
            )
        return data
    path = Path(data)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        records = json.loads(text)
        if not isinstance(records, list):
            raise ValueError(f"--data {path} must hold a JSON list of records, got a {type(records).__name__}.")
        return records
    try:
        import datasets
    except ImportError as error:
        raise FileNotFoundError(
            f"--data {data} is not a file; loading it as a Hub dataset needs `pip install datasets`."
        ) from error
    return datasets.load_dataset(str(data), split=split)


def to_messages(record: dict) -> tuple[list[dict], list]:
    """A record as chat `messages` (the template's input) and its images (paths or PIL images), in order."""
    if "conversations" in record:
        return _llava_to_messages(record), _as_list(record.get("image"))
    if "messages" not in record:
        raise ValueError(f"A record needs `conversations` (LLaVA format) or `messages`; got keys {sorted(record)}.")
    messages = [dict(message) for message in record["messages"]]
    images = _as_list(record.get("images", record.get("image")))
    if not images:
        for message in messages:
            if isinstance(message["content"], list):
                images += [
                    item.get("image") or item.get("path") or item.get("url")
                    for item in message["content"]
                    if item.get("type") == "image" and (item.get("image") or item.get("path") or item.get("url"))
                ]
    return messages, images


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _llava_to_messages(record: dict) -> list[dict]:
    turns = list(record["conversations"])
    if turns and turns[0]["from"] == "gpt":
        turns = turns[1:]  # LLaVA's preprocessing drops a leading assistant turn
    messages = []
    for turn in turns:
        role = LLAVA_ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"Record {record.get('id')!r}: unknown speaker {turn['from']!r} (expected human/gpt).")
        value = turn["value"]
        if role == "user" and "<image>" in value:
            # LLaVA moves the image to the front of the turn: "<image>\n" + the text without it.
            content = [{"type": "image"} for _ in range(value.count("<image>"))]
            content.append({"type": "text", "text": value.replace("<image>", "").strip()})
            messages.append({"role": role, "content": content})
        else:
            messages.append({"role": role, "content": value})
    return messages


def _load_image(image, image_folder: str | os.PathLike | None) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, dict) and ("path" in image or "bytes" in image):  # an undecoded `datasets.Image`
        if image.get("bytes") is not None:
            import io

            return Image.open(io.BytesIO(image["bytes"])).convert("RGB")
        image = image["path"]
    path = Path(image)
    if not path.is_absolute():
        if image_folder is None:
            raise ValueError(f"Image {image!r} is a relative path: pass --image-folder.")
        path = Path(image_folder) / path
    with Image.open(path) as opened:
        return opened.convert("RGB")


def _has_generation_block(chat_template: str | None) -> bool:
    return chat_template is not None and re.search(r"\{%-?\s*generation\s*-?%\}", chat_template) is not None


class ConversationDataset(torch.utils.data.Dataset):
    """Tokenizes conversation records on the fly (images are read lazily).

    Each item holds `input_ids` and `labels` (`(seq_len,)`), and, when the record has images, `pixel_values`
    (`(num_images, channels, height, width)`) plus, for instruction-guided processors, `instruction_input_ids` and
    `instruction_attention_mask` (`(num_images, instruction_length)`).

    Args:
        records: See [`load_records`].
        processor ([`LlavaMultiLayerProcessor`]): The model's processor; its chat template must mark the assistant
            turns with `{% generation %}` (the default `vicuna_v1` template does) and its tokenizer must be a fast
            tokenizer (the labels come from character offsets).
        image_folder: Root of relative image paths.
        max_length: Sequences are cut to this many tokens (LLaVA's `model_max_length`); a cut through image tokens
            is an error.
    """

    def __init__(
        self,
        records,
        processor,
        image_folder: str | os.PathLike | None = None,
        max_length: int | None = None,
    ):
        if not _has_generation_block(processor.chat_template):
            raise ValueError(
                "The processor's chat template does not mark the assistant turns with {% generation %}, so the "
                "answers to supervise cannot be found. Use the default vicuna_v1 template "
                "(`llava_multilayer.processing_llava_multilayer.VICUNA_V1_CHAT_TEMPLATE`)."
            )
        if getattr(processor.tokenizer, "backend", None) != "tokenizers":
            raise ValueError(
                "Finetuning needs a fast (`tokenizers`) tokenizer: the labels are placed by character offsets."
            )
        self.records = records
        self.processor = processor
        self.image_folder = image_folder
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        messages, images = to_messages(record)
        prompt, spans = self.render(messages)
        images = [_load_image(image, self.image_folder) for image in images]
        extra = {}
        if hasattr(self.processor, "instruction_from_prompt") and images:
            extra["instructions"] = [_instruction(messages)]
        encoded = self.processor(images=images or None, text=prompt, return_tensors="pt", **extra)
        input_ids = encoded["input_ids"][0]
        num_image_tokens = [
            self.processor.num_image_tokens(*pixels.shape[-2:]) for pixels in encoded.get("pixel_values", [])
        ]
        mask = self.assistant_mask(prompt, spans, input_ids, num_image_tokens)
        labels = input_ids.masked_fill(~mask, IGNORE_INDEX)
        if self.max_length is not None and len(input_ids) > self.max_length:
            image_positions = (input_ids == self.processor.image_token_id).nonzero()
            if len(image_positions) and image_positions.max() >= self.max_length:
                raise ValueError(
                    f"Record {record.get('id', index)!r} is {len(input_ids)} tokens long and max_length="
                    f"{self.max_length} would cut through its image tokens: raise --max-length or drop the record."
                )
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        item = {"input_ids": input_ids, "labels": labels}
        for key in ("pixel_values", "instruction_input_ids", "instruction_attention_mask"):
            if key in encoded:
                item[key] = encoded[key]
        return item

    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The prompt text and the character spans of the assistant answers (`{% generation %}` blocks)."""
        prompts, generation_indices = render_jinja_template(
            conversations=[messages],
            chat_template=self.processor.chat_template,
            return_assistant_tokens_mask=True,
            **self.processor.tokenizer.special_tokens_map,
        )
        return prompts[0], [tuple(span) for span in generation_indices[0]]

    def assistant_mask(
        self, prompt: str, spans: list[tuple[int, int]], input_ids: torch.Tensor, num_image_tokens: list[int]
    ) -> torch.Tensor:
        """`True` for the tokens that overlap an answer span, `(seq_len,)`.

        The prompt is re-tokenized piece by piece around the `<image>` placeholders (the i-th one expanded into
        `num_image_tokens[i]` image tokens), as the processor does, with character offsets; the ids must match the
        processor's `input_ids`.
        """
        processor = self.processor
        tokenizer = processor.tokenizer
        chunks = prompt.split(processor.image_token)
        ids, mask = [], []
        start = 0
        for chunk_index, chunk in enumerate(chunks):
            if chunk_index:
                ids += [processor.image_token_id] * num_image_tokens[chunk_index - 1]
                mask += [False] * num_image_tokens[chunk_index - 1]
                start += len(processor.image_token)
            encoded = tokenizer(chunk, add_special_tokens=True, return_offsets_mapping=True)
            chunk_ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
            if chunk_index and chunk_ids[:1] == [tokenizer.bos_token_id]:
                chunk_ids, offsets = chunk_ids[1:], offsets[1:]
            ids += chunk_ids
            mask += [
                token_end > token_start
                and any(start + token_start < end and start + token_end > begin for begin, end in spans)
                for token_start, token_end in offsets
            ]
            start += len(chunk)
        if ids != input_ids.tolist():
            raise ValueError(
                "Re-tokenizing the prompt did not reproduce the processor's input_ids, so the labels cannot be "
                f"placed. Prompt: {prompt[:200]!r}"
            )
        return torch.tensor(mask, dtype=torch.bool)


def _instruction(messages: list[dict]) -> str:
    """The instruction of an instruction-guided (igva) sample: the text of the user turn that holds the image."""
    for message in messages:
        content = message["content"]
        if message["role"] != "user":
            continue
        if isinstance(content, list) and any(item.get("type") == "image" for item in content):
            return " ".join(item["text"] for item in content if item.get("type") == "text").strip()
        if isinstance(content, str) and "<image>" in content:
            return content.replace("<image>", "").strip()
    raise ValueError("An instruction-guided sample needs a user turn with the image, whose text is the instruction.")


@dataclass
class ConversationCollator:
    """Right-pads a list of [`ConversationDataset`] items into a batch.

    Returns `input_ids`, `attention_mask`, `labels` (`(batch, max_len)`, labels `-100` on padding), and the images of
    all samples concatenated in sample order (`pixel_values`, `(total_images, channels, height, width)`, and the
    instruction inputs, padded to the longest instruction).
    """

    pad_token_id: int
    instruction_pad_token_id: int = 0

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        max_length = max(len(feature["input_ids"]) for feature in features)
        batch_size = len(features)
        input_ids = torch.full((batch_size, max_length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, max_length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, max_length), dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = feature["input_ids"]
            labels[row, :length] = feature["labels"]
            attention_mask[row, :length] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        with_images = [feature for feature in features if "pixel_values" in feature]
        if with_images:
            batch["pixel_values"] = torch.cat([feature["pixel_values"] for feature in with_images])
        if any("instruction_input_ids" in feature for feature in with_images):
            width = max(feature["instruction_input_ids"].shape[1] for feature in with_images)
            ids, masks = [], []
            for feature in with_images:
                pad = width - feature["instruction_input_ids"].shape[1]
                pad_value = self.instruction_pad_token_id
                ids.append(torch.nn.functional.pad(feature["instruction_input_ids"], (0, pad), value=pad_value))
                masks.append(torch.nn.functional.pad(feature["instruction_attention_mask"], (0, pad), value=0))
            batch["instruction_input_ids"] = torch.cat(ids)
            batch["instruction_attention_mask"] = torch.cat(masks)
        return batch


__all__ = ["ConversationCollator", "ConversationDataset", "IGNORE_INDEX", "load_records", "to_messages"]
