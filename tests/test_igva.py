"""IGVA: conversion of the original checkpoints and parity with the golden outputs of the original code.

The fixture `fixtures/igva-clip` was produced by running the original IGVA code (see its README): a finetune
checkpoint (`original/`), a stage-1 artifact (`original_pretrain/`), the tiny CLIP tower and the tiny sentence
encoder (a sentence-transformers directory), and per prompt (suffixes "" and "_2") the inputs and outputs of the
original model. The prompts' LLM question differs from the instruction given to the sentence encoder (prompt 1
carries the "Answer using a single word or phrase." suffix), so the parity tests pass the instructions explicitly.
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
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, CLIPVisionModel

from llava_multilayer import (
    LlavaMultiLayerConfig,
    LlavaMultiLayerForConditionalGeneration,
    LlavaMultiLayerInstructionProcessor,
    LlavaMultiLayerProcessor,
)
from llava_multilayer.conversion.convert_igva_to_hf import convert_igva, detect, parse_layer_groups
from llava_multilayer.conversion.reading import ConversionError


REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "igva-clip"
SCRIPT = REPO_ROOT / "conversion_scripts" / "convert_igva_to_hf.py"
PROMPTS = json.loads((FIXTURE / "prompt.json").read_text())
INPUTS = load_file(FIXTURE / "inputs.safetensors")
EXPECTED = load_file(FIXTURE / "expected.safetensors")
VOCAB = EXPECTED["logits"].shape[-1]  # the original vocabulary; our `<image>` id lies just outside it
SUFFIXES = ["", "_2"]


def run_converter(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def fixture_args(output_dir: Path, input_dir: Path = FIXTURE / "original", *extra: str) -> list[str]:
    return [
        "--input-dir", str(input_dir),
        "--output-dir", str(output_dir),
        "--vision-tower", str(FIXTURE / "vision_tower"),
        "--sentence-encoder", str(FIXTURE / "sentence_embedder"),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("igva") / "converted"
    result = run_converter(*fixture_args(output_dir, FIXTURE / "original", "--verify"))
    assert result.returncode == 0, result.stderr
    return output_dir


@pytest.fixture(scope="module")
def model(converted_dir) -> LlavaMultiLayerForConditionalGeneration:
    return LlavaMultiLayerForConditionalGeneration.from_pretrained(converted_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(converted_dir) -> LlavaMultiLayerInstructionProcessor:
    return AutoProcessor.from_pretrained(converted_dir)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.open(FIXTURE / "image.png").convert("RGB")


def expanded_ids(suffix: str, config: LlavaMultiLayerConfig) -> list[int]:
    """The original input ids with the `-200` placeholder expanded into our image tokens."""
    ids = []
    for token in INPUTS["input_ids" + suffix][0].tolist():
        ids += [config.image_token_id] * config.image_seq_length if token == -200 else [token]
    return ids


def process(processor, image, suffix: str):
    return processor(
        images=image,
        text=PROMPTS["prompt" + suffix],
        instructions=[PROMPTS["instruction" + suffix]],
        return_tensors="pt",
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# Conversion output
# --------------------------------------------------------------------------------------------------------------


def test_converted_config_keeps_the_original_settings(converted_dir):
    config = LlavaMultiLayerConfig.from_pretrained(converted_dir)
    assert config.fusion_type == "igva"
    assert config.igva_layer_groups == [list(range(start, start + 6)) for start in (1, 7, 13, 19)]
    assert config.vision_feature_layer == -2
    assert not config.igva_aggregate_by_average
    assert (config.igva_num_blocks, config.igva_num_heads, config.igva_hidden_size) == (4, 4, 40)
    assert config.igva_sentence_embed_dim == config.instruction_encoder_config.hidden_size == 32
    assert config.instruction_encoder_config.model_type == "mpnet"


def test_instruction_tokenizer_and_max_length_come_from_the_encoder_dir(converted_dir, processor):
    assert isinstance(processor, LlavaMultiLayerInstructionProcessor)
    assert (converted_dir / "instruction_tokenizer" / "tokenizer_config.json").is_file()
    bert_config = json.loads((FIXTURE / "sentence_embedder" / "sentence_bert_config.json").read_text())
    assert processor.instruction_max_length == bert_config["max_seq_length"] == 128
    # The generic processor class loads the instruction processor that `processor_config.json` names.
    assert isinstance(LlavaMultiLayerProcessor.from_pretrained(converted_dir), LlavaMultiLayerInstructionProcessor)
    # Lower-casing is done by the tokenizer itself.
    tokenizer = processor.instruction_tokenizer
    assert tokenizer("How MANY objects?")["input_ids"] == tokenizer("how many objects?")["input_ids"]


def test_instruction_truncated_to_max_length(processor, image):
    long_instruction = " ".join(["what"] * 500)
    batch = processor(images=image, text=PROMPTS["prompt_2"], instructions=[long_instruction], return_tensors="pt")
    assert batch["instruction_input_ids"].shape[1] == processor.instruction_max_length


def test_report_and_card_list_drops_and_settings(converted_dir):
    report = json.loads((converted_dir / "conversion_report.json").read_text())
    dropped = report["dropped"]
    assert "pooler.dense.weight" in dropped and "pooler" in dropped["pooler.dense.weight"]
    assert all(key.startswith("model.vision_tower.vision_tower.") or key.startswith("pooler.") for key in dropped)
    assert report["verified"]
    card = (converted_dir / "README.md").read_text()
    assert "[[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18], [19, 20, 21, 22, 23, 24]]" in card
    assert "`base_layer (vision_feature_layer)`: `-2`" in card
    assert "last user turn" in card and "instructions=[...]" in card
    assert "Answer using a single word or phrase." in card


def test_detect():
    assert detect(json.loads((FIXTURE / "original" / "config.json").read_text()))
    assert detect(json.loads((FIXTURE / "original_pretrain" / "config.json").read_text()))
    for other in ("mmfuser-clip", "lsf-E_D-clip-3-18-23"):
        path = FIXTURE.parent / other / "original" / "config.json"
        if path.is_file():
            assert not detect(json.loads(path.read_text()))


def test_parse_layer_groups():
    assert parse_layer_groups("[[1,2],[3, 4, 5],[-1]]") == [[1, 2], [3, 4, 5], [-1]]
    assert parse_layer_groups([[0, 1]]) == [[0, 1]]
    for bad in ("[[1,2],", "[1, 2]", "[[]]", "[[1.5]]", "[]", "__import__('os')"):
        with pytest.raises(ConversionError, match="vit_aggregate_groups"):
            parse_layer_groups(bad)


# --------------------------------------------------------------------------------------------------------------
# Parity with the original code, per prompt
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_processor_matches_the_original_inputs(processor, model, image, suffix):
    batch = process(processor, image, suffix)
    assert torch.equal(batch["pixel_values"], INPUTS["pixel_values"])
    assert batch["input_ids"][0].tolist() == expanded_ids(suffix, model.config)
    assert batch["attention_mask"].all()
    assert torch.equal(batch["instruction_input_ids"], INPUTS["instruction_input_ids" + suffix])
    assert torch.equal(batch["instruction_attention_mask"], INPUTS["instruction_attention_mask" + suffix])


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_forward_matches_the_original(processor, model, image, suffix):
    with torch.no_grad():
        output = model(**process(processor, image, suffix))
    assert_close(output.fusion_weights, EXPECTED["fusion_weights" + suffix], atol=1e-5)
    assert_close(output.image_hidden_states, EXPECTED["image_features" + suffix], atol=1e-5)
    assert_close(output.logits[..., :VOCAB], EXPECTED["logits" + suffix], atol=1e-4)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_greedy_generation_matches_the_original(processor, model, image, suffix):
    batch = process(processor, image, suffix)
    expected = EXPECTED["generated_ids" + suffix][0, 1:]  # the original returns [bos] + new tokens
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=len(expected), do_sample=False)
    assert generated[0, batch["input_ids"].shape[1] :].tolist() == expected.tolist()


def test_prompts_get_different_fusion_weights(processor, model, image):
    with torch.no_grad():
        first, second = (model(**process(processor, image, suffix)).fusion_weights for suffix in SUFFIXES)
    assert (first - second).abs().max() > 1e-2


def test_batch_of_both_prompts_with_left_padding(processor, model, image):
    batch = processor(
        images=[image, image],
        text=[PROMPTS["prompt"], PROMPTS["prompt_2"]],
        instructions=[PROMPTS["instruction"], PROMPTS["instruction_2"]],
        padding_side="left",
        return_tensors="pt",
    )
    assert batch["instruction_input_ids"].shape[0] == 2
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        output = model(**batch, position_ids=position_ids)
        generated = model.generate(**batch, max_new_tokens=8, do_sample=False)
    length = batch["input_ids"].shape[1]
    for row, suffix in enumerate(SUFFIXES):
        real = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, length - real :].tolist() == expanded_ids(suffix, model.config)
        assert_close(output.fusion_weights[row : row + 1], EXPECTED["fusion_weights" + suffix], atol=1e-5)
        assert_close(output.image_hidden_states[row : row + 1], EXPECTED["image_features" + suffix], atol=1e-5)
        assert_close(output.logits[row : row + 1, length - real :, :VOCAB], EXPECTED["logits" + suffix], atol=1e-4)
        assert generated[row, length:].tolist() == EXPECTED["generated_ids" + suffix][0, 1:].tolist()


# --------------------------------------------------------------------------------------------------------------
# The instruction encoder: inside the model vs precomputed
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_instruction_encoder_reproduces_the_sentence_embeddings(model, suffix):
    with torch.no_grad():
        embeds = model.model.get_instruction_embeds(
            INPUTS["instruction_input_ids" + suffix], INPUTS["instruction_attention_mask" + suffix]
        )
    assert_close(embeds, INPUTS["sentence_embeds" + suffix], atol=1e-6)
    assert_close(embeds.norm(dim=-1), torch.ones(1), atol=1e-6)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_instruction_inside_or_precomputed_gives_the_same_features(model, suffix):
    pixel_values = INPUTS["pixel_values"]
    ids, mask = INPUTS["instruction_input_ids" + suffix], INPUTS["instruction_attention_mask" + suffix]
    with torch.no_grad():
        inside = model.get_image_features(pixel_values, instruction_input_ids=ids, instruction_attention_mask=mask)
        own_embeds = model.model.get_instruction_embeds(ids, mask)
        same_embeds = model.get_image_features(pixel_values, instruction_embeds=own_embeds)
        original_embeds = model.get_image_features(pixel_values, instruction_embeds=INPUTS["sentence_embeds" + suffix])
    assert torch.equal(inside.image_features, same_embeds.image_features)
    assert torch.equal(inside.fusion_weights, same_embeds.fusion_weights)
    for features in (inside, original_embeds):
        assert_close(features.image_features, EXPECTED["image_features" + suffix], atol=1e-5)
        assert_close(features.fusion_weights, EXPECTED["fusion_weights" + suffix], atol=1e-5)
    assert_close(inside.image_features, original_embeds.image_features, atol=1e-6)


def test_padded_instructions_are_masked_out_of_the_mean(processor, model, image):
    instructions = [PROMPTS["instruction"], "a much longer instruction that forces padding of the first one here"]
    batch = processor(
        images=[image, image], text=[PROMPTS["prompt"]] * 2, instructions=instructions, return_tensors="pt"
    )
    assert not batch["instruction_attention_mask"][0].all()
    with torch.no_grad():
        embeds = model.model.get_instruction_embeds(
            batch["instruction_input_ids"], batch["instruction_attention_mask"]
        )
    assert_close(embeds[:1], INPUTS["sentence_embeds"], atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# The default instruction rule
# --------------------------------------------------------------------------------------------------------------


def test_default_instruction_is_the_last_user_turn(processor, image):
    # Prompt 2's question is its instruction, so the default rule reproduces the original tokenisation.
    batch = processor(images=image, text=PROMPTS["prompt_2"], return_tensors="pt")
    assert torch.equal(batch["instruction_input_ids"], INPUTS["instruction_input_ids_2"])
    # Prompt 1's user turn carries the answer-format suffix, which the default rule keeps.
    batch = processor(images=image, text=PROMPTS["prompt"], return_tensors="pt")
    expected = processor.instruction_tokenizer([PROMPTS["question"]], return_tensors="pt")["input_ids"]
    assert torch.equal(batch["instruction_input_ids"], expected)
    assert processor.instruction_from_prompt(PROMPTS["prompt"]) == PROMPTS["question"]


def test_default_instruction_of_a_chat_template_conversation(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
        {"role": "user", "content": [{"type": "text", "text": "What color is it?"}]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert processor.instruction_from_prompt(prompt) == "What color is it?"


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


def test_missing_instruction_is_an_error(processor, model, image):
    batch = process(processor, image, "")
    for key in ("instruction_input_ids", "instruction_attention_mask"):
        batch.pop(key)
    with pytest.raises(ValueError, match="needs the instruction"):
        model(**batch)
    with pytest.raises(ValueError, match="needs the instruction"):
        model.generate(**batch, max_new_tokens=1)


def test_instruction_list_of_the_wrong_length_is_an_error(processor, image):
    with pytest.raises(ValueError, match="2 instruction\\(s\\) for 1 prompt"):
        processor(images=image, text=PROMPTS["prompt"], instructions=["a", "b"], return_tensors="pt")
    with pytest.raises(ValueError, match="1 instruction\\(s\\) for 2 prompt"):
        processor(images=[image, image], text=[PROMPTS["prompt"]] * 2, instructions=["a"], return_tensors="pt")


def test_instruction_embeds_of_the_wrong_shape_are_an_error(model):
    pixel_values = INPUTS["pixel_values"]
    with pytest.raises(ValueError, match="one instruction per image"):
        model.get_image_features(pixel_values.repeat(2, 1, 1, 1), instruction_embeds=INPUTS["sentence_embeds"])
    with pytest.raises(ValueError, match=r"must have shape \(num_images, 32\)"):
        model.get_image_features(pixel_values, instruction_embeds=torch.zeros(1, 48))
    with pytest.raises(ValueError, match="not both"):
        model.get_image_features(
            pixel_values,
            instruction_embeds=INPUTS["sentence_embeds"],
            instruction_input_ids=INPUTS["instruction_input_ids"],
        )


def test_encoder_width_mismatch_is_a_config_error(model):
    config = model.config.to_dict()
    config["igva_sentence_embed_dim"] = 48
    # Strict configs wrap the validator's ValueError into huggingface_hub's StrictDataclassClassValidationError.
    with pytest.raises(Exception, match="igva_sentence_embed_dim` \\(48\\).*32-wide") as info:
        LlavaMultiLayerConfig(**config)
    assert isinstance(info.value.__cause__, ValueError)


def test_encoder_width_mismatch_is_a_conversion_error(tmp_path):
    original = tmp_path / "original"
    shutil.copytree(FIXTURE / "original", original)
    config = json.loads((original / "config.json").read_text())
    config["sentence_embed_dim"] = 48
    (original / "config.json").write_text(json.dumps(config))
    result = run_converter(*fixture_args(tmp_path / "out", original))
    assert result.returncode == 1
    assert "sentence_embed_dim=48" in result.stderr and "32-wide" in result.stderr
    assert not (tmp_path / "out").exists()


def copy_sentence_encoder(tmp_path: Path) -> Path:
    encoder = tmp_path / "encoder"
    shutil.copytree(FIXTURE / "sentence_embedder", encoder)
    return encoder


def test_non_mean_pooling_encoder_is_refused(tmp_path):
    encoder = copy_sentence_encoder(tmp_path)
    pooling_path = encoder / "1_Pooling" / "config.json"
    pooling = json.loads(pooling_path.read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    pooling_path.write_text(json.dumps(pooling))
    with pytest.raises(ConversionError, match="only mean pooling"):
        convert_igva(FIXTURE / "original", tmp_path / "out", FIXTURE / "vision_tower", encoder, progress=False)


def test_encoder_without_normalize_is_refused(tmp_path):
    encoder = copy_sentence_encoder(tmp_path)
    modules = json.loads((encoder / "modules.json").read_text())[:2]
    (encoder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConversionError, match="Normalize"):
        convert_igva(FIXTURE / "original", tmp_path / "out", FIXTURE / "vision_tower", encoder, progress=False)


def test_linear_projector_is_refused(tmp_path):
    original = tmp_path / "original"
    shutil.copytree(FIXTURE / "original", original)
    config = json.loads((original / "config.json").read_text())
    config["mm_projector_type"] = "linear"
    (original / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="mm_projector_type='linear' is not supported"):
        convert_igva(
            original, tmp_path / "out", FIXTURE / "vision_tower", FIXTURE / "sentence_embedder", progress=False
        )


# --------------------------------------------------------------------------------------------------------------
# Other layouts and the stage-1 (pretrain) checkpoint
# --------------------------------------------------------------------------------------------------------------


def test_sentence_encoder_in_0_transformer_layout(tmp_path, model):
    source = FIXTURE / "sentence_embedder"
    encoder = tmp_path / "encoder"
    (encoder / "0_Transformer").mkdir(parents=True)
    shutil.copytree(source / "1_Pooling", encoder / "1_Pooling")
    for path in source.iterdir():
        if path.is_file() and path.name not in ("modules.json", "config_sentence_transformers.json"):
            shutil.copy(path, encoder / "0_Transformer" / path.name)
    modules = json.loads((source / "modules.json").read_text())
    modules[0]["path"] = "0_Transformer"
    (encoder / "modules.json").write_text(json.dumps(modules))
    output_dir = tmp_path / "out"
    convert_igva(FIXTURE / "original", output_dir, FIXTURE / "vision_tower", encoder, progress=False)
    converted = LlavaMultiLayerForConditionalGeneration.from_pretrained(output_dir, dtype=torch.float32)
    expected = model.model.instruction_encoder.state_dict()
    for key, value in converted.model.instruction_encoder.state_dict().items():
        assert torch.equal(value, expected[key]), key


def make_base_language_model(directory: Path) -> Path:
    """A plain LLaMA checkpoint directory (the base LLM of stage 1) with the fixture's language-model weights."""
    directory.mkdir(parents=True)
    state_dict = load_file(FIXTURE / "original" / "model.safetensors")
    llm_prefixes = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
    save_file({k: v for k, v in state_dict.items() if k.startswith(llm_prefixes)}, directory / "model.safetensors")
    original = json.loads((FIXTURE / "original" / "config.json").read_text())
    llama_keys = (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "max_position_embeddings", "rms_norm_eps", "rope_theta", "vocab_size", "bos_token_id", "eos_token_id",
        "pad_token_id", "hidden_act", "tie_word_embeddings", "attention_bias",
    )  # fmt: skip
    config = {key: original[key] for key in llama_keys}
    config |= {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    (directory / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(FIXTURE / "original" / name, directory / name)
    return directory


def test_stage1_pretrain_conversion(tmp_path, image):
    base_llm = make_base_language_model(tmp_path / "vicuna")
    output_dir = tmp_path / "out"
    report = convert_igva(
        base_llm, output_dir, FIXTURE / "vision_tower", pretrain_dir=FIXTURE / "original_pretrain", verify=True,
        progress=False,
    )  # fmt: skip
    assert report.verified and report.settings["stage"].startswith("pretrain")
    model = LlavaMultiLayerForConditionalGeneration.from_pretrained(output_dir, dtype=torch.float32).eval()
    assert model.config.igva_aggregate_by_average and model.config.instruction_encoder_config is None
    assert model.model.instruction_encoder is None and model.model.multi_modal_projector.aggregator is None
    processor = AutoProcessor.from_pretrained(output_dir)
    assert type(processor) is LlavaMultiLayerProcessor

    projector = torch.load(FIXTURE / "original_pretrain" / "mm_projector.bin", weights_only=True)
    converted = model.model.multi_modal_projector
    assert torch.equal(converted.linear_1.weight, projector["model.mm_projector.0.weight"])
    assert torch.equal(converted.linear_2.bias, projector["model.mm_projector.2.bias"])

    # Reference from the spec: uniform mean over the group means, concatenated after the base layer.
    pixel_values = processor(images=image, text=PROMPTS["prompt"], return_tensors="pt")["pixel_values"]
    assert torch.equal(pixel_values, INPUTS["pixel_values"])
    tower = CLIPVisionModel.from_pretrained(FIXTURE / "vision_tower", dtype=torch.float32).eval()
    pretrain_config = json.loads((FIXTURE / "original_pretrain" / "config.json").read_text())
    groups = parse_layer_groups(pretrain_config["vit_aggregate_groups"])
    with torch.no_grad():
        hidden_states = tower(pixel_values, output_hidden_states=True).hidden_states
        group_means = [torch.stack([hidden_states[i] for i in group]).mean(0)[:, 1:] for group in groups]
        final = torch.cat([hidden_states[-2][:, 1:], torch.stack(group_means).mean(0)], dim=-1)
        mlp_weights = {k: v.float() for k, v in projector.items()}
        hidden = torch.nn.functional.gelu(
            final @ mlp_weights["model.mm_projector.0.weight"].T + mlp_weights["model.mm_projector.0.bias"]
        )
        reference = hidden @ mlp_weights["model.mm_projector.2.weight"].T + mlp_weights["model.mm_projector.2.bias"]
        output = model.get_image_features(pixel_values)
    assert_close(output.image_features, reference, atol=1e-5)
    assert torch.equal(output.fusion_weights, torch.full((1, len(groups)), 1 / len(groups)))


def test_pretrain_dir_without_base_llm_is_explained(tmp_path):
    with pytest.raises(ConversionError, match="pass it as --pretrain-dir"):
        convert_igva(FIXTURE / "original_pretrain", tmp_path / "out", FIXTURE / "vision_tower", progress=False)


def test_differing_tower_copy_in_the_checkpoint_is_reported(tmp_path, caplog):
    original = tmp_path / "original"
    shutil.copytree(FIXTURE / "original", original)
    state_dict = load_file(original / "model.safetensors")
    key = "model.vision_tower.vision_tower.vision_model.post_layernorm.weight"
    state_dict[key] = state_dict[key] + 1
    save_file(state_dict, original / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING"):
        convert_igva(
            original, tmp_path / "out", FIXTURE / "vision_tower", FIXTURE / "sentence_embedder", progress=False
        )
    assert "1 vision-tower tensor(s) stored in the original checkpoint differ from --vision-tower" in caplog.text
    assert key in caplog.text
