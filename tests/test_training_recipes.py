"""Recipes beyond the golden fixtures, on tiny models: IGVA with precomputed instruction embeddings, the
Layer_Select_Fuse I_M internal modules in every stage, the original sampler, and the errors a user gets for a broken
record or an option the family's original code does not have."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_model, processor_for, random_image
from transformers import AutoModel, TrainingArguments

from llava_multilayer import LlavaMultiLayerForConditionalGeneration, LlavaMultiLayerProcessor
from llava_multilayer.training import RecipeTrainer, RecordError, load_recipe, train
from llava_multilayer.training.sampler import modality_length_grouped_indices


RECORDS = [
    {
        "id": "a",
        "image": "a.png",
        "sentence_embed": "a.pt",
        "conversations": [
            {"from": "human", "value": "What is this?\n<image>"},
            {"from": "gpt", "value": "A picture."},
        ],
    },
    {
        "id": "b",
        "conversations": [{"from": "human", "value": "Hello there"}, {"from": "gpt", "value": "Hi."}],
    },
    {
        "id": "c",
        "image": "c.png",
        "sentence_embed": "c.pt",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe it."},
            {"from": "gpt", "value": "Colourful noise."},
            {"from": "human", "value": "And more?"},
            {"from": "gpt", "value": "Nothing more."},
        ],
    },
]


@pytest.fixture
def image_folder(tmp_path) -> Path:
    for index, name in enumerate(("a", "c")):
        random_image(seed=index).save(tmp_path / f"{name}.png")
    return tmp_path


def test_igva_finetune_uses_the_precomputed_instruction_embeddings(image_folder):
    model = make_model("igva")
    processor = processor_for(model.config)
    width = model.config.instruction_encoder_config.hidden_size
    embeddings = {name: torch.randn(width, generator=torch.Generator().manual_seed(i)) for i, name in enumerate("ac")}
    for name, embedding in embeddings.items():
        torch.save(embedding, image_folder / f"{name}.pt")
    recipe = load_recipe("finetune", model, model_max_length=256)
    dataset = recipe.dataset(RECORDS, processor, image_folder=image_folder, instruction_embeds_folder=image_folder)
    batch = recipe.collate([dataset[i] for i in range(len(dataset))])
    # One row per image, in record order; the text-only record has none.
    torch.testing.assert_close(batch["instruction_embeds"], torch.stack([embeddings["a"], embeddings["c"]]))
    loss = recipe.prepare_model(model)(**batch).loss
    reference = model(**{**batch, "instruction_embeds": batch["instruction_embeds"].flip(0)}).loss
    assert torch.isfinite(loss) and loss != reference  # the embeddings steer the fusion
    trainable = recipe.trainable_parameters(model)
    assert any(".aggregator." in name for name in trainable)
    assert not any(name.startswith(("model.vision_tower.", "model.instruction_encoder.")) for name in trainable)


def test_igva_finetune_without_folder_embeds_the_instruction_with_the_bundled_encoder(image_folder):
    model = make_model("igva")
    recipe = load_recipe("finetune", model, model_max_length=256)
    dataset = recipe.dataset(RECORDS, processor_for(model.config), image_folder=image_folder)
    batch = recipe.collate([dataset[0], dataset[2]])
    assert batch["instruction_input_ids"].shape[0] == 2
    assert torch.isfinite(recipe.prepare_model(model)(**batch).loss)


def test_igva_pretrain_averages_the_groups_and_trains_only_the_projector(image_folder):
    model = make_model("igva")
    recipe = load_recipe("pretrain", model, model_max_length=256)
    pretrain = [RECORDS[0], {**RECORDS[2], "conversations": RECORDS[2]["conversations"][:2]}]
    dataset = recipe.dataset(pretrain, processor_for(model.config), image_folder=image_folder)
    batch = recipe.collate([dataset[0], dataset[1]])
    assert "instruction_embeds" not in batch and "instruction_input_ids" not in batch
    output = recipe.prepare_model(model)(**batch)
    assert torch.isfinite(output.loss)
    torch.testing.assert_close(output.fusion_weights, torch.full((2, 2), 0.5))
    assert recipe.trainable_parameters(model) == sorted(
        name for name, _ in model.named_parameters() if name.startswith("model.multi_modal_projector.linear_")
    )


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "lora"])
def test_layer_select_fuse_internal_modular_trainable_sets(stage):
    model = make_model("internal_cross_pre")
    recipe = load_recipe(stage, model)
    assert recipe.family == "layer_select_fuse"
    trainable = recipe.trainable_parameters(model)
    names = [name.removeprefix("base_model.model.") for name in trainable]
    cross = [name for name in names if ".cross_attn" in name or ".cross_mlp" in name]
    assert any(name.startswith("model.internal_projectors.") for name in names)
    assert any(name.startswith("model.multi_modal_projector.") for name in names)
    if stage == "lora":
        # LoRA on every language-model linear layer, the cross-fusion projections included; their gates stay frozen.
        assert cross and all(".lora_" in name for name in cross)
        assert any(".self_attn.q_proj.lora_A." in name for name in names)
        assert not any(name.startswith("lm_head") or "embed_tokens" in name for name in names)
    else:
        assert any(name.endswith("cross_attn_gate") for name in cross)
        assert any(".cross_mlp.gate_proj." in name for name in cross)
        llm = [n for n in names if n.startswith("model.language_model.") and n not in cross]
        assert bool(llm) == (stage == "finetune")
    groups = recipe.optimizer_groups(model)
    grouped = sorted(name for group in groups for name in group["params"])
    assert grouped == trainable


def test_layer_select_fuse_cross_attn_lr_gets_its_own_groups():
    model = make_model("internal_cross_pre")
    recipe = load_recipe("finetune", model, mm_projector_lr=1e-4, cross_attn_lr=3e-4, weight_decay=0.1)
    groups = recipe.optimizer_groups(model)
    assert [group["lr"] for group in groups] == [2e-5, 2e-5, 1e-4, 1e-4, 3e-4, 3e-4]
    assert [group["weight_decay"] for group in groups] == [0.1, 0.0] * 3
    assert all(".cross_" in name for group in groups[4:] for name in group["params"])
    assert all("projector" in name for group in groups[2:4] for name in group["params"])


def test_options_the_original_lacks_are_refused():
    model = make_model("mmfuser")
    with pytest.raises(ValueError, match="mm_projector_lr: the original mmfuser code has no such option"):
        load_recipe("finetune", model, mm_projector_lr=1e-4)
    with pytest.raises(ValueError, match="unknown overrides \\['learning_rates'\\]"):
        load_recipe("finetune", model, learning_rates=1e-4)
    with pytest.raises(ValueError, match="stage must be one of"):
        load_recipe("stage3", model)
    with pytest.raises(ValueError, match="Cannot tell the family"):
        load_recipe("finetune", make_model("single"))
    assert load_recipe("finetune", make_model("single"), family="igva").family == "igva"


def test_broken_records_are_reported_with_id_and_index(image_folder):
    model = make_model("mmfuser")
    recipe = load_recipe("finetune", model, model_max_length=256)
    records = [
        RECORDS[1],
        {**RECORDS[0], "image": "missing.png"},
        {"id": "turns", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
        {
            **RECORDS[0],
            "id": "two",
            "conversations": [{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "<image> y"}],
        },
        {"id": "none"},
    ]
    dataset = recipe.dataset(records, processor_for(model.config), image_folder=image_folder)
    dataset[0]
    with pytest.raises(RecordError, match=r"record 'a' \(index 1\): cannot read image .*missing.png"):
        dataset[1]
    with pytest.raises(RecordError, match=r"record 'turns' \(index 2\): .*alternate"):
        dataset[2]
    with pytest.raises(RecordError, match=r"record 'two' \(index 3\): 2 turns hold <image>"):
        dataset[3]
    with pytest.raises(RecordError, match=r"record 'none' \(index 4\): no `conversations`"):
        dataset[4]


def test_modality_grouped_order_keeps_modalities_apart():
    lengths = [5, -3, 7, -2, 4, 9, -8, 6, -1, 3, 2, -4]
    torch.manual_seed(0)
    order = modality_length_grouped_indices(lengths, batch_size=2, world_size=1)
    assert sorted(order) == list(range(len(lengths)))
    batches = [order[i : i + 2] for i in range(0, len(order) - 2, 2)]  # the last megabatch mixes the leftovers
    for batch in batches:
        assert len({lengths[i] > 0 for i in batch}) == 1


def test_internal_cross_attention_text_only_rows_attend_to_the_zero_image(image_folder):
    model = make_model("internal_cross_pre")
    processor = processor_for(model.config)
    plain = load_recipe("finetune", model, model_max_length=256, zero_image_for_text_only=False)
    dataset = plain.dataset(RECORDS, processor, image_folder=image_folder)
    batch = plain.collate([dataset[0], dataset[1]])
    text_only = plain.collate([dataset[1]])
    with torch.no_grad():
        without = model(**batch).logits
    recipe = load_recipe("finetune", model, model_max_length=256)  # sets the forward up at once
    with torch.no_grad():
        with_zero = model(**batch).logits
    prepared = recipe.prepare_model(model)
    with torch.no_grad():
        torch.testing.assert_close(prepared(**batch).logits, with_zero)  # installed once
        alone = prepared(**text_only).logits
    length = int(text_only["attention_mask"].sum())
    torch.testing.assert_close(with_zero[0], without[0])  # the image row is untouched
    assert not torch.allclose(with_zero[1, :length], without[1, :length], atol=1e-4)
    torch.testing.assert_close(with_zero[1, :length], alone[0, :length], atol=1e-5, rtol=1e-5)
    # The internal projectors learn from text-only records too, as in the original.
    prepared.zero_grad()
    prepared(**text_only).loss.backward()
    assert model.model.internal_projectors[0].linear_1.weight.grad.abs().sum() > 0


def test_datasets_tables_and_streams_give_the_same_items(image_folder):
    datasets = pytest.importorskip("datasets")
    model = make_model("mmfuser")
    processor = processor_for(model.config)
    recipe = load_recipe("finetune", model, model_max_length=256)
    listed = recipe.dataset(RECORDS, processor, image_folder=image_folder)
    table = recipe.dataset(datasets.Dataset.from_list(RECORDS), processor, image_folder=image_folder)
    stream = recipe.dataset(
        datasets.Dataset.from_list(RECORDS).to_iterable_dataset(), processor, image_folder=image_folder
    )
    assert len(table) == len(RECORDS) and not hasattr(stream, "__len__")
    streamed = list(stream)
    for index in range(len(RECORDS)):
        for item in (table[index], streamed[index]):
            assert item.keys() == listed[index].keys()
            for key, value in item.items():
                assert torch.equal(value, listed[index][key]), (index, key)
    broken = datasets.Dataset.from_list([RECORDS[0], {**RECORDS[2], "image": "gone.png"}]).to_iterable_dataset()
    with pytest.raises(RecordError, match=r"record 'c' \(index 1\): cannot read image"):
        list(recipe.dataset(broken, processor, image_folder=image_folder))


def test_igva_stage_1_output_trains_in_stage_2_with_a_fresh_aggregator(image_folder, tmp_path):
    encoder_dir = Path(__file__).parent / "fixtures" / "igva-clip" / "sentence_embedder"
    model = make_model("igva_average")
    model.save_pretrained(tmp_path / "init")
    processor_for(model.config).save_pretrained(tmp_path / "init")
    pretrain = [RECORDS[0], {**RECORDS[2], "conversations": RECORDS[2]["conversations"][:2]}]
    arguments = {"bf16": False, "use_cpu": True, "max_steps": 1, "per_device_train_batch_size": 2, "save_steps": 10}
    recipe = {"model_max_length": 256, "warmup_ratio": 0.0}
    train(
        tmp_path / "init",
        pretrain,
        tmp_path / "stage1",
        "pretrain",
        image_folder=image_folder,
        recipe_overrides=recipe,
        **arguments,
    )
    with pytest.raises(ValueError, match="needs the sentence encoder"):
        train(
            tmp_path / "stage1",
            RECORDS,
            tmp_path / "stage2",
            "finetune",
            image_folder=image_folder,
            recipe_overrides=recipe,
            **arguments,
        )
    trainer = train(
        tmp_path / "stage1",
        RECORDS,
        tmp_path / "stage2",
        "finetune",
        image_folder=image_folder,
        sentence_encoder=encoder_dir,
        recipe_overrides=recipe,
        **arguments,
    )
    assert trainer.state.global_step == 1
    stage1 = LlavaMultiLayerForConditionalGeneration.from_pretrained(tmp_path / "stage1")
    stage2 = LlavaMultiLayerForConditionalGeneration.from_pretrained(tmp_path / "stage2")
    assert stage2.config.igva_aggregate_by_average is False and stage2.model.instruction_encoder is not None
    processor = LlavaMultiLayerProcessor.from_pretrained(tmp_path / "stage2")
    assert processor.instruction_tokenizer is not None
    vision = {name: tensor for name, tensor in stage1.state_dict().items() if name.startswith("model.vision_tower.")}
    for name, tensor in vision.items():
        assert torch.equal(stage2.state_dict()[name], tensor)
    encoder = AutoModel.from_pretrained(encoder_dir, add_pooling_layer=False).state_dict()
    for name, tensor in stage2.model.instruction_encoder.encoder.state_dict().items():
        assert torch.equal(tensor, encoder[name]), name


def test_tokenization_mismatch_masks_the_whole_record_as_the_original(caplog):
    model = make_model("mmfuser")
    recipe = load_recipe("finetune", model, model_max_length=256)
    records = [
        {"id": "ok", "conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "Hi."}]},
        # " ASSISTANT: " inside a turn breaks the original's round split, so its length check fails.
        {
            "id": "odd",
            "conversations": [{"from": "human", "value": "Say ASSISTANT: hi"}, {"from": "gpt", "value": "Hi."}],
        },
    ]
    dataset = recipe.dataset(records, processor_for(model.config))
    assert (dataset[0]["labels"] != -100).any()
    with caplog.at_level("WARNING"):
        assert (dataset[1]["labels"] == -100).all()
    assert "tokenization mismatch" in caplog.text


def test_the_trainer_optimizes_the_recipe_groups(tmp_path):
    model = make_model("mmfuser")
    recipe = load_recipe("pretrain", model, weight_decay=0.1)
    prepared = recipe.prepare_model(model)
    arguments = TrainingArguments(**recipe.training_arguments(tmp_path, bf16=False, use_cpu=True))
    trainer = RecipeTrainer(recipe, model=prepared, args=arguments, train_dataset=[], data_collator=None)
    optimizer = trainer.create_optimizer()
    parameters = dict(prepared.named_parameters())
    groups = recipe.optimizer_groups(model)
    assert [group["lr"] for group in groups] == [1e-3, 1e-3, 1e-4, 1e-4]
    assert [group["weight_decay"] for group in groups] == [0.1, 0.0, 0.1, 0.0]
    assert len(optimizer.param_groups) == len(groups)
    for used, group in zip(optimizer.param_groups, groups):
        assert used["lr"] == group["lr"] and used["weight_decay"] == group["weight_decay"]
        assert [id(p) for p in used["params"]] == [id(parameters[name]) for name in group["params"]]
    assert all(".fuser." in name for group in groups[2:] for name in group["params"])
    assert any(name.endswith("scale") for name in groups[2]["params"])  # the fuser's gammas decay, as in the original
