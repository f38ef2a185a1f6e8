"""MMFuser: the fuser block, conversion of original checkpoints, and parity with the original code's golden outputs.

The fixture `fixtures/mmfuser-clip` was produced by running the original MMFuser code (see its README): a finetune
checkpoint (`original/`, the tower embedded as `model.vision_tower.vision_tower.vision_model.*`), a pretrain-stage
artifact (`original_pretrain/`: config.json + mm_projector.bin), the tiny CLIP tower (`vision_tower/`), and the
original model's inputs and outputs, including the fuser's intermediates `selected_features` (the stacked CLIP
layers) and `fused_features` (the fuser block's output).

`reference_fuser` below re-implements the original `MSCrossAttnBlock` from the spec with a hand-written bilinear
sampler (no `grid_sample`, no transformers code); it is checked against the golden data and then used to check the
converted fuser on layer lists and grids the fixture does not cover.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, LlamaConfig, LlamaForCausalLM
from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

import llava_multilayer  # noqa: F401  (registers the family with the Auto classes)
from llava_multilayer import LlavaMultiLayerConfig, LlavaMultiLayerForConditionalGeneration, LlavaMultiLayerProcessor
from llava_multilayer.conversion.components import text_config_from_original
from llava_multilayer.conversion.convert_mmfuser_to_hf import (
    convert_mmfuser,
    detect,
    fuser_layers,
    main,
    parse_select_layer,
)
from llava_multilayer.conversion.reading import ConversionError
from llava_multilayer.deformable_fusion_llava_multilayer import MMFuserBlock, MMFuserDeformableAttention


REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "mmfuser-clip"
ORIGINAL = FIXTURE / "original"
VISION_TOWER = FIXTURE / "vision_tower"
SCRIPT = REPO_ROOT / "conversion_scripts" / "convert_mmfuser_to_hf.py"
PROMPT = json.loads((FIXTURE / "prompt.json").read_text())["prompt"]
INPUTS = load_file(FIXTURE / "inputs.safetensors")
EXPECTED = load_file(FIXTURE / "expected.safetensors")
ORIGINAL_CONFIG = json.loads((ORIGINAL / "config.json").read_text())
ORIGINAL_LAYERS = ORIGINAL_CONFIG["mm_vision_select_layer"]  # [-22, -17, -12, -7, -2]
VOCAB = EXPECTED["logits"].shape[-1]  # the original vocabulary; our `<image>` id (= VOCAB) lies just outside it
FUSER_PREFIX = "model.mm_projector.0."


def run_converter(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def cli_args(output_dir: Path, input_dir: Path = ORIGINAL, *extra: str) -> list[str]:
    return [
        "--input-dir", str(input_dir), "--output-dir", str(output_dir), "--vision-tower", str(VISION_TOWER), *extra
    ]


def original_tensors() -> dict[str, torch.Tensor]:
    return load_file(ORIGINAL / "model.safetensors")


def copy_original(directory: Path, weights: bool = True, **config_changes) -> Path:
    """A copy of `original/` with `config_changes` applied to config.json (and without weights if asked)."""
    directory.mkdir(parents=True)
    for path in ORIGINAL.iterdir():
        if path.name != "config.json" and (weights or path.name != "model.safetensors"):
            shutil.copy(path, directory / path.name)
    (directory / "config.json").write_text(json.dumps({**ORIGINAL_CONFIG, **config_changes}, indent=2))
    return directory


def load_converted(directory: Path, dtype: torch.dtype = torch.float32) -> LlavaMultiLayerForConditionalGeneration:
    return AutoModelForImageTextToText.from_pretrained(directory, dtype=dtype).eval()


def fixture_batch(processor):
    image = Image.open(FIXTURE / "image.png").convert("RGB")
    return processor(images=image, text=PROMPT, return_tensors="pt")


def assert_same_state_dict(directory: Path, reference: Path) -> None:
    state = load_converted(directory).state_dict()
    expected = load_converted(reference).state_dict()
    assert state.keys() == expected.keys()
    for key in expected:
        assert torch.equal(state[key], expected[key]), key


# --------------------------------------------------------------------------------------------------------------
# Independent reference of the original fuser (spec sections 1.4 and 1.5)
# --------------------------------------------------------------------------------------------------------------


def bilinear_sample(value: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling of `value` `(batch, height, width, dim)` at normalised `x`, `y` `(batch, queries)`.

    Location `x` is the continuous pixel coordinate `x * width - 0.5` (pixel centres at `(k + 0.5) / width`); corners
    outside the map contribute zero. Returns `(batch, queries, dim)`.
    """
    batch, height, width, dim = value.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = px.floor(), py.floor()
    result = value.new_zeros(batch, x.shape[1], dim)
    for dx in (0, 1):
        for dy in (0, 1):
            cx, cy = x0 + dx, y0 + dy
            weight = (1 - (px - cx).abs()) * (1 - (py - cy).abs())
            inside = (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
            index = (cy.clamp(0, height - 1) * width + cx.clamp(0, width - 1)).long()
            corner = torch.gather(value.reshape(batch, -1, dim), 1, index[..., None].expand(-1, -1, dim))
            result += corner * (weight * inside)[..., None]
    return result


def reference_msda(params: dict, prefix: str, query, reference_points, source, shapes, heads: int, points: int):
    """The original `MSDeformAttn` in float64: `query` `(B, Lq, C)`, `source` `(B, sum(h*w), C)`, `shapes` (h, w)."""
    linear = lambda name, x: x @ params[f"{prefix}{name}.weight"].T + params[f"{prefix}{name}.bias"]  # noqa: E731
    batch, num_queries, channels = query.shape
    levels, head_dim = len(shapes), channels // heads
    value = linear("value_proj", source).view(batch, -1, heads, head_dim)
    offsets = linear("sampling_offsets", query).view(batch, num_queries, heads, levels, points, 2)
    weights = linear("attention_weights", query).view(batch, num_queries, heads, levels * points).softmax(-1)
    weights = weights.view(batch, num_queries, heads, levels, points)
    output = query.new_zeros(batch, num_queries, heads, head_dim)
    start = 0
    for level, (height, width) in enumerate(shapes):
        level_value = value[:, start : start + height * width]
        start += height * width
        for head in range(heads):
            head_value = level_value[:, :, head].reshape(batch, height, width, head_dim)
            for point in range(points):
                x = reference_points[..., 0] + offsets[:, :, head, level, point, 0] / width
                y = reference_points[..., 1] + offsets[:, :, head, level, point, 1] / height
                sampled = bilinear_sample(head_value, x.expand(batch, -1), y.expand(batch, -1))
                output[:, :, head] += sampled * weights[:, :, head, level, point, None]
    return linear("output_proj", output.reshape(batch, num_queries, channels))


def reference_fuser(params: dict, srcs: list[torch.Tensor], heads: int = 16, points: int = 4) -> torch.Tensor:
    """The original `MSCrossAttnBlock` on the stacked selected layers `srcs` (original key names, gamma1/gamma2):
    key/value = `srcs[0..3]`, query = `srcs[-1]`, LayerNorm eps 1e-6. Float64, `(B, N, C)`."""
    params = {key: value.double() for key, value in params.items()}
    srcs = [src.double() for src in srcs]
    norm = lambda name, x: torch.nn.functional.layer_norm(  # noqa: E731
        x, x.shape[-1:], params[f"{name}.weight"], params[f"{name}.bias"], eps=1e-6
    )
    query = srcs[-1]
    side = math.isqrt(query.shape[1])
    centres = (torch.arange(side, dtype=torch.float64) + 0.5) / side
    grid_y, grid_x = torch.meshgrid(centres, centres, indexing="ij")
    reference_points = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], -1)[None]  # (1, N, 2), (x, y)
    features = norm("feat_norm", torch.cat(srcs[:4], dim=1))
    attended = reference_msda(
        params, "cross_attn.", norm("query_norm", query), reference_points, features, [(side, side)] * 4, heads, points
    )
    attended_norm = norm("norm1", attended)
    refined = reference_msda(
        params, "self_attn.", attended_norm, reference_points, attended_norm, [(side, side)], heads, points
    )
    attended = attended + params["gamma2"] * refined
    return query + params["gamma1"] * attended


def original_fuser_params() -> dict[str, torch.Tensor]:
    tensors = original_tensors()
    return {key[len(FUSER_PREFIX) :]: value for key, value in tensors.items() if key.startswith(FUSER_PREFIX)}


def random_fuser_params(channels: int, heads: int, points: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Original-named fuser weights drawn so that every part matters (offsets of a few pixels, open gammas)."""
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape, std=1.0: std * torch.randn(*shape, generator=generator)  # noqa: E731
    params = {"gamma1": 0.5 + randn(channels, std=0.2), "gamma2": 0.5 + randn(channels, std=0.2)}
    for name in ("query_norm", "feat_norm", "norm1"):
        params[f"{name}.weight"], params[f"{name}.bias"] = 1 + randn(channels, std=0.1), randn(channels, std=0.1)
    for prefix, levels in (("cross_attn.", 4), ("self_attn.", 1)):
        for name, rows, std in (
            ("sampling_offsets", heads * levels * points * 2, 0.3),
            ("attention_weights", heads * levels * points, 0.3),
            ("value_proj", channels, 0.2),
            ("output_proj", channels, 0.2),
        ):
            params[f"{prefix}{name}.weight"] = randn(rows, channels, std=std)
            params[f"{prefix}{name}.bias"] = randn(rows, std=1.0 if name == "sampling_offsets" else 0.1)
    return params


def block_from_original_params(params: dict, heads: int = 16, points: int = 4) -> MMFuserBlock:
    channels = params["gamma1"].shape[0]
    block = MMFuserBlock(channels, num_levels=4, num_heads=heads, num_points=points, layer_norm_eps=1e-6)
    renames = {"gamma1": "cross_attn_scale", "gamma2": "self_attn_scale"}
    block.load_state_dict({renames.get(key, key): value for key, value in params.items()}, strict=True)
    return block.eval()


def test_reference_fuser_reproduces_the_golden_fused_features():
    fused = reference_fuser(original_fuser_params(), list(EXPECTED["selected_features"]))
    torch.testing.assert_close(fused.float(), EXPECTED["fused_features"], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# The fuser block
# --------------------------------------------------------------------------------------------------------------


def test_block_matches_golden_fused_features_from_selected_features():
    block = block_from_original_params(original_fuser_params())
    selected = list(EXPECTED["selected_features"])
    with torch.no_grad():
        fused = block(selected[-1], selected[:-1])
    torch.testing.assert_close(fused, EXPECTED["fused_features"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", [6, 5])
def test_block_matches_reference_on_other_grids(side):
    # The hidden fixtures use a 6x6 grid; 5x5 checks an odd side. Batch 2 checks the batch dimension.
    params = random_fuser_params(channels=32, heads=16, points=4, seed=side)
    srcs = [torch.randn(2, side * side, 32, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    with torch.no_grad():
        fused = block_from_original_params(params)(srcs[-1], srcs[:4])
    torch.testing.assert_close(fused, reference_fuser(params, srcs).float(), atol=1e-5, rtol=0)


def test_deformable_attention_normalises_x_by_width_and_y_by_height():
    # A non-square level (3 rows x 5 columns): swapping width and height in the offset normaliser changes the result.
    params = random_fuser_params(channels=32, heads=4, points=3, seed=1)
    attention = MMFuserDeformableAttention(32, num_heads=4, num_levels=1, num_points=3).eval()
    cross = {key[len("self_attn.") :]: value for key, value in params.items() if key.startswith("self_attn.")}
    attention.load_state_dict(cross)
    generator = torch.Generator().manual_seed(0)
    query, source = torch.randn(2, 7, 32, generator=generator), torch.randn(2, 15, 32, generator=generator)
    reference_points = torch.rand(1, 7, 1, 2, generator=generator)
    with torch.no_grad():
        output = attention(query, reference_points, source, [(3, 5)])
    expected = reference_msda(
        {k: v.double() for k, v in params.items()}, "self_attn.", query.double(), reference_points[:, :, 0].double(),
        source.double(), [(3, 5)], heads=4, points=3,
    )  # fmt: skip
    torch.testing.assert_close(output, expected.float(), atol=1e-5, rtol=0)


def test_fresh_block_is_identity_on_the_query():
    config = LlavaMultiLayerConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                           image_size=28, patch_size=7),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=64),
        fusion_type="mmfuser", vision_feature_layer=[1, 2, 3, 4, -1], mmfuser_num_heads=4,
    )  # fmt: skip
    torch.manual_seed(0)
    fuser = LlavaMultiLayerForConditionalGeneration(config).model.multi_modal_projector.fuser.eval()
    assert torch.count_nonzero(fuser.cross_attn_scale) == 0 and torch.count_nonzero(fuser.self_attn_scale) == 0
    # Deformable-DETR's initialisation (spec 1.5): zero offset/attention weights, star-shaped offset bias.
    for attention in (fuser.cross_attn, fuser.self_attn):
        assert torch.count_nonzero(attention.sampling_offsets.weight) == 0
        assert torch.count_nonzero(attention.attention_weights.weight) == 0
        bias = attention.sampling_offsets.bias.view(4, attention.num_levels, attention.num_points, 2)
        torch.testing.assert_close(bias[0, 0, :, 0], torch.arange(1.0, attention.num_points + 1))  # head 0: +x
        torch.testing.assert_close(bias[1, 0, 0], torch.tensor([0.0, 1.0]))  # head 1 of 4: +y
    query = torch.randn(2, 16, 32)
    with torch.no_grad():
        assert torch.equal(fuser(query, [torch.randn(2, 16, 32) for _ in range(4)]), query)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_block_runs_in_each_dtype_with_float32_sampling(dtype):
    params = random_fuser_params(channels=32, heads=16, points=4)
    block = block_from_original_params(params)
    srcs = [torch.randn(1, 36, 32, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    with torch.no_grad():
        expected = block(srcs[-1], srcs[:4])
    block = block.to(dtype)
    sampled_dtypes = []
    for attention in (block.cross_attn, block.self_attn):
        # value, sampling locations, attention weights as they enter the sampling core
        attention.attn.register_forward_pre_hook(
            lambda module, args: sampled_dtypes.append((args[0].dtype, args[4].dtype, args[5].dtype))
        )
    with torch.no_grad():
        fused = block(srcs[-1].to(dtype), [src.to(dtype) for src in srcs[:4]])
    assert fused.dtype == dtype
    assert sampled_dtypes == [(torch.float32,) * 3] * 2  # the cross- and the self-attention, sampling in float32
    # The fused features reach ~5 here; one bf16 rounding (2^-8 relative) of such a value is ~0.02 and the LayerNorms
    # and linears round several times (measured: bf16 0.087, fp16 0.0079). The bounds leave ~2x headroom.
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 0.15, torch.float16: 0.02}[dtype]
    assert (fused.float() - expected).abs().max() <= tolerance


def test_block_uses_the_transformers_deformable_attention_core():
    block = block_from_original_params(random_fuser_params(channels=32, heads=16, points=4))
    assert isinstance(block.cross_attn.attn, MultiScaleDeformableAttention)
    assert isinstance(block.self_attn.attn, MultiScaleDeformableAttention)
    calls = []
    hooks = [
        attention.attn.register_forward_hook(lambda *args: calls.append(1))
        for attention in (block.cross_attn, block.self_attn)
    ]
    with torch.no_grad():
        block(torch.randn(1, 16, 32), [torch.randn(1, 16, 32) for _ in range(4)])
    for hook in hooks:
        hook.remove()
    assert len(calls) == 2


def test_block_refuses_a_non_square_patch_grid():
    block = block_from_original_params(random_fuser_params(channels=32, heads=16, points=4))
    with pytest.raises(ValueError, match="square patch grid.*65 tokens"):
        block(torch.randn(1, 65, 32), [torch.randn(1, 65, 32) for _ in range(4)])


# --------------------------------------------------------------------------------------------------------------
# Original layer lists
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("list-22/-17/-12/-7/-2", [-22, -17, -12, -7, -2]),
        ("list3/8/-2", [3, 8, -2]),
        ("list 3 / 8 /13/ 18/ -2", [3, 8, 13, 18, -2]),
        ("-2", -2),
        (-2, -2),
        ([-22, -17, -12, -7, -2], [-22, -17, -12, -7, -2]),
    ],
)
def test_parse_select_layer_follows_phase_select_layer(value, expected):
    assert parse_select_layer(value) == expected


@pytest.mark.parametrize("value", ["list-22/x", "layer", True, 1.5, ["a"]])
def test_parse_select_layer_refuses_garbage(value):
    with pytest.raises(ConversionError, match="mm_vision_select_layer"):
        parse_select_layer(value)


def test_fuser_layers_maps_original_lists_to_values_then_query():
    assert fuser_layers([-22, -17, -12, -7, -2]) == ([-22, -17, -12, -7, -2], [])
    assert fuser_layers([3, 8, 13, 18]) == ([3, 8, 13, 18, 18], [])  # the last entry is a value level AND the query
    assert fuser_layers([1, 2, 3, 4, 5, 6, 7]) == ([1, 2, 3, 4, 7], [5, 6])
    with pytest.raises(ConversionError, match="at least 4"):
        fuser_layers([3, 8, -2])
    with pytest.raises(ConversionError, match="single layer"):
        fuser_layers(-2)


def test_detect_recognises_mmfuser_configs_only():
    assert detect(ORIGINAL_CONFIG)
    assert detect(json.loads((FIXTURE / "original_pretrain" / "config.json").read_text()))
    assert detect({**ORIGINAL_CONFIG, "mm_vision_select_layer": "list-22/-17/-12/-7/-2"})
    for other in ("lsf-E_D-clip-3-18-23", "lsf-E_M-clip-3-18-23", "igva-clip"):
        assert not detect(json.loads((FIXTURES / other / "original" / "config.json").read_text()))
    plain_llava = {key: value for key, value in ORIGINAL_CONFIG.items() if key != "ms_cross_attn_lr"}
    assert not detect({**plain_llava, "mm_vision_select_layer": -2})


# --------------------------------------------------------------------------------------------------------------
# Conversion through the command line, and parity with the original code
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("mmfuser") / "converted"
    result = run_converter(*cli_args(output_dir, ORIGINAL, "--verify", "--parity-fixture", str(FIXTURE)))
    assert result.returncode == 0, result.stderr
    return output_dir


@pytest.fixture(scope="module")
def model(converted) -> LlavaMultiLayerForConditionalGeneration:
    return load_converted(converted)


@pytest.fixture(scope="module")
def processor(converted) -> LlavaMultiLayerProcessor:
    return AutoProcessor.from_pretrained(converted)


def test_converted_directory_is_a_complete_hub_checkpoint(converted):
    for name in (
        "config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "processor_config.json", "chat_template.jinja", "README.md", "conversion_report.json",
        "modeling_llava_multilayer.py", "deformable_fusion_llava_multilayer.py", "configuration_llava_multilayer.py",
    ):  # fmt: skip
        assert (converted / name).is_file(), name
    assert not (converted / "tokenizer.model").exists()  # loading must not need sentencepiece
    with safe_open(converted / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    assert not any("gamma" in key or "beta" in key for key in keys)  # transformers' legacy rename would hit them
    assert "model.multi_modal_projector.fuser.cross_attn_scale" in keys


def test_converted_config(converted, model):
    config = model.config
    assert config.fusion_type == "mmfuser"
    assert config.vision_feature_layer == [-22, -17, -12, -7, -2]  # value levels, then the query
    assert config.vision_feature_select_strategy == "default"
    assert (config.mmfuser_num_heads, config.mmfuser_num_points, config.mmfuser_layer_norm_eps) == (16, 4, 1e-6)
    assert config.image_token_id == VOCAB == config.text_config.vocab_size
    assert config.image_seq_length == EXPECTED["image_features"].shape[1] == 64
    assert config.projector_hidden_act == "gelu"
    fuser = model.model.multi_modal_projector.fuser
    assert fuser.num_levels == fuser.cross_attn.num_levels == 4
    assert fuser.cross_attn.num_heads == 16 and fuser.cross_attn.num_points == 4
    assert config.text_config.hidden_size == ORIGINAL_CONFIG["hidden_size"]
    assert config.vision_config.num_hidden_layers == 24
    generation = json.loads((converted / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)


def test_processor_reproduces_the_original_inputs(processor, model):
    batch = fixture_batch(processor)
    torch.testing.assert_close(batch["pixel_values"], INPUTS["pixel_values"], atol=1e-6, rtol=0)
    expanded = []
    for token in INPUTS["input_ids"][0].tolist():
        expanded += [model.config.image_token_id] * model.config.image_seq_length if token == -200 else [token]
    assert batch["input_ids"][0].tolist() == expanded
    assert batch["attention_mask"].all()


def test_chat_template_reproduces_the_vicuna_v1_prompt(processor):
    question = json.loads((FIXTURE / "prompt.json").read_text())["question"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == PROMPT


def test_selected_and_fused_features_match(model):
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        hidden_states = model.model.vision_tower(INPUTS["pixel_values"], output_hidden_states=True).hidden_states
        fused = projector.fuse(hidden_states)
        image_features = projector(hidden_states).image_features
    selected = torch.stack([hidden_states[layer][:, 1:] for layer in ORIGINAL_LAYERS])
    torch.testing.assert_close(selected, EXPECTED["selected_features"], atol=1e-5, rtol=0)
    torch.testing.assert_close(fused, EXPECTED["fused_features"], atol=1e-5, rtol=0)
    torch.testing.assert_close(image_features, EXPECTED["image_features"], atol=1e-5, rtol=0)


def test_logits_and_image_features_match(model, processor):
    with torch.no_grad():
        output = model(**fixture_batch(processor))
    torch.testing.assert_close(output.image_hidden_states, EXPECTED["image_features"], atol=1e-5, rtol=0)
    torch.testing.assert_close(output.logits[..., :VOCAB], EXPECTED["logits"], atol=1e-4, rtol=0)


def test_greedy_generation_matches(model, processor):
    batch = fixture_batch(processor)
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert generated[0, batch["input_ids"].shape[1] :].tolist() == EXPECTED["generated_ids"][0, 1:].tolist()


def test_model_card_records_the_parity_numbers(converted):
    card = (converted / "README.md").read_text()
    report = json.loads((converted / "conversion_report.json").read_text())
    parity = report["parity"]
    assert parity["prompt_1"]["logits_max_abs_diff"] <= 1e-4
    assert parity["prompt_1"]["image_features_max_abs_diff"] <= 1e-5
    assert parity["prompt_1"]["greedy_tokens_equal"] and parity["prompt_1"]["input_ids_equal"]
    assert parity["fuser"]["fused_features_max_abs_diff"] <= 1e-5
    assert parity["fuser"]["selected_features_max_abs_diff"] <= 1e-5
    assert report["verified"]
    assert "logits_max_abs_diff" in card and "fused_features_max_abs_diff" in card
    assert "value (key/value) levels" in card and "[-22, -17, -12, -7]" in card and "query layer" in card
    assert "mmfuser" in card.split("---")[1]  # card metadata tags


def test_converted_model_loads_without_sentencepiece(converted):
    code = (
        "import sys; sys.modules['sentencepiece'] = None\n"
        "import llava_multilayer\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        f"processor = AutoProcessor.from_pretrained({str(converted)!r})\n"
        f"AutoModelForImageTextToText.from_pretrained({str(converted)!r})\n"
        "print(len(processor.tokenizer('USER: <image>\\nhi')['input_ids']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_bfloat16_inference_stays_close_to_float32(converted, model, processor):
    """bf16 keeps 8 mantissa bits (relative rounding 2^-8 ~ 0.4%), and the tiny random fixture LLaMA (N(0, 0.2)
    weights, logits up to ~8) amplifies that, as does transformers' CLIP tower: how much depends on the CPU's bf16
    kernels (native AVX512-BF16 rounds differently from emulation). So the bound is stated relative to the error of
    transformers' own modules in bf16 (tower and language model in bf16, this package's fuser + projector in
    float32 on the bf16 tower's hidden states), to test what this package adds (fuser + projector in bf16, with the
    sampling in float32). Measured on a 2-vCPU Xeon: logits max |diff| 0.70 vs 0.50 for the language model alone; on
    an AMD EPYC with AVX512-BF16: 1.09 vs 0.99 for tower + language model; fuser + projector alone in bf16 change
    image_features by 3.8e-3 on both (spec: ~4e-3)."""
    model_bf16 = load_converted(converted, torch.bfloat16)
    batch = fixture_batch(processor)
    image_positions = (batch["input_ids"] == VOCAB)[..., None]
    with torch.no_grad():
        reference = model(**batch).logits[..., :VOCAB]
        logits = model_bf16(**batch).logits[..., :VOCAB].float()
        hidden_states = model.model.vision_tower(INPUTS["pixel_values"], output_hidden_states=True).hidden_states
        image_features = model.model.multi_modal_projector(hidden_states).image_features
        bf16_tower_states = model_bf16.model.vision_tower(
            INPUTS["pixel_values"].bfloat16(), output_hidden_states=True
        ).hidden_states
        fp32_fuser_features = model.model.multi_modal_projector(tuple(h.float() for h in bf16_tower_states))
        embeds = model.get_input_embeddings()(batch["input_ids"].masked_fill(batch["input_ids"] == VOCAB, 0))
        embeds = embeds.masked_scatter(image_positions, fp32_fuser_features.image_features)
        transformers_modules_only = model_bf16.lm_head(
            model_bf16.model.language_model(inputs_embeds=embeds.bfloat16()).last_hidden_state
        ).float()[..., :VOCAB]
        projector_bf16 = model_bf16.model.multi_modal_projector(tuple(h.bfloat16() for h in hidden_states))
    assert torch.isfinite(logits).all()
    transformers_modules_error = (transformers_modules_only - reference).abs().max()
    assert (logits - reference).abs().max() <= 2 * transformers_modules_error
    assert (logits - reference).norm() / reference.norm() <= 0.1
    assert (projector_bf16.image_features.float() - image_features).abs().max() <= 1e-2
    assert projector_bf16.image_features.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------------------
# Other checkpoint layouts and stages
# --------------------------------------------------------------------------------------------------------------


def _split(keys: list[str], count: int) -> list[list[str]]:
    # The projector and the tower land in the last shard, as in the original 7B/13B saves.
    keys = sorted(keys, key=lambda key: (key.startswith(("model.mm_projector", "model.vision_tower")), key))
    size = math.ceil(len(keys) / count)
    return [keys[i : i + size] for i in range(0, len(keys), size)]


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_checkpoint_converts_to_the_same_model(fmt, converted, tmp_path):
    source = copy_original(tmp_path / "sharded", weights=False)
    tensors = original_tensors()
    chunks = _split(list(tensors), 3)
    weight_map = {}
    for number, chunk in enumerate(chunks, start=1):
        name = (
            f"model-{number:05d}-of-{len(chunks):05d}.safetensors"
            if fmt == "safetensors"
            else f"pytorch_model-{number:05d}-of-{len(chunks):05d}.bin"
        )
        shard = {key: tensors[key] for key in chunk}
        save_file(shard, source / name, metadata={"format": "pt"}) if fmt == "safetensors" else torch.save(
            shard, source / name
        )
        weight_map.update(dict.fromkeys(chunk, name))
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (source / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    main(cli_args(tmp_path / "out", source))
    assert_same_state_dict(tmp_path / "out", converted)


def test_layer_list_given_as_the_raw_list_string_converts_to_the_same_model(converted, tmp_path):
    source = copy_original(tmp_path / "string", mm_vision_select_layer="list-22/-17/-12/-7/-2")
    convert_mmfuser(source, tmp_path / "out", vision_tower=str(VISION_TOWER), progress=False)
    assert load_converted(tmp_path / "out").config.vision_feature_layer == [-22, -17, -12, -7, -2]
    assert_same_state_dict(tmp_path / "out", converted)


@pytest.mark.parametrize(
    "layers, expected_layers",
    [
        ([-22, -17, -12, -2], [-22, -17, -12, -2, -2]),  # 4 entries: the last is a value level and the query
        ([-22, -17, -12, -7, -5, -3, -2], [-22, -17, -12, -7, -2]),  # entries 4..n-2 are ignored
    ],
)
def test_other_layer_list_lengths_keep_the_original_semantics(layers, expected_layers, tmp_path, caplog):
    source = copy_original(tmp_path / "layers", mm_vision_select_layer=layers)
    with caplog.at_level(logging.WARNING):
        convert_mmfuser(source, tmp_path / "out", vision_tower=str(VISION_TOWER), progress=False)
    ignored = layers[4:-1]
    assert (f"so {ignored} are ignored" in caplog.text) == bool(ignored)
    converted_model = load_converted(tmp_path / "out")
    assert converted_model.config.vision_feature_layer == expected_layers
    assert converted_model.model.multi_modal_projector.fuser.num_levels == 4
    with torch.no_grad():
        vision_outputs = converted_model.model.vision_tower(INPUTS["pixel_values"], output_hidden_states=True)
        hidden_states = vision_outputs.hidden_states
        fused = converted_model.model.multi_modal_projector.fuse(hidden_states)
    expected = reference_fuser(original_fuser_params(), [hidden_states[layer][:, 1:] for layer in layers])
    torch.testing.assert_close(fused, expected.float(), atol=1e-5, rtol=0)


def test_dtype_flag_casts_the_weights(tmp_path):
    main(cli_args(tmp_path / "out", ORIGINAL, "--dtype", "bfloat16"))
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as handle:
        assert {handle.get_slice(key).get_dtype() for key in handle.keys()} == {"BF16"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def make_base_language_model(directory: Path) -> Path:
    """The fixture's LLaMA (the language-model keys of `original/`) saved as a plain LlamaForCausalLM directory."""
    config = LlamaConfig(**{k: v for k, v in text_config_from_original(ORIGINAL_CONFIG).items() if k != "model_type"})
    language_model = LlamaForCausalLM(config)
    tensors = original_tensors()
    multimodal = ("model.mm_projector", "model.vision_tower")
    language_model.load_state_dict(
        {key: value for key, value in tensors.items() if not key.startswith(multimodal)}, strict=True
    )
    language_model.save_pretrained(directory)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(ORIGINAL / name, directory / name)
    return directory


def test_pretrain_stage_builds_the_model_from_mm_projector_bin(converted, tmp_path):
    base = make_base_language_model(tmp_path / "vicuna")
    output_dir = tmp_path / "pretrain"
    main(cli_args(output_dir, base, "--pretrain-dir", str(FIXTURE / "original_pretrain"), "--verify"))
    pretrained = load_converted(output_dir)
    finetuned = load_converted(converted)
    projector = pretrained.model.multi_modal_projector.state_dict()
    expected = finetuned.model.multi_modal_projector.state_dict()
    assert projector.keys() == expected.keys()
    for key in expected:
        assert torch.equal(projector[key], expected[key]), key
    # The fixture's LLM and tower are those of the finetune checkpoint, so the whole model is the same.
    assert_same_state_dict(output_dir, converted)
    # The pretrain stage trains without pad-to-square (image_aspect_ratio "square").
    assert AutoProcessor.from_pretrained(output_dir).image_processor.do_pad is False
    settings = json.loads((output_dir / "conversion_report.json").read_text())["settings"]
    assert settings["stage"].startswith("pretrain")


# --------------------------------------------------------------------------------------------------------------
# Wrong inputs fail clearly
# --------------------------------------------------------------------------------------------------------------


def test_missing_vision_tower_offline_fails_clearly(tmp_path, monkeypatch, capsys):
    # config.json names the hub id `openai/clip-vit-large-patch14-336`; offline and with an empty cache, it cannot be
    # found, and no --vision-tower is given.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--input-dir", str(ORIGINAL), "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "openai/clip-vit-large-patch14-336" in error and "--vision-tower" in error
    assert not (tmp_path / "out").exists()


def convert_error(tmp_path: Path, input_dir: Path, *extra: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(cli_args(tmp_path / "out", input_dir, *extra))
    assert exit_info.value.code == 1
    assert not (tmp_path / "out").exists()
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"mm_vision_select_layer": [-12, -7, -2]}, "has 3 entries.*at least 4"),
        ({"mm_vision_select_layer": "list-12/-2"}, "has 2 entries.*at least 4"),
        ({"mm_vision_select_layer": -2}, "single layer"),
        ({"mm_vision_select_layer": [-22, -17, -12, -7, 30]}, "out of range"),
        ({"mm_vision_select_feature": "cls_patch"}, "cls_patch.*not a square grid"),
        ({"mm_projector_type": "linear"}, "mm_projector_type='linear' is not supported"),
        ({"image_aspect_ratio": "anyres"}, "anyres"),
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
        ({"mm_hidden_size": 1024}, "mm_hidden_size=1024"),
    ],
)
def test_unusable_settings_fail_clearly(changes, message, tmp_path, capsys):
    source = copy_original(tmp_path / "bad", **changes)
    error = convert_error(tmp_path, source, capsys=capsys)
    assert re.search(message, error, re.S), error


def test_checkpoint_of_another_family_is_refused(tmp_path, capsys):
    error = convert_error(tmp_path, FIXTURES / "lsf-E_D-clip-3-18-23" / "original", capsys=capsys)
    assert "is not an MMFuser config" in error


def test_embedded_tower_must_match_the_named_tower(tmp_path, capsys):
    tower = tmp_path / "tower23"
    shutil.copytree(VISION_TOWER, tower)
    config = json.loads((tower / "config.json").read_text())
    (tower / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 23}))
    error = convert_error(tmp_path, ORIGINAL, "--vision-tower", str(tower), capsys=capsys)
    assert "does not match the tower" in error and "24 encoder layers instead of 23" in error


def test_finetune_flags_on_a_pretrain_directory_fail_clearly(tmp_path, capsys):
    error = convert_error(tmp_path, FIXTURE / "original_pretrain", capsys=capsys)
    assert "--pretrain-dir" in error
