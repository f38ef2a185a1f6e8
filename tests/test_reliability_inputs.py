"""Reliability of inputs: a bad config, processor call or model call gives an actionable error, never a wrong
answer, and every image the processor accepts is read as the original codebases read it (8-bit RGB)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    IMAGE_SIZE,
    IMAGE_TOKEN_ID,
    NUM_PATCHES,
    make_config,
    make_inputs,
    make_model,
    processor_for,
    random_image,
    tiny_instruction_encoder_config,
    tiny_siglip_vision_config,
    tiny_text_config,
    vicuna_prompt,
)
from huggingface_hub.errors import StrictDataclassError
from PIL import Image

from llava_multilayer.processing_llava_multilayer import to_rgb


CONFIG_ERRORS = (ValueError, TypeError, StrictDataclassError)

# --------------------------------------------------------------------------------------------------------------
# Config validation (the `validate_*` methods of `LlavaMultiLayerConfig`, the fusers' `validate_config`, the field
# types), one case per rule
# --------------------------------------------------------------------------------------------------------------

INVALID_CONFIGS = {
    # layer indices out of range for the 4-layer tower (hidden-state indices -5..4)
    "single layer too high": (dict(fusion_type="single", vision_feature_layer=5), r"\[5\], out of range .* \[-5, 4\]"),
    "single layer too low": (dict(fusion_type="single", vision_feature_layer=-6), r"\[-6\], out of range"),
    "concat layer out of range": (dict(fusion_type="concat", vision_feature_layer=[1, 9]), r"\[9\], out of range"),
    "concat group out of range": (
        dict(fusion_type="concat", vision_feature_layer=[1, [2, 7]]),
        r"\[7\], out of range",
    ),
    "mmfuser query out of range": (
        dict(fusion_type="mmfuser", vision_feature_layer=[1, 2, 24]),
        r"\[24\], out of range",
    ),
    "igva base layer out of range": (dict(fusion_type="igva", vision_feature_layer=8), r"\[8\], out of range"),
    "igva group out of range": (
        dict(fusion_type="igva", igva_layer_groups=[[1, 2], [3, 30]]),
        r"igva_layer_groups.*\[30\]",
    ),
    "internal feature out of range": (
        dict(internal_fusion_type="add", internal_feature_layers=[1, 12]),
        r"internal_feature_layers.*\[12\], out of range",
    ),
    # layer lists of the wrong form
    "single with a list": (dict(fusion_type="single", vision_feature_layer=[1, 2]), r"must be a single int"),
    "igva with a list": (dict(fusion_type="igva", vision_feature_layer=[1, 2]), r"must be a single int"),
    "concat with an int": (dict(fusion_type="concat", vision_feature_layer=2), r"must be a non-empty list"),
    "concat empty": (dict(fusion_type="concat", vision_feature_layer=[]), r"must be a non-empty list"),
    "concat empty group": (dict(fusion_type="concat", vision_feature_layer=[1, []]), r"empty or non-list group"),
    "concat repeating group": (
        dict(fusion_type="concat", vision_feature_layer=[1, [2, 2]]),
        r"repeats an index: \[2, 2\]",
    ),
    "concat group naming a layer twice": (
        dict(fusion_type="concat", vision_feature_layer=[1, [4, -1]]),
        r"names the same hidden state twice: \[4, -1\] \(as non-negative indices \[4, 4\]",
    ),
    "mmfuser one layer": (dict(fusion_type="mmfuser", vision_feature_layer=[2]), r"at least two layers"),
    "mmfuser group": (dict(fusion_type="mmfuser", vision_feature_layer=[1, [2, 3], -1]), r"lists single indices"),
    "layer as a string": (dict(fusion_type="single", vision_feature_layer="-2"), r"vision_feature_layer"),
    # igva groups
    "igva no groups": (dict(fusion_type="igva", igva_layer_groups=None), r"needs `igva_layer_groups`"),
    "igva empty groups": (dict(fusion_type="igva", igva_layer_groups=[]), r"needs `igva_layer_groups`"),
    "igva empty group": (dict(fusion_type="igva", igva_layer_groups=[[1, 2], []]), r"empty or non-list group"),
    "igva repeating group": (
        dict(fusion_type="igva", igva_layer_groups=[[1, 1], [3, 4]]),
        r"repeats an index: \[1, 1\]",
    ),
    "igva group naming a layer twice": (
        dict(fusion_type="igva", igva_layer_groups=[[1, 2], [0, -5]]),
        r"names the same hidden state twice: \[0, -5\]",
    ),
    "igva groups on concat": (
        dict(fusion_type="concat", igva_layer_groups=[[1, 2]]),
        r"only used with fusion_type='igva'",
    ),
    "igva without encoder": (
        dict(fusion_type="igva", instruction_encoder_config=None),
        r"needs `instruction_encoder_config`",
    ),
    # unknown choices
    "unknown fusion type": (dict(fusion_type="sum"), r"fusion_type.*sum"),
    "unknown internal fusion": (dict(internal_fusion_type="gated"), r"internal_fusion_type.*gated"),
    "unknown placement": (
        dict(internal_fusion_type="cross_attention", internal_fusion_placement="after"),
        r"internal_fusion_placement.*after",
    ),
    "unknown select strategy": (dict(vision_feature_select_strategy="cls"), r"vision_feature_select_strategy.*cls"),
    # widths not divisible by heads
    "mmfuser heads": (
        dict(fusion_type="mmfuser", mmfuser_num_heads=5),
        r"\(32\) must be divisible by `mmfuser_num_heads` \(5\)",
    ),
    "mmfuser zero heads": (
        dict(fusion_type="mmfuser", mmfuser_num_heads=0),
        r"must be divisible by `mmfuser_num_heads` \(0\)",
    ),
    "mmfuser zero points": (dict(fusion_type="mmfuser", mmfuser_num_points=0), r"`mmfuser_num_points` must be >= 1"),
    "igva heads": (
        dict(fusion_type="igva", igva_hidden_size=18, igva_num_heads=4),
        r"`igva_hidden_size` \(18\) must be divisible",
    ),
    "cross-attention heads": (
        # LlamaConfig refuses it itself, before our validators see it
        dict(
            internal_fusion_type="cross_attention",
            text_config={**tiny_text_config().to_dict(), "hidden_size": 30, "num_attention_heads": 4},
        ),
        r"hidden size \(30\) is not a multiple of the number of attention heads \(4\)",
    ),
    # internal fusion maps
    "internal without features": (
        dict(internal_fusion_type="add", internal_feature_layers=[]),
        r"needs `internal_feature_layers`",
    ),
    "internal without map": (dict(internal_fusion_type="add", internal_layer_map=[]), r"needs `internal_layer_map`"),
    "internal map not pairs": (
        dict(internal_fusion_type="add", internal_layer_map=[[0, 0, 1]]),
        r"\[decoder_layer, feature_index\] pairs",
    ),
    "internal decoder layer out of range": (
        dict(internal_fusion_type="add", internal_layer_map=[[2, 0]]),
        r"decoder layer 2, but the language model has 2 layers",
    ),
    "internal feature index out of range": (
        dict(internal_fusion_type="add", internal_layer_map=[[0, 2]]),
        r"names feature 2, but `internal_feature_layers` has 2 entries",
    ),
    "internal decoder layer twice": (
        dict(internal_fusion_type="add", internal_layer_map=[[0, 0], [0, 1]]),
        r"names decoder layer 0 twice",
    ),
    "internal settings without type": (
        dict(internal_feature_layers=[1], internal_layer_map=[[0, 0]]),
        r"`internal_fusion_type` is None",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID_CONFIGS))
def test_invalid_config_is_refused_with_an_actionable_message(case):
    settings, message = INVALID_CONFIGS[case]
    settings = dict(settings)
    fusion_type = settings.pop("fusion_type", "single")
    with pytest.raises(CONFIG_ERRORS, match=message):
        make_config(fusion_type, **settings)


def test_valid_edge_configs_are_accepted():
    make_config("single", vision_feature_layer=0)  # the embeddings
    make_config("single", vision_feature_layer=-5)
    make_config("concat", vision_feature_layer=[[0, 1, 2, 3, 4]])
    make_config("mmfuser", vision_feature_layer=[0, 4])
    make_config("igva", igva_layer_groups=[[0], [1, 2, 3, 4]])
    make_config("igva", igva_aggregate_by_average=True, instruction_encoder_config=None)


def test_invalid_config_is_refused_when_loaded(tmp_path):
    config = make_config("concat")
    config.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    text = text.replace('"vision_feature_layer": [\n    -3,', '"vision_feature_layer": [\n    -30,')
    (tmp_path / "config.json").write_text(text)
    from llava_multilayer import LlavaMultiLayerConfig

    with pytest.raises(CONFIG_ERRORS, match=r"\[-30\], out of range"):
        LlavaMultiLayerConfig.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------------------------
# Processor calls
# --------------------------------------------------------------------------------------------------------------

PROMPT = vicuna_prompt("What is shown?")


@pytest.mark.parametrize(
    "text, num_images, message",
    [
        (PROMPT, 0, r"contain 1 '<image>' placeholder\(s\) \(per prompt: \[1\]\) but 0 image\(s\)"),
        (PROMPT, 2, r"contain 1 '<image>' placeholder\(s\).* but 2 image\(s\)"),
        (vicuna_prompt("Hi", num_images=0), 1, r"contain 0 '<image>' placeholder\(s\).* but 1 image\(s\)"),
        ([PROMPT, vicuna_prompt("Two?", num_images=2)], 2, r"\(per prompt: \[1, 2\]\) but 2 image\(s\)"),
    ],
    ids=["no image", "extra image", "image without placeholder", "batch short of one image"],
)
def test_image_placeholder_count_mismatch(processor, text, num_images, message):
    images = [random_image(seed) for seed in range(num_images)] or None
    with pytest.raises(ValueError, match=message):
        processor(images=images, text=text)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", r"Prompt 0 is empty"),
        ("   \n", r"Prompt 0 is empty"),
        ([PROMPT, ""], r"Prompt 1 is empty"),
        ([], r"non-empty list of strings"),
        ([PROMPT, 3], r"non-empty list of strings"),
        (None, r"`text` is required"),
    ],
    ids=["empty", "whitespace", "empty in batch", "empty list", "non-string", "none"],
)
def test_empty_or_invalid_text(processor, text, message):
    images = [random_image(0)] if isinstance(text, str) and text.strip() else None
    with pytest.raises(ValueError, match=message):
        processor(images=images, text=text)


@pytest.mark.parametrize(
    "image",
    [Image.new("RGB", (0, 10)), Image.new("RGB", (10, 0)), np.zeros((0, 8, 3), np.uint8), torch.zeros(3, 8, 0)],
    ids=["pil zero width", "pil zero height", "numpy zero height", "tensor zero width"],
)
def test_zero_size_image(processor, image):
    with pytest.raises(ValueError, match=r"Image 0 is empty"):
        processor(images=image, text=PROMPT)


def test_unsupported_processor_arguments(processor):
    with pytest.raises(ValueError, match="Mismatch in `image` token count"):
        processor(images=random_image(0), text=PROMPT, truncation=True, max_length=8)
    with pytest.raises(ValueError, match="does not process videos"):
        processor(images=random_image(0), text=PROMPT, videos=[np.zeros((2, 8, 8, 3), np.uint8)])
    with pytest.raises(TypeError, match=r"unexpected arguments: \['colour'\]"):
        processor(images=random_image(0), text=PROMPT, colour="red")


def test_instruction_processor_checks_instructions(instruction_processor):
    with pytest.raises(ValueError, match=r"Got 2 instruction\(s\) for 1 prompt\(s\)"):
        instruction_processor(images=random_image(0), text=PROMPT, instructions=["a", "b"])
    with pytest.raises(ValueError, match=r"Could not find an instruction .* pass `instructions=\[...\]`"):
        instruction_processor(images=random_image(0), text="USER: <image>\n ASSISTANT:")


# --------------------------------------------------------------------------------------------------------------
# Image modes: everything becomes the 8-bit RGB image `Image.convert("RGB")` gives (16-bit scaled, not clipped)
# --------------------------------------------------------------------------------------------------------------


def _pixels(processor, image) -> torch.Tensor:
    return processor(images=image, text=PROMPT, return_tensors="pt")["pixel_values"]


def _with_random_alpha(image: Image.Image, mode: str) -> Image.Image:
    array = np.array(image.convert(mode))
    array[..., -1] = np.random.default_rng(1).integers(0, 256, array.shape[:2])
    return Image.fromarray(array, mode)


EIGHT_BIT_MODES = {
    "L": lambda image: image.convert("L"),
    "LA with alpha": lambda image: _with_random_alpha(image, "LA"),
    "RGBA with alpha": lambda image: _with_random_alpha(image, "RGBA"),
    "RGBA opaque": lambda image: image.convert("RGBA"),
    "CMYK": lambda image: image.convert("CMYK"),
    "P": lambda image: image.convert("P"),
    "P with transparency": lambda image: image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
    "PA": lambda image: image.convert("PA"),
    "1": lambda image: image.convert("1"),
    "YCbCr": lambda image: image.convert("YCbCr"),
    "HSV": lambda image: image.convert("HSV"),
}


@pytest.mark.parametrize("mode", sorted(EIGHT_BIT_MODES))
def test_any_pil_mode_equals_converting_to_rgb_first(processor, mode):
    image = EIGHT_BIT_MODES[mode](random_image(3, size=(37, 23)))
    if mode == "P with transparency":
        image.info["transparency"] = 0
    expected = _pixels(processor, image.convert("RGB"))
    assert torch.equal(_pixels(processor, image), expected)
    assert to_rgb(image).mode == "RGB"


def _sixteen_bit(seed: int = 0, size=(23, 37)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, size, dtype=np.uint16)


def _scaled_to_8_bit(values: np.ndarray) -> np.ndarray:
    return np.rint(values / 257).astype(np.uint8)


@pytest.mark.parametrize("kind", ["I;16", "I;16B", "I", "numpy uint16 HWC", "torch uint16 CHW"])
def test_sixteen_bit_images_are_scaled_to_eight_bits(processor, kind):
    gray = _sixteen_bit()
    if kind == "I;16":
        image = Image.fromarray(gray)
        assert image.mode == "I;16"
    elif kind == "I;16B":
        image = Image.frombytes("I;16B", gray.shape[::-1], gray.astype(">u2").tobytes())
    elif kind == "I":
        image = Image.fromarray(gray.astype(np.int32))
        assert image.mode == "I"
    rgb = np.stack([gray, gray[::-1], 65535 - gray], axis=-1)
    if kind == "numpy uint16 HWC":
        image, expected_8 = rgb, _scaled_to_8_bit(rgb)
    elif kind == "torch uint16 CHW":
        image = torch.from_numpy(rgb.astype(np.int32)).to(torch.uint16).permute(2, 0, 1)
        expected_8 = _scaled_to_8_bit(rgb)
    else:
        expected_8 = np.repeat(_scaled_to_8_bit(gray)[..., None], 3, axis=-1)
    assert torch.equal(_pixels(processor, image), _pixels(processor, Image.fromarray(expected_8)))


def test_sixteen_bit_mid_gray_is_not_clipped_to_white(processor):
    mid_gray_16 = Image.fromarray(np.full((20, 20), 32896, np.uint16))  # 128 * 257
    mid_gray_8 = Image.new("RGB", (20, 20), (128, 128, 128))
    white = Image.new("RGB", (20, 20), (255, 255, 255))
    assert torch.equal(_pixels(processor, mid_gray_16), _pixels(processor, mid_gray_8))
    assert not torch.equal(_pixels(processor, mid_gray_16), _pixels(processor, white))
    full_scale = Image.fromarray(np.full((20, 20), 65535, np.uint16))
    assert torch.equal(_pixels(processor, full_scale), _pixels(processor, white))


def test_rgb_images_and_8_bit_arrays_are_untouched(processor):
    image = random_image(5)
    assert to_rgb(image) is image
    array = np.asarray(image)
    assert to_rgb(array) is array
    assert torch.equal(_pixels(processor, array), _pixels(processor, image))


@pytest.mark.parametrize("size", [(8000, 6000), (6000, 8000), (1, 3000), (3000, 1), (1, 1)])
def test_extreme_image_sizes_are_processed_to_the_model_size(processor, size):
    image = Image.new("RGB", size, (200, 30, 90))
    batch = processor(images=image, text=PROMPT, return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.isfinite(batch["pixel_values"]).all()
    assert int((batch["input_ids"] == IMAGE_TOKEN_ID).sum()) == NUM_PATCHES


def test_huge_image_runs_through_the_model(processor):
    model = make_model("single")
    batch = processor(images=Image.new("RGB", (8000, 6000), (10, 200, 40)), text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()


# --------------------------------------------------------------------------------------------------------------
# Model calls
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single():
    model = make_model("single")
    processor = processor_for(model.config)
    inputs = make_inputs(processor, [PROMPT, vicuna_prompt("Again?")], [random_image(0), random_image(1)])
    return model, inputs


@pytest.mark.parametrize(
    "pixel_values, message",
    [
        (
            torch.randn(2, 1, IMAGE_SIZE, IMAGE_SIZE),
            r"must have shape \(num_images, 3, 28, 28\) .* got \(2, 1, 28, 28\)",
        ),
        (torch.randn(2, 4, IMAGE_SIZE, IMAGE_SIZE), r"got \(2, 4, 28, 28\)"),
        (torch.randn(2, 3, 56, 56), r"got \(2, 3, 56, 56\)"),
        (torch.randn(2, 3, IMAGE_SIZE, 27), r"got \(2, 3, 28, 27\)"),
        (torch.randn(3, IMAGE_SIZE, IMAGE_SIZE), r"got \(3, 28, 28\)"),
        (torch.randn(2, IMAGE_SIZE, IMAGE_SIZE, 3), r"got \(2, 28, 28, 3\)"),
        (
            torch.randint(0, 255, (2, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8),
            r"floating-point values, got dtype torch.uint8",
        ),
    ],
    ids=["one channel", "four channels", "too large", "not square", "no batch dim", "channels last", "raw uint8"],
)
def test_wrong_pixel_values(single, pixel_values, message):
    model, inputs = single
    with pytest.raises(ValueError, match=message):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=pixel_values)


@pytest.mark.parametrize("num_images", [1, 3, 4])
def test_image_batch_does_not_match_the_prompts(single, num_images):
    model, inputs = single
    pixel_values = torch.cat([inputs["pixel_values"]] * 2)[:num_images]
    with pytest.raises(ValueError, match=rf"prompts hold {2 * NUM_PATCHES} image tokens, but {num_images} image\(s\)"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=pixel_values)


def test_image_tokens_without_pixel_values(single):
    model, inputs = single
    with pytest.raises(ValueError, match=r"contain image tokens but no `pixel_values`"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    with pytest.raises(ValueError, match=r"contain image tokens but no `pixel_values`"):
        model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=2)


def test_pixel_values_without_image_tokens(single):
    model, inputs = single
    text_only = torch.tensor([[1, 5, 6, 7]])
    with pytest.raises(ValueError, match=r"prompts hold 0 image tokens, but 1 image\(s\)"):
        model(input_ids=text_only, pixel_values=inputs["pixel_values"][:1])


def test_image_split_across_rows_is_refused(single):
    # 1.5 images' tokens in the first row and 0.5 in the second: the totals match, the placement does not.
    model, inputs = single
    half = NUM_PATCHES // 2
    row_a = [1, 5] + [IMAGE_TOKEN_ID] * (NUM_PATCHES + half) + [6]
    row_b = [1, 5] + [IMAGE_TOKEN_ID] * half + [6] * (NUM_PATCHES + 1)
    with pytest.raises(ValueError, match=rf"runs of \[{half}, {NUM_PATCHES + half}\] image tokens"):
        model(input_ids=torch.tensor([row_a, row_b]), pixel_values=inputs["pixel_values"])


def test_image_split_around_text_is_refused(single):
    model, inputs = single
    half = NUM_PATCHES // 2
    row = [1, 5] + [IMAGE_TOKEN_ID] * half + [7] + [IMAGE_TOKEN_ID] * half + [6]
    with pytest.raises(ValueError, match=r"cut or split inside an image"):
        model(input_ids=torch.tensor([row]), pixel_values=inputs["pixel_values"][:1])


def test_adjacent_images_are_accepted(single):
    model, inputs = single
    row = [1, 5] + [IMAGE_TOKEN_ID] * (2 * NUM_PATCHES) + [6]
    with torch.no_grad():
        assert model(input_ids=torch.tensor([row]), pixel_values=inputs["pixel_values"]).logits.shape[1] == len(row)


def test_input_ids_and_inputs_embeds_are_exclusive(single):
    model, inputs = single
    embeds = model.get_input_embeddings()(torch.tensor([[1, 5]]))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(input_ids=torch.tensor([[1, 5]]), inputs_embeds=embeds)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()


def test_out_of_vocabulary_image_token_needs_input_ids(single):
    model, inputs = single
    embeds = model.get_input_embeddings()(torch.tensor([[1, 5, 6]]))
    with pytest.raises(ValueError, match=r"pass `input_ids` together with `pixel_values`"):
        model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"][:1])


@pytest.fixture(scope="module")
def igva():
    model = make_model("igva")
    processor = processor_for(model.config)
    inputs = make_inputs(processor, [PROMPT], [random_image(0)])
    return model, inputs


def test_igva_instruction_inputs_are_checked(igva):
    model, inputs = igva
    base = {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"]}
    width = tiny_instruction_encoder_config().hidden_size
    with pytest.raises(ValueError, match=r"instruction"):
        model(**base)
    with pytest.raises(ValueError, match=r"Got 2 instructions for 1 images"):
        model(**base, instruction_embeds=torch.randn(2, width))
    with pytest.raises(ValueError, match=rf"must have shape \(num_images, {width}\)"):
        model(**base, instruction_embeds=torch.randn(1, width + 1))
    with pytest.raises(ValueError, match=r"either `instruction_input_ids` or `instruction_embeds`, not both"):
        model(**base, instruction_input_ids=inputs["instruction_input_ids"], instruction_embeds=torch.randn(1, width))


def test_mmfuser_with_a_non_square_grid_is_refused():
    # SigLIP has no CLS: dropping the first token ("default") leaves 15 patches, which is no square grid.
    model = make_model("mmfuser", vision_config=tiny_siglip_vision_config())
    pixel_values = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(ValueError, match=r"square"):
        model.get_image_features(pixel_values)
