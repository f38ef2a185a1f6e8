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
"""LoRA / QLoRA finetuning of multi-layer fusion LLaVA models with `peft` and the transformers `Trainer`, and merging
the result into a full checkpoint.

What is trained (LLaVA-1.5's LoRA recipe, with the fusion modules in the role of its `mm_projector`):

- LoRA adapters on the language model's linear layers (`q/k/v/o_proj`, `gate/up/down_proj` of every decoder layer;
  [`LORA_TARGET_MODULES`]), not on the internal cross-fusion modules;
- fully: the external fuser + projector (`model.multi_modal_projector`), the internal projectors, and the internal
  cross-fusion modules (`cross_attn`, `cross_mlp` and their norms) through peft's `modules_to_save`; the two
  cross-fusion gates of each layer are bare parameters, which peft cannot wrap, and are trained and saved beside
  the adapter (`non_lora_trainables.safetensors`, as the original code's `non_lora_trainables.bin`);
- frozen: the vision tower, the instruction encoder, the embeddings and `lm_head`.

Python API: [`finetune`], [`load_finetuned_model`], [`merge_lora`].

Command line (`commands/cli.py` wires these as sub-commands; each pair is independent of the parser it is given):

- `add_finetune_arguments(parser)` adds the `llava-multilayer finetune` flags to an `argparse` (sub)parser;
  `run_finetune(args)` runs it from the parsed namespace and returns the exit code (0).
- `add_merge_arguments(parser)` / `run_merge(args)` do the same for `llava-multilayer merge-lora`.

Both run unchanged under `accelerate launch` / `torchrun` / `deepspeed` (see docs/finetuning.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

import llava_multilayer
from llava_multilayer import (
    LlavaMultiLayerConfig,
    LlavaMultiLayerForConditionalGeneration,
    LlavaMultiLayerProcessor,
)
from llava_multilayer.compatibility_llava_multilayer import checkpointing_training_arguments
from llava_multilayer.conversion.model_card import write_merged_model_card
from llava_multilayer.conversion.output_dir import atomic_output_dir, created_parents, remove_empty
from llava_multilayer.conversion.pipeline import describe_location
from llava_multilayer.fusion_registry_llava_multilayer import original_family
from llava_multilayer.module_roles_llava_multilayer import (
    fully_trained_modules,
    fully_trained_parameters,
    quantization_skip_modules,
)

from .errors import CommandError, check_model_dir, check_output_dir, is_repo_id
from .finetune_data import ConversationCollator, ConversationDataset, load_records, to_messages


#: What `finetune` records about a run next to the adapter (read by `merge-lora` for the merged model card).
FINETUNE_RECORD_NAME = "finetune_record.json"
#: What `merge-lora` records about a merge (family, base model, adapter, training data); `inspect` reads it.
MERGE_RECORD_NAME = "merge_report.json"


#: LoRA targets: the language model's own linear layers. `peft` full-matches this against module names, so the
#: internal cross-fusion modules (`...layers.N.cross_attn.q_proj`, `...cross_mlp.gate_proj`) are not targets.
LORA_TARGET_MODULES = (
    r"model\.language_model\.layers\.\d+\."
    r"(?:self_attn\.(?:q_proj|k_proj|v_proj|o_proj)|mlp\.(?:gate_proj|up_proj|down_proj))"
)
#: Trainable parameters that are not modules (the cross-fusion gates), saved beside the adapter.
NON_LORA_TRAINABLES_NAME = "non_lora_trainables.safetensors"


# --------------------------------------------------------------------------------------------------------------
# The LoRA recipe (what is trained in full and what stays unquantized: `module_roles_llava_multilayer`)
# --------------------------------------------------------------------------------------------------------------


def build_lora_config(config: LlavaMultiLayerConfig, r: int = 128, alpha: int = 256, dropout: float = 0.05):
    """The `peft.LoraConfig` of the recipe above (defaults: LLaVA-1.5's `finetune_lora.sh`, r=128, alpha=256)."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=LORA_TARGET_MODULES,
        modules_to_save=fully_trained_modules(config),
        bias="none",
        task_type="CAUSAL_LM",
    )


# --------------------------------------------------------------------------------------------------------------
# Loading and wrapping
# --------------------------------------------------------------------------------------------------------------


def load_model_for_training(
    model_name_or_path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    load_in_4bit: bool = False,
    attn_implementation: str | None = None,
) -> LlavaMultiLayerForConditionalGeneration:
    """Loads the base model in `dtype`; with `load_in_4bit`, the language model's linear layers in 4-bit NF4 (double
    quantization, bfloat16 compute) and everything else unquantized (see [`quantization_skip_modules`])."""
    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        from accelerate import PartialState
        from transformers import BitsAndBytesConfig

        config = LlavaMultiLayerConfig.from_pretrained(model_name_or_path)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=quantization_skip_modules(config),
        )
        if torch.cuda.is_available():
            # One full copy per process (data parallel): each on its own GPU.
            kwargs["device_map"] = {"": PartialState().local_process_index}
    return LlavaMultiLayerForConditionalGeneration.from_pretrained(model_name_or_path, **kwargs)


def prepare_model_for_finetuning(
    model: LlavaMultiLayerForConditionalGeneration,
    lora_config=None,
    gradient_checkpointing: bool = True,
):
    """Wraps `model` in a `peft.PeftModel` for the recipe above and returns it (`model` is modified in place).

    Trainable parameters (LoRA weights, the fully trained modules and gates) are kept in float32, whatever the dtype
    of the frozen weights; a quantized model first goes through `peft.prepare_model_for_kbit_training`, which also
    enables gradient checkpointing when `gradient_checkpointing` is set (otherwise the `Trainer` enables it).
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    if lora_config is None:
        lora_config = build_lora_config(model.config)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    peft_model = get_peft_model(model, lora_config)
    for name in fully_trained_parameters(model.config):
        model.get_parameter(name).requires_grad_(True)
    for parameter in peft_model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return peft_model


@contextlib.contextmanager
def _gathered(parameters: list[torch.nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Makes DeepSpeed ZeRO-3 partitioned parameters whole inside the block (for reading, or for writing from
    `modifier_rank`); a no-op otherwise. Must be entered on every rank."""
    if any(hasattr(parameter, "ds_id") for parameter in parameters):
        import deepspeed

        with deepspeed.zero.GatheredParameters(parameters, modifier_rank=modifier_rank):
            yield
    else:
        yield


def non_lora_trainables_state_dict(model) -> dict[str, torch.Tensor]:
    """The trainable bare parameters (cross-fusion gates) of a peft-wrapped model, by full base-model name, on CPU.

    Under DeepSpeed ZeRO-3 or FSDP2 the parameters are gathered first, so every rank must call this.
    """
    base = model.get_base_model()
    names = fully_trained_parameters(base.config)
    parameters = [base.get_parameter(name) for name in names]
    state = {}
    with _gathered(parameters):
        for name, parameter in zip(names, parameters):
            if hasattr(parameter, "full_tensor"):  # an FSDP2-sharded DTensor
                parameter = parameter.full_tensor()
            state[name] = parameter.detach().float().cpu().clone()
    return state


def load_non_lora_trainables(model, directory: str | os.PathLike) -> None:
    """Loads `non_lora_trainables.safetensors` of `directory` (if the model has such parameters) into `model`."""
    base = model.get_base_model()
    names = fully_trained_parameters(base.config)
    if not names:
        return
    path = Path(directory) / NON_LORA_TRAINABLES_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {NON_LORA_TRAINABLES_NAME}: the trained cross-fusion gates of this model are missing."
        )
    state = load_file(path)
    missing = sorted(set(names) - set(state))
    if missing:
        raise ValueError(f"{path} lacks {missing}.")
    parameters = [base.get_parameter(name) for name in names]
    with _gathered(parameters, modifier_rank=0), torch.no_grad():
        for name, parameter in zip(names, parameters):
            parameter.copy_(state[name].to(parameter.dtype))


class LlavaMultiLayerTrainer(Trainer):
    """`Trainer` that also writes [`NON_LORA_TRAINABLES_NAME`] next to every saved adapter (checkpoints and the
    final save), when the model has trainable parameters peft does not save."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        model = self.accelerator.unwrap_model(self.model)
        if not fully_trained_parameters(model.get_base_model().config):
            return
        state = non_lora_trainables_state_dict(model)
        if self.args.should_save:
            save_file(state, Path(output_dir or self.args.output_dir) / NON_LORA_TRAINABLES_NAME)


# --------------------------------------------------------------------------------------------------------------
# Finetuning
# --------------------------------------------------------------------------------------------------------------


def finetune(
    model: str | os.PathLike | PreTrainedModel,
    data,
    output_dir: str | os.PathLike,
    *,
    image_folder: str | os.PathLike | None = None,
    processor: LlavaMultiLayerProcessor | None = None,
    lora_r: int = 128,
    lora_alpha: int = 256,
    lora_dropout: float = 0.05,
    max_steps: int = -1,
    num_train_epochs: float = 1.0,
    learning_rate: float = 2e-4,
    per_device_batch_size: int = 4,
    gradient_accumulation_steps: int = 1,
    bf16: bool = False,
    dtype: torch.dtype | str | None = None,
    gradient_checkpointing: bool = True,
    load_in_4bit: bool = False,
    resume_from_checkpoint: str | bool | None = None,
    seed: int = 42,
    max_length: int | None = 2048,
    data_split: str = "train",
    attn_implementation: str | None = None,
    **training_kwargs,
) -> Trainer:
    """LoRA (or, with `load_in_4bit`, QLoRA) finetuning; writes the adapter, the fully trained fusion modules and the
    processor to `output_dir` (plus `checkpoint-N/` folders) and returns the `Trainer`.

    Args:
        model: Directory / Hub id of a `LlavaMultiLayerForConditionalGeneration` checkpoint, or the model itself
            (not quantized; `load_in_4bit` needs a path). The processor is loaded from the same place unless given.
        data: Training records ([`load_records`](finetune_data): a `.json`/`.jsonl` file in LLaVA or chat-message
            format, a list of records, a `datasets.Dataset` or a Hub dataset name).
        output_dir: Where the adapter and the checkpoints go.
        image_folder: Root of the records' relative image paths.
        processor: The model's processor (loaded from `model` when it is a path).
        lora_r, lora_alpha, lora_dropout: LoRA hyper-parameters (defaults: LLaVA-1.5's LoRA script).
        max_steps: Optimizer steps; `-1` trains `num_train_epochs` epochs.
        learning_rate: Peak learning rate (cosine schedule, 3% warm-up) of all trained parameters.
        per_device_batch_size, gradient_accumulation_steps: Batch size per process and accumulation steps.
        bf16: Train under bfloat16 mixed precision (autocast; the trained weights stay float32).
        dtype: Dtype of the frozen weights (`torch.dtype` or its name): defaults to bfloat16 with `bf16` or
            `load_in_4bit`, else float32. Use float32 with FSDP, which needs one dtype per wrapped unit.
        gradient_checkpointing: Recompute decoder/vision layer activations in the backward pass.
        load_in_4bit: QLoRA: the language model's linear layers in 4-bit NF4 (bitsandbytes).
        resume_from_checkpoint: A `checkpoint-N` directory, or `True` for the last one in `output_dir`.
        seed: Seed of the LoRA initialisation, data order and dropout.
        max_length: Sequences are cut to this many tokens.
        data_split: Split to use when `data` names a Hub dataset.
        attn_implementation: E.g. `"sdpa"` or `"flash_attention_2"` (default: transformers' choice).
        training_kwargs: Any other `TrainingArguments` field (e.g. `deepspeed`, `logging_steps`, `save_steps`,
            `report_to`, `fsdp`), overriding the defaults set here.
    """
    set_seed(seed)
    if dtype is None:
        dtype = torch.bfloat16 if bf16 or load_in_4bit else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    mixed_precision = bf16 or training_kwargs.get("fp16", False)
    if dtype != torch.float32 and not (mixed_precision or load_in_4bit):
        raise ValueError(
            f"`dtype={dtype}` frozen weights need mixed precision, since the trained weights are float32: pass "
            "`bf16=True` (--bf16)."
        )
    if isinstance(model, (str, os.PathLike)):
        model_path = str(Path(model).resolve()) if Path(model).is_dir() else str(model)
        if processor is None:
            processor = LlavaMultiLayerProcessor.from_pretrained(model_path)
        model = load_model_for_training(model_path, dtype, load_in_4bit, attn_implementation)
    elif load_in_4bit:
        raise ValueError("`load_in_4bit=True` needs `model` as a path: the model is quantized while it loads.")
    elif processor is None:
        raise ValueError("Pass `processor` when `model` is a model instance (which is modified in place).")
    else:
        model = model.to(dtype)

    peft_model = prepare_model_for_finetuning(
        model, build_lora_config(model.config, lora_r, lora_alpha, lora_dropout), gradient_checkpointing
    )
    dataset = ConversationDataset(load_records(data, data_split), processor, image_folder, max_length)
    instruction_tokenizer = getattr(processor, "instruction_tokenizer", None)
    collator = ConversationCollator(
        pad_token_id=processor.tokenizer.pad_token_id,
        instruction_pad_token_id=instruction_tokenizer.pad_token_id if instruction_tokenizer is not None else 0,
    )
    arguments = {
        "output_dir": str(output_dir),
        "max_steps": max_steps,
        "num_train_epochs": num_train_epochs,
        "learning_rate": learning_rate,
        "per_device_train_batch_size": per_device_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "bf16": bf16,
        **checkpointing_training_arguments(gradient_checkpointing, {"use_reentrant": False}),
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03,
        "weight_decay": 0.0,
        "seed": seed,
        "logging_steps": 10,
        "save_steps": 500,
        "save_total_limit": 2,
        "remove_unused_columns": False,
        "label_names": ["labels"],
        # Text-only batches leave the fusion modules without gradients, which DDP must be told about.
        "ddp_find_unused_parameters": True,
        "report_to": "none",
        **training_kwargs,
    }
    trainer = LlavaMultiLayerTrainer(
        model=peft_model,
        args=TrainingArguments(**arguments),
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
    )
    if resume_from_checkpoint is True:
        resume_from_checkpoint = get_last_checkpoint(str(output_dir))
        if resume_from_checkpoint is None:
            raise FileNotFoundError(f"--resume-from-checkpoint: {output_dir} holds no checkpoint-N folder.")
    if resume_from_checkpoint:
        load_non_lora_trainables(peft_model, resume_from_checkpoint)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint or None)
    if trainer.is_fsdp_enabled:
        # Checkpoints may be sharded; the final adapter is written whole (peft's FSDP recipe).
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(output_dir))
    if trainer.args.should_save:
        record = {"training_data": _data_name(data), "data_split": data_split, "num_records": len(dataset)}
        record.update(lora_r=lora_r, lora_alpha=lora_alpha, steps=trainer.state.global_step)
        (Path(output_dir) / FINETUNE_RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return trainer


def _data_name(data) -> str | None:
    """The name of the training data as it may be published: a file's name (not its path) or a Hub dataset id."""
    if isinstance(data, (str, os.PathLike)):
        return Path(data).name if Path(data).exists() else str(data)
    info = getattr(data, "info", None)
    return getattr(info, "dataset_name", None)


def load_finetuned_model(
    adapter_dir: str | os.PathLike,
    base_model: str | os.PathLike | PreTrainedModel | None = None,
    dtype: torch.dtype | str = "auto",
    is_trainable: bool = False,
):
    """The base model with a finetuned adapter (and its trained fusion modules and gates) applied: a `PeftModel`.

    Args:
        adapter_dir: A directory written by [`finetune`] (or one of its `checkpoint-N` folders).
        base_model: The base model or where it loads from; defaults to the adapter's `base_model_name_or_path`.
            Its cross-fusion gates, if any, are overwritten with the trained ones.
        dtype: Dtype of the base model when it is loaded here.
        is_trainable: Keep the adapter trainable (to continue training).
    """
    from peft import PeftConfig, PeftModel

    if base_model is None:
        base_model = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
        if not base_model:
            raise ValueError(f"{adapter_dir}/adapter_config.json names no base model: pass `base_model`.")
    if not isinstance(base_model, PreTrainedModel):
        base_model = LlavaMultiLayerForConditionalGeneration.from_pretrained(base_model, dtype=dtype)
    model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=is_trainable)
    load_non_lora_trainables(model, adapter_dir)
    return model


def merge_lora(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    base_model: str | os.PathLike | None = None,
    dtype: torch.dtype | str = "auto",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> Path:
    """Merges a finetuned adapter into its base model and writes a full checkpoint (weights, config, remote code,
    processor, a model card and [`MERGE_RECORD_NAME`]) that loads with `from_pretrained`. Returns `output_dir`.

    The output appears only when everything succeeded, as `convert`'s does; an existing non-empty `output_dir` is
    replaced only with `overwrite`. The base is loaded unquantized: a QLoRA adapter is merged into the
    full-precision weights (which differ slightly from the 4-bit weights it was trained against).

    Args:
        adapter_dir: A directory written by [`finetune`] (or one of its `checkpoint-N` folders).
        output_dir: Where the merged checkpoint is written.
        base_model: Where the base model loads from; defaults to the adapter's `base_model_name_or_path`.
        dtype: Dtype of the base model, and so of the merged checkpoint (`"auto"`: the base checkpoint's).
        max_shard_size: Largest weight file written.
        overwrite: Replace a non-empty `output_dir`.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"--output-dir {output_dir} exists and is not empty; pass --overwrite to replace it.")
    model = load_finetuned_model(adapter_dir, base_model, dtype)
    base_path = model.peft_config["default"].base_model_name_or_path if base_model is None else base_model
    # The fully trained modules were float32: give the checkpoint the base model's single dtype.
    merged = model.merge_and_unload()
    merged = merged.to(merged.get_input_embeddings().weight.dtype)
    merged.config._name_or_path = ""  # the base's local path: config.json travels to the Hub
    processor_dir = adapter_dir if (Path(adapter_dir) / "processor_config.json").is_file() else base_path
    processor = LlavaMultiLayerProcessor.from_pretrained(str(processor_dir))
    record = merge_record(adapter_dir, base_path, base_model is not None, merged.config)
    with atomic_output_dir(output_dir) as staging:
        merged.save_pretrained(staging, max_shard_size=max_shard_size)
        processor.save_pretrained(staging)
        (staging / MERGE_RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
        write_merged_model_card(staging, record)
    return output_dir


def merge_record(adapter_dir: str | os.PathLike, base_path: str, base_given: bool, config) -> dict:
    """What a merged checkpoint records about itself, without local paths: family, base model, adapter, data."""
    adapter_dir = Path(adapter_dir)
    finetune_record = {}
    for directory in (adapter_dir, adapter_dir.parent):
        if (directory / FINETUNE_RECORD_NAME).is_file():
            finetune_record = json.loads((directory / FINETUNE_RECORD_NAME).read_text(encoding="utf-8"))
            break
    base_report = {}
    for name in ("conversion_report.json", MERGE_RECORD_NAME):
        if Path(base_path, name).is_file():
            base_report = json.loads(Path(base_path, name).read_text(encoding="utf-8"))
            break
    family = base_report.get("family") or original_family(config)
    hub_base = [str(base_path)] if is_repo_id(str(base_path)) else list(base_report.get("base_model") or [])
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    return {
        "family": family,
        "base_model": describe_location(
            base_path, "--base-model" if base_given else "the adapter's base_model_name_or_path"
        ),
        "base_model_hub_ids": hub_base,
        "adapter": describe_location(adapter_dir, "--adapter-dir"),
        "lora_r": adapter_config.get("r"),
        "lora_alpha": adapter_config.get("lora_alpha"),
        "training_data": finetune_record.get("training_data"),
        "training_steps": finetune_record.get("steps"),
        "dtype": str(config.dtype).replace("torch.", "") if config.dtype is not None else None,
        "merged_by": f"llava-multilayer {llava_multilayer.__version__}",
        "date": datetime.date.today().isoformat(),
    }


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def add_finetune_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the `llava-multilayer finetune` flags to `parser` (a parser or sub-parser) and returns it."""
    parser.add_argument(
        "--model", required=True, help="Directory or Hub id of the llava_multilayer model to finetune."
    )
    parser.add_argument(
        "--data", required=True, help="Training data: .json/.jsonl (LLaVA or chat-message records) or a Hub dataset."
    )
    parser.add_argument("--image-folder", help="Root of the records' relative image paths.")
    parser.add_argument("--output-dir", required=True, help="Where the adapter and checkpoints are written.")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace a non-empty --output-dir once training has succeeded (a failed run leaves it as it was).",
    )
    parser.add_argument("--lora-r", type=int, default=128, help="LoRA rank (default: 128).")
    parser.add_argument("--lora-alpha", type=int, default=256, help="LoRA alpha (default: 256).")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default: 0.05).")
    parser.add_argument("--max-steps", type=int, default=-1, help="Optimizer steps (default: -1, use --epochs).")
    parser.add_argument("--epochs", type=float, default=1.0, help="Epochs when --max-steps is not set (default: 1).")
    parser.add_argument("--learning-rate", type=float, default=2e-4, help="Peak learning rate (default: 2e-4).")
    parser.add_argument("--per-device-batch-size", type=int, default=4, help="Batch size per process (default: 4).")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1, help="(default: 1).")
    parser.add_argument("--max-length", type=int, default=2048, help="Cut sequences to this many tokens (2048).")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision.")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="Dtype of the frozen weights (default: bfloat16 with --bf16 or --load-in-4bit, else float32).",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Recompute activations in the backward pass (default: on).",
    )
    parser.add_argument("--load-in-4bit", action="store_true", help="QLoRA: 4-bit NF4 language model (bitsandbytes).")
    parser.add_argument(
        "--resume-from-checkpoint",
        nargs="?",
        const=True,
        help="Resume from a checkpoint-N directory, or (no value) from the last one in --output-dir.",
    )
    parser.add_argument("--seed", type=int, default=42, help="Random seed (default: 42).")
    parser.add_argument("--data-split", default="train", help="Split of a Hub dataset (default: train).")
    parser.add_argument("--attn-implementation", help="e.g. sdpa, flash_attention_2 (default: transformers' choice).")
    parser.add_argument("--logging-steps", type=int, default=10, help="(default: 10).")
    parser.add_argument("--save-steps", type=int, default=500, help="Checkpoint every N steps (default: 500).")
    parser.add_argument("--save-total-limit", type=int, default=2, help="Checkpoints kept (default: 2).")
    parser.add_argument("--dataloader-num-workers", type=int, default=0, help="Data loading processes (default: 0).")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON config (e.g. examples/deepspeed_zero2.json).")
    parser.add_argument(
        "--report-to", default="none", help="Trainer loggers, e.g. tensorboard, wandb (default: none)."
    )
    return parser


def check_finetune_arguments(args: argparse.Namespace) -> None:
    """The cheap checks of `finetune`, run before the model is loaded: model, data, images, output directory."""
    check_model_dir("--model", args.model, "finetune")
    if args.image_folder is not None and not Path(args.image_folder).is_dir():
        state = "is a file" if Path(args.image_folder).exists() else "does not exist"
        found = f"{args.image_folder}, which {state}"
        raise CommandError.of("--image-folder", "the directory the records' image paths are relative to", found)
    data = Path(args.data)
    if data.is_dir() or (not data.exists() and (data.suffix in (".json", ".jsonl") or not is_repo_id(args.data))):
        found = f"{args.data}, which " + ("is a directory" if data.is_dir() else "does not exist")
        raise CommandError.of("--data", "a .json / .jsonl file of records or a Hub dataset name", found)
    if data.is_file():
        _check_images(load_records(data), args.image_folder)
    if args.resume_from_checkpoint is True and get_last_checkpoint(args.output_dir) is None:
        raise CommandError.of(
            "--resume-from-checkpoint",
            "an --output-dir holding a checkpoint-N folder of an earlier run",
            f"{args.output_dir}, which holds none" if Path(args.output_dir).is_dir() else f"no {args.output_dir}",
            "drop --resume-from-checkpoint to start afresh, or pass the --output-dir of the run to continue.",
        )
    if not args.resume_from_checkpoint:
        check_output_dir(args.output_dir, args.overwrite, "finetune")


def _check_images(records: list[dict], image_folder: str | None) -> None:
    """Checks that every local image file the records name exists (the first few missing ones are named)."""
    missing = []
    for record in records:
        _, images = to_messages(record)
        for image in images:
            if not isinstance(image, str) or image.startswith(("http://", "https://")):
                continue
            if not Path(image).is_absolute() and image_folder is None:
                raise CommandError.of(
                    "--image-folder", "the folder of the records' relative image paths", f"none, and {image!r}"
                )
            if not (Path(image_folder or "") / image).is_file():
                missing.append(image)
    if missing:
        raise CommandError.of(
            "--image-folder",
            "a folder holding every image the records name",
            f"{len(missing)} missing under {image_folder}: {', '.join(missing[:3])}" + ("..." if missing[3:] else ""),
            "pass the folder the records' image paths are relative to.",
        )


@contextlib.contextmanager
def _output_dir_of_run(output_dir: Path, replace: bool) -> Iterator[Path]:
    """Where a training run writes. With `replace`, a staging directory that replaces `output_dir` on success.
    Otherwise `output_dir` itself; if the run fails, what it added there is removed, except the `checkpoint-N`
    folders (resumable with --resume-from-checkpoint)."""
    if replace:
        with atomic_output_dir(output_dir) as staging:
            yield staging
        return
    new_parents = created_parents(output_dir) + ([] if output_dir.exists() else [output_dir])
    before = set(output_dir.iterdir()) if output_dir.is_dir() else set()
    try:
        yield output_dir
    except BaseException:
        if output_dir.is_dir():
            for path in set(output_dir.iterdir()) - before:
                if path.name.startswith("checkpoint-"):
                    continue
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        remove_empty([output_dir] + [parent for parent in new_parents if parent != output_dir])
        raise


def run_finetune(args: argparse.Namespace) -> int:
    """Runs `llava-multilayer finetune` from the namespace `add_finetune_arguments` parses; returns 0."""
    check_finetune_arguments(args)
    training_kwargs = {
        "logging_steps": args.logging_steps,
        "save_steps": args.save_steps,
        "save_total_limit": args.save_total_limit,
        "dataloader_num_workers": args.dataloader_num_workers,
        "report_to": args.report_to,
    }
    if args.deepspeed:
        training_kwargs["deepspeed"] = args.deepspeed
    output_dir = Path(args.output_dir)
    replace = args.overwrite and not args.resume_from_checkpoint and output_dir.exists() and any(output_dir.iterdir())
    with _output_dir_of_run(output_dir, replace) as run_dir:
        finetune(
            args.model,
            args.data,
            run_dir,
            image_folder=args.image_folder,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            max_steps=args.max_steps,
            num_train_epochs=args.epochs,
            learning_rate=args.learning_rate,
            per_device_batch_size=args.per_device_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            bf16=args.bf16,
            dtype=args.dtype,
            gradient_checkpointing=args.gradient_checkpointing,
            load_in_4bit=args.load_in_4bit,
            resume_from_checkpoint=args.resume_from_checkpoint,
            seed=args.seed,
            max_length=args.max_length,
            data_split=args.data_split,
            attn_implementation=args.attn_implementation,
            **training_kwargs,
        )
    print(f"Wrote {output_dir}")
    return 0


def add_merge_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the `llava-multilayer merge-lora` flags to `parser` and returns it."""
    parser.add_argument("--adapter-dir", required=True, help="Output (or checkpoint-N) directory of `finetune`.")
    parser.add_argument("--output-dir", required=True, help="Where the merged full checkpoint is written.")
    parser.add_argument("--base-model", help="Base model directory / Hub id (default: the adapter's own record).")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output-dir (on success).")
    parser.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="(default: the base's)."
    )
    return parser


def run_merge(args: argparse.Namespace) -> int:
    """Runs `llava-multilayer merge-lora` from the namespace `add_merge_arguments` parses; returns 0."""
    check_merge_arguments(args)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    merge_lora(args.adapter_dir, args.output_dir, base_model=args.base_model, dtype=dtype, overwrite=args.overwrite)
    print(f"Wrote {args.output_dir}")
    return 0


def check_merge_arguments(args: argparse.Namespace) -> None:
    """The cheap checks of `merge-lora`, run before any model is loaded: adapter, base model, output directory."""
    adapter = Path(args.adapter_dir)
    if not (adapter / "adapter_config.json").is_file():
        if not adapter.exists():
            found = f"{args.adapter_dir}, which does not exist"
        elif (adapter / "config.json").is_file():
            found = f"{args.adapter_dir}, which is a full model directory (config.json, no adapter_config.json)"
        else:
            found = f"{args.adapter_dir}, which has no adapter_config.json"
        raise CommandError.of(
            "--adapter-dir",
            "a LoRA adapter directory written by `llava-multilayer finetune` (with adapter_config.json)",
            found,
            "pass the --output-dir of `finetune` (or one of its checkpoint-N folders).",
        )
    base = args.base_model or json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise CommandError.of(
            "--base-model", "the base model", "none recorded in adapter_config.json", "pass --base-model."
        )
    check_model_dir("--base-model", base, "merge-lora")
    check_output_dir(args.output_dir, args.overwrite, "merge-lora")


__all__ = [
    "FINETUNE_RECORD_NAME",
    "LORA_TARGET_MODULES",
    "MERGE_RECORD_NAME",
    "NON_LORA_TRAINABLES_NAME",
    "LlavaMultiLayerTrainer",
    "add_finetune_arguments",
    "add_merge_arguments",
    "build_lora_config",
    "check_finetune_arguments",
    "check_merge_arguments",
    "finetune",
    "fully_trained_modules",
    "fully_trained_parameters",
    "load_finetuned_model",
    "load_model_for_training",
    "load_non_lora_trainables",
    "merge_lora",
    "merge_record",
    "non_lora_trainables_state_dict",
    "prepare_model_for_finetuning",
    "quantization_skip_modules",
    "run_finetune",
    "run_merge",
]
