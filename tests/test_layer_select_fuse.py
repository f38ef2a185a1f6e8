"""Layer_Select_Fuse: layer selection and decoder-layer maps, conversion of original checkpoints (finetune and
pretrain stage), parity with the original code's golden outputs, and what the port adds (text-only generation,
left-padded batches, the `post_cross`/`parallel` placements of internal modular fusion).

The five public fixtures `fixtures/lsf-*-3-18-23` were produced by running the original code (see their READMEs):
`original/` (finetune checkpoint, config `model_type: "llama"`), `original_pretrain/` (`mm_projector_f.bin`,
`mm_projector_{k}.bin`, `ucross.bin`), the tiny tower `vision_tower/`, and the original model's inputs and outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_weights_
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, CLIPVisionConfig, SiglipVisionConfig

from llava_multilayer import LlavaMultiLayerConfig, LlavaMultiLayerForConditionalGeneration
from llava_multilayer.conversion.convert_layer_select_fuse_to_hf import (
    MMFUSER_LEVELS,
    TOWER_LAYERS,
    build_config,
    check_supported,
    convert_layer_select_fuse,
    decoder_layer_order,
    detect,
    fusion_settings,
    internal_layer_map,
    main,
    original_key_mapping,
)
from llava_multilayer.conversion.pipeline import expected_target_shapes
from llava_multilayer.conversion.reading import ConversionError
from llava_multilayer.internal_fusion_llava_multilayer import CrossAttentionFusionDecoderLayer


REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_DIR = Path(__file__).parent / "fixtures"
SCRIPT = REPO_ROOT / "conversion_scripts" / "convert_layer_select_fuse_to_hf.py"
FIXTURES = [
    "lsf-E_D-clip-3-18-23",
    "lsf-E_M-clip-3-18-23",
    "lsf-I_D-clip-3-18-23",
    "lsf-I_M-clip-3-18-23",
    "lsf-E_D-siglip-3-18-23",
]
INTERNAL_FIXTURES = [name for name in FIXTURES if "-I_" in name]
CLI_PRETRAIN = "lsf-I_M-clip-3-18-23"  # also converted from its pretrain artifacts through the command line
MAX_NEW_TOKENS = 8

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

CLIP = list(range(1, 25))
FIRST_HALF, SECOND_HALF = list(range(1, 13)), list(range(13, 25))
SIGLIP_LATTER = list(range(15, 27))


def fixture_dir(name: str) -> Path:
    return FIXTURES_DIR / name


def golden(name: str) -> tuple[dict, dict, str, Image.Image]:
    """`(inputs, expected, prompt, image)` of a fixture."""
    directory = fixture_dir(name)
    prompt = json.loads((directory / "prompt.json").read_text())["prompt"]
    image = Image.open(directory / "image.png").convert("RGB")
    return load_file(directory / "inputs.safetensors"), load_file(directory / "expected.safetensors"), prompt, image


def make_base_language_model(name: str, directory: Path) -> Path:
    """The base LLM of a fixture as the pretraining stage sees it: the LLaMA weights of `original/` (no ucross
    modules), a plain LLaMA config.json and the tokenizer files."""
    original = fixture_dir(name) / "original"
    directory.mkdir(parents=True)
    config = json.loads((original / "config.json").read_text())
    fusion_fields = ("mm_", "layer_", "tune_", "tokenizer_", "image_", "use_mm", "n_queries")
    config = {key: value for key, value in config.items() if not key.startswith(fusion_fields)}
    config["architectures"] = ["LlamaForCausalLM"]
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(original / "model.safetensors")
    llama = {
        key: tensor
        for key, tensor in tensors.items()
        if key == "lm_head.weight"
        or (key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")) and "ucross" not in key)
    }
    save_file(llama, directory / "model.safetensors", metadata={"format": "pt"})
    for file in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(original / file, directory / file)
    return directory


def run_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


# --------------------------------------------------------------------------------------------------------------
# Layer selection and decoder-layer maps
# --------------------------------------------------------------------------------------------------------------


def test_detect_recognises_layer_select_fuse_configs():
    config = json.loads((fixture_dir(FIXTURES[0]) / "original" / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert detect(config)
    assert not detect({k: v for k, v in config.items() if k != "layer_fusing_strategy"})
    assert not detect({"model_type": "llama", "mm_vision_tower": "openai/clip-vit-large-patch14-336"})


def test_tower_layer_lists_follow_the_original_towers():
    assert TOWER_LAYERS["clip"] == {
        "18": [18, 23],
        "3-18": [3, 18, 23],
        "3-18-23": [3, 18, 23, 23],
        "former": FIRST_HALF + [23],
        "latter": SECOND_HALF + [23],
        "all": CLIP + [23],
    }
    assert TOWER_LAYERS["siglip"] == {"3-18-23": [3, 20, 25, 25], "latter": SIGLIP_LATTER + [25]}


EXTERNAL_CASES = [
    ("E_D", "18", "clip", [18, 23]),
    ("E_D", "3-18-23", "clip", [3, 18, 23]),
    ("E_D", "former", "clip", [FIRST_HALF, 23]),
    ("E_D", "latter", "clip", [SECOND_HALF, 23]),
    ("E_D", "all", "clip", [FIRST_HALF, SECOND_HALF, 23]),
    ("E_D", "3-18-23", "siglip", [3, 20, 25]),
    ("E_D", "latter", "siglip", [SIGLIP_LATTER, 25]),
    ("E_M", "18", "clip", [18, 23]),
    ("E_M", "3-18-23", "clip", [3, 18, 23]),
    ("E_M", "former", "clip", FIRST_HALF + [23]),
    ("E_M", "latter", "clip", SECOND_HALF + [23]),
    ("E_M", "all", "clip", CLIP + [23]),
]


@pytest.mark.parametrize("strategy, selection, encoder, layers", EXTERNAL_CASES)
def test_external_strategies_map_onto_concat_and_mmfuser(strategy, selection, encoder, layers):
    settings = fusion_settings(strategy, selection, encoder, num_decoder_layers=24)
    assert settings.fusion_type == ("concat" if strategy == "E_D" else "mmfuser")
    assert settings.vision_feature_layer == layers
    assert settings.internal_fusion_type is None
    if strategy == "E_M":
        assert len(layers) - 1 == MMFUSER_LEVELS[selection]
        kwargs = settings.config_kwargs()
        assert (kwargs["mmfuser_num_heads"], kwargs["mmfuser_num_points"], kwargs["mmfuser_layer_norm_eps"]) == (
            16,
            4,
            1e-6,
        )


INTERNAL_CASES = [
    ("18", "clip", 23, [18]),
    ("3-18", "clip", 23, [3, 18]),
    ("3-18-23", "clip", 23, [3, 18, 23]),
    ("former", "clip", 23, FIRST_HALF),
    ("latter", "clip", 23, SECOND_HALF),
    ("all", "clip", 23, CLIP),
    ("3-18-23", "siglip", 25, [3, 20, 25]),
    ("latter", "siglip", 25, SIGLIP_LATTER),
]


@pytest.mark.parametrize("strategy", ["I_D", "I_M"])
@pytest.mark.parametrize("selection, encoder, main_layer, internal", INTERNAL_CASES)
def test_internal_strategies_splice_the_main_layer_and_inject_the_others(
    strategy, selection, encoder, main_layer, internal
):
    settings = fusion_settings(strategy, selection, encoder, num_decoder_layers=24)
    assert (settings.fusion_type, settings.vision_feature_layer) == ("single", main_layer)
    assert settings.internal_fusion_type == ("add" if strategy == "I_D" else "cross_attention")
    assert settings.internal_feature_layers == internal
    assert settings.config_kwargs()["internal_fusion_placement"] == "pre_cross"


@pytest.mark.parametrize(
    "selection, num_layers, expected",
    [
        # MobileLLaMA-1.4B (24 layers) and -2.7B (32 layers), spec section 3.1
        ("3-18-23", 24, [[2, 0], [17, 1], [22, 2]]),
        ("18", 24, [[17, 0]]),
        ("3-18", 24, [[2, 0], [17, 1]]),
        ("former", 24, [[layer, layer] for layer in range(12)]),
        ("latter", 24, [[layer, layer - 12] for layer in range(12, 24)]),
        ("all", 24, [[layer, layer] for layer in range(24)]),
        ("3-18-23", 32, [[3, 0], [23, 1], [29, 2]]),
        ("latter", 32, [[layer, layer - 20] for layer in range(20, 32)]),
        ("all", 32, [[layer, layer] for layer in range(12)] + [[layer, layer - 8] for layer in range(20, 32)]),
        # 5 layers (the fixtures): t(3) = int(-0.375) = 0 truncates toward zero
        ("3-18-23", 5, [[0, 0], [2, 1], [3, 2]]),
        ("18", 5, [[2, 0]]),
        ("former", 5, [[layer, layer] for layer in range(5)]),
        ("latter", 5, [[layer, layer + 7] for layer in range(5)]),  # the list is [-7, ..., 4]
        ("all", 5, [[layer, layer] for layer in range(5)]),  # first occurrence wins
        # 2 layers: t(3), t(18), t(23) all truncate to 0 -> only the first feature is ever used
        ("3-18-23", 2, [[0, 0]]),
    ],
)
def test_decoder_layer_maps(selection, num_layers, expected):
    assert internal_layer_map(selection, num_layers) == expected


def test_decoder_layer_order_keeps_the_original_list():
    assert decoder_layer_order("3-18-23", 24) == [2, 17, 22]
    assert decoder_layer_order("3-18-23", 32) == [3, 23, 29]
    assert decoder_layer_order("latter", 5) == list(range(-7, 5))
    assert decoder_layer_order("all", 32) == list(range(12)) + list(range(20, 32))


@pytest.mark.parametrize(
    "strategy, selection, encoder, message",
    [
        ("E_D", "3-18", "clip", "no branch for it"),
        ("E_M", "3-18", "clip", "no branch for it"),
        ("E_M", "3-18-23", "siglip", "676 reference points"),
        ("E_M", "latter", "siglip", "676 reference points"),
        ("E_D", "18", "siglip", "SigLIP tower only implements"),
        ("I_D", "3-18", "siglip", "SigLIP tower only implements"),
        ("I_M", "former", "siglip", "SigLIP tower only implements"),
        ("E_D", "all", "siglip", "SigLIP tower only implements"),
        ("X_D", "18", "clip", "not one of the original code's strategies"),
        ("E_D", "3-23", "clip", "not one of the original code's layer selections"),
    ],
)
def test_combinations_the_original_cannot_produce_are_refused(strategy, selection, encoder, message):
    with pytest.raises(ConversionError, match=message):
        check_supported(strategy, selection, encoder)


def _supported_combinations():
    for encoder, selections in TOWER_LAYERS.items():
        for selection in selections:
            for strategy in ("E_D", "E_M", "I_D", "I_M"):
                try:
                    check_supported(strategy, selection, encoder)
                except ConversionError:
                    continue
                yield strategy, selection, encoder


SUPPORTED = list(_supported_combinations())


def test_every_convertible_combination_is_listed():
    # CLIP: 4 strategies x 6 selections, minus E_D/3-18 and E_M/3-18; SigLIP: E_D, I_D, I_M x (3-18-23, latter).
    assert len(SUPPORTED) == 22 + 6


def _tiny_original(strategy: str, selection: str, encoder: str, num_layers: int) -> tuple[dict, object]:
    """An original config.json (tiny LLaMA) and tower config for a combination."""
    original = json.loads((fixture_dir(FIXTURES[0]) / "original" / "config.json").read_text())
    original.update(layer_fusing_strategy=strategy, layer_using_strategy=selection, num_hidden_layers=num_layers)
    geometry = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, image_size=42, patch_size=7)
    if encoder == "siglip":
        original["mm_vision_tower"] = "google/siglip-so400m-patch14-384"
        original["mm_hidden_size"] = 1152  # what the original always writes for SigLIP (a default config)
        tower = SiglipVisionConfig(num_hidden_layers=27, **geometry)
    else:
        tower = CLIPVisionConfig(num_hidden_layers=24, **geometry)
    return original, tower


def _original_fusion_keys(strategy: str, selection: str, config: LlavaMultiLayerConfig) -> dict[str, tuple]:
    """The fusion keys and shapes of an original checkpoint, written from the spec's tables (section 6.4)."""
    width, hidden = config.vision_config.hidden_size, config.text_config.hidden_size
    intermediate = config.text_config.intermediate_size
    mlp = lambda prefix, in_dim, first="0", second="2": {  # noqa: E731
        f"{prefix}.{first}.weight": (hidden, in_dim),
        f"{prefix}.{first}.bias": (hidden,),
        f"{prefix}.{second}.weight": (hidden, hidden),
        f"{prefix}.{second}.bias": (hidden,),
    }
    if strategy == "E_D":
        return mlp("model.mm_projector_f", width * (3 if selection in ("3-18-23", "all") else 2))
    if strategy == "E_M":
        levels = {"18": 1, "3-18-23": 2, "former": 12, "latter": 12, "all": 24}[selection]
        keys = mlp("model.mm_projector_f", width, "1", "3")
        block = "model.mm_projector_f.0."
        keys.update({block + "gamma1": (width,), block + "gamma2": (width,)})
        for norm in ("query_norm", "feat_norm", "norm1"):
            keys.update({f"{block}{norm}.weight": (width,), f"{block}{norm}.bias": (width,)})
        for attention, num_levels in (("cross_attn", levels), ("self_attn", 1)):
            rows = {"sampling_offsets": 16 * num_levels * 4 * 2, "attention_weights": 16 * num_levels * 4}
            rows.update(value_proj=width, output_proj=width)
            for linear, out in rows.items():
                prefix = f"{block}{attention}.{linear}"
                keys.update({f"{prefix}.weight": (out, width), f"{prefix}.bias": (out,)})
        return keys
    num_projectors = {"18": 1, "3-18": 2, "3-18-23": 3, "former": 12, "latter": 12, "all": 24}[selection]
    keys = mlp("model.mm_projector_f", width)
    for k in range(num_projectors):
        keys.update(mlp(f"model.mm_projectors.{k}", width))
    if strategy == "I_M":
        for layer, _ in internal_layer_map(selection, config.text_config.num_hidden_layers):
            prefix = f"model.layers.{layer}."
            keys[prefix + "ucross_xattn.weight"] = (1,)
            keys[prefix + "ucross_xmlp.weight"] = (1,)
            for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
                keys[f"{prefix}ucross_attn.{projection}.weight"] = (hidden, hidden)
            keys[prefix + "ucross_mlp.gate_proj.weight"] = (intermediate, hidden)
            keys[prefix + "ucross_mlp.up_proj.weight"] = (intermediate, hidden)
            keys[prefix + "ucross_mlp.down_proj.weight"] = (hidden, intermediate)
    return keys


@pytest.mark.parametrize("num_layers", [5, 24])
@pytest.mark.parametrize("strategy, selection, encoder", SUPPORTED)
def test_original_fusion_keys_fill_exactly_the_converted_fusion_modules(strategy, selection, encoder, num_layers):
    original, tower = _tiny_original(strategy, selection, encoder, num_layers)
    config, detected = build_config(original, tower, image_token_id=512)
    assert detected == encoder
    if encoder == "siglip":
        assert config.vision_config.num_hidden_layers == 26 and config.vision_config.vision_use_head is False
        assert config.image_seq_length == 35  # 6x6 patches minus the first one
    else:
        assert config.image_seq_length == 36
    expected = expected_target_shapes(config)
    fusion_targets = {
        key
        for key in expected
        if key.startswith(("model.multi_modal_projector.", "model.internal_projectors."))
        or ".cross_" in key
    }
    mapping = original_key_mapping(strategy)
    mapped = {}
    for key, shape in _original_fusion_keys(strategy, selection, config).items():
        target = mapping(key)
        assert isinstance(target, str), key
        assert tuple(expected[target]) == shape, (key, target)
        mapped[target] = key
    assert set(mapped) == fusion_targets


@pytest.mark.parametrize(
    "strategy, selection, num_keys, shapes",
    [
        # Spec section 6.4: CLIP-L/336 + MobileLLaMA-1.4B, counted on the original classes.
        ("E_D", "all", 4, {"model.mm_projector_f.0.weight": (2048, 3072)}),
        ("E_D", "latter", 4, {"model.mm_projector_f.0.weight": (2048, 2048)}),
        ("E_M", "3-18-23", 28, {"model.mm_projector_f.0.cross_attn.sampling_offsets.weight": (256, 1024)}),
        ("E_M", "all", 28, {"model.mm_projector_f.0.cross_attn.attention_weights.weight": (1536, 1024)}),
        ("I_D", "3-18-23", 16, {"model.mm_projectors.2.0.weight": (2048, 1024)}),
        ("I_M", "3-18-23", 43, {"model.layers.22.ucross_mlp.down_proj.weight": (2048, 5632)}),
        ("I_M", "latter", 160, {"model.layers.12.ucross_xattn.weight": (1,)}),
    ],
)
def test_real_size_fusion_keys_match_the_original_classes(strategy, selection, num_keys, shapes):
    original, _ = _tiny_original(strategy, selection, "clip", 24)
    original.update(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16,
                    vocab_size=32000, mm_hidden_size=1024)  # fmt: skip
    tower = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             image_size=336, patch_size=14)  # fmt: skip
    config, _ = build_config(original, tower, image_token_id=32000)
    assert config.image_seq_length == 576
    keys = _original_fusion_keys(strategy, selection, config)
    assert len(keys) == num_keys
    expected = expected_target_shapes(config)
    mapping = original_key_mapping(strategy)
    for key, shape in shapes.items():
        assert keys[key] == shape
        assert tuple(expected[mapping(key)]) == shape


@pytest.mark.parametrize("strategy, selection, encoder", SUPPORTED)
def test_every_convertible_combination_runs(strategy, selection, encoder):
    original, tower = _tiny_original(strategy, selection, encoder, num_layers=5)
    config, _ = build_config(original, tower, image_token_id=512)
    torch.manual_seed(0)
    model = randomize_weights_(LlavaMultiLayerForConditionalGeneration(config), seed=0).eval()
    input_ids = torch.tensor([[1, 319, 13] + [512] * config.image_seq_length + [172, 29]])
    pixel_values = torch.randn(1, 3, 42, 42, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
    assert logits.shape == (1, input_ids.shape[1], 512) and torch.isfinite(logits).all()
    cached = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=3, do_sample=False)
    uncached = model.generate(
        input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=3, do_sample=False, use_cache=False
    )
    assert torch.equal(cached, uncached)


# --------------------------------------------------------------------------------------------------------------
# Conversion of the public fixtures (through the command line) and parity
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> dict[str, Path]:
    """Every public fixture converted by the command-line script (run in parallel subprocesses), plus the CLI
    pretrain-stage conversion of `CLI_PRETRAIN` under the key `"pretrain"`."""
    root = tmp_path_factory.mktemp("lsf-converted")
    jobs = {}
    for name in FIXTURES:
        directory = fixture_dir(name)
        jobs[name] = run_cli(
            "--input-dir", str(directory / "original"),
            "--vision-tower", str(directory / "vision_tower"),
            "--output-dir", str(root / name),
            "--verify",
        )  # fmt: skip
    base = make_base_language_model(CLI_PRETRAIN, root / "base-llm")
    jobs["pretrain"] = run_cli(
        "--input-dir", str(base),
        "--pretrain-dir", str(fixture_dir(CLI_PRETRAIN) / "original_pretrain"),
        "--vision-tower", str(fixture_dir(CLI_PRETRAIN) / "vision_tower"),
        "--output-dir", str(root / "pretrain"),
        "--verify",
    )  # fmt: skip
    failures = []
    for name, job in jobs.items():
        output, _ = job.communicate(timeout=900)
        if job.returncode != 0:
            failures.append(f"{name}: exit {job.returncode}\n{output[-3000:]}")
    assert not failures, "\n".join(failures)
    return {name: root / name for name in jobs}


_MODELS: dict[Path, tuple] = {}


def load_converted(directory: Path):
    """`(model, processor)` of a converted directory, float32, cached per directory."""
    if directory not in _MODELS:
        model = LlavaMultiLayerForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
        _MODELS[directory] = (model, AutoProcessor.from_pretrained(directory))
    return _MODELS[directory]


def original_ids_expanded(input_ids: torch.Tensor, config) -> list[int]:
    expanded = []
    for token in input_ids.tolist():
        expanded += [config.image_token_id] * config.image_seq_length if token == -200 else [token]
    return expanded


@pytest.mark.parametrize("name", FIXTURES)
def test_processor_reproduces_the_original_inputs(name, converted):
    model, processor = load_converted(converted[name])
    inputs, _, prompt, image = golden(name)
    batch = processor(images=image, text=prompt, return_tensors="pt")
    assert torch.equal(batch["pixel_values"], inputs["pixel_values"])
    assert batch["input_ids"][0].tolist() == original_ids_expanded(inputs["input_ids"][0], model.config)


@pytest.mark.parametrize("name", FIXTURES)
def test_image_features_match(name, converted):
    model, _ = load_converted(converted[name])
    inputs, expected, _, _ = golden(name)
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"])
    torch.testing.assert_close(features.image_features, expected["image_features"], atol=1e-5, rtol=0)
    if "internal_image_features" in expected:
        internal = torch.stack(features.internal_image_features)
        torch.testing.assert_close(internal, expected["internal_image_features"], atol=1e-5, rtol=0)
    else:
        assert features.internal_image_features is None


@pytest.mark.parametrize("name", INTERNAL_FIXTURES)
def test_internal_layer_map_matches(name, converted):
    model, _ = load_converted(converted[name])
    _, expected, _, _ = golden(name)
    assert model.config.internal_layer_map == expected["internal_layer_map"].tolist()


@pytest.mark.parametrize("name", FIXTURES)
def test_logits_match(name, converted):
    model, processor = load_converted(converted[name])
    _, expected, prompt, image = golden(name)
    batch = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    vocab = expected["logits"].shape[-1]
    torch.testing.assert_close(logits[..., :vocab], expected["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FIXTURES + ["pretrain"])
def test_greedy_generation_matches(name, converted):
    model, processor = load_converted(converted[name])
    _, expected, prompt, image = golden(CLI_PRETRAIN if name == "pretrain" else name)
    batch = processor(images=image, text=prompt, return_tensors="pt")
    generated = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert generated[0, batch["input_ids"].shape[1] :].tolist() == expected["generated_ids"][0, 1:].tolist()


def test_pretrain_conversion_through_the_cli_matches(converted):
    model, processor = load_converted(converted["pretrain"])
    _, expected, prompt, image = golden(CLI_PRETRAIN)
    batch = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        output = model(**batch)
    vocab = expected["logits"].shape[-1]
    torch.testing.assert_close(output.logits[..., :vocab], expected["logits"], atol=1e-4, rtol=0)
    report = json.loads((converted["pretrain"] / "conversion_report.json").read_text())
    assert report["settings"]["stage"] == "pretrain"


@pytest.mark.parametrize("name", [name for name in FIXTURES if name != CLI_PRETRAIN])
def test_pretrain_artifacts_convert_to_the_same_model(name, converted, tmp_path):
    base = make_base_language_model(name, tmp_path / "base-llm")
    directory = fixture_dir(name)
    convert_layer_select_fuse(
        base,
        tmp_path / "out",
        vision_tower=directory / "vision_tower",
        pretrain_dir=directory / "original_pretrain",
        progress=False,
    )
    finetune = load_file(converted[name] / "model.safetensors")
    pretrain = load_file(tmp_path / "out" / "model.safetensors")
    assert finetune.keys() == pretrain.keys()
    for key in finetune:
        assert torch.equal(finetune[key], pretrain[key]), key


@pytest.mark.parametrize("name", FIXTURES)
def test_model_card_records_the_fusion_settings(name, converted):
    card = (converted[name] / "README.md").read_text()
    strategy, encoder = name.split("-")[1:3]
    expected = (
        f'`layer_fusing_strategy`: `"{strategy}"`',
        '`layer_using_strategy`: `"3-18-23"`',
        f'`encoder`: `"{encoder}"`',
    )
    for text in expected:
        assert text in card
    if strategy.startswith("I_"):
        assert '`internal_layer_map`: `[[0, 0], [2, 1], [3, 2]]`' in card
        assert '`decoder_layer_to_vision_layer`: `{"0": 3, "2": 18, "3": 23}`' in card


def test_siglip_conversion_runs_26_layers_without_head(converted):
    config = json.loads((converted["lsf-E_D-siglip-3-18-23"] / "config.json").read_text())
    assert config["vision_config"]["num_hidden_layers"] == 26
    assert config["vision_config"]["vision_use_head"] is False
    assert config["vision_feature_layer"] == [3, 20, 25]
    report = json.loads((converted["lsf-E_D-siglip-3-18-23"] / "conversion_report.json").read_text())
    dropped = report["dropped"]
    assert any(key.startswith("vision_model.encoder.layers.26.") for key in dropped)
    assert any(key.startswith("vision_model.head.") for key in dropped)
    processor = json.loads((converted["lsf-E_D-siglip-3-18-23"] / "processor_config.json").read_text())
    image_processor = processor["image_processor"]
    assert image_processor["image_mean"] == [0.5, 0.5, 0.5] and image_processor["do_center_crop"] is False


# --------------------------------------------------------------------------------------------------------------
# Pretrain-stage files: the prefix collisions of mm_projector_{k}.bin
# --------------------------------------------------------------------------------------------------------------


def _pretrain_dir_with_collisions(tmp_path: Path, selection: str = "all") -> tuple[Path, dict[str, torch.Tensor]]:
    """An I_D pretrain directory for `selection` (24 projectors for `all`), saved as the original saver does: every
    key that *contains* `mm_projectors.{k}` goes into `mm_projector_{k}.bin`."""
    source = fixture_dir("lsf-I_D-clip-3-18-23") / "original_pretrain"
    directory = tmp_path / "pretrain"
    directory.mkdir()
    config = json.loads((source / "config.json").read_text())
    config["layer_using_strategy"] = selection
    (directory / "config.json").write_text(json.dumps(config))
    shutil.copy(source / "mm_projector_f.bin", directory / "mm_projector_f.bin")
    torch.save({}, directory / "ucross.bin")
    generator = torch.Generator().manual_seed(0)
    num_projectors = len(TOWER_LAYERS["clip"][selection]) - 1
    tensors = {}
    for k in range(num_projectors):
        for linear, shape in (("0", (64, 32)), ("2", (64, 64))):
            tensors[f"model.mm_projectors.{k}.{linear}.weight"] = torch.randn(shape, generator=generator)
            tensors[f"model.mm_projectors.{k}.{linear}.bias"] = torch.randn(shape[:1], generator=generator)
    for k in range(num_projectors):
        projector = {key: t for key, t in tensors.items() if f"mm_projectors.{k}" in key}
        torch.save(projector, directory / f"mm_projector_{k}.bin")
    return directory, tensors


def test_prefix_collisions_are_assigned_to_their_true_projector(tmp_path):
    pretrain, tensors = _pretrain_dir_with_collisions(tmp_path)
    assert len(torch.load(pretrain / "mm_projector_1.bin")) == 4 * 11  # .1 and .10-.19
    assert len(torch.load(pretrain / "mm_projector_2.bin")) == 4 * 5  # .2 and .20-.23
    base = make_base_language_model("lsf-I_D-clip-3-18-23", tmp_path / "base-llm")
    report = convert_layer_select_fuse(
        base,
        tmp_path / "out",
        vision_tower=fixture_dir("lsf-I_D-clip-3-18-23") / "vision_tower",
        pretrain_dir=pretrain,
        progress=False,
    )
    written = load_file(tmp_path / "out" / "model.safetensors")
    for k in range(24):
        for source, target in (("0", "linear_1"), ("2", "linear_2")):
            for param in ("weight", "bias"):
                key = f"model.mm_projectors.{k}.{source}.{param}"
                assert torch.equal(written[f"model.internal_projectors.{k}.{target}.{param}"], tensors[key]), key
    copies = sorted(key for key in report.dropped if key.startswith("mm_projector_"))
    assert len(copies) == 4 * (10 + 4)
    copied_projectors = ("mm_projector_1.bin:model.mm_projectors.1", "mm_projector_2.bin:model.mm_projectors.2")
    assert all(key.startswith(copied_projectors) for key in copies)
    assert report.settings["internal_layer_map"] == [[layer, layer] for layer in range(5)]

    model = LlavaMultiLayerForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    inputs, _, _, _ = golden("lsf-I_D-clip-3-18-23")
    assert len(model.get_image_features(inputs["pixel_values"]).internal_image_features) == 24


def test_inconsistent_collision_copies_are_refused(tmp_path):
    pretrain, tensors = _pretrain_dir_with_collisions(tmp_path)
    content = torch.load(pretrain / "mm_projector_1.bin")
    content["model.mm_projectors.12.0.bias"] = content["model.mm_projectors.12.0.bias"] + 1
    torch.save(content, pretrain / "mm_projector_1.bin")
    base = make_base_language_model("lsf-I_D-clip-3-18-23", tmp_path / "base-llm")
    with pytest.raises(ConversionError, match="differs between mm_projector_12.bin and mm_projector_1.bin"):
        convert_layer_select_fuse(
            base, tmp_path / "out", vision_tower=fixture_dir("lsf-I_D-clip-3-18-23") / "vision_tower",
            pretrain_dir=pretrain, progress=False,
        )  # fmt: skip


def test_missing_projector_file_is_refused(tmp_path):
    pretrain, _ = _pretrain_dir_with_collisions(tmp_path, selection="3-18-23")
    (pretrain / "mm_projector_2.bin").unlink()
    base = make_base_language_model("lsf-I_D-clip-3-18-23", tmp_path / "base-llm")
    with pytest.raises(ConversionError, match="mm_projector_0.bin .. mm_projector_2.bin"):
        convert_layer_select_fuse(
            base, tmp_path / "out", vision_tower=fixture_dir("lsf-I_D-clip-3-18-23") / "vision_tower",
            pretrain_dir=pretrain, progress=False,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Refusals through the converter
# --------------------------------------------------------------------------------------------------------------


def _edited_original(tmp_path: Path, name: str, **changes) -> Path:
    directory = tmp_path / "original"
    shutil.copytree(fixture_dir(name) / "original", directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize(
    "name, changes, message",
    [
        ("lsf-E_D-siglip-3-18-23", {"layer_fusing_strategy": "E_M"}, "E_M' with a SigLIP tower cannot run"),
        ("lsf-E_D-siglip-3-18-23", {"layer_using_strategy": "former"}, "SigLIP tower only implements"),
        ("lsf-E_D-clip-3-18-23", {"layer_using_strategy": "3-18"}, "mm_projector_f` is None"),
        ("lsf-E_M-clip-3-18-23", {"layer_using_strategy": "3-18"}, "mm_projector_f` is None"),
        ("lsf-E_D-clip-3-18-23", {"mm_patch_merge_type": "spatial"}, "mm_patch_merge_type='spatial'"),
    ],
)
def test_converter_refuses_what_the_original_cannot_produce(name, changes, message, tmp_path, capsys):
    original = _edited_original(tmp_path, name, **changes)
    with pytest.raises(SystemExit) as exit_info:
        main([
            "--input-dir", str(original), "--output-dir", str(tmp_path / "out"),
            "--vision-tower", str(fixture_dir(name) / "vision_tower"),
        ])  # fmt: skip
    assert exit_info.value.code == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "fixture, input_dir, tower_fixture, message",
    [
        ("lsf-E_D-clip-3-18-23", "original", "lsf-E_D-siglip-3-18-23", "names a CLIP tower"),
        ("lsf-I_D-clip-3-18-23", "original_pretrain", "lsf-I_D-clip-3-18-23", "pass it as --pretrain-dir"),
    ],
    ids=["wrong tower", "pretrain directory as input dir"],
)
def test_wrong_input_is_refused(tmp_path, fixture, input_dir, tower_fixture, message):
    with pytest.raises(ConversionError, match=message):
        convert_layer_select_fuse(
            fixture_dir(fixture) / input_dir,
            tmp_path / "out",
            vision_tower=fixture_dir(tower_fixture) / "vision_tower",
            progress=False,
        )


# --------------------------------------------------------------------------------------------------------------
# Beyond the original: text-only prompts and left-padded batches of unequal length (the original crashes on both)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
def test_text_only_generation(name, converted):
    model, processor = load_converted(converted[name])
    batch = processor(text=f"{SYSTEM} USER: Tell me a story. ASSISTANT:", return_tensors="pt")
    assert "pixel_values" not in batch
    cached = model.generate(**batch, max_new_tokens=6, do_sample=False)
    uncached = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, batch["input_ids"].shape[1] + 6)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", FIXTURES)
def test_left_padded_batch_of_unequal_lengths(name, converted):
    model, processor = load_converted(converted[name])
    _, _, _, image = golden(name)
    images = [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    prompts = [
        f"{SYSTEM} USER: <image>\nWhat is shown in this image? ASSISTANT:",
        f"{SYSTEM} USER: <image>\nDescribe the image in great detail, covering every object you see. ASSISTANT:",
    ]
    batch = processor(images=images, text=prompts, return_tensors="pt", padding_side="left")
    mask = batch["attention_mask"]
    assert (mask[0] == 0).any() and (mask[1] == 1).all()
    generated = model.generate(**batch, max_new_tokens=6, do_sample=False)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch_logits = model(**batch, position_ids=position_ids).logits
    for row, (prompt, row_image) in enumerate(zip(prompts, images)):
        single = processor(images=row_image, text=prompt, return_tensors="pt")
        alone = model.generate(**single, max_new_tokens=6, do_sample=False)
        new_tokens = generated[row, batch["input_ids"].shape[1] :]
        assert new_tokens.tolist() == alone[0, single["input_ids"].shape[1] :].tolist()
        with torch.no_grad():
            logits = model(**single).logits[0]
        torch.testing.assert_close(batch_logits[row][mask[row].bool()], logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FIXTURES)
def test_right_padded_batch_matches_single_prompts(name, converted):
    model, processor = load_converted(converted[name])
    _, _, prompt, image = golden(name)
    prompts = [prompt, prompt.replace("What is shown in this image?", "What colours and shapes do you see here?")]
    batch = processor(images=[image, image], text=prompts, return_tensors="pt", padding_side="right")
    with torch.no_grad():
        logits = model(**batch).logits
        for row, text in enumerate(prompts):
            single = processor(images=image, text=text, return_tensors="pt")
            length = single["input_ids"].shape[1]
            torch.testing.assert_close(logits[row, :length], model(**single).logits[0], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# Internal modular fusion placements for new training: pre_cross (the original), post_cross, parallel
# --------------------------------------------------------------------------------------------------------------

PLACEMENTS = ["pre_cross", "post_cross", "parallel"]


def placement_model(converted, placement: str, randomize: bool = True) -> LlavaMultiLayerForConditionalGeneration:
    """A model with the I_M fixture's sizes and `placement`, freshly initialised (then randomised: gates open)."""
    config = LlavaMultiLayerConfig.from_pretrained(converted["lsf-I_M-clip-3-18-23"])
    config.internal_fusion_placement = placement
    torch.manual_seed(0)
    model = LlavaMultiLayerForConditionalGeneration(config)
    if randomize:
        randomize_weights_(model, seed=1)
    return model.eval()


def fixture_batch(converted):
    _, processor = load_converted(converted["lsf-I_M-clip-3-18-23"])
    _, _, prompt, image = golden("lsf-I_M-clip-3-18-23")
    return processor(images=image, text=prompt, return_tensors="pt")


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_placement_shapes_and_cached_generation(placement, converted):
    model = placement_model(converted, placement)
    batch = fixture_batch(converted)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    cached = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    uncached = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("placement", ["post_cross", "parallel"])
def test_closed_gates_leave_the_language_model_unchanged(placement, converted):
    model = placement_model(converted, placement)
    with torch.no_grad():
        for layer in model.model.internal_fusion_layers:
            layer.cross_attn_gate.zero_()
            layer.cross_mlp_gate.zero_()
    plain_config = LlavaMultiLayerConfig.from_pretrained(converted["lsf-I_M-clip-3-18-23"])
    plain_config.internal_fusion_type = None
    plain_config.internal_feature_layers = None
    plain_config.internal_layer_map = None
    plain = LlavaMultiLayerForConditionalGeneration(plain_config).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    assert all(".cross_" in key or "internal_projectors" in key for key in unexpected)
    batch = fixture_batch(converted)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, plain(**batch).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_gradients_reach_gates_and_cross_modules(placement, converted):
    batch = fixture_batch(converted)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == 512, -100)

    fresh = placement_model(converted, placement, randomize=False).train()
    fresh(**batch, labels=labels).loss.backward()
    for layer in fresh.model.internal_fusion_layers:
        assert isinstance(layer, CrossAttentionFusionDecoderLayer)
        # Gates start closed (zero), yet learn: their gradient is the cross branch's output.
        assert layer.cross_attn_gate.item() == 0 and layer.cross_mlp_gate.item() == 0
        assert layer.cross_attn_gate.grad.abs().item() > 0
        assert layer.cross_mlp_gate.grad.abs().item() > 0

    opened = placement_model(converted, placement).train()
    opened(**batch, labels=labels).loss.backward()
    parameters = dict(opened.named_parameters())
    fusion = [name for name in parameters if ".cross_" in name or "internal_projectors" in name]
    assert any("cross_attn_norm" in name for name in fusion) == (placement == "post_cross")
    # Feature 0 feeds decoder layer 0, feature 1 layer 2, feature 2 layer 3: all are used.
    no_grad = [name for name in fusion if parameters[name].grad is None or not parameters[name].grad.abs().sum() > 0]
    assert not no_grad
