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
"""Training recipes: the two stages of each paper (stage 1 `pretrain`, stage 2 `finetune`) and LLaVA-1.5's LoRA
variant (`lora`, `qlora`), with the original scripts' settings as defaults.

Defaults come from the scripts the original code ships (flags as the scripts pass them, values in
[`RECIPE_DEFAULTS`]); every field can be overridden with a keyword of [`load_recipe`]:

- MMFuser: `scripts/mmfuser/pretrain_13b.sh` (stage 1: the 13B script, whose `--ms_cross_attn_lr 1e-4` gives
  the fuser its own learning rate; `ms_cross_attn_lr=None` is `pretrain_7b.sh`), `finetune_7b.sh` (stage 2), and
  for `lora` LLaVA-1.5's `finetune_lora.sh` flags on top of `finetune_7b.sh` (MMFuser has no `mm_projector_lr`).
- Layer_Select_Fuse: `scripts/MLVF/train.sh` (both stages, including its per-device batch 1, gradient
  accumulation 8 / 16 and `--max_steps 10`; pass `max_steps=-1` to train whole epochs), and for `lora` LLaVA-1.5's
  `--lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 --learning_rate 2e-4`.
- IGVA: `scripts/v1_5/pretrain_balance.sh` (stage 1: LLaVA-1.5's values, but `--image_aspect_ratio pad`, which
  LLaVA-1.5's stage 1 does not pass) and `finetune_balance(1).sh` (stage 2: the 8-GPU script whose
  `--lambda_balance 0.02` the paper's runs used: per-device batch 8, gradient accumulation 2, `--save_steps 1000`;
  `finetune_balance.sh` is a 4-GPU variant with `--max_steps 2`). IGVA ships no LoRA script: `lora` is its stage 2
  with LLaVA-1.5's LoRA flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from llava_multilayer.compatibility_llava_multilayer import checkpointing_training_arguments
from llava_multilayer.fusion_registry_llava_multilayer import original_family

from . import parameters, zero_image
from .data import IterableSupervisedDataset, SupervisedCollator, SupervisedDataset


FAMILIES = ("mmfuser", "layer_select_fuse", "igva")
STAGES = ("pretrain", "finetune", "lora", "qlora")
#: Files of a checkpoint directory that name its family: written by the converters and by the end of training.
FAMILY_FILES = ("conversion_report.json", "training_recipe.json")

_STAGE_1 = {
    "template": "plain",
    "image_aspect_ratio": "square",
    "learning_rate": 1e-3,
    "weight_decay": 0.0,
    "warmup_ratio": 0.03,
    "per_device_train_batch_size": 32,
    "gradient_accumulation_steps": 1,
    "group_by_modality_length": False,
    "save_steps": 24000,
    "save_total_limit": 1,
}
_STAGE_2 = {
    "template": "vicuna_v1",
    "image_aspect_ratio": "pad",
    "learning_rate": 2e-5,
    "weight_decay": 0.0,
    "warmup_ratio": 0.03,
    "per_device_train_batch_size": 16,
    "gradient_accumulation_steps": 1,
    "group_by_modality_length": True,
    "save_steps": 50000,
    "save_total_limit": 1,
}
_LORA = {"lora_r": 128, "lora_alpha": 256, "learning_rate": 2e-4}
_LSF_STAGE_2 = {
    **_STAGE_2,
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 16,
    "max_steps": 10,
    "save_steps": 1000,
    "save_total_limit": 5,
}
_IGVA_STAGE_2 = {**_STAGE_2, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "save_steps": 1000}

#: family -> stage -> the fields of [`Recipe`] the original scripts set (the rest keep the dataclass defaults).
RECIPE_DEFAULTS: dict[str, dict[str, dict]] = {
    "mmfuser": {
        "pretrain": {**_STAGE_1, "ms_cross_attn_lr": 1e-4},
        "finetune": _STAGE_2,
        "lora": {**_STAGE_2, **_LORA},
    },
    "layer_select_fuse": {
        "pretrain": {
            **_STAGE_1,
            "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": 8,
            "max_steps": 10,
            "weight_decay": 0.05,
            "warmup_ratio": 0.0,
            "warmup_steps": 200,
            "save_steps": 500,
            "save_total_limit": 4,
        },
        "finetune": _LSF_STAGE_2,
        "lora": {**_LSF_STAGE_2, **_LORA, "mm_projector_lr": 2e-5},
    },
    "igva": {
        "pretrain": {**_STAGE_1, "image_aspect_ratio": "pad"},
        "finetune": _IGVA_STAGE_2,
        "lora": {**_IGVA_STAGE_2, **_LORA, "mm_projector_lr": 2e-5},
    },
}
for _family in RECIPE_DEFAULTS.values():
    _family["qlora"] = _family["lora"]

#: The learning-rate options each family's original `TrainingArguments` defines.
FAMILY_LR_OPTIONS = {
    "mmfuser": ("ms_cross_attn_lr",),
    "layer_select_fuse": ("mm_projector_lr", "cross_attn_lr"),
    "igva": ("mm_projector_lr",),
}


@dataclass
class Recipe:
    """One training stage of one family. Build it with [`load_recipe`].

    The data fields (`template`, `image_aspect_ratio`, `model_max_length`) drive [`Recipe.dataset`] and
    [`Recipe.collate`]; the optimisation fields drive [`Recipe.trainable_parameters`],
    [`Recipe.optimizer_groups`] and [`Recipe.training_arguments`] (the `transformers.TrainingArguments` values).
    `zero_image_for_text_only` reproduces the original's zero image of text-only records where it matters (internal
    cross-attention fusion, see [`zero_image`]).
    """

    family: str
    stage: str
    template: str = "vicuna_v1"
    image_aspect_ratio: str = "pad"
    model_max_length: int = 2048
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    mm_projector_lr: float | None = None
    ms_cross_attn_lr: float | None = None
    cross_attn_lr: float | None = None
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    group_by_modality_length: bool = False
    gradient_checkpointing: bool = True
    bf16: bool = True
    save_steps: int = 500
    save_total_limit: int | None = 1
    logging_steps: int = 1
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    zero_image_for_text_only: bool = True
    _prepared: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False, compare=False)
    _collator: SupervisedCollator | None = field(default=None, repr=False, compare=False)

    # ----------------------------------------------------------------------------------------------------------
    # Data
    # ----------------------------------------------------------------------------------------------------------

    def dataset(
        self,
        records,
        processor,
        image_folder: str | os.PathLike | None = None,
        instruction_embeds_folder: str | os.PathLike | None = None,
        instruction_source: str | None = "auto",
    ) -> SupervisedDataset | IterableSupervisedDataset:
        """The stage's dataset over LLaVA-format `records` (see [`SupervisedDataset`]); records without `len`
        (a streamed `datasets.IterableDataset`) give an [`IterableSupervisedDataset`] (set `max_steps` to train).

        IGVA stage 2 needs one instruction embedding per image: from `instruction_embeds_folder` (the original's
        `--sentence_embed_folder`, each record's `sentence_embed` names a `.pt` file there), or, without a folder,
        computed by the model's instruction encoder from the text of the turn holding the image
        (`instruction_source="encoder"`); stage 1 averages the layer groups and uses none. Also sets up the
        collator [`Recipe.collate`] uses.
        """
        if instruction_source == "auto":
            if self.family != "igva" or self.stage == "pretrain":
                instruction_source = None
            else:
                instruction_source = "folder" if instruction_embeds_folder is not None else "encoder"
        self._collator = self.collator(processor)
        streamed = not hasattr(records, "__len__") or not hasattr(records, "__getitem__")
        dataset = SupervisedDataset(
            [] if streamed else records,
            processor,
            template=self.template,
            model_max_length=self.model_max_length,
            image_folder=image_folder,
            image_aspect_ratio=self.image_aspect_ratio,
            instruction_embeds_folder=instruction_embeds_folder,
            instruction_source=instruction_source,
        )
        return IterableSupervisedDataset(records, dataset) if streamed else dataset

    def collator(self, processor) -> SupervisedCollator:
        """The collator of [`Recipe.dataset`] items for `processor`'s tokenizer and image token."""
        instruction_tokenizer = getattr(processor, "instruction_tokenizer", None)
        return SupervisedCollator(
            pad_token_id=processor.tokenizer.pad_token_id,
            image_token_id=processor.image_token_id,
            model_max_length=self.model_max_length,
            instruction_pad_token_id=instruction_tokenizer.pad_token_id if instruction_tokenizer is not None else 0,
        )

    def collate(self, features: list[dict]) -> dict:
        """Batches [`Recipe.dataset`] items (see [`SupervisedCollator`]); `model(**batch).loss` is the batch loss."""
        if self._collator is None:
            raise ValueError("Recipe.collate needs a dataset built first: call recipe.dataset(records, processor).")
        return self._collator(features)

    # ----------------------------------------------------------------------------------------------------------
    # Optimisation
    # ----------------------------------------------------------------------------------------------------------

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """`model` set up for this stage: its forward ([`Recipe.set_up_forward`]), `requires_grad` per stage, and
        for `lora`/`qlora` a `peft.PeftModel` around it (the LoRA layers are injected into `model`). Returns the model
        to train (the same `PeftModel` when called again with the same `model`)."""
        if model in self._prepared:
            return self._prepared[model]
        if any(prepared is model for prepared in self._prepared.values()):
            return model
        if hasattr(model, "peft_config"):
            raise ValueError(
                "prepare_model expects the plain LlavaMultiLayer model, got a model already wrapped by peft."
            )
        self.set_up_forward(model)
        model.config.use_cache = False
        prepared = model
        if self.stage in ("lora", "qlora"):
            prepared = self._wrap_lora(model)
        parameters.set_trainable(prepared, self.stage)
        if prepared is not model:
            # Trained weights in float32 whatever the dtype of the frozen (possibly quantized) ones.
            for parameter in prepared.parameters():
                if parameter.requires_grad and parameter.dtype != torch.float32:
                    parameter.data = parameter.data.float()
        self._prepared[model] = prepared
        return prepared

    def set_up_forward(self, model: nn.Module) -> None:
        """Makes `model`'s forward the original's for this stage ([`load_recipe`] calls it): IGVA stage 1 averages
        the layer groups uniformly (other stages: the config's setting); I_M text-only rows attend to the zero
        image (`zero_image_for_text_only`)."""
        if model.config.fusion_type == "igva":
            # Stage 1 of IGVA averages the layer groups uniformly (the original builds it with aggregate_by_average).
            by_average = self.stage == "pretrain" or model.config.igva_aggregate_by_average
            model.model.multi_modal_projector.aggregate_by_average = by_average
        zero_image.set_enabled(model, self.zero_image_for_text_only)

    def _wrap_lora(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=self.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        elif self.stage == "qlora":
            raise ValueError("stage='qlora' needs a model loaded in 4-bit (see llava_multilayer.training.load_model).")
        config = LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=parameters.LORA_TARGET_MODULES,
            bias="none",
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)

    def trainable_parameters(self, model: nn.Module) -> list[str]:
        """Sorted names of the parameters this stage trains (names of [`Recipe.prepare_model`]'s model)."""
        return parameters.trainable_parameter_names(self.prepare_model(model))

    def optimizer_groups(self, model: nn.Module) -> list[dict]:
        """The original optimizer groups `[{"lr", "weight_decay", "params": [names]}]` (see
        [`parameters.optimizer_groups`])."""
        special = {option: getattr(self, option) for option in FAMILY_LR_OPTIONS[self.family]}
        return parameters.optimizer_groups(self.prepare_model(model), self.learning_rate, self.weight_decay, special)

    def training_arguments(self, output_dir: str | os.PathLike, **overrides) -> dict:
        """The `transformers.TrainingArguments` keywords of this recipe (any of them can be overridden)."""
        arguments = {
            "output_dir": str(output_dir),
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "lr_scheduler_type": self.lr_scheduler_type,
            "warmup_steps": self.warmup_steps if self.warmup_steps else self.warmup_ratio,
            "num_train_epochs": self.num_train_epochs,
            "max_steps": self.max_steps,
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "bf16": self.bf16,
            **checkpointing_training_arguments(self.gradient_checkpointing, {"use_reentrant": False}),
            "save_strategy": "steps",
            "save_steps": self.save_steps,
            "save_total_limit": self.save_total_limit,
            "logging_steps": self.logging_steps,
            "remove_unused_columns": False,
            "label_names": ["labels"],
            "report_to": "none",
            # Text-only batches leave the fusion modules without gradients, which DDP must be told about.
            "ddp_find_unused_parameters": True,
        }
        arguments.update(overrides)
        return arguments

    def to_dict(self) -> dict:
        """The recipe's fields (what `training_recipe.json` holds)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}


def detect_family(model: nn.Module) -> str:
    """The family of a loaded model: from the `conversion_report.json` / `training_recipe.json` of the directory
    it was loaded from, else from its config (the fuser's `original_family`; internal fusion: Layer_Select_Fuse; an
    `mmfuser` fuser gives MMFuser, whose fuser Layer_Select_Fuse E_M shares, so pass `family=` for E_M models that
    lack those files)."""
    config = model.config
    directory = Path(getattr(config, "_name_or_path", "") or "")
    for name in FAMILY_FILES:
        path = directory / name
        if path.is_file():
            family = json.loads(path.read_text(encoding="utf-8")).get("family")
            if family in FAMILIES:
                return family
    family = original_family(config)
    if family is not None:
        return family
    raise ValueError(
        f"Cannot tell the family of a model with fusion_type={config.fusion_type!r}: pass family= one of {FAMILIES}."
    )


def load_recipe(stage: str, model: nn.Module | None = None, family: str | None = None, **overrides) -> Recipe:
    """The recipe of `stage` (`"pretrain"`, `"finetune"`, `"lora"`, `"qlora"`) for `model`'s family (or `family`),
    with the original scripts' defaults and `overrides` (any [`Recipe`] field, e.g. `model_max_length=320`,
    `learning_rate=1e-4`, `ms_cross_attn_lr=None`).

    With `model`, its forward is set up for the stage at once ([`Recipe.set_up_forward`]), so that
    `model(**recipe.collate(items)).loss` is the original's loss even before [`Recipe.prepare_model`].

    Raises `ValueError` for an unknown stage or family, an unknown override, or a learning-rate option the family's
    original code does not have (e.g. `mm_projector_lr` for MMFuser).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}.")
    if family is None:
        if model is None:
            raise ValueError("load_recipe needs `model` or `family=`.")
        family = detect_family(model)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}.")
    fields = {f.name for f in dataclasses.fields(Recipe) if not f.name.startswith("_")} - {"family", "stage"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"load_recipe got unknown overrides {unknown}; the recipe fields are {sorted(fields)}.")
    for option in parameters.LR_OPTION_ROLES:
        if overrides.get(option) is not None and option not in FAMILY_LR_OPTIONS[family]:
            raise ValueError(
                f"{option}: the original {family} code has no such option (it has {FAMILY_LR_OPTIONS[family]}), "
                f"got {option}={overrides[option]}."
            )
    recipe = Recipe(family=family, stage=stage, **{**RECIPE_DEFAULTS[family][stage], **overrides})
    if model is not None:
        recipe.set_up_forward(model)
    return recipe


__all__ = ["FAMILIES", "RECIPE_DEFAULTS", "STAGES", "Recipe", "detect_family", "load_recipe"]
