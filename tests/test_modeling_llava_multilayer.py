"""Model tests of the foundation: LLaVA parity of the baseline fusers, save/load through the Auto classes,
generation, attention backends, gradient checkpointing and config validation. Tiny random models, CPU."""

import re

import pytest
import torch
from conftest import (
    IMAGE_TOKEN_ID,
    NUM_PATCHES,
    TEXT_VOCAB_SIZE,
    VARIANTS,
    make_config,
    make_inputs,
    make_model,
    needs_instructions,
    processor_for,
    random_image,
    randomize_weights_,
    tiny_siglip_vision_config,
    tiny_text_config,
    tiny_vision_config,
    vicuna_prompt,
)
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
)

from llava_multilayer import (
    LlavaMultiLayerConfig,
    LlavaMultiLayerForConditionalGeneration,
    LlavaMultiLayerInstructionProcessor,
    LlavaMultiLayerModel,
    LlavaMultiLayerProcessor,
)
from llava_multilayer.compatibility_llava_multilayer import (
    enable_activation_checkpointing,
    is_activation_checkpointing,
)


ALL_VARIANTS = list(VARIANTS)
PROMPT_A = vicuna_prompt("What is shown in this image?")
PROMPT_B = vicuna_prompt("Describe the colours you can see in the picture, one by one, please.")
GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


@pytest.fixture
def build(tokenizer, instruction_tokenizer):
    """`build(variant, **overrides)` -> (model, processor)."""

    def _build(variant: str, **overrides):
        model = make_model(variant, **overrides)
        return model, processor_for(model.config, tokenizer, instruction_tokenizer)

    return _build


def _generate(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, **{**GREEDY, **kwargs}, return_dict_in_generate=True, output_scores=True)


def _new_tokens(output, inputs) -> torch.Tensor:
    return output.sequences[:, inputs["input_ids"].shape[1] :]


# --------------------------------------------------------------------------------------------------------------
# Parity with transformers' LLaVA
# --------------------------------------------------------------------------------------------------------------


def _llava_pair(vision_feature_layer, image_token_in_vocab: bool):
    """A random tiny `LlavaForConditionalGeneration` and our model with its weights (same names, strict load).

    LLaVA's image token is always inside its vocabulary (513 tokens, image token 512); ours is inside too, or
    outside (vocabulary 512, the LLaVA rows of token 512 dropped).
    """
    llava_config = LlavaConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(vocab_size=TEXT_VOCAB_SIZE + 1),
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=NUM_PATCHES,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    llava = randomize_weights_(LlavaForConditionalGeneration(llava_config), seed=3).eval()
    vocab_size = TEXT_VOCAB_SIZE + 1 if image_token_in_vocab else TEXT_VOCAB_SIZE
    ours = make_model(
        "single" if isinstance(vision_feature_layer, int) else "concat",
        vision_feature_layer=vision_feature_layer,
        text_config=tiny_text_config(vocab_size=vocab_size),
        randomize=False,
    )
    state_dict = llava.state_dict()
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        state_dict[key] = state_dict[key][:vocab_size]
    ours.load_state_dict(state_dict, strict=True)
    return llava, ours


@pytest.mark.parametrize("image_token_in_vocab", [True, False], ids=["image_token_in_vocab", "image_token_outside"])
@pytest.mark.parametrize("vision_feature_layer", [-2, [-3, -1], [0, 2, -1]], ids=["single", "concat2", "concat3"])
def test_baseline_fusers_match_llava(processor, vision_feature_layer, image_token_in_vocab):
    llava, ours = _llava_pair(vision_feature_layer, image_token_in_vocab)
    inputs = make_inputs(processor, [PROMPT_A, PROMPT_B], [random_image(0), random_image(1, (20, 50))])
    with torch.no_grad():
        expected = llava(**inputs).logits[..., :TEXT_VOCAB_SIZE]
        actual = ours(**inputs).logits[..., :TEXT_VOCAB_SIZE]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)

    # Generation: LLaVA must not pick its extra row when ours has no such token.
    suppress = {} if image_token_in_vocab else {"suppress_tokens": [IMAGE_TOKEN_ID]}
    expected_ids = _new_tokens(_generate(llava, inputs, **suppress), inputs)
    actual_ids = _new_tokens(_generate(ours, inputs), inputs)
    assert torch.equal(actual_ids, expected_ids)


def test_llava_parity_detects_a_wrong_layer(processor):
    """The parity check is sensitive: the same weights with another feature layer give other logits."""
    llava, _ = _llava_pair(-2, True)
    other = make_model(
        "single", vision_feature_layer=-3, text_config=tiny_text_config(vocab_size=513), randomize=False
    )
    other.load_state_dict(llava.state_dict(), strict=True)
    inputs = make_inputs(processor, [PROMPT_A], [random_image(0)])
    with torch.no_grad():
        assert (llava(**inputs).logits - other(**inputs).logits).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------------------
# Every part of each fusion set-up is live
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_structure_and_image_dependence(build, variant):
    model, processor = build(variant)
    config = model.config
    inner = model.model
    assert isinstance(inner, LlavaMultiLayerModel)
    assert hasattr(inner.multi_modal_projector, "linear_1") and hasattr(inner.multi_modal_projector, "linear_2")
    assert (inner.instruction_encoder is not None) == needs_instructions(config)
    if config.internal_fusion_type is None:
        assert inner.internal_projectors is None and inner.internal_fusion_layers == []
    else:
        assert len(inner.internal_projectors) == len(config.internal_feature_layers)
        assert [layer.layer_idx for layer in inner.internal_fusion_layers] == [0, 1]

    prompts = [PROMPT_A, PROMPT_B]
    inputs = make_inputs(processor, prompts, [random_image(0), random_image(1)])
    other = make_inputs(processor, prompts, [random_image(2), random_image(3)])
    assert int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == 2 * NUM_PATCHES
    with torch.no_grad():
        outputs = model(**inputs)
        changed = model(**other).logits
    assert outputs.logits.shape == (*inputs["input_ids"].shape, TEXT_VOCAB_SIZE)
    assert outputs.image_hidden_states.shape == (2, NUM_PATCHES, config.text_config.hidden_size)
    assert torch.isfinite(outputs.logits).all()
    assert (outputs.logits[:, -1] - changed[:, -1]).abs().max() > 1e-2, "the image does not reach the logits"
    if config.fusion_type == "igva":
        assert outputs.fusion_weights.shape == (2, 2)
        torch.testing.assert_close(outputs.fusion_weights.sum(-1), torch.ones(2))


def test_instruction_changes_igva_weights(build):
    model, processor = build("igva")
    aggregator = model.model.multi_modal_projector.aggregator
    with torch.no_grad():  # as in the IGVA fixture: a strong instruction projection, far-from-uniform weights
        aggregator.sentence_proj.weight.mul_(10)
        aggregator.linear.weight.mul_(2)
    image = random_image(0)
    weights = []
    instructions = ("What color is the large square in the picture?", "How many small objects are on the left side?")
    for instruction in instructions:
        inputs = processor(images=image, text=PROMPT_A, instructions=instruction, return_tensors="pt")
        with torch.no_grad():
            weights.append(model(**inputs).fusion_weights)
    weights_1, weights_2 = weights
    assert (weights_1 - weights_2).abs().max() > 1e-2


def test_image_token_mismatch_raises(build):
    model, processor = build("single")
    inputs = make_inputs(processor, [PROMPT_A], [random_image(0)])
    input_ids = inputs["input_ids"]
    first_image_token = int((input_ids[0] == IMAGE_TOKEN_ID).nonzero()[0])
    one_token_short = torch.cat([input_ids[:, :first_image_token], input_ids[:, first_image_token + 1 :]], dim=1)
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(input_ids=one_token_short, pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match="no `pixel_values`"):
        model(input_ids=inputs["input_ids"])


# --------------------------------------------------------------------------------------------------------------
# Save / load through the Auto classes
# --------------------------------------------------------------------------------------------------------------

_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "architectures", "auto_map", "dtype"}


def _config_fields(config) -> dict:
    return {key: value for key, value in config.to_dict().items() if key not in _VOLATILE_CONFIG_KEYS}


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_save_load_round_trip(build, tmp_path, variant):
    model, processor = build(variant)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is LlavaMultiLayerConfig
    assert _config_fields(config) == _config_fields(model.config)
    for field in ("fusion_type", "vision_feature_layer", "internal_fusion_type", "internal_fusion_placement",
                  "internal_feature_layers", "internal_layer_map", "igva_layer_groups", "image_token_id"):
        assert getattr(config, field) == getattr(model.config, field), field

    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is LlavaMultiLayerForConditionalGeneration
    assert type(base) is LlavaMultiLayerModel
    instruction_guided = needs_instructions(model.config)
    expected_processor = LlavaMultiLayerInstructionProcessor if instruction_guided else LlavaMultiLayerProcessor
    assert type(loaded_processor) is expected_processor
    assert loaded_processor.chat_template == processor.chat_template

    images = [random_image(0), random_image(1)]
    inputs = make_inputs(processor, [PROMPT_A, PROMPT_B], images)
    reloaded_inputs = make_inputs(loaded_processor, [PROMPT_A, PROMPT_B], images)
    assert inputs.keys() == reloaded_inputs.keys()
    for key in inputs:
        assert torch.equal(inputs[key], reloaded_inputs[key]), key
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
        torch.testing.assert_close(
            base(**inputs).last_hidden_state, model.model(**inputs).last_hidden_state, atol=0, rtol=0
        )


# --------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_batched_left_padded_generation_matches_single(build, variant):
    model, processor = build(variant)
    prompts, images = [PROMPT_A, PROMPT_B], [random_image(0), random_image(1, (20, 50))]
    batch = make_inputs(processor, prompts, images)
    assert batch["attention_mask"][0, 0] == 0, "the shorter prompt must be left-padded"
    batched = _generate(model, batch)
    batched_ids = _new_tokens(batched, batch)
    for row, (prompt, image) in enumerate(zip(prompts, images)):
        alone_inputs = make_inputs(processor, [prompt], [image])
        alone = _generate(model, alone_inputs)
        assert torch.equal(batched_ids[row], _new_tokens(alone, alone_inputs)[0]), f"row {row}"
        for step, scores in enumerate(alone.scores):
            torch.testing.assert_close(batched.scores[step][row], scores[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_cached_generation_matches_uncached(build, variant):
    model, processor = build(variant)
    inputs = make_inputs(processor, [PROMPT_A, PROMPT_B], [random_image(0), random_image(1)])
    cached = _generate(model, inputs, use_cache=True)
    uncached = _generate(model, inputs, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for cached_scores, uncached_scores in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(cached_scores, uncached_scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_sampling_is_seeded(build, variant):
    model, processor = build(variant)
    inputs = make_inputs(processor, [PROMPT_A, PROMPT_B], [random_image(0), random_image(1)])
    sample = dict(do_sample=True, top_k=0, temperature=1.5, max_new_tokens=8, pad_token_id=0)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            runs.append(model.generate(**inputs, **sample)[:, inputs["input_ids"].shape[1] :])
    assert runs[0].shape == (2, 8)
    assert ((runs[0] >= 0) & (runs[0] < TEXT_VOCAB_SIZE)).all()
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_text_only_prompts(build, variant):
    model, processor = build(variant)
    prompts = [f"{vicuna_prompt('Tell me a story.', 0)}", f"{vicuna_prompt('Hi there, how are you doing?', 0)}"]
    batch = make_inputs(processor, prompts)
    assert "pixel_values" not in batch and not (batch["input_ids"] == IMAGE_TOKEN_ID).any()
    with torch.no_grad():
        outputs = model(**batch)
    assert outputs.image_hidden_states is None and torch.isfinite(outputs.logits).all()
    batched_ids = _new_tokens(_generate(model, batch), batch)
    for row, prompt in enumerate(prompts):
        alone = make_inputs(processor, [prompt])
        assert torch.equal(batched_ids[row], _new_tokens(_generate(model, alone), alone)[0])


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_mixed_text_only_and_image_prompts(build, variant):
    model, processor = build(variant)
    prompts = [vicuna_prompt("Tell me a story.", 0), PROMPT_A]
    image = random_image(4)
    batch = make_inputs(processor, prompts, [image])
    batched_ids = _new_tokens(_generate(model, batch), batch)
    text_alone = make_inputs(processor, prompts[:1])
    image_alone = make_inputs(processor, prompts[1:], [image])
    assert torch.equal(batched_ids[0], _new_tokens(_generate(model, text_alone), text_alone)[0])
    assert torch.equal(batched_ids[1], _new_tokens(_generate(model, image_alone), image_alone)[0])


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_one_prompt_with_two_images(build, variant):
    model, processor = build(variant)
    two = vicuna_prompt("Compare the two images.", 2)
    first, second = random_image(5), random_image(6, (30, 60))
    inputs = make_inputs(processor, [two], [first, second])
    swapped = make_inputs(processor, [two], [second, first])
    assert int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == 2 * NUM_PATCHES
    with torch.no_grad():
        outputs = model(**inputs)
        swapped_logits = model(**swapped).logits
    assert outputs.image_hidden_states.shape[0] == 2
    assert (outputs.logits[:, -1] - swapped_logits[:, -1]).abs().max() > 1e-3, "image order must matter"
    # Batched with a one-image prompt, each row generates what it generates alone.
    batch = make_inputs(processor, [two, PROMPT_A], [first, second, random_image(7)])
    batched_ids = _new_tokens(_generate(model, batch), batch)
    assert torch.equal(batched_ids[0], _new_tokens(_generate(model, inputs), inputs)[0])
    single = make_inputs(processor, [PROMPT_A], [random_image(7)])
    assert torch.equal(batched_ids[1], _new_tokens(_generate(model, single), single)[0])


# --------------------------------------------------------------------------------------------------------------
# Attention backends, training
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_eager_matches_sdpa(build, variant):
    model, processor = build(variant)
    inputs = make_inputs(processor, [PROMPT_A, PROMPT_B], [random_image(0), random_image(1)])
    results = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        assert model.config.text_config._attn_implementation == implementation
        assert model.config.vision_config._attn_implementation == implementation
        assert model.model.language_model.config._attn_implementation == implementation
        with torch.no_grad():
            results[implementation] = model(**inputs).logits
    real = inputs["attention_mask"].bool()  # outputs at (fully masked) left-padding positions are arbitrary
    torch.testing.assert_close(results["eager"][real], results["sdpa"][real], atol=1e-4, rtol=1e-4)


def _loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)
    labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    loss = model(**inputs, labels=labels, use_cache=False).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_gradient_checkpointing_trains(build, variant):
    model, processor = build(variant)
    inputs = make_inputs(processor, [PROMPT_A, PROMPT_B], [random_image(0), random_image(1)], padding_side="right")
    model.train()
    loss, grads = _loss_and_grads(model, inputs)

    enable_activation_checkpointing(model)
    assert is_activation_checkpointing(model)
    # A pre-hook inside the checkpointed layer (the recompute stops early, so a post-hook may not fire again).
    calls = []
    hook = model.model.language_model.layers[0].mlp.register_forward_pre_hook(lambda *args: calls.append(1))
    checkpointed_loss, checkpointed_grads = _loss_and_grads(model, inputs)
    hook.remove()
    assert len(calls) == 2, "the decoder layer was not recomputed in backward: checkpointing is inactive"

    torch.testing.assert_close(checkpointed_loss, loss)
    projector_grads = [name for name in grads if ".multi_modal_projector." in name or ".internal_projectors." in name]
    assert any(".multi_modal_projector.linear_1." in name for name in projector_grads)
    if model.config.internal_fusion_type is not None:
        assert any(".internal_projectors." in name for name in projector_grads)
    assert grads.keys() == checkpointed_grads.keys()
    for name in grads:
        assert torch.isfinite(checkpointed_grads[name]).all(), name
        torch.testing.assert_close(checkpointed_grads[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)
    for name in projector_grads:
        assert grads[name].abs().max() > 0, f"{name} gets no gradient"
    if model.model.instruction_encoder is not None:
        assert not any(".instruction_encoder." in name for name in grads), "the instruction encoder must stay frozen"


@pytest.mark.skipif(
    not hasattr(PreTrainedModel, "activation_checkpointing_enable"),
    reason="activation checkpointing got its name in transformers 5.23; older releases only have the old name",
)
def test_deprecated_gradient_checkpointing_alias(build):
    """transformers 5.x renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable`; the old name
    still works (with a FutureWarning), as training scripts and peft call it."""
    model, _ = build("internal_cross_pre")
    with pytest.warns(FutureWarning, match="activation_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_activation_checkpointing
    layers = [model.model.language_model.layers[0], model.model.vision_tower.encoder.layers[0]]
    assert all(layer.gradient_checkpointing for layer in layers)
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing and not any(layer.gradient_checkpointing for layer in layers)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["single", "mmfuser", "internal_cross_pre"])
def test_gpu_matches_cpu(build, variant):
    model, processor = build(variant)
    inputs = make_inputs(processor, [PROMPT_A, PROMPT_B], [random_image(0), random_image(1)])
    with torch.no_grad():
        expected = model(**inputs).logits
        model.to("cuda")
        actual = model(**inputs.to("cuda")).logits.cpu()
    torch.testing.assert_close(actual, expected, atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------------------------------


def _validation_error(build_config) -> ValueError:
    """The `ValueError` raised while building a config. transformers' strict configs wrap the `ValueError` of a
    `validate_*` method into huggingface_hub's `StrictDataclassClassValidationError` (raised `from` it), as for
    its own configs (e.g. `LlamaConfig` with heads not dividing the width)."""
    with pytest.raises(Exception) as info:
        build_config()
    error = info.value
    while not isinstance(error, ValueError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, ValueError), f"expected a ValueError, got {info.value!r}"
    return error


@pytest.mark.parametrize(
    ("overrides", "field", "detail"),
    [
        (dict(vision_feature_layer=99), "vision_feature_layer", r"\[99\]"),
        (dict(vision_feature_layer=-6), "vision_feature_layer", r"\[-6\]"),
        (dict(vision_feature_layer=[-2]), "vision_feature_layer", "single int"),
        (dict(fusion_type="concat", vision_feature_layer=[]), "vision_feature_layer", "non-empty list"),
        (dict(fusion_type="concat", vision_feature_layer=[[], -1]), "vision_feature_layer", "empty"),
        (dict(fusion_type="concat", vision_feature_layer=[[2, 2], -1]), "vision_feature_layer", "repeats"),
        (dict(fusion_type="concat", vision_feature_layer=[[1, 7], -1]), "vision_feature_layer", r"\[7\]"),
        (dict(fusion_type="mmfuser", vision_feature_layer=[-1]), "vision_feature_layer", "at least two"),
        (dict(fusion_type="mmfuser", vision_feature_layer=[[1, 2], -1]), "vision_feature_layer", "single indices"),
        (dict(fusion_type="mmfuser", mmfuser_num_heads=5), "mmfuser_num_heads", r"\(5\)"),
        (dict(fusion_type="igva", igva_layer_groups=[]), "igva_layer_groups", "non-empty"),
        (dict(fusion_type="igva", igva_layer_groups=[[1, 2], []]), "igva_layer_groups", "empty"),
        (dict(fusion_type="igva", igva_layer_groups=[[1, 1], [2]]), "igva_layer_groups", "repeats"),
        (dict(fusion_type="igva", igva_layer_groups=[[1, 9]]), "igva_layer_groups", r"\[9\]"),
        (dict(fusion_type="igva", igva_num_heads=3), "igva_num_heads", r"\(3\)"),
        (dict(fusion_type="igva", instruction_encoder_config=None), "instruction_encoder_config", "igva"),
        (dict(igva_layer_groups=[[1]]), "igva_layer_groups", "only used"),
        (dict(internal_feature_layers=[1]), "internal_fusion_type", "None"),
        (dict(internal_fusion_type="add", internal_feature_layers=[]), "internal_feature_layers", "non-empty"),
        (dict(internal_fusion_type="add", internal_feature_layers=[8]), "internal_feature_layers", r"\[8\]"),
        (dict(internal_fusion_type="add", internal_layer_map=[]), "internal_layer_map", "non-empty"),
        (dict(internal_fusion_type="add", internal_layer_map=[[0, 2]]), "internal_layer_map", "feature 2"),
        (dict(internal_fusion_type="add", internal_layer_map=[[2, 0]]), "internal_layer_map", "decoder layer 2"),
        (dict(internal_fusion_type="add", internal_layer_map=[[0, 0], [0, 1]]), "internal_layer_map", "twice"),
        (dict(internal_fusion_type="add", internal_layer_map=[[0, 0, 1]]), "internal_layer_map", "pairs"),
    ],
)
def test_config_validation_names_the_field(overrides, field, detail):
    fusion_type = overrides.pop("fusion_type", "single")
    error = _validation_error(lambda: make_config(fusion_type, **overrides))
    message = str(error)
    assert f"`{field}`" in message or f"{field}=" in message, message
    assert re.search(detail, message), message


def test_config_validation_heads_must_divide_width():
    # The language model's own config refuses it first for attention; our check guards the cross-attention too.
    error = _validation_error(lambda: make_config(text_config=tiny_text_config(num_attention_heads=5)))
    assert "attention heads" in str(error)
    config = make_config(internal_fusion_type="cross_attention")
    config.text_config.num_attention_heads = 5
    with pytest.raises(ValueError, match=r"`text_config.hidden_size` \(32\) must be divisible by "
                                         r"`text_config.num_attention_heads` \(5\)"):
        config.validate_internal_fusion()


def test_config_validation_runs_on_load(tmp_path):
    config = make_config("concat")
    config.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text().replace('"fusion_type": "concat"', '"fusion_type": "single"')
    (tmp_path / "config.json").write_text(text)
    error = _validation_error(lambda: AutoConfig.from_pretrained(tmp_path))
    assert "`vision_feature_layer`" in str(error)


def test_valid_configs_build():
    for variant, settings in VARIANTS.items():
        settings = dict(settings)
        config = make_config(settings.pop("fusion_type", "single"), **settings)
        config.validate()
    siglip = make_config("concat", vision_config=tiny_siglip_vision_config())
    assert siglip.vision_config.model_type == "siglip_vision_model"
