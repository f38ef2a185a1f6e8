"""`LlavaMultiLayerForConditionalGeneration.from_llava`: a multi-layer model built from a transformers LLaVA model
starts from the LLaVA model's outputs wherever the fusion allows it, and says so where it cannot."""

import pytest
import torch
from conftest import (
    IMAGE_SIZE,
    NUM_PATCHES,
    make_image_processor,
    randomize_weights_,
    tiny_instruction_encoder_config,
    tiny_text_config,
    tiny_vision_config,
)
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, MPNetModel

from llava_multilayer import LlavaMultiLayerForConditionalGeneration, LlavaMultiLayerProcessor
from llava_multilayer.upcycling_llava_multilayer import UpcyclingError, processor_from_llava


# transformers' LLaVA embeds the image token, so it needs it inside the vocabulary: the fixture tokenizer's 512 tokens
# plus `<image>` (id 512).
IMAGE_TOKEN_ID = 512


def make_llava(vision_feature_layer=-2) -> LlavaForConditionalGeneration:
    config = LlavaConfig(
        vision_config=tiny_vision_config().to_dict(),
        text_config=tiny_text_config(vocab_size=IMAGE_TOKEN_ID + 1).to_dict(),
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=NUM_PATCHES,
        vision_feature_layer=vision_feature_layer,
    )
    torch.manual_seed(0)
    return randomize_weights_(LlavaForConditionalGeneration(config), seed=1).eval()


@pytest.fixture(scope="module")
def llava():
    return make_llava()


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(3, 500, (2, 12), generator=generator)
    image = torch.full((2, NUM_PATCHES), IMAGE_TOKEN_ID)
    input_ids = torch.cat([text[:, :4], image, text[:, 4:]], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
    }


def logits(model, inputs, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **extra).logits


# Hidden-state indices of the tiny 4-layer tower: -2 == 3 (LLaVA's layer), -1 == 4.
PRESERVING = {
    "single": dict(fusion_type="single"),
    "concat": dict(fusion_type="concat", vision_feature_layer=[1, [2, 4], 3]),
    "mmfuser": dict(fusion_type="mmfuser", vision_feature_layer=[1, 2, -2], mmfuser_num_heads=4, mmfuser_num_points=2),
    "igva_average": dict(fusion_type="igva", igva_layer_groups=[[1, 2], [3, 4]], igva_aggregate_by_average=True),
    "igva": dict(
        fusion_type="igva",
        igva_layer_groups=[[1, 2], [3, 4]],
        igva_num_blocks=2,
        igva_num_heads=4,
        igva_hidden_size=16,
    ),
    "internal_add": dict(
        internal_fusion_type="add", internal_feature_layers=[1, 2], internal_layer_map=[[0, 0], [1, 1]]
    ),
    "internal_cross_post": dict(
        internal_fusion_type="cross_attention",
        internal_fusion_placement="post_cross",
        internal_feature_layers=[1, 2],
        internal_layer_map=[[0, 0], [1, 1]],
    ),
    "internal_cross_parallel": dict(
        internal_fusion_type="cross_attention",
        internal_fusion_placement="parallel",
        internal_feature_layers=[2],
        internal_layer_map=[[1, 0]],
    ),
}


@pytest.mark.parametrize("name", sorted(PRESERVING))
def test_upcycled_model_reproduces_llava(name, llava, inputs):
    kwargs = dict(PRESERVING[name])
    extra = {}
    if name == "igva":
        torch.manual_seed(0)
        kwargs["instruction_encoder"] = MPNetModel(tiny_instruction_encoder_config())
        extra["instruction_embeds"] = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    model = LlavaMultiLayerForConditionalGeneration.from_llava(llava, **kwargs)
    expected = logits(llava, inputs)
    actual = logits(model, inputs, **extra)
    print(f"{name}: max |logits - LLaVA logits| = {(actual - expected).abs().max().item():.2e}")
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert torch.equal(model.lm_head.weight, llava.lm_head.weight)
    for key, value in llava.model.vision_tower.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[key], value)


def test_upcycled_fusion_is_live(llava, inputs):
    """Opening the zero-initialised parts moves the outputs well past the tolerance above (10x), so the equality
    is not vacuous; and the closed parts still get gradients (nothing is stuck at zero)."""
    model = LlavaMultiLayerForConditionalGeneration.from_llava(llava, **PRESERVING["mmfuser"])
    model(**inputs).logits.logsumexp(-1).sum().backward()
    assert model.model.multi_modal_projector.fuser.cross_attn_scale.grad.abs().sum() > 0
    with torch.no_grad():
        model.model.multi_modal_projector.fuser.cross_attn_scale.fill_(1.0)
    assert (logits(model, inputs) - logits(llava, inputs)).abs().max() > 1e-4

    model = LlavaMultiLayerForConditionalGeneration.from_llava(llava, **PRESERVING["internal_cross_post"])
    model(**inputs).logits.logsumexp(-1).sum().backward()
    for layer in model.model.internal_fusion_layers:
        assert layer.cross_attn_gate.grad.abs().sum() > 0 and layer.cross_mlp_gate.grad.abs().sum() > 0
    with torch.no_grad():
        for layer in model.model.internal_fusion_layers:
            layer.cross_attn_gate.fill_(1.0)
    assert (logits(model, inputs) - logits(llava, inputs)).abs().max() > 1e-4

    model = LlavaMultiLayerForConditionalGeneration.from_llava(llava, **PRESERVING["internal_add"])
    model(**inputs).logits.logsumexp(-1).sum().backward()
    assert all(projector.linear_2.weight.grad.abs().sum() > 0 for projector in model.model.internal_projectors)


def test_llava_layer_list_maps_onto_concat(inputs):
    """A LLaVA model that concatenates layers [-2, 1] keeps its outputs when upcycled with extra layers in between."""
    llava = make_llava(vision_feature_layer=[-2, 1])
    model = LlavaMultiLayerForConditionalGeneration.from_llava(
        llava, fusion_type="concat", vision_feature_layer=[1, 2, 3]
    )
    torch.testing.assert_close(logits(model, inputs), logits(llava, inputs), atol=1e-5, rtol=0)
    default = LlavaMultiLayerForConditionalGeneration.from_llava(llava, fusion_type="concat")
    assert default.config.vision_feature_layer == [-2, 1]


def test_pre_cross_placement_is_refused(llava, inputs):
    settings = dict(PRESERVING["internal_cross_post"], internal_fusion_placement="pre_cross")
    with pytest.raises(UpcyclingError, match="pre_cross"):
        LlavaMultiLayerForConditionalGeneration.from_llava(llava, **settings)
    with pytest.warns(UserWarning, match="pre_cross"):
        model = LlavaMultiLayerForConditionalGeneration.from_llava(llava, strict=False, **settings)
    assert (logits(model, inputs) - logits(llava, inputs)).abs().max() > 1e-3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(fusion_type="single", vision_feature_layer=-1), "not LLaVA's layer"),
        (dict(fusion_type="concat", vision_feature_layer=[1, 2]), r"does not contain LLaVA's layer"),
        (dict(fusion_type="mmfuser", vision_feature_layer=[1, -2, -1], mmfuser_num_heads=4), "query layer"),
        (
            dict(
                fusion_type="igva",
                igva_layer_groups=[[1, 2]],
                igva_hidden_size=16,
                instruction_encoder_config=tiny_instruction_encoder_config(),
            ),
            "instruction encoder stays randomly initialised",
        ),
    ],
)
def test_unreproducible_settings_are_named(llava, kwargs, match):
    with pytest.raises(UpcyclingError, match=match):
        LlavaMultiLayerForConditionalGeneration.from_llava(llava, **kwargs)


def test_bad_arguments(llava):
    with pytest.raises(TypeError, match="llava_model_or_path"):
        LlavaMultiLayerForConditionalGeneration.from_llava(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="image_token_id"):
        LlavaMultiLayerForConditionalGeneration.from_llava(llava, image_token_id=3)
    with pytest.raises(ValueError, match="needs `vision_feature_layer`"):
        LlavaMultiLayerForConditionalGeneration.from_llava(llava, fusion_type="mmfuser")
    with pytest.raises(ValueError, match="pass `instruction_encoder`"):
        LlavaMultiLayerForConditionalGeneration.from_llava(llava, fusion_type="igva", igva_layer_groups=[[1, 2]])


def test_upcycled_checkpoint_round_trip(llava, inputs, tmp_path, tokenizer):
    """From a LLaVA directory to a saved multi-layer checkpoint (model + processor) that reloads identically."""
    llava.save_pretrained(tmp_path / "llava")
    llava_processor = LlavaProcessor(
        image_processor=make_image_processor(),
        tokenizer=tokenizer,
        patch_size=7,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    model = LlavaMultiLayerForConditionalGeneration.from_llava(tmp_path / "llava", **PRESERVING["mmfuser"])
    processor = processor_from_llava(llava_processor)
    model.save_pretrained(tmp_path / "upcycled")
    processor.save_pretrained(tmp_path / "upcycled")

    reloaded = LlavaMultiLayerForConditionalGeneration.from_pretrained(tmp_path / "upcycled")
    torch.testing.assert_close(logits(reloaded, inputs), logits(llava, inputs), atol=1e-5, rtol=0)
    reloaded_processor = LlavaMultiLayerProcessor.from_pretrained(tmp_path / "upcycled")
    assert reloaded_processor.num_image_tokens(IMAGE_SIZE, IMAGE_SIZE) == NUM_PATCHES
    assert "{% generation %}" in reloaded_processor.chat_template
