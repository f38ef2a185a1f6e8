"""The image token's tokenization rule: tokenizing a whole prompt (the processor, vLLM, any caller of the tokenizer)
gives the ids of the original codebases' `tokenizer_image_token`, which tokenizes each chunk around `<image>` on its
own (reproduced in `training/conversation.py`, checked against the originals' training data in
test_training_parity.py)."""

import pytest
from conftest import IMAGE_TOKEN, IMAGE_TOKEN_ID, NUM_PATCHES, TOKENIZER_DIR, make_processor, random_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from llava_multilayer import add_image_token
from llava_multilayer.tokenization_llava_multilayer import follows_image_token_rule, tokenize_by_chunks
from llava_multilayer.training.conversation import IMAGE_PLACEHOLDER_ID, tokenizer_image_token


# Pieces that meet at chunk borders in every way that matters to a SentencePiece tokenizer: spaces, newlines, the
# word-start marker itself, special tokens, the image token repeated or at either end, non-ASCII text.
PIECES = [
    *("a", "b", "What", " ", "  ", "\n", "\t", "\u2581", "é", "?"),
    *(IMAGE_TOKEN, "</s>", "<s>", "USER:", "ASSISTANT:"),
]
prompts = st.lists(st.sampled_from(PIECES), min_size=1, max_size=12).map("".join)


@pytest.fixture(scope="module")
def original_tokenizer():
    """The fixture's LLaMA tokenizer as the original code loads it: no image token at all."""
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def ruled_tokenizer(original_tokenizer):
    return add_image_token(original_tokenizer, IMAGE_TOKEN)


def _original_ids(original_tokenizer, prompt: str, num_image_tokens: int = 1) -> list[int]:
    ids = []
    for token in tokenizer_image_token(prompt, original_tokenizer):
        ids += [IMAGE_TOKEN_ID] * num_image_tokens if token == IMAGE_PLACEHOLDER_ID else [token]
    return ids


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=prompts)
def test_whole_prompt_tokenization_equals_the_originals_per_chunk_tokenization(
    original_tokenizer, ruled_tokenizer, prompt
):
    assert ruled_tokenizer(prompt)["input_ids"] == _original_ids(original_tokenizer, prompt)
    assert ruled_tokenizer(prompt)["input_ids"] == tokenize_by_chunks(ruled_tokenizer, prompt)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=prompts.filter(lambda prompt: prompt.strip()))
def test_processor_gives_the_originals_ids(original_tokenizer, ruled_tokenizer, prompt):
    processor = make_processor(ruled_tokenizer)
    images = [random_image(index) for index in range(prompt.count(IMAGE_TOKEN))] or None
    ids = processor(images=images, text=prompt)["input_ids"][0]
    assert ids == _original_ids(original_tokenizer, prompt, NUM_PATCHES)


def test_the_unruled_tokenizer_loses_the_word_start_marker(original_tokenizer, ruled_tokenizer):
    """What the rule fixes: a tokenizer that only knows `<image>` drops the `▁` the original puts after it."""
    unruled = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    unruled.add_tokens([IMAGE_TOKEN], special_tokens=True)
    prompt = f"USER: {IMAGE_TOKEN}\nWhat is it? ASSISTANT:"
    assert unruled(prompt)["input_ids"] != _original_ids(original_tokenizer, prompt)
    assert not follows_image_token_rule(unruled)
    assert follows_image_token_rule(ruled_tokenizer)


def test_the_processor_builds_the_rule_into_an_unruled_tokenizer(original_tokenizer):
    """A tokenizer saved before the rule existed (or built by hand) still gives the originals' ids."""
    unruled = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    unruled.add_tokens([IMAGE_TOKEN], special_tokens=True)
    processor = make_processor(unruled)
    assert follows_image_token_rule(processor.tokenizer) and not follows_image_token_rule(unruled)
    prompt = f"USER: {IMAGE_TOKEN}\nWhat is it? ASSISTANT:"
    ids = processor(images=[random_image(0)], text=prompt)["input_ids"][0]
    assert ids == _original_ids(original_tokenizer, prompt, NUM_PATCHES)


def test_the_processor_refuses_a_tokenizer_without_the_image_token():
    with pytest.raises(ValueError, match="has no '<image>' token.*add_image_token"):
        make_processor(AutoTokenizer.from_pretrained(TOKENIZER_DIR))


def test_the_rule_survives_save_and_load(ruled_tokenizer, original_tokenizer, tmp_path):
    """vLLM and `AutoTokenizer` read the saved tokenizer.json: the rule must be in it."""
    ruled_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    prompt = f"A1</s>USER: {IMAGE_TOKEN}\nQ ASSISTANT:"
    assert reloaded(prompt)["input_ids"] == _original_ids(original_tokenizer, prompt)
    assert reloaded.convert_tokens_to_ids(IMAGE_TOKEN) == IMAGE_TOKEN_ID
    assert reloaded.padding_side == original_tokenizer.padding_side
    assert reloaded.init_kwargs["legacy"] is False, "the training arithmetic reads the non-legacy flag"


def test_adding_twice_changes_nothing(ruled_tokenizer):
    again = add_image_token(ruled_tokenizer, IMAGE_TOKEN)
    prompt = f"x {IMAGE_TOKEN}\ny{IMAGE_TOKEN}{IMAGE_TOKEN}z"
    assert again(prompt)["input_ids"] == ruled_tokenizer(prompt)["input_ids"]
    assert len(again) == len(ruled_tokenizer)


def test_slow_tokenizer_is_refused():
    with pytest.raises(TypeError, match="tokenizers-backed"):
        add_image_token(object())
