"""Generation beyond greedy decoding, for every fusion variant: beam search, assisted decoding, static caches and
`torch.compile(fullgraph=True)` of a decode step (transformers' `GenerationTesterMixin` is not in its source
distribution, so these are this package's own), and activation checkpointing of internal fusion."""

import pytest
import torch
from conftest import make_inputs, make_model, needs_instructions, processor_for, random_image, vicuna_prompt
from transformers import StaticCache

from llava_multilayer.compatibility_llava_multilayer import CACHE_ARGUMENT, enable_activation_checkpointing


EXTERNAL_FUSERS = ["single", "concat", "mmfuser", "igva"]
INTERNAL_FUSION = ["internal_add", "internal_cross_pre", "internal_cross_post"]
GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
QUESTION = "What is shown in this image?"


def _model_and_inputs(tokenizer, variant: str, prompts: int = 1):
    model = make_model(variant)
    processor = processor_for(model.config, tokenizer)
    questions = [QUESTION, "Describe the colours you can see, one by one."][:prompts]
    kwargs = {"instructions": questions} if needs_instructions(model.config) else {}
    images = [random_image(seed) for seed in range(prompts)]
    return model, make_inputs(processor, [vicuna_prompt(q) for q in questions], images, **kwargs)


@pytest.mark.parametrize("variant", EXTERNAL_FUSERS + INTERNAL_FUSION)
def test_assisted_decoding_matches_greedy(tokenizer, variant):
    model, inputs = _model_and_inputs(tokenizer, variant)
    assistant = make_model(variant, seed=1)  # other weights: some of its candidates are rejected
    prefill_pixel_values = []
    assistant.register_forward_pre_hook(
        lambda module, args, kwargs: prefill_pixel_values.append(kwargs.get("pixel_values")), with_kwargs=True
    )
    with torch.no_grad():
        expected = model.generate(**inputs, **GREEDY)
        actual = model.generate(**inputs, **GREEDY, assistant_model=assistant)
    assert torch.equal(actual, expected)
    # The assistant's prefill (run with `is_first_iteration=False` by transformers) saw the images.
    assert prefill_pixel_values[0] is not None and torch.equal(prefill_pixel_values[0], inputs["pixel_values"])


@pytest.mark.parametrize("variant", EXTERNAL_FUSERS + INTERNAL_FUSION)
def test_static_cache_generation_matches_dynamic(tokenizer, variant):
    model, inputs = _model_and_inputs(tokenizer, variant, prompts=2)
    with torch.no_grad():
        expected = model.generate(**inputs, **GREEDY, output_scores=True, return_dict_in_generate=True)
        actual = model.generate(
            **inputs, **GREEDY, cache_implementation="static", output_scores=True, return_dict_in_generate=True
        )
    assert torch.equal(actual.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(actual.scores), torch.stack(expected.scores), atol=1e-5, rtol=0)


def _decode_step(model, inputs, cache):
    """Prefills `cache` eagerly and returns the inputs of the next (decode) step."""
    with torch.no_grad():
        logits = model(**inputs, **{CACHE_ARGUMENT: cache}, use_cache=True).logits
    next_token = logits[:, -1:].argmax(-1)
    attention_mask = torch.cat([inputs["attention_mask"], torch.ones_like(next_token)], dim=-1)
    position_ids = attention_mask.long().cumsum(-1)[:, -1:] - 1
    return dict(input_ids=next_token, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)


@pytest.mark.parametrize("variant", EXTERNAL_FUSERS + INTERNAL_FUSION)
def test_fullgraph_compile_is_declared(variant):
    assert make_model(variant)._can_compile_fullgraph


@pytest.mark.slow
@pytest.mark.parametrize("variant", EXTERNAL_FUSERS + INTERNAL_FUSION[:2])
def test_fullgraph_compiled_decode_step_matches_eager(tokenizer, variant):
    model, inputs = _model_and_inputs(tokenizer, variant, prompts=2)
    text_config = model.config.get_text_config(decoder=True)
    # Two prefills (not a copy of one cache: I_M keeps its visual keys/values with the cache they belong to).
    cache, compiled_cache = (
        StaticCache(config=text_config, max_cache_len=inputs["input_ids"].shape[1] + 4) for _ in range(2)
    )
    step = _decode_step(model, inputs, cache)
    assert torch.equal(_decode_step(model, inputs, compiled_cache)["input_ids"], step["input_ids"])
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, fullgraph=True)
    with torch.no_grad():
        expected = model(**step, **{CACHE_ARGUMENT: cache}).logits
        actual = compiled(**step, **{CACHE_ARGUMENT: compiled_cache}).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)

    # The compiled step, reused for another prompt's cache (other images), reads that prompt's state.
    other_inputs = dict(inputs, pixel_values=inputs["pixel_values"].flip(0))
    other_cache, other_compiled_cache = (
        StaticCache(config=text_config, max_cache_len=inputs["input_ids"].shape[1] + 4) for _ in range(2)
    )
    other_step = _decode_step(model, other_inputs, other_cache)
    _decode_step(model, other_inputs, other_compiled_cache)
    with torch.no_grad():
        expected = model(**other_step, **{CACHE_ARGUMENT: other_cache}).logits
        actual = compiled(**other_step, **{CACHE_ARGUMENT: other_compiled_cache}).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("variant", INTERNAL_FUSION)
def test_internal_fusion_activation_checkpointing_gradients(tokenizer, variant, use_reentrant):
    """Checkpointed fusing layers recompute in backward and give the gradients of the plain run, the projectors of
    the internal features (reached only through the checkpointed layers' visual inputs) included."""
    model, inputs = _model_and_inputs(tokenizer, variant, prompts=2)
    model.train()
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)

    def gradients():
        model.zero_grad()
        model(**inputs, labels=labels, use_cache=False).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    expected = gradients()
    fused_layer = model.model.internal_fusion_layers[0]
    calls = []
    fused_layer.register_forward_pre_hook(lambda *_: calls.append(1))
    inner = "fused_forward" if hasattr(fused_layer, "fused_forward") else "decoder_forward"
    original = getattr(fused_layer, inner)
    runs = []

    def counting(*args, **kwargs):
        runs.append(1)
        return original(*args, **kwargs)

    setattr(fused_layer, inner, counting)
    enable_activation_checkpointing(model, {"use_reentrant": use_reentrant})
    actual = gradients()
    assert len(calls) == 1 and len(runs) == 2  # one forward, recomputed once in backward
    assert actual.keys() == expected.keys()
    assert any(name.startswith("model.internal_projectors.") for name in actual)
    for name, gradient in expected.items():
        torch.testing.assert_close(actual[name], gradient, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("variant", EXTERNAL_FUSERS + INTERNAL_FUSION)
def test_beam_search_scores_are_the_model_log_likelihoods(tokenizer, variant):
    """Each returned beam's score (no length penalty) is the log-likelihood that one uncached forward of the prompt,
    its images and the beam gives to the beam's tokens: the beams carry the images' state correctly."""
    model, inputs = _model_and_inputs(tokenizer, variant)
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=4,
            num_beams=3,
            num_return_sequences=3,
            length_penalty=0.0,
            early_stopping=True,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
        prompt_length = inputs["input_ids"].shape[1]
        checked = 0
        for sequence, score in zip(output.sequences, output.sequences_scores):
            if (sequence[prompt_length:] == 0).any():
                continue  # a beam that ended early is padded
            row = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}
            logits = model(input_ids=sequence[None], attention_mask=torch.ones_like(sequence[None]), **row).logits
            log_probs = logits[0, prompt_length - 1 : -1].float().log_softmax(-1)
            expected = log_probs.gather(-1, sequence[prompt_length:, None]).sum()
            torch.testing.assert_close(score, expected, atol=1e-4, rtol=0)
            checked += 1
    assert checked > 0
