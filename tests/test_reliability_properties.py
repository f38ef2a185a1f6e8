"""Property-based tests (hypothesis): invariants of the processor over random prompt/image combinations, and of
the fusers over every valid layer selection. Few examples per property, so that the suite stays fast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    IMAGE_SIZE,
    IMAGE_TOKEN,
    IMAGE_TOKEN_ID,
    NUM_PATCHES,
    TEXT_LAYERS,
    VISION_LAYERS,
    make_model,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image


SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

NUM_HIDDEN_STATES = VISION_LAYERS + 1  # embeddings + one per layer
TEXT_HIDDEN = 32

# --------------------------------------------------------------------------------------------------------------
# Processor: image-token count invariant, batched == unbatched
# --------------------------------------------------------------------------------------------------------------

# Pieces that, glued without separators, can form a placeholder by accident ("<" + "image>") or look like one.
WORDS = [
    "What", "is", "this", "?", "USER:", "ASSISTANT:", "\n", "the", "cat", "<", "image", ">", "<im", "age>", "é", "日本"
]
PIECES = st.sampled_from(WORDS + [IMAGE_TOKEN] * 4)
PROMPTS = st.lists(PIECES, min_size=1, max_size=12).flatmap(
    lambda pieces: st.lists(st.sampled_from(["", " ", "\n"]), min_size=len(pieces), max_size=len(pieces)).map(
        lambda separators: "".join(piece + sep for piece, sep in zip(pieces, separators))
    )
).filter(lambda prompt: prompt.strip())
IMAGE_SPECS = st.tuples(
    st.integers(1, 90),  # width
    st.integers(1, 90),  # height
    st.sampled_from(["RGB", "L", "RGBA", "P", "I;16"]),
    st.integers(0, 2**16),  # seed
)


def _image(spec) -> Image.Image:
    width, height, mode, seed = spec
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


@st.composite
def prompts_with_images(draw, max_prompts: int = 3):
    prompts = draw(st.lists(PROMPTS, min_size=1, max_size=max_prompts))
    counts = [prompt.count(IMAGE_TOKEN) for prompt in prompts]
    images = [_image(draw(IMAGE_SPECS)) for _ in range(sum(counts))]
    return prompts, counts, images


def _unpadded_rows(batch) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def _runs(row: list[int]) -> list[int]:
    """Lengths of the runs of consecutive image tokens in `row`."""
    runs, current = [], 0
    for token in row + [None]:
        if token == IMAGE_TOKEN_ID:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


@SETTINGS
@given(data=prompts_with_images(), padding_side=st.sampled_from(["left", "right"]))
def test_image_token_count_is_tokens_per_image_times_images(processor, data, padding_side):
    prompts, counts, images = data
    batch = processor(images=images or None, text=prompts, return_tensors="pt", padding_side=padding_side)
    assert int((batch["input_ids"] == IMAGE_TOKEN_ID).sum()) == NUM_PATCHES * len(images)
    for row, count in zip(_unpadded_rows(batch), counts):
        assert row.count(IMAGE_TOKEN_ID) == NUM_PATCHES * count
        assert all(run % NUM_PATCHES == 0 for run in _runs(row))
    if images:
        assert batch["pixel_values"].shape == (len(images), 3, IMAGE_SIZE, IMAGE_SIZE)
    else:
        assert "pixel_values" not in batch


@SETTINGS
@given(data=prompts_with_images(), padding_side=st.sampled_from(["left", "right"]))
def test_batched_equals_unbatched(processor, data, padding_side):
    prompts, counts, images = data
    batch = processor(images=images or None, text=prompts, return_tensors="pt", padding_side=padding_side)
    rows = _unpadded_rows(batch)
    start = 0
    for index, (prompt, count) in enumerate(zip(prompts, counts)):
        own = images[start : start + count]
        single = processor(images=own or None, text=prompt, return_tensors="pt")
        assert rows[index] == single["input_ids"][0].tolist()
        if own:
            assert torch.equal(batch["pixel_values"][start : start + count], single["pixel_values"])
        start += count


@SETTINGS
@given(data=prompts_with_images(max_prompts=2))
def test_instruction_processor_gives_one_instruction_row_per_image(instruction_processor, data):
    prompts, counts, images = data
    instructions = [f"describe {index}" for index in range(len(prompts))]
    batch = instruction_processor(images=images or None, text=prompts, instructions=instructions, return_tensors="pt")
    if images:
        assert batch["instruction_input_ids"].shape[0] == len(images)
        assert batch["instruction_attention_mask"].shape == batch["instruction_input_ids"].shape
    else:
        assert "instruction_input_ids" not in batch


# --------------------------------------------------------------------------------------------------------------
# Fusers: output shapes for every valid layer selection
# --------------------------------------------------------------------------------------------------------------

LAYER = st.integers(-NUM_HIDDEN_STATES, NUM_HIDDEN_STATES - 1)
GROUP = st.lists(LAYER, min_size=1, max_size=4, unique_by=lambda i: i % NUM_HIDDEN_STATES).map(list)
NUM_IMAGES = st.integers(1, 3)


def _features(model, num_images: int, seed: int = 0, **kwargs):
    pixel_values = torch.randn(num_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.get_image_features(pixel_values, **kwargs)


def _positive(layer: int) -> int:
    return layer % NUM_HIDDEN_STATES


@SETTINGS
@given(layer=LAYER, num_images=NUM_IMAGES)
def test_single_shapes_and_negative_indices(layer, num_images):
    model = make_model("single", vision_feature_layer=layer)
    features = _features(model, num_images).image_features
    assert features.shape == (num_images, NUM_PATCHES, TEXT_HIDDEN)
    twin = make_model("single", vision_feature_layer=_positive(layer), randomize=False)
    twin.load_state_dict(model.state_dict())
    assert torch.equal(_features(twin, num_images).image_features, features)


@SETTINGS
@given(layers=st.lists(st.one_of(LAYER, GROUP), min_size=1, max_size=4), num_images=NUM_IMAGES)
def test_concat_shapes_for_any_selection(layers, num_images):
    model = make_model("concat", vision_feature_layer=layers)
    projector = model.model.multi_modal_projector
    assert projector.linear_1.in_features == 32 * len(layers)
    features = _features(model, num_images).image_features
    assert features.shape == (num_images, NUM_PATCHES, TEXT_HIDDEN)
    assert torch.isfinite(features).all()


@SETTINGS
@given(values=st.lists(LAYER, min_size=1, max_size=4), query=LAYER, num_images=NUM_IMAGES)
def test_mmfuser_shapes_for_any_value_and_query_layers(values, query, num_images):
    model = make_model("mmfuser", vision_feature_layer=[*values, query])
    fuser = model.model.multi_modal_projector
    features = _features(model, num_images).image_features
    assert features.shape == (num_images, NUM_PATCHES, TEXT_HIDDEN)
    assert torch.isfinite(features).all()
    assert sum(p.numel() for p in fuser.parameters()) > 0


@SETTINGS
@given(
    groups=st.lists(GROUP, min_size=1, max_size=4),
    base=LAYER,
    by_average=st.booleans(),
    num_images=NUM_IMAGES,
)
def test_igva_shapes_and_weights_for_any_groups(groups, base, by_average, num_images):
    model = make_model(
        "igva", igva_layer_groups=groups, vision_feature_layer=base, igva_aggregate_by_average=by_average,
        **({"instruction_encoder_config": None} if by_average else {}),
    )
    kwargs = {}
    if not by_average:
        kwargs["instruction_input_ids"] = torch.randint(
            5, 100, (num_images, 7), generator=torch.Generator().manual_seed(1)
        )
    output = _features(model, num_images, **kwargs)
    assert output.image_features.shape == (num_images, NUM_PATCHES, TEXT_HIDDEN)
    assert output.fusion_weights.shape == (num_images, len(groups))
    assert torch.allclose(output.fusion_weights.sum(-1), torch.ones(num_images), atol=1e-5)
    assert (output.fusion_weights >= 0).all()


@st.composite
def internal_selections(draw):
    features = draw(st.lists(LAYER, min_size=1, max_size=3))
    decoder_layers = draw(st.lists(st.integers(0, TEXT_LAYERS - 1), min_size=1, max_size=TEXT_LAYERS, unique=True))
    layer_map = [[layer, draw(st.integers(0, len(features) - 1))] for layer in decoder_layers]
    return features, layer_map


@SETTINGS
@given(
    selection=internal_selections(),
    fusion=st.sampled_from(["add", "cross_attention"]),
    placement=st.sampled_from(["pre_cross", "post_cross", "parallel"]),
    num_images=st.integers(1, 2),
)
def test_internal_fusion_shapes_for_any_feature_layers_and_maps(selection, fusion, placement, num_images):
    features, layer_map = selection
    model = make_model(
        "single", internal_fusion_type=fusion, internal_fusion_placement=placement,
        internal_feature_layers=features, internal_layer_map=layer_map,
    )
    output = _features(model, num_images)
    assert len(output.internal_image_features) == len(features)
    assert all(f.shape == (num_images, NUM_PATCHES, TEXT_HIDDEN) for f in output.internal_image_features)
    fused_layers = sorted(layer.layer_idx for layer in model.model.internal_fusion_layers)
    assert fused_layers == sorted(decoder_layer for decoder_layer, _ in layer_map)
    row = [1, 5] + [IMAGE_TOKEN_ID] * (NUM_PATCHES * num_images) + [6, 7]
    pixel_values = torch.randn(num_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([row]), pixel_values=pixel_values).logits
    assert logits.shape == (1, len(row), model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("fusion_type", ["concat", "mmfuser", "igva_average"])
def test_layer_selection_matters(fusion_type):
    # Guard against a property passing vacuously: two different selections give different features.
    selections = {
        "concat": ([1, 3], [2, 3]),
        "mmfuser": ([1, 2, -1], [1, 3, -1]),
        "igva_average": ([[1], [2]], [[1], [3]]),
    }[fusion_type]
    key = "igva_layer_groups" if fusion_type == "igva_average" else "vision_feature_layer"
    first, second = (make_model(fusion_type, **{key: selection}) for selection in selections)
    second.load_state_dict(first.state_dict())
    assert not torch.allclose(_features(first, 1).image_features, _features(second, 1).image_features)

