"""Internal fusion across decode steps: cached decoding must equal a full recompute, token for token.

This guards against the silent failure where the visual inputs of internal-fusion layers are lost after prefill
(I_M's cross-attention keys/values not found at a decode step): decoding would then go on as if fusion were off and
answer differently, without any error.
"""

import pytest
import torch
from conftest import make_inputs, make_model, processor_for, random_image, vicuna_prompt

from llava_multilayer.internal_fusion_llava_multilayer import FusionCrossAttention


INTERNAL_VARIANTS = ["internal_add", "internal_cross_pre", "internal_cross_post", "internal_cross_parallel"]
CROSS_VARIANTS = [variant for variant in INTERNAL_VARIANTS if "cross" in variant]
PROMPTS = [vicuna_prompt("What is shown in this image?"), vicuna_prompt("Which colours do you see, one by one?")]
MAX_NEW_TOKENS = 10


@pytest.fixture
def model_and_inputs(tokenizer, instruction_tokenizer):
    def _build(variant: str):
        model = make_model(variant)
        processor = processor_for(model.config, tokenizer, instruction_tokenizer)
        return model, make_inputs(processor, PROMPTS, [random_image(0), random_image(1, (20, 50))])

    return _build


def _greedy(model, inputs, use_cache: bool) -> torch.Tensor:
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=0,
            use_cache=use_cache,
        )
    return output[:, inputs["input_ids"].shape[1] :]


class _KeyValueCounter:
    """Counts the calls of `FusionCrossAttention.key_values` (one per I_M layer each time images are encoded)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = FusionCrossAttention.key_values

        def counting(module, features):
            self.calls += 1
            return original(module, features)

        monkeypatch.setattr(FusionCrossAttention, "key_values", counting)


@pytest.mark.parametrize("variant", INTERNAL_VARIANTS)
def test_cached_greedy_decoding_equals_full_recompute(model_and_inputs, variant):
    model, inputs = model_and_inputs(variant)
    cached = _greedy(model, inputs, use_cache=True)
    recomputed = _greedy(model, inputs, use_cache=False)
    assert cached.shape[1] == MAX_NEW_TOKENS
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("variant", CROSS_VARIANTS)
def test_decoding_without_visual_inputs_would_answer_differently(model_and_inputs, variant):
    """The check above can fail: dropping the cross-attention inputs at decode steps changes the answer."""
    model, inputs = model_and_inputs(variant)
    cached = _greedy(model, inputs, use_cache=True)
    original_put = model.model.cross_attention_store.put
    model.model.cross_attention_store.put = lambda cache, entries: None
    try:
        forgetful = _greedy(model, inputs, use_cache=True)
    finally:
        model.model.cross_attention_store.put = original_put
    assert not torch.equal(cached, forgetful)


@pytest.mark.parametrize("variant", CROSS_VARIANTS)
def test_cross_key_values_computed_once_per_generate(model_and_inputs, monkeypatch, variant):
    model, inputs = model_and_inputs(variant)
    counter = _KeyValueCounter(monkeypatch)
    num_layers = len(model.model.internal_fusion_layers)
    _greedy(model, inputs, use_cache=True)
    assert counter.calls == num_layers
    _greedy(model, inputs, use_cache=True)
    assert counter.calls == 2 * num_layers, "a second generate call encodes its own prompt once"
    counter.calls = 0
    _greedy(model, inputs, use_cache=False)
    assert counter.calls == MAX_NEW_TOKENS * num_layers, "without a cache every step recomputes everything"


@pytest.mark.parametrize("variant", CROSS_VARIANTS)
def test_manual_decode_loop_with_returned_cache(model_and_inputs, variant):
    """A hand-written loop that passes back the cache the model returned decodes like a full recompute."""
    model, inputs = model_and_inputs(variant)
    recomputed = _greedy(model, inputs, use_cache=False)
    attention_mask = inputs["attention_mask"]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        output = model(**inputs, position_ids=position_ids, use_cache=True)
        tokens = []
        for _ in range(MAX_NEW_TOKENS):
            next_token = output.logits[:, -1, :].argmax(-1, keepdim=True)
            tokens.append(next_token)
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=-1)
            position_ids = position_ids[:, -1:] + 1
            cache = next(value for key, value in output.items() if key in ("cache", "past_key_values"))
            output = model(
                input_ids=next_token, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
                use_cache=True,
            )
    assert torch.equal(torch.cat(tokens, dim=-1), recomputed)
