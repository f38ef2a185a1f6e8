"""Parity of the training recipes with the ORIGINAL training code, on the golden training fixtures
(`tests/fixtures/training-*`, produced by running each original `train()` with its own scripts' arguments).

Checked per fixture: the tokens and labels of every record and of the batch (our expanded image tokens mapped back to
the single placeholder -200), the pixel values, the trainable parameter set and the optimizer groups of every stage
(original names mapped to ours with the converters' key mappings), and the float32 loss, per-record losses and
gradients of the finetune batch.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor

from llava_multilayer import LlavaMultiLayerForConditionalGeneration
from llava_multilayer.commands.cli import main
from llava_multilayer.conversion import convert_layer_select_fuse_to_hf, convert_mmfuser_to_hf
from llava_multilayer.training import IMAGE_PLACEHOLDER_ID, load_recipe
from llava_multilayer.training.data import collapse_image_tokens


FIXTURES_DIR = Path(__file__).parent / "fixtures"
FIXTURES = {
    "training-mmfuser-clip": convert_mmfuser_to_hf.original_key_mapping,
    "training-lsf-E_D-clip-3-18-23": convert_layer_select_fuse_to_hf.original_key_mapping("E_D"),
}
RECORDS = {"pretrain": "pretrain_records.json", "finetune": "records.json"}
LOSS_ATOL = 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each fixture's `original/` + `vision_tower/` converted with `llava-multilayer convert`."""
    directories = {}
    for name in FIXTURES:
        fixture = FIXTURES_DIR / name
        output = tmp_path_factory.mktemp("converted") / name
        argv = ["convert", "--input-dir", str(fixture / "original"), "--vision-tower", str(fixture / "vision_tower")]
        with contextlib.redirect_stderr(io.StringIO()) as stderr:
            status = main([*argv, "--output-dir", str(output)])
        assert status == 0, stderr.getvalue()
        directories[name] = output
    return directories


def map_name(name: str, mapping) -> str:
    """An original parameter name (optionally peft-wrapped, optionally a LoRA weight) -> ours."""
    prefix = "base_model.model."
    wrapped = name.startswith(prefix)
    name = name[len(prefix) :] if wrapped else name
    suffix = ""
    for lora in (".lora_A.default.weight", ".lora_B.default.weight"):
        if name.endswith(lora):
            name, suffix = name[: -len(lora)] + ".weight", lora
    mapped = mapping(name)
    assert isinstance(mapped, str), f"no mapping for the original parameter {name!r}"
    if suffix:
        mapped = mapped[: -len(".weight")] + suffix
    return (prefix if wrapped else "") + mapped


def load(directory):
    model = LlavaMultiLayerForConditionalGeneration.from_pretrained(directory, dtype=torch.float32)
    return model, AutoProcessor.from_pretrained(directory)


def fixture_records(name: str, stage: str) -> list[dict]:
    return json.loads((FIXTURES_DIR / name / "data" / RECORDS[stage]).read_text())


def load_stage(directory, name: str, stage: str):
    """The converted model of fixture `name`, its processor, the `stage` recipe and its dataset of the fixture's
    records: `(model, processor, recipe, dataset)`."""
    model, processor = load(directory)
    recipe = load_recipe(stage, model, model_max_length=320)
    dataset = recipe.dataset(fixture_records(name, stage), processor, image_folder=FIXTURES_DIR / name / "data/images")
    return model, processor, recipe, dataset


def original_effective(ids, labels, mask, num_image_tokens: int, max_length: int):
    """What the original model trains on for one batch row: masked positions removed, the image expanded, truncated
    to `max_length` (returned with the placeholder collapsed again): `(ids, labels)`."""
    ids, labels = ids[mask.bool()], labels[mask.bool()]
    budget = max_length - (num_image_tokens - 1 if (ids == IMAGE_PLACEHOLDER_ID).any() else 0)
    return ids[:budget], labels[:budget]


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_tokens_labels_and_pixels_per_record(converted, name, stage):
    model, processor, recipe, dataset = load_stage(converted[name], name, stage)
    expected = load_file(FIXTURES_DIR / name / "expected_data.safetensors")
    for index in range(len(dataset)):
        item = dataset[index]
        ids = collapse_image_tokens(item["input_ids"], processor.image_token_id)
        assert ids.tolist() == expected[f"{stage}.{index}.input_ids"].tolist(), index
        assert len(item["labels"]) == len(item["input_ids"])
        image_runs = item["input_ids"] == processor.image_token_id
        assert (item["labels"][image_runs] == -100).all()
        run_start = image_runs & ~torch.cat([image_runs.new_zeros(1), image_runs[:-1]])
        labels = item["labels"][~image_runs | run_start]
        assert labels.tolist() == expected[f"{stage}.{index}.labels"].tolist(), index
        if f"{stage}.{index}.pixel_values" in expected:
            torch.testing.assert_close(
                item["pixel_values"][0], expected[f"{stage}.{index}.pixel_values"], rtol=0, atol=0
            )
        else:
            assert "pixel_values" not in item


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_batch_equals_what_the_original_model_trains_on(converted, name, stage):
    model, processor, recipe, dataset = load_stage(converted[name], name, stage)
    expected = load_file(FIXTURES_DIR / name / "expected_data.safetensors")
    batch = recipe.collate([dataset[i] for i in range(len(dataset))])
    num_tokens = model.config.image_seq_length
    assert batch["input_ids"].shape[1] <= 320
    images = [i for i in range(len(dataset)) if f"{stage}.{i}.pixel_values" in expected]
    torch.testing.assert_close(
        batch["pixel_values"], torch.stack([expected[f"{stage}.{i}.pixel_values"] for i in images]), rtol=0, atol=0
    )
    for row in range(len(dataset)):
        mask = batch["attention_mask"][row].bool()
        ids = batch["input_ids"][row][mask]
        want_mask = expected[f"{stage}.batch.attention_mask"][row]
        want_ids, want_labels = original_effective(
            expected[f"{stage}.batch.input_ids"][row],
            expected[f"{stage}.batch.labels"][row],
            want_mask,
            num_tokens,
            320,
        )
        assert collapse_image_tokens(ids, processor.image_token_id).tolist() == want_ids.tolist(), row
        is_image = ids == processor.image_token_id
        run_start = is_image & ~torch.cat([is_image.new_zeros(1), is_image[:-1]])
        labels = batch["labels"][row][mask][~is_image | run_start]
        # The original's labels of the image placeholder are -100 like those of the image tokens.
        assert labels.tolist() == want_labels.tolist(), row
        assert (batch["labels"][row][~mask] == -100).all()
    # ft-4 is truncated twice: to 320 ids with the placeholder, then to 320 after the image expansion.
    if stage == "finetune":
        assert batch["attention_mask"][4].sum() == 320


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("stage", ["pretrain", "pretrain_7b", "finetune", "lora"])
def test_trainable_parameters_and_optimizer_groups(converted, name, stage):
    spec = json.loads((FIXTURES_DIR / name / "trainable.json").read_text())
    if stage not in spec:
        pytest.skip(f"{name} has no {stage} stage")
    spec = spec[stage]
    mapping = FIXTURES[name]
    model, _ = load(converted[name])
    overrides = {"ms_cross_attn_lr": None} if stage == "pretrain_7b" else {}
    recipe = load_recipe(stage.removesuffix("_7b"), model, model_max_length=320, **overrides)
    assert recipe.learning_rate == spec["args"]["learning_rate"]
    assert recipe.weight_decay == spec["args"]["weight_decay"]
    assert recipe.group_by_modality_length == spec["args"]["group_by_modality_length"]
    if stage == "lora":
        assert (recipe.lora_r, recipe.lora_alpha, recipe.lora_dropout) == (
            spec["args"]["lora_r"],
            spec["args"]["lora_alpha"],
            spec["args"]["lora_dropout"],
        )
    trainable = recipe.trainable_parameters(model)
    assert trainable == sorted(map_name(name, mapping) for name in spec["trainable"])
    groups = recipe.optimizer_groups(model)
    assert len(groups) == len(spec["param_groups"])
    for group, want in zip(groups, spec["param_groups"]):
        assert group["lr"] == want["lr"] and group["weight_decay"] == want["weight_decay"]
        assert sorted(group["params"]) == sorted(map_name(name, mapping) for name in want["params"])


@pytest.mark.parametrize("name", FIXTURES)
def test_finetune_loss_and_gradients(converted, name):
    model, processor = load(converted[name])
    expected = load_file(FIXTURES_DIR / name / "expected_loss.safetensors")
    recipe = load_recipe("finetune", model, model_max_length=320)
    dataset = recipe.dataset(
        fixture_records(name, "finetune"), processor, image_folder=FIXTURES_DIR / name / "data/images"
    )
    items = [dataset[i] for i in range(len(dataset))]
    model = recipe.prepare_model(model).eval()
    for index, item in enumerate(items):
        with torch.no_grad():
            loss = model(**recipe.collate([item])).loss
        assert abs(loss.item() - expected["per_record_loss"][index].item()) <= LOSS_ATOL, index
    loss = model(**recipe.collate(items)).loss
    assert abs(loss.item() - expected["loss"].item()) <= LOSS_ATOL
    loss.backward()
    parameters = dict(model.named_parameters())
    gradient_names = [key for key in expected if key.startswith(("model.", "lm_head"))]
    assert gradient_names
    for original in gradient_names:
        gradient = parameters[map_name(original, FIXTURES[name])].grad
        want = expected[original].reshape(gradient.shape)
        torch.testing.assert_close(gradient, want, atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=original)


#: `train()` flags of the fixtures' argv -> the recipe field holding the same value (CPU overrides left out:
#: `--bf16`, `--model_max_length`, `--dataloader_num_workers`, `--report_to`).
SCRIPT_FLAGS = {
    "--learning_rate": ("learning_rate", float),
    "--weight_decay": ("weight_decay", float),
    "--mm_projector_lr": ("mm_projector_lr", float),
    "--ms_cross_attn_lr": ("ms_cross_attn_lr", float),
    "--lr_scheduler_type": ("lr_scheduler_type", str),
    "--warmup_ratio": ("warmup_ratio", float),
    "--warmup_steps": ("warmup_steps", int),
    "--num_train_epochs": ("num_train_epochs", float),
    "--max_steps": ("max_steps", int),
    "--per_device_train_batch_size": ("per_device_train_batch_size", int),
    "--gradient_accumulation_steps": ("gradient_accumulation_steps", int),
    "--group_by_modality_length": ("group_by_modality_length", lambda value: value == "True"),
    "--gradient_checkpointing": ("gradient_checkpointing", lambda value: value == "True"),
    "--save_steps": ("save_steps", int),
    "--save_total_limit": ("save_total_limit", int),
    "--logging_steps": ("logging_steps", int),
    "--lora_r": ("lora_r", int),
    "--lora_alpha": ("lora_alpha", int),
    "--image_aspect_ratio": ("image_aspect_ratio", str),
    "--version": ("template", {"plain": "plain", "v1": "vicuna_v1"}.get),
}
#: What the original `TrainingArguments` / `DataArguments` default to when a script does not pass the flag.
SCRIPT_DEFAULTS = {
    "warmup_ratio": 0.0,
    "warmup_steps": 0,
    "max_steps": -1,
    "image_aspect_ratio": "square",
    "group_by_modality_length": False,
    "mm_projector_lr": None,
    "ms_cross_attn_lr": None,
}


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("stage", ["pretrain", "pretrain_7b", "finetune", "lora"])
def test_recipe_defaults_are_the_original_scripts(name, stage):
    spec = json.loads((FIXTURES_DIR / name / "trainable.json").read_text())
    if stage not in spec:
        pytest.skip(f"{name} has no {stage} stage")
    argv = spec[stage]["argv"]
    flags = {}
    for index, flag in enumerate(argv):
        if flag.startswith("--") and index + 1 < len(argv):
            flags[flag] = argv[index + 1]  # a later occurrence wins, as in HfArgumentParser
    family = "mmfuser" if "mmfuser" in name else "layer_select_fuse"
    overrides = {"ms_cross_attn_lr": None} if stage == "pretrain_7b" else {}
    recipe = load_recipe(stage.removesuffix("_7b"), family=family, **overrides)
    for flag, (field, parse) in SCRIPT_FLAGS.items():
        if flag in flags:
            assert getattr(recipe, field) == parse(flags[flag]), (flag, flags[flag], getattr(recipe, field))
        elif field in SCRIPT_DEFAULTS:
            assert getattr(recipe, field) == SCRIPT_DEFAULTS[field], (flag, "not passed", getattr(recipe, field))
    assert recipe.model_max_length == 2048  # the scripts' value (the fixtures ran with 320 on CPU)
    assert recipe.bf16  # the scripts' --bf16 True (the fixtures ran on CPU without)
