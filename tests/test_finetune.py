"""LoRA / QLoRA finetuning (`llava_multilayer.commands.finetune`): labels, what is trained, an end-to-end run that
learns, saving, reloading, resuming and merging."""

import argparse
import importlib.util
import json
import math

import pytest
import torch
from conftest import IMAGE_TOKEN_ID, make_model, make_processor, randomize_weights_
from PIL import Image
from safetensors.torch import load_file

from llava_multilayer import LlavaMultiLayerForConditionalGeneration
from llava_multilayer.commands.finetune import (
    LORA_TARGET_MODULES,
    NON_LORA_TRAINABLES_NAME,
    add_finetune_arguments,
    add_merge_arguments,
    build_lora_config,
    finetune,
    load_finetuned_model,
    prepare_model_for_finetuning,
    quantization_skip_modules,
    run_finetune,
    run_merge,
)
from llava_multilayer.commands.finetune_data import IGNORE_INDEX, ConversationCollator, ConversationDataset


COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}

# Every trainable kind at once: an external fuser (mmfuser), internal projectors, internal cross-attention modules
# and their gates.
MODEL_SETTINGS = dict(internal_fusion_type="cross_attention", internal_fusion_placement="parallel")


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The models are tiny: one thread avoids oversubscribing a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model():
    model = make_model("mmfuser", randomize=False, **MODEL_SETTINGS)
    return randomize_weights_(model, seed=0, std=0.1)


def make_records(image_folder, count: int = 12) -> list[dict]:
    """`count` samples: LLaVA-format records asking for the colour of a generated image, two in chat-message format
    and one text-only."""
    records = []
    for index in range(count):
        color = list(COLORS)[index % len(COLORS)]
        Image.new("RGB", (40, 30), COLORS[color]).save(image_folder / f"{index}.png")
        question, answer = "What color is this picture?", f"It is {color}."
        if index in (4, 9):
            records.append(
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                        {"role": "assistant", "content": answer},
                    ],
                    "images": [f"{index}.png"],
                }
            )
        elif index == 7:
            conversation = [{"from": "human", "value": "Name a color."}, {"from": "gpt", "value": color}]
            records.append({"id": str(index), "conversations": conversation})
        else:
            records.append(
                {
                    "id": str(index),
                    "image": f"{index}.png",
                    "conversations": [
                        {"from": "human", "value": f"{question}\n<image>"},
                        {"from": "gpt", "value": answer},
                    ],
                }
            )
    return records


def mean_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def test_only_assistant_answers_are_supervised(processor, tmp_path):
    Image.new("RGB", (40, 30), COLORS["red"]).save(tmp_path / "a.png")
    llava = {
        "id": "x",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "What is this?\n<image>"},
            {"from": "gpt", "value": "A red square."},
            {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": "Yes, 3 times."},
        ],
    }
    chat = {
        "messages": [
            {"role": "user", "content": "<image>\nWhat is this?"},
            {"role": "assistant", "content": "A red square."},
            {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Yes, 3 times."}]},
        ],
        "image": str(tmp_path / "a.png"),
    }
    dataset = ConversationDataset([llava, chat], processor, image_folder=tmp_path)
    item, chat_item = dataset[0], dataset[1]
    for key in ("input_ids", "labels", "pixel_values"):
        assert torch.equal(item[key], chat_item[key]), key  # both formats give the same sample

    input_ids, labels = item["input_ids"], item["labels"]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        add_generation_prompt=True,
    )
    prompt_ids = processor(images=Image.open(tmp_path / "a.png"), text=prompt)["input_ids"][0]
    assert input_ids[: len(prompt_ids)].tolist() == prompt_ids  # training tokens = inference tokens
    assert (labels[input_ids == IMAGE_TOKEN_ID] == IGNORE_INDEX).all()
    assert (labels[: len(prompt_ids)] == IGNORE_INDEX).all()  # system prompt, question, image, "ASSISTANT:"
    supervised = processor.tokenizer.decode(labels[labels != IGNORE_INDEX])
    assert supervised == "A red square.</s>Yes, 3 times.</s>"
    assert labels[-1] == processor.tokenizer.eos_token_id

    batch = ConversationCollator(pad_token_id=processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 28, 28)
    assert batch["labels"].shape == batch["input_ids"].shape == batch["attention_mask"].shape


def test_data_errors_name_the_fix(processor, tmp_path):
    Image.new("RGB", (40, 30), COLORS["red"]).save(tmp_path / "a.png")
    conversation = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]
    record = {"image": "a.png", "conversations": conversation}
    with pytest.raises(ValueError, match="--image-folder"):
        ConversationDataset([record], processor)[0]
    with pytest.raises(ValueError, match="--max-length"):
        ConversationDataset([record], processor, image_folder=tmp_path, max_length=10)[0]
    with pytest.raises(ValueError, match="conversations.*messages"):
        ConversationDataset([{"text": "x"}], processor)[0]
    plain = make_processor(processor.tokenizer)
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="generation"):
        ConversationDataset([record], plain)


# --------------------------------------------------------------------------------------------------------------
# What is trained
# --------------------------------------------------------------------------------------------------------------


def test_lora_on_language_model_only_fusion_trained_in_full():
    model = tiny_model()
    peft_model = prepare_model_for_finetuning(model, build_lora_config(model.config, r=4, alpha=8))
    lora_modules = {name.split(".lora_A")[0] for name, _ in peft_model.named_parameters() if ".lora_A." in name}
    expected = {
        f"base_model.model.model.language_model.layers.{layer}.{name}"
        for layer in range(2)
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }
    assert lora_modules == expected  # not the cross-fusion projections
    trainable = [name for name, parameter in peft_model.named_parameters() if parameter.requires_grad]
    assert not [name for name in trainable if "vision_tower" in name or "embed_tokens" in name or "lm_head" in name]
    assert all(".lora_" in name or ".modules_to_save." in name or name.endswith("_gate") for name in trainable)
    for prefix in (
        "model.multi_modal_projector.modules_to_save.default.fuser.cross_attn",
        "model.internal_projectors.1.modules_to_save.default.linear_2",
        "model.language_model.layers.0.cross_attn.modules_to_save.default.q_proj",
        "model.language_model.layers.1.cross_mlp.modules_to_save.default.down_proj",
        "model.language_model.layers.1.cross_mlp_norm.modules_to_save.default",
        "model.language_model.layers.0.cross_attn_gate",
    ):
        assert any(prefix in name for name in trainable), prefix
    assert all(parameter.dtype == torch.float32 for parameter in peft_model.parameters() if parameter.requires_grad)


# --------------------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------------------


def test_finetune_learns_saves_reloads_merges_and_resumes(tmp_path, processor):
    base_dir, image_folder, output_dir = tmp_path / "base", tmp_path / "images", tmp_path / "out"
    image_folder.mkdir()
    tiny_model().save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    records = make_records(image_folder)
    (tmp_path / "data.json").write_text(json.dumps(records))

    dataset = ConversationDataset(records, processor, image_folder)
    batch = ConversationCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    base = LlavaMultiLayerForConditionalGeneration.from_pretrained(base_dir)
    vision_before = {key: value.clone() for key, value in base.model.vision_tower.state_dict().items()}
    loss_before = mean_loss(base, batch)

    trainer = finetune(
        base_dir,
        tmp_path / "data.json",
        output_dir,
        image_folder=image_folder,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        max_steps=30,
        learning_rate=5e-3,
        per_device_batch_size=4,
        warmup_steps=0,
        lr_scheduler_type="constant",
        logging_steps=5,
        save_steps=15,
    )
    trained = trainer.model
    loss_after = mean_loss(trained, batch)
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"\ntraining loss (12 samples, eval mode): before {loss_before:.4f}, after 30 LoRA steps {loss_after:.4f}")
    print(f"logged training losses every 5 steps: {[round(loss, 4) for loss in logged]}")
    assert loss_after < 0.6 * loss_before

    # Saved layout: a standard peft adapter (+ trained fusion modules), the gates beside it, the processor.
    saved = {path.name for path in output_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "processor_config.json"} <= saved
    assert NON_LORA_TRAINABLES_NAME in saved
    assert {"checkpoint-15", "checkpoint-30"} <= saved
    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == LORA_TARGET_MODULES
    assert "model.multi_modal_projector" in adapter_config["modules_to_save"]
    adapter_keys = load_file(output_dir / "adapter_model.safetensors").keys()
    assert any("multi_modal_projector.fuser.cross_attn" in key for key in adapter_keys)
    assert not any("vision_tower" in key for key in adapter_keys)
    gates = ("cross_attn_gate", "cross_mlp_gate")
    assert set(load_file(output_dir / NON_LORA_TRAINABLES_NAME)) == {
        f"model.language_model.layers.{layer}.{gate}" for layer in range(2) for gate in gates
    }

    expected = logits(trained, batch)
    reloaded = load_finetuned_model(output_dir)
    reload_diff = (logits(reloaded, batch) - expected).abs().max().item()

    parser = add_merge_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--adapter-dir", str(output_dir), "--output-dir", str(tmp_path / "merged")])
    assert run_merge(args) == 0
    merged = LlavaMultiLayerForConditionalGeneration.from_pretrained(tmp_path / "merged")
    merge_diff = (logits(merged, batch) - expected).abs().max().item()
    print(
        f"max |logits| differences to the trained model: reloaded adapter {reload_diff:.2e}, merged {merge_diff:.2e}"
    )
    assert reload_diff == 0.0
    assert merge_diff < 1e-5
    assert (tmp_path / "merged" / "processor_config.json").is_file()

    for model in (trained.get_base_model(), merged):
        for key, value in model.model.vision_tower.state_dict().items():
            assert torch.equal(value, vision_before[key]), key

    # Resume from the last checkpoint through the command-line entry point: two more steps.
    parser = add_finetune_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--model", str(base_dir), "--data", str(tmp_path / "data.json"), "--image-folder", str(image_folder),
         "--output-dir", str(output_dir), "--lora-r", "8", "--lora-alpha", "16", "--max-steps", "32",
         "--lora-dropout", "0", "--learning-rate", "5e-3", "--resume-from-checkpoint", "--save-steps", "100"]
    )
    assert args.resume_from_checkpoint is True and args.gradient_checkpointing is True
    assert run_finetune(args) == 0
    state = json.loads((output_dir / "checkpoint-32" / "trainer_state.json").read_text())
    assert state["global_step"] == 32
    resumed_losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert resumed_losses[: len(logged)] == pytest.approx(logged)  # it continued the first run's history
    resumed = load_finetuned_model(output_dir)
    assert (logits(resumed, batch) - expected).abs().max() > 0  # the two extra steps moved the weights


# --------------------------------------------------------------------------------------------------------------
# QLoRA (CPU smoke test: bitsandbytes runs 4-bit on the CPU, slowly and without numerical guarantees)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_qlora_quantizes_only_language_model_linears(tmp_path, processor):
    import bitsandbytes as bnb

    from llava_multilayer.commands.finetune import load_model_for_training

    model = make_model("mmfuser", internal_fusion_type="cross_attention", internal_fusion_placement="post_cross")
    model.save_pretrained(tmp_path)
    assert "model.language_model.layers.1.cross_mlp" in quantization_skip_modules(model.config)

    quantized = load_model_for_training(tmp_path, load_in_4bit=True)
    names = sorted(name for name, module in quantized.named_modules() if isinstance(module, bnb.nn.Linear4bit))
    expected = sorted(
        f"model.language_model.layers.{layer}.{name}"
        for layer in range(2)
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    )
    assert names == expected

    lora_config = build_lora_config(quantized.config, r=4, alpha=8, dropout=0.0)
    peft_model = prepare_model_for_finetuning(quantized, lora_config)
    peft_model.train()
    Image.new("RGB", (40, 30), COLORS["red"]).save(tmp_path / "a.png")
    conversation = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "Red."}]
    item = ConversationDataset([{"image": "a.png", "conversations": conversation}], processor, tmp_path)[0]
    batch = ConversationCollator(processor.tokenizer.pad_token_id)([item])
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):  # lora_B starts at zero, so lora_A gets gradients from the second step on
        optimizer.zero_grad()
        peft_model(**batch).loss.backward()
        lora = {name: p.grad for name, p in peft_model.named_parameters() if ".lora_" in name}
        assert len(lora) == 2 * len(expected)
        assert all(grad is not None and grad.abs().sum() > 0 for name, grad in lora.items() if "lora_B" in name)
        optimizer.step()
    assert all(grad.abs().sum() > 0 for grad in lora.values())
    projector = peft_model.base_model.model.model.multi_modal_projector.modules_to_save["default"]
    assert projector.linear_1.weight.grad.abs().sum() > 0


def test_bf16_mixed_precision_and_merged_dtype(tmp_path, processor):
    """`bf16`: frozen weights in bfloat16, trained ones in float32 under autocast; merging into a bfloat16 base gives
    a checkpoint of one dtype. bfloat16 weights without mixed precision are refused."""
    base_dir, image_folder = tmp_path / "base", tmp_path / "images"
    image_folder.mkdir()
    tiny_model().save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    records = make_records(image_folder, count=4)
    with pytest.raises(ValueError, match="--bf16"):
        finetune(base_dir, records, tmp_path / "refused", image_folder=image_folder, dtype="bfloat16")

    trainer = finetune(
        base_dir, records, tmp_path / "out", image_folder=image_folder, lora_r=4, lora_alpha=8, max_steps=2,
        bf16=True, use_cpu=True,
    )
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])

    args = add_merge_arguments(argparse.ArgumentParser()).parse_args(
        ["--adapter-dir", str(tmp_path / "out"), "--output-dir", str(tmp_path / "merged"), "--dtype", "bfloat16"]
    )
    run_merge(args)
    merged = LlavaMultiLayerForConditionalGeneration.from_pretrained(tmp_path / "merged", dtype="auto")
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
