"""The original-checkpoint families as specs (`conversion_scripts/llava_original.py`, `families.py`): detection that
names the field at fault, one vision-tower policy for every family, and a new family added as one small spec (the
README's "Adding an original-checkpoint family" walkthrough)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llava_multilayer import LlavaMultiLayerConfig, LlavaMultiLayerForConditionalGeneration
from llava_multilayer.conversion import model_card
from llava_multilayer.conversion.components import num_image_tokens
from llava_multilayer.conversion.convert_igva_to_hf import convert_igva
from llava_multilayer.conversion.convert_layer_select_fuse_to_hf import convert_layer_select_fuse
from llava_multilayer.conversion.convert_mmfuser_to_hf import convert_mmfuser
from llava_multilayer.conversion.families import UnknownFamilyError, detect_family
from llava_multilayer.conversion.key_rules import Drop, KeyRules, key_mapping
from llava_multilayer.conversion.llava_original import (
    EMBEDDED_TOWER_PREFIX,
    EMBEDDED_TOWER_RULES,
    LANGUAGE_MODEL_RULES,
    Detection,
    FamilyConversion,
    FamilyInputs,
    OriginalFamily,
    convert_original,
)
from llava_multilayer.conversion.reading import ConversionError


FIXTURES = Path(__file__).parent / "fixtures"


def fixture_config(name: str, stage: str = "original") -> dict:
    return json.loads((FIXTURES / name / stage / "config.json").read_text())


def copy_original(name: str, directory: Path, drop: tuple[str, ...] = (), **changes) -> Path:
    shutil.copytree(FIXTURES / name / "original", directory)
    config = {key: value for key, value in fixture_config(name).items() if key not in drop} | changes
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def stored_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in directory.glob("*.safetensors"):
        tensors.update(load_file(path))
    return tensors


# --------------------------------------------------------------------------------------------------------------
# Detection names the field at fault
# --------------------------------------------------------------------------------------------------------------


def test_mmfuser_config_without_mm_vision_tower_converts_with_the_flag(tmp_path):
    source = copy_original("mmfuser-clip", tmp_path / "original", drop=("mm_vision_tower",))
    assert detect_family(json.loads((source / "config.json").read_text())) == "mmfuser"
    tower = str(FIXTURES / "mmfuser-clip" / "vision_tower")
    report = convert_mmfuser(source, tmp_path / "out", vision_tower=tower, progress=False)
    assert report.family == "mmfuser" and (tmp_path / "out" / "model.safetensors").is_file()


def test_mmfuser_config_without_tower_or_flag_asks_for_the_flag(tmp_path):
    source = copy_original("mmfuser-clip", tmp_path / "original", drop=("mm_vision_tower",))
    with pytest.raises(ConversionError, match="No vision tower given: pass --vision-tower"):
        convert_mmfuser(source, tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    "name, drop, changes, message",
    [
        ("igva-clip", ("vit_base_layer",), {}, r"an IGVA config \(it has `vit_aggregate_groups`\), but .* `vit_base"),
        ("lsf-E_D-clip-3-18-23", (), {"layer_fusing_strategy": 3}, r"Select_Fuse .*`layer_fusing_strategy` is 3"),
        ("lsf-E_D-clip-3-18-23", ("layer_fusing_strategy",), {}, r"it has no `layer_fusing_strategy`"),
        ("mmfuser-clip", ("mm_vision_select_layer",), {}, r"an MMFuser config .*no `mm_vision_select_layer`"),
    ],
)
def test_a_near_match_names_the_missing_or_wrong_field(name, drop, changes, message):
    config = {key: value for key, value in fixture_config(name).items() if key not in drop} | changes
    with pytest.raises(UnknownFamilyError, match=message):
        detect_family(config)


def test_a_family_converter_names_the_field_of_the_other_family(tmp_path):
    with pytest.raises(ConversionError, match=r"is not an IGVA config \(it has none of its fields"):
        convert_igva(FIXTURES / "mmfuser-clip" / "original", tmp_path / "out", progress=False)
    with pytest.raises(ConversionError, match=r"not an MMFuser config \(it has `layer_fusing_strategy`, a field of"):
        convert_mmfuser(FIXTURES / "lsf-E_D-clip-3-18-23" / "original", tmp_path / "out", progress=False)


# --------------------------------------------------------------------------------------------------------------
# One vision-tower policy
# --------------------------------------------------------------------------------------------------------------

CONVERTERS = {
    "mmfuser-clip": lambda source, out, tower: convert_mmfuser(source, out, tower, progress=False),
    "lsf-E_D-clip-3-18-23": lambda source, out, tower: convert_layer_select_fuse(source, out, tower, progress=False),
    "igva-clip": lambda source, out, tower: convert_igva(
        source, out, tower, str(FIXTURES / "igva-clip" / "sentence_embedder"), progress=False
    ),
}


@pytest.mark.parametrize("name", sorted(CONVERTERS))
def test_every_family_takes_the_tower_from_the_named_tower_and_drops_the_copy(name, tmp_path):
    tower = FIXTURES / name / "vision_tower"
    report = CONVERTERS[name](FIXTURES / name / "original", tmp_path / "out", str(tower))
    dropped = {key: reason for key, reason in report.dropped.items() if key.startswith(EMBEDDED_TOWER_PREFIX)}
    assert dropped and set(dropped.values()) == {EMBEDDED_TOWER_RULES[next(iter(EMBEDDED_TOWER_RULES))].reason}
    written = stored_tensors(tmp_path / "out")
    expected = {
        "model.vision_tower." + key.removeprefix("vision_model."): value
        for key, value in load_file(tower / "model.safetensors").items()
        if not key.endswith("position_ids")
    }
    assert {key for key in written if key.startswith("model.vision_tower.")} == set(expected)
    for key, value in expected.items():
        assert torch.equal(written[key], value), key


@pytest.mark.parametrize("name", sorted(CONVERTERS))
def test_every_family_refuses_a_stored_copy_of_another_architecture(name, tmp_path):
    source = copy_original(name, tmp_path / "original")
    state = load_file(source / "model.safetensors")
    key = EMBEDDED_TOWER_PREFIX + "embeddings.patch_embedding.weight"
    state[key] = state[key][..., :-1].contiguous()
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"does not match the tower .*patch_embedding\.weight of shape"):
        CONVERTERS[name](source, tmp_path / "out", str(FIXTURES / name / "vision_tower"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", sorted(CONVERTERS))
def test_every_family_reports_a_stored_copy_with_other_values(name, tmp_path, caplog):
    source = copy_original(name, tmp_path / "original")
    state = load_file(source / "model.safetensors")
    key = EMBEDDED_TOWER_PREFIX + "post_layernorm.bias"
    state[key] = state[key] + 1
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING"):
        CONVERTERS[name](source, tmp_path / "out", str(FIXTURES / name / "vision_tower"))
    assert "1 vision-tower tensor(s) stored in the original checkpoint differ from --vision-tower" in caplog.text
    assert key in caplog.text


# --------------------------------------------------------------------------------------------------------------
# Adding a family: the README walkthrough
# --------------------------------------------------------------------------------------------------------------

# A fork that concatenates the layers listed in its config field `toy_layers` and saves its projector as
# `model.toy_projector.{0,2}` (Linear, GELU, Linear).
TOY_RULES: KeyRules = {
    r"model\.toy_projector\.0\.(weight|bias)": r"model.multi_modal_projector.linear_1.\1",
    r"model\.toy_projector\.2\.(weight|bias)": r"model.multi_modal_projector.linear_2.\1",
    r"model\.toy_step": Drop("training-step counter of the toy trainer"),
}


def build_toy(inputs: FamilyInputs) -> FamilyConversion:
    config = LlavaMultiLayerConfig(
        vision_config=inputs.tower.config.to_dict(),
        text_config=inputs.text_config,
        image_token_id=inputs.image_token_id,
        image_seq_length=num_image_tokens(inputs.tower.config, "default"),
        vision_feature_select_strategy="default",
        vision_feature_layer=inputs.stage.original["toy_layers"],
        fusion_type="concat",
    )
    mapping = key_mapping(LANGUAGE_MODEL_RULES, TOY_RULES, EMBEDDED_TOWER_RULES)
    return FamilyConversion(config, [(inputs.checkpoint, mapping)], {"toy_layers": config.vision_feature_layer})


TOY = OriginalFamily(
    name="toy",
    title="a Toy",
    detection=Detection(markers=("toy_layers",), required={"toy_layers": (lambda v: isinstance(v, list), "a list")}),
    pretrain_files=("toy_projector.bin",),
    build=build_toy,
)


def make_toy_checkpoint(directory: Path) -> Path:
    """The Layer_Select_Fuse E_D fixture (concat of layers 3, 18, 23) rewritten as the toy fork saves it."""
    lsf_fields = ("layer_fusing_strategy", "layer_using_strategy")
    source = copy_original("lsf-E_D-clip-3-18-23", directory, drop=lsf_fields, toy_layers=[3, 18, 23])
    original = load_file(source / "model.safetensors")
    state = {key.replace("mm_projector_f", "toy_projector"): value for key, value in original.items()}
    state["model.toy_step"] = torch.tensor(7)
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    return source


def test_a_toy_family_spec_converts_a_toy_checkpoint(tmp_path, monkeypatch):
    # A family also writes its model card template, model_cards/<name>.md; the toy one borrows an existing one.
    template = model_card._template
    monkeypatch.setattr(model_card, "_template", lambda family: template("layer_select_fuse"))
    source = make_toy_checkpoint(tmp_path / "toy")
    tower = str(FIXTURES / "lsf-E_D-clip-3-18-23" / "vision_tower")
    report = convert_original(TOY, source, tmp_path / "out", vision_tower=tower, verify=True, progress=False)
    assert report.family == "toy" and report.verified
    assert report.dropped["model.toy_step"] == "training-step counter of the toy trainer"
    assert report.settings["toy_layers"] == [3, 18, 23]

    # The toy conversion is the Layer_Select_Fuse E_D conversion of the same weights.
    convert_layer_select_fuse(FIXTURES / "lsf-E_D-clip-3-18-23" / "original", tmp_path / "lsf", tower, progress=False)
    toy, lsf = stored_tensors(tmp_path / "out"), stored_tensors(tmp_path / "lsf")
    assert toy.keys() == lsf.keys()
    for key, value in lsf.items():
        assert torch.equal(toy[key], value), key
    model = LlavaMultiLayerForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert model.config.fusion_type == "concat" and model.config.vision_feature_layer == [3, 18, 23]
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as handle:
        assert "model.multi_modal_projector.linear_1.weight" in handle.keys()


def test_a_toy_family_rejects_configs_of_the_known_families(tmp_path):
    with pytest.raises(ConversionError, match=r"is not a Toy config \(it has none of its fields `toy_layers`\)"):
        convert_original(TOY, FIXTURES / "igva-clip" / "original", tmp_path / "out", progress=False)
