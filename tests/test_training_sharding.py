"""Sharded training engines on CPU: what can be checked without a GPU.

- accelerate enables FSDP and DeepSpeed only on accelerator devices; on a CPU-only machine (or with `use_cpu`) it
  would silently train unsharded DDP instead, so `train` refuses that combination with a clear error.
- The model itself under FSDP2 (`torch.distributed.fsdp.fully_shard`, what `examples/accelerate_fsdp.yaml` makes
  accelerate apply on GPUs: one unit per `_no_split_modules` layer, then the root), on 2 CPU processes (gloo): each
  rank's loss equals the unsharded model's on the same record, and the reduced gradients of every trained parameter
  equal those of the unsharded model on the mean of the two records' losses; one optimizer step with the recipe's
  groups runs on the sharded parameters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_model, random_image
from transformers import TrainingArguments

from llava_multilayer.training import RecipeTrainer, load_recipe
from llava_multilayer.training.trainer import check_sharding_engine


TESTS = Path(__file__).resolve().parent

# Run by torchrun in each of the 2 processes: argv = image folder, output JSON.
FSDP2_CHILD = r'''
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, TESTS)
from conftest import make_model, processor_for  # noqa: E402

from llava_multilayer.training import load_recipe  # noqa: E402

RECORDS = [
    {"id": "a", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A picture of noise."}]},
    {"id": "b", "image": "b.png", "conversations": [
        {"from": "human", "value": "Describe it.\n<image>"}, {"from": "gpt", "value": "Colourful dots."}]},
]
# (model, stage, layer classes not wrapped as their own unit). I_M computes a fusion layer's cross-attention keys
# and values before that layer runs (once per image, cached for generation), outside the layer's forward, where
# FSDP has not gathered its weights: those layers stay in the root unit (`fsdp_transformer_layer_cls_to_wrap`).
CASES = [
    ("mmfuser", "finetune", ()),
    ("igva", "finetune", ()),
    ("internal_add", "finetune", ()),
    ("internal_cross_pre", "pretrain", ("CrossAttentionFusionDecoderLayer",)),
]


def prepared(kind, stage, folder):
    model = make_model(kind).train()
    recipe = load_recipe(stage, model, model_max_length=256)
    dataset = recipe.dataset(RECORDS, processor_for(model.config), image_folder=folder)
    batches = [recipe.collate([dataset[index]]) for index in range(len(RECORDS))]
    model = recipe.prepare_model(model)
    return model, recipe.optimizer_groups(model), batches


def optimizer(model, groups):
    parameters = dict(model.named_parameters())
    return torch.optim.AdamW(
        [{"params": [parameters[n] for n in g["params"]], "lr": g["lr"], "weight_decay": g["weight_decay"]}
         for g in groups]
    )


dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))
folder, output = sys.argv[1], sys.argv[2]
results = {}
for kind, stage, unwrapped in CASES:
    reference, groups, batches = prepared(kind, stage, folder)
    reference_losses = [reference(**batch).loss for batch in batches]
    (sum(reference_losses) / len(reference_losses)).backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}

    model, groups, batches = prepared(kind, stage, folder)
    no_split = set(model._no_split_modules) - set(unwrapped)
    units = [m for m in model.modules() if type(m).__name__ in no_split]
    for module in units:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    loss = model(**batches[rank]).loss
    loss.backward()
    gradients = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    optimizer(model, groups).step()
    results[f"{kind}/{stage}"] = {
        "units": len(units),
        "trained": sorted(gradients) == sorted(expected),
        "loss_diff": max(abs(float(a) - float(b)) for a, b in zip(losses, reference_losses)),
        "gradient_diff": max(float((gradients[n] - expected[n]).abs().max()) for n in expected),
        "gradient_max": max(float(expected[n].abs().max()) for n in expected),
    }
if rank == 0:
    with open(output, "w") as handle:
        json.dump(results, handle)
dist.destroy_process_group()
'''.replace("TESTS", repr(str(TESTS)))


def test_train_refuses_fsdp_that_accelerate_would_drop_on_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    model = make_model("single")
    recipe = load_recipe("finetune", model, family="layer_select_fuse")
    arguments = TrainingArguments(**recipe.training_arguments(tmp_path, bf16=False, use_cpu=True))
    trainer = RecipeTrainer(recipe, model=recipe.prepare_model(model), args=arguments)
    assert not trainer.is_fsdp_enabled
    with pytest.raises(ValueError, match="FSDP was requested .* accelerate enables FSDP only on accelerator"):
        check_sharding_engine(trainer)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    check_sharding_engine(trainer)  # plain DDP / single process: nothing to refuse


@pytest.mark.slow  # about 20 s of CPU (2 processes): CI runs it with RUN_SLOW=1
def test_fsdp2_sharded_training_step_equals_the_unsharded_model(tmp_path):
    for index, name in enumerate("ab"):
        random_image(seed=index).save(tmp_path / f"{name}.png")
    child = tmp_path / "fsdp2_child.py"
    child.write_text(FSDP2_CHILD)
    output = tmp_path / "results.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d"]
    command += ["--rdzv-endpoint", "localhost:0", str(child), str(tmp_path), str(output)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(output.read_text())
    expected = {"mmfuser/finetune", "igva/finetune", "internal_add/finetune", "internal_cross_pre/pretrain"}
    assert set(results) == expected
    for case, measured in results.items():
        assert measured["units"] > 0 and measured["trained"], (case, measured)
        assert measured["loss_diff"] <= 1e-6, (case, measured)
        assert measured["gradient_diff"] <= 1e-6 + 1e-5 * measured["gradient_max"], (case, measured)


def test_fsdp_refuses_to_wrap_internal_cross_attention_layers_as_units():
    from types import SimpleNamespace

    from llava_multilayer.training.trainer import _check_fsdp_wrapping

    def trainer(model, wrapped):
        plugin = SimpleNamespace(transformer_cls_names_to_wrap=wrapped)
        accelerator = SimpleNamespace(unwrap_model=lambda m: m, state=SimpleNamespace(fsdp_plugin=plugin))
        return SimpleNamespace(model=model, accelerator=accelerator)

    cross = make_model("internal_cross_pre")
    for wrapped in (None, ["LlamaDecoderLayer", "CrossAttentionFusionDecoderLayer"]):
        with pytest.raises(ValueError, match="fsdp_transformer_layer_cls_to_wrap"):
            _check_fsdp_wrapping(trainer(cross, wrapped))
    _check_fsdp_wrapping(trainer(cross, ["LlamaDecoderLayer", "CLIPEncoderLayer"]))
    _check_fsdp_wrapping(trainer(make_model("mmfuser"), None))
