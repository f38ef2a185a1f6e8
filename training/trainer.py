# Copyright 2026 The llava-multilayer authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Running a recipe with the transformers `Trainer` (single process, `accelerate launch` / `torchrun` DDP,
DeepSpeed ZeRO, FSDP), and the checkpoint it ends with.

- [`RecipeTrainer`]: the `Trainer` with the recipe's optimizer groups, the original `group_by_modality_length`
  sampler and the learning rate of every group in the logs; for peft models it saves the fully trained non-LoRA
  parameters (`non_lora_trainables.safetensors`) next to every adapter, as the original's `non_lora_trainables.bin`.
- [`train`]: loads, prepares, trains and writes a normal `save_pretrained` checkpoint of the family + processor
  (+ `training_recipe.json`, which names the family for the next stage). LoRA runs write the adapter to
  `OUTPUT/adapter/` and the merged model to `OUTPUT/`; QLoRA merges into the unquantized base.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from llava_multilayer import LlavaMultiLayerForConditionalGeneration, LlavaMultiLayerProcessor

from .data import load_records
from .igva import add_aggregator
from .recipes import Recipe, load_recipe
from .sampler import ModalityLengthGroupedSampler


NON_LORA_TRAINABLES_NAME = "non_lora_trainables.safetensors"
CROSS_FUSION_LAYER = "CrossAttentionFusionDecoderLayer"
RECIPE_FILE = "training_recipe.json"


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def non_lora_trainables(model) -> dict[str, torch.Tensor]:
    """The trainable parameters of a peft model that are not LoRA weights, by base-model name, on CPU."""
    prefix = "base_model.model."
    return {
        name[len(prefix) :]: parameter.detach().cpu().clone().contiguous()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and "lora_" not in name
    }


def load_non_lora_trainables(model, directory: str | os.PathLike) -> None:
    """Copies `non_lora_trainables.safetensors` of `directory` into the peft `model` (raises if it is missing)."""
    path = Path(directory) / NON_LORA_TRAINABLES_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {NON_LORA_TRAINABLES_NAME} (the trained projector weights).")
    base = model.get_base_model()
    with torch.no_grad():
        for name, tensor in load_file(path).items():
            base.get_parameter(name).copy_(tensor)


class GroupLearningRates(TrainerCallback):
    """Records the learning rate of every optimizer group used by the last optimizer step."""

    def __init__(self):
        self.learning_rates: list[float] = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.learning_rates = [float(group["lr"]) for group in optimizer.param_groups]


class RecipeTrainer(Trainer):
    """`Trainer` that optimizes a [`Recipe`]'s groups (see the module notes). `model` must be the recipe's prepared
    model ([`Recipe.prepare_model`])."""

    def __init__(self, recipe: Recipe, *args, **kwargs):
        self.recipe = recipe
        self.group_learning_rates = GroupLearningRates()
        super().__init__(*args, **kwargs)
        self.add_callback(self.group_learning_rates)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            parameters = dict(opt_model.named_parameters())
            groups = [
                {
                    "params": [parameters[name] for name in group["params"]],
                    "lr": group["lr"],
                    "weight_decay": group["weight_decay"],
                }
                for group in self.recipe.optimizer_groups(opt_model)
            ]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.recipe.group_by_modality_length and hasattr(dataset, "modality_lengths"):
            return ModalityLengthGroupedSampler(
                dataset.modality_lengths,
                batch_size=self.args.train_batch_size,
                world_size=self.args.world_size * self.args.gradient_accumulation_steps,
            )
        return super()._get_train_sampler(train_dataset)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            for index, learning_rate in enumerate(self.group_learning_rates.learning_rates):
                logs[f"learning_rate_group_{index}"] = learning_rate
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        model = self.accelerator.unwrap_model(self.model)
        if _is_peft(model) and self.args.should_save:
            save_file(non_lora_trainables(model), Path(output_dir or self.args.output_dir) / NON_LORA_TRAINABLES_NAME)


def check_sharding_engine(trainer: Trainer) -> None:
    """Raises when FSDP or DeepSpeed was asked for (an `accelerate launch` config or the `fsdp` / `deepspeed`
    training arguments) but the trainer's accelerator does not use it. accelerate enables FSDP only on accelerator
    devices: on a CPU-only machine or with `use_cpu` it would silently train unsharded, plain DDP instead."""
    engines = {
        "FSDP": (
            os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or bool(trainer.args.fsdp),
            trainer.is_fsdp_enabled,
        ),
        "DeepSpeed": (
            os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" or bool(trainer.args.deepspeed),
            trainer.is_deepspeed_enabled,
        ),
    }
    if trainer.is_fsdp_enabled:
        _check_fsdp_wrapping(trainer)
    for engine, (requested, enabled) in engines.items():
        if requested and not enabled:
            state = trainer.accelerator.state
            raise ValueError(
                f"{engine} was requested (accelerate config or training arguments) but accelerate runs this job as "
                f"{state.distributed_type.value} on {state.device.type}: accelerate enables {engine} only on "
                "accelerator devices (CUDA, XPU, ...), not on a CPU-only machine or with --use-cpu, where it would "
                "train unsharded. Use a GPU machine, or drop the config to train with DDP "
                "(examples/accelerate_multi_gpu.yaml, `--multi_gpu` on CPU)."
            )


def _check_fsdp_wrapping(trainer: Trainer) -> None:
    """Internal cross-attention fusion (I_M) computes a fusion layer's keys and values from the image before the
    layer runs, outside its forward, where FSDP has not gathered the layer's weights: those layers must not be FSDP
    units of their own (accelerate's default, `_no_split_modules`, makes them so)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not any(type(module).__name__ == CROSS_FUSION_LAYER for module in model.modules()):
        return
    wrapped = trainer.accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap
    if wrapped is None or CROSS_FUSION_LAYER in wrapped:
        raise ValueError(
            f"FSDP would wrap each {CROSS_FUSION_LAYER} (internal cross-attention fusion, I_M) as its own unit, but "
            "its cross-attention keys and values are computed outside its forward, where FSDP has not gathered its "
            "weights. Set `fsdp_transformer_layer_cls_to_wrap` in the accelerate config to the other layer classes, "
            "e.g. `LlamaDecoderLayer,CLIPEncoderLayer` (see examples/accelerate_fsdp.yaml); the fusion layers then "
            "belong to the root unit."
        )


def load_model(
    model_name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, load_in_4bit: bool = False
) -> LlavaMultiLayerForConditionalGeneration:
    """Loads a model for training (`load_in_4bit`: QLoRA, the language model's linear layers in NF4)."""
    if not load_in_4bit:
        return LlavaMultiLayerForConditionalGeneration.from_pretrained(model_name_or_path, dtype=dtype)
    from llava_multilayer.commands.finetune import load_model_for_training

    return load_model_for_training(model_name_or_path, dtype=torch.bfloat16, load_in_4bit=True)


def train(
    model: str | os.PathLike,
    data,
    output_dir: str | os.PathLike,
    recipe: str | Recipe = "finetune",
    *,
    image_folder: str | os.PathLike | None = None,
    instruction_embeds_folder: str | os.PathLike | None = None,
    family: str | None = None,
    resume_from_checkpoint: str | bool | None = None,
    seed: int = 42,
    data_split: str = "train",
    streaming: bool = False,
    sentence_encoder: str | os.PathLike | None = None,
    dtype: torch.dtype | str = torch.float32,
    recipe_overrides: dict | None = None,
    **training_arguments,
) -> RecipeTrainer:
    """Trains `model` (a checkpoint directory / Hub id) on `data` with `recipe` and writes the result to
    `output_dir`; returns the trainer.

    Args:
        model: Where the model and its processor load from (stage 2: the output of stage 1).
        data: Records ([`load_records`]: `.json`/`.jsonl`, a list, a `datasets` dataset or its name).
        output_dir: Checkpoints (`checkpoint-N/`) and the final model + processor + `training_recipe.json`.
        recipe: A stage name (`pretrain`, `finetune`, `lora`, `qlora`) or a [`Recipe`].
        image_folder, instruction_embeds_folder: See [`Recipe.dataset`].
        family: The family, when it cannot be detected (see [`detect_family`]).
        resume_from_checkpoint: A `checkpoint-N` directory, or `True` for the last one in `output_dir`.
        seed: Seed of the initialisation of new weights (LoRA) and of the data order.
        data_split, streaming: Split of a `datasets` dataset, and whether to stream it (then set `max_steps`).
        sentence_encoder: IGVA stage 2 from a stage-1 model: the sentence-transformers directory of the instruction
            encoder (see [`add_aggregator`]).
        dtype: Dtype the model is loaded in (`torch.dtype` or its name). float32 (default) keeps float32 master
            weights under `bf16` autocast; bfloat16 halves the memory of frozen weights (LoRA: the trained ones stay
            float32) and, as the original, suits DeepSpeed, which keeps float32 master weights itself.
        recipe_overrides: [`Recipe`] fields to override (when `recipe` is a name).
        training_arguments: `TrainingArguments` fields overriding the recipe's (e.g. `bf16=False`, `deepspeed=...`).
    """
    set_seed(seed)
    stage = recipe if isinstance(recipe, str) else recipe.stage
    load_in_4bit = stage == "qlora"
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    loaded = load_model(model, dtype=dtype, load_in_4bit=load_in_4bit)
    if isinstance(recipe, str):
        recipe = load_recipe(recipe, loaded, family=family, **(recipe_overrides or {}))
    processor = LlavaMultiLayerProcessor.from_pretrained(str(model))
    if recipe.family == "igva" and recipe.stage != "pretrain" and loaded.config.igva_aggregate_by_average:
        if sentence_encoder is None:
            raise ValueError(
                f"{model} is an IGVA stage-1 model (uniform averaging): stage 2 ({recipe.stage}) adds the instruction-"
                "guided aggregator and needs the sentence encoder: pass sentence_encoder= (--sentence-encoder DIR)."
            )
        loaded, processor = add_aggregator(loaded, processor, sentence_encoder)
        if recipe.stage != "finetune":
            # The base a LoRA adapter is merged into at the end (the stored stage-1 model lacks the aggregator).
            initial = Path(output_dir) / "stage2-init"
            if PartialState().is_main_process:
                loaded.save_pretrained(initial)
                processor.save_pretrained(initial)
            loaded.config._name_or_path = str(initial)
    prepared = recipe.prepare_model(loaded)
    dataset = recipe.dataset(
        load_records(data, data_split, streaming),
        processor,
        image_folder=image_folder,
        instruction_embeds_folder=instruction_embeds_folder,
    )
    arguments = recipe.training_arguments(output_dir, seed=seed, **training_arguments)
    trainer = RecipeTrainer(
        recipe,
        model=prepared,
        args=TrainingArguments(**arguments),
        train_dataset=dataset,
        data_collator=recipe.collator(processor),
        processing_class=processor,
    )
    check_sharding_engine(trainer)
    if resume_from_checkpoint is True:
        resume_from_checkpoint = get_last_checkpoint(str(output_dir))
        if resume_from_checkpoint is None:
            raise FileNotFoundError(f"resume_from_checkpoint=True: {output_dir} holds no checkpoint-N folder.")
    if resume_from_checkpoint and _is_peft(prepared):
        load_non_lora_trainables(prepared, resume_from_checkpoint)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint or None)
    if trainer.is_fsdp_enabled:
        # Checkpoints may be sharded; the final model is written whole.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    if _is_peft(prepared):
        trainer.save_model(str(Path(output_dir) / "adapter"))
    else:
        trainer.save_model(str(output_dir))
    if trainer.args.should_save:
        if _is_peft(prepared):
            merge_adapter(prepared, Path(output_dir) / "adapter", output_dir, processor)
        (Path(output_dir) / RECIPE_FILE).write_text(json.dumps(recipe.to_dict(), indent=2) + "\n", encoding="utf-8")
    return trainer


def merge_adapter(trained, adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, processor) -> Path:
    """Merges an adapter written by [`train`] (LoRA weights + `non_lora_trainables.safetensors`) into the
    unquantized base of the trained peft model `trained` (loaded afresh from its `name_or_path`, so that QLoRA merges
    into full-precision weights) and writes a full checkpoint + `processor` to `output_dir`."""
    from peft import PeftModel

    base_dir = trained.get_base_model().config._name_or_path
    base = LlavaMultiLayerForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    load_non_lora_trainables(model, adapter_dir)
    merged = model.merge_and_unload()
    merged.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return Path(output_dir)


__all__ = [
    "NON_LORA_TRAINABLES_NAME",
    "RECIPE_FILE",
    "RecipeTrainer",
    "check_sharding_engine",
    "load_model",
    "load_non_lora_trainables",
    "merge_adapter",
    "non_lora_trainables",
    "train",
]
