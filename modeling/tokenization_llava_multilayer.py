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
"""The tokenization rule of the image placeholder, carried by the tokenizer itself.

The original codebases tokenize a prompt with `tokenizer_image_token`: the text chunks between `<image>` placeholders
are tokenized one by one, so a SentencePiece (LLaMA) tokenizer starts every chunk after an image with its word-start
marker `▁`, as the start of a new text. A tokenizer that knows `<image>` as an added token tokenizes the whole prompt
in one call instead, and its `Metaspace(prepend_scheme="first")` pre-tokenizer marks only the start of the prompt:
`"USER: <image>\\nWhat"` loses the `▁` before `\\n`, and the model sees other ids than it was trained on.

[`add_image_token`] makes one rule out of the two: the tokenizer's normalizer puts a space after each `<image>` that
starts a chunk the original would have marked (a non-empty chunk that does not already start with a space or a
special token), and `<image>` is matched after normalization. Whole-prompt tokenization (this package's processor,
vLLM, anything that calls the tokenizer) then gives exactly the ids of the per-chunk tokenization. The rule lives in
`tokenizer.json` and is loaded verbatim by the generic `TokenizersBackend` class, which is why the returned tokenizer
is of that class.
"""

import copy
import json
import re

from tokenizers import AddedToken, Regex, normalizers
from transformers import PreTrainedTokenizerBase, TokenizersBackend


IMAGE_TOKEN = "<image>"

# Prompts whose whole-prompt tokenization must equal the per-chunk one ([`follows_image_token_rule`]).
_PROBE_PROMPTS = ("a{0}\nb c", "a {0} b", "{0}{0}\nb", "a{0}", "{0}</s>b")


def _needs_word_start_rule(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the pre-tokenizer marks only the start of the text (`Metaspace` with `prepend_scheme="first"`)."""
    pre_tokenizer = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if pre_tokenizer.get("type") == "Sequence" else [
        pre_tokenizer
    ]
    return any(step.get("type") == "Metaspace" and step.get("prepend_scheme") == "first" for step in steps)


def image_token_normalizer(image_token: str = IMAGE_TOKEN) -> normalizers.Replace:
    """The normalizer step that puts a space after each `image_token` followed by a chunk that gets the word-start
    marker when tokenized on its own: not at the end of a segment, not before a space, `▁` or another image token
    (special tokens such as `</s>` are split off before normalization, so they end the segment)."""
    escaped = re.escape(image_token)
    return normalizers.Replace(Regex(f"{escaped}(?=[^ \\x{{2581}}])(?!{escaped})"), f"{image_token} ")


def add_image_token(tokenizer: PreTrainedTokenizerBase, image_token: str = IMAGE_TOKEN) -> PreTrainedTokenizerBase:
    """A copy of `tokenizer` with `image_token` added as a special token (the next free id when it is new) and the
    tokenization rule of the original codebases' `tokenizer_image_token` built in (see the module docstring).

    Tokenizers whose pre-tokenizer does not need the rule (byte-level BPE) get the token only; the others come back
    as a `TokenizersBackend` whose `tokenizer.json` holds the rule, with the same special tokens, padding side and
    `legacy` flag.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"`tokenizer` must be a tokenizers-backed (fast) tokenizer, got {type(tokenizer).__name__}: the image "
            "token's rule is written into tokenizer.json."
        )
    if not _needs_word_start_rule(tokenizer):
        tokenizer = copy.deepcopy(tokenizer)
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
        return tokenizer
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    rule = image_token_normalizer(image_token)
    if backend.normalizer is None:
        backend.normalizer = rule
    elif repr(rule) not in repr(backend.normalizer):
        backend.normalizer = normalizers.Sequence([backend.normalizer, rule])
    # Matched after normalization, so that the space the rule puts after it starts the next chunk.
    backend.add_special_tokens([AddedToken(image_token, special=True, normalized=True)])
    init_kwargs = {
        key: value
        for key, value in tokenizer.init_kwargs.items()
        if key not in ("tokenizer_file", "vocab_file", "vocab", "merges", "name_or_path", "added_tokens_decoder")
    }
    init_kwargs["legacy"] = getattr(tokenizer, "legacy", init_kwargs.get("legacy", False))
    init_kwargs["padding_side"] = tokenizer.padding_side
    result = TokenizersBackend(tokenizer_object=backend, **init_kwargs)
    result.chat_template = getattr(tokenizer, "chat_template", None)
    return result


def tokenize_by_chunks(tokenizer: PreTrainedTokenizerBase, prompt: str, image_token: str = IMAGE_TOKEN) -> list[int]:
    """The original `tokenizer_image_token` with the image token's id: each chunk tokenized on its own, BOS kept
    only at the front. The reference [`add_image_token`]'s whole-prompt tokenization reproduces."""
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    chunks = [tokenizer(chunk)["input_ids"] for chunk in prompt.split(image_token)]
    bos = tokenizer.bos_token_id
    input_ids = list(chunks[0])
    for chunk in chunks[1:]:
        input_ids += [image_token_id] + (chunk[1:] if bos is not None and chunk[:1] == [bos] else chunk)
    return input_ids


def follows_image_token_rule(tokenizer: PreTrainedTokenizerBase, image_token: str = IMAGE_TOKEN) -> bool:
    """Whether whole-prompt tokenization equals [`tokenize_by_chunks`] on a few prompts that tell the two apart."""
    for template in _PROBE_PROMPTS:
        prompt = template.format(image_token)
        if tokenizer(prompt)["input_ids"] != tokenize_by_chunks(tokenizer, prompt, image_token):
            return False
    return True


__all__ = [
    "IMAGE_TOKEN",
    "add_image_token",
    "follows_image_token_rule",
    "image_token_normalizer",
    "tokenize_by_chunks",
]
