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
"""The two conversation templates of the original training code and its tokenization + label masking, reproduced
step by step (LLaVA-1.5 `llava/train/train.py`: `preprocess_multimodal`, `preprocess_plain`, `preprocess_v1`,
`tokenizer_image_token`; the three original repositories share them unchanged).

Token ids come out with the single placeholder [`IMAGE_PLACEHOLDER_ID`] (`-200`) where the image goes, exactly as
the original dataset returns them; the collator expands it into the model's image tokens.

Quirks of the original kept on purpose (see docs/training.md):

- every turn holding `<image>` has it removed, the text stripped and `"<image>\\n"` put in front;
- `plain` (stage 1) replaces the whole human turn by `<image>`, dropping any prompt text, and adds no `</s>`;
- `vicuna_v1` (stage 2) masks the system prompt and each `USER: ... ASSISTANT: ` instruction with the
  original's token arithmetic (`len(tok(instruction)) - 2`, minus one more after the first round); when that
  arithmetic disagrees with the real length, every label of the record is masked (`tokenization mismatch`);
- image records are never truncated here (the collator truncates them); text-only records are truncated by the
  tokenizer call itself, which drops their final `</s>`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch


logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
#: The original `IMAGE_TOKEN_INDEX`: the one id that stands for a whole image before the collator expands it.
IMAGE_PLACEHOLDER_ID = -200
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Template:
    """A conversation template: `plain` (LLaVA's `conv_llava_plain`) or `vicuna_v1` (`conv_vicuna_v1`)."""

    name: str
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str | None


TEMPLATES = {
    "plain": Template("plain", "", ("", ""), "\n", None),
    "vicuna_v1": Template(
        "vicuna_v1",
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        ("USER", "ASSISTANT"),
        " ",
        "</s>",
    ),
}
ROLES = {"human": 0, "gpt": 1}


@dataclass
class TokenizedRecord:
    """`input_ids` / `labels`, `(seq_len,)` int64, with [`IMAGE_PLACEHOLDER_ID`] for the image; `prompt` is the text
    that was tokenized; `mismatch` tells that the original's length check masked every label."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    prompt: str
    mismatch: bool = False


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """The original `tokenizer_image_token`: each `<image>`-separated chunk tokenized on its own (with BOS, kept only
    for the first chunk), joined by [`IMAGE_PLACEHOLDER_ID`]. Never truncates."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_PLACEHOLDER)]
    input_ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    for index, chunk in enumerate(chunks):
        if index:
            input_ids.append(IMAGE_PLACEHOLDER_ID)
        input_ids.extend(chunk[offset:])
    return input_ids


def move_image_to_front(conversations: list[dict]) -> list[dict]:
    """The original `preprocess_multimodal`: in each turn that holds `<image>`, the placeholder is removed, the text
    stripped and `"<image>\\n"` put in front (then stripped again). Returns a copy."""
    conversations = copy.deepcopy(conversations)
    for turn in conversations:
        if IMAGE_PLACEHOLDER in turn["value"]:
            value = turn["value"].replace(IMAGE_PLACEHOLDER, "").strip()
            turn["value"] = (IMAGE_PLACEHOLDER + "\n" + value).strip()
    return conversations


def vicuna_v1_prompt(conversations: list[dict], template: Template = TEMPLATES["vicuna_v1"]) -> str:
    """`Conversation.get_prompt` of the original (`SeparatorStyle.TWO`); a leading assistant turn is dropped and the
    speakers must alternate human/gpt. An empty message renders as `"ROLE:"`, as in the original."""
    if conversations and ROLES.get(conversations[0]["from"]) != 0:
        conversations = conversations[1:]
    prompt = template.system + template.sep
    seps = (template.sep, template.sep2)
    for index, turn in enumerate(conversations):
        role = ROLES.get(turn["from"])
        if role != index % 2:
            raise ValueError(
                f"turn {index} is from {turn['from']!r}: conversations must alternate 'human' and 'gpt' turns."
            )
        name = template.roles[role]
        prompt += f"{name}: {turn['value']}{seps[index % 2]}" if turn["value"] else f"{name}:"
    return prompt


def preprocess_plain(conversations: list[dict], tokenizer) -> TokenizedRecord:
    """Stage-1 (`plain`) tokens and labels: `<image>` + caption + `"\\n"`, the first two tokens (BOS, image) masked.

    `conversations` must be one human turn holding `<image>` and one gpt turn (the caption); the human turn's text
    is dropped, as the original does.
    """
    if len(conversations) != 2:
        raise ValueError(f"the plain template needs exactly 2 turns (human, gpt), got {len(conversations)}.")
    if IMAGE_PLACEHOLDER not in conversations[0]["value"]:
        raise ValueError("the plain template needs `<image>` in the human turn (stage-1 records are image captions).")
    template = TEMPLATES["plain"]
    prompt = IMAGE_PLACEHOLDER + conversations[1]["value"] + template.sep
    input_ids = torch.tensor(tokenizer_image_token(prompt, tokenizer), dtype=torch.long)
    labels = input_ids.clone()
    labels[: len(tokenizer_image_token(IMAGE_PLACEHOLDER, tokenizer))] = IGNORE_INDEX
    return TokenizedRecord(input_ids, labels, prompt)


def preprocess_vicuna_v1(
    conversations: list[dict], tokenizer, has_image: bool, model_max_length: int
) -> TokenizedRecord:
    """Stage-2 (`vicuna_v1`) tokens and labels, by the original `preprocess_v1` arithmetic (see the module notes).

    Text-only records are tokenized with `truncation=True, max_length=model_max_length`; image records are not
    truncated. The tokenizer must be non-legacy (the original checks `tokenizer.legacy` and tokenizers >= 0.14).
    """
    template = TEMPLATES["vicuna_v1"]
    prompt = vicuna_v1_prompt(conversations, template)
    if has_image:
        input_ids = torch.tensor(tokenizer_image_token(prompt, tokenizer), dtype=torch.long)
    else:
        input_ids = torch.tensor(
            tokenizer(prompt, max_length=model_max_length, truncation=True).input_ids, dtype=torch.long
        )

    def length(text: str) -> int:
        return len(tokenizer_image_token(text, tokenizer)) if has_image else len(tokenizer(text).input_ids)

    labels = input_ids.clone()
    total_len = int(labels.ne(tokenizer.pad_token_id).sum())
    separator = template.sep + template.roles[1] + ": "
    cur_len = 1
    labels[:cur_len] = IGNORE_INDEX
    # A tokenizers-backed tokenizer built by `add_image_token` keeps the flag among its init kwargs only.
    non_legacy = not getattr(tokenizer, "legacy", tokenizer.init_kwargs.get("legacy", True))
    for index, round_text in enumerate(prompt.split(template.sep2)):
        if round_text == "":
            break
        parts = round_text.split(separator)
        if len(parts) != 2:
            break
        parts[0] += separator
        round_len = length(round_text)
        instruction_len = length(parts[0]) - 2
        if index != 0 and non_legacy:
            round_len -= 1
            instruction_len -= 1
        labels[cur_len : cur_len + instruction_len] = IGNORE_INDEX
        cur_len += round_len
    labels[cur_len:] = IGNORE_INDEX
    mismatch = cur_len < model_max_length and cur_len != total_len
    if mismatch:
        labels[:] = IGNORE_INDEX
        logger.warning("tokenization mismatch: %d vs. %d (all labels of the record masked)", cur_len, total_len)
    return TokenizedRecord(input_ids, labels, prompt, mismatch)


def preprocess(
    conversations: list[dict], tokenizer, template: str, has_image: bool, model_max_length: int
) -> TokenizedRecord:
    """Tokens and labels of one LLaVA-format record (`conversations` = its `"conversations"` list) with `template`
    (`"plain"` or `"vicuna_v1"`); `<image>` is moved to the front of its turns first when `has_image`."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {sorted(TEMPLATES)}, got {template!r}.")
    if has_image:
        conversations = move_image_to_front(conversations)
    if template == "plain":
        return preprocess_plain(conversations, tokenizer)
    return preprocess_vicuna_v1(conversations, tokenizer, has_image, model_max_length)


__all__ = [
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "IMAGE_PLACEHOLDER_ID",
    "TEMPLATES",
    "Template",
    "TokenizedRecord",
    "move_image_to_front",
    "preprocess",
    "preprocess_plain",
    "preprocess_vicuna_v1",
    "tokenizer_image_token",
    "vicuna_v1_prompt",
]
