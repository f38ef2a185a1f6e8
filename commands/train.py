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
"""`llava-multilayer train`: one stage of a paper's recipe (`--recipe pretrain|finetune|lora|qlora`) with the
original scripts' defaults; every flag left out keeps the recipe's value. Runs unchanged under `accelerate launch`,
`torchrun` and `deepspeed` (see docs/training.md).

    llava-multilayer train --recipe pretrain --model MODEL --data blip_laion_cc_sbu_558k.json \\
        --image-folder LCS-558K/images --output-dir stage1
    llava-multilayer train --recipe finetune --model stage1 --data llava_v1_5_mix665k.json \\
        --image-folder data --output-dir stage2
"""

from __future__ import annotations

import argparse

from llava_multilayer.conversion.families import FAMILY_MODULES

from .errors import CommandError


#: Flags that override a `Recipe` field (flag destination -> field), left out = the recipe's default.
RECIPE_FLAGS = {
    "model_max_length": int,
    "learning_rate": float,
    "weight_decay": float,
    "mm_projector_lr": float,
    "ms_cross_attn_lr": float,
    "cross_attn_lr": float,
    "warmup_ratio": float,
    "warmup_steps": int,
    "num_train_epochs": float,
    "max_steps": int,
    "per_device_train_batch_size": int,
    "gradient_accumulation_steps": int,
    "lora_r": int,
    "lora_alpha": int,
    "lora_dropout": float,
    "save_steps": int,
    "save_total_limit": int,
    "logging_steps": int,
}


def _bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the `llava-multilayer train` flags to `parser` and returns it."""
    parser.add_argument(
        "--recipe", required=True, choices=["pretrain", "finetune", "lora", "qlora"], help="The training stage."
    )
    parser.add_argument("--model", required=True, help="Checkpoint directory / Hub id (stage 2: stage 1's output).")
    parser.add_argument("--data", required=True, help="Records: .json / .jsonl (LLaVA format) or a datasets name.")
    parser.add_argument("--data-split", default="train", help="Split of a datasets dataset (default: train).")
    parser.add_argument("--streaming", action="store_true", help="Stream a datasets dataset (needs --max-steps).")
    parser.add_argument("--image-folder", help="Root of the records' relative image paths.")
    parser.add_argument(
        "--sentence-embed-folder", help="IGVA: folder of the precomputed instruction embeddings (`sentence_embed`)."
    )
    parser.add_argument(
        "--sentence-encoder",
        help="IGVA stage 2 from a stage-1 model: the instruction encoder (sentence-transformers).",
    )
    parser.add_argument("--output-dir", required=True, help="Checkpoints and the final model + processor.")
    parser.add_argument(
        "--family", choices=list(FAMILY_MODULES), help="Original codebase of the recipe, when it cannot be detected."
    )
    for name, kind in RECIPE_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help="(default: the recipe's)")
    parser.add_argument("--bf16", type=_bool, help="bfloat16 mixed precision (default: the recipe's, True).")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="Dtype the model is loaded in (default: float32; bfloat16 with DeepSpeed or for LoRA's frozen weights).",
    )
    parser.add_argument("--gradient-checkpointing", type=_bool, help="(default: the recipe's, True).")
    parser.add_argument(
        "--group-by-modality-length", type=_bool, help="Original length-grouped sampler (default: the recipe's)."
    )
    parser.add_argument("--resume-from-checkpoint", nargs="?", const=True, help="A checkpoint-N dir, or the last one.")
    parser.add_argument("--seed", type=int, default=42, help="(default: 42).")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON config (examples/deepspeed_zero2.json, _zero3.json).")
    parser.add_argument("--dataloader-num-workers", type=int, default=0, help="(default: 0).")
    parser.add_argument(
        "--report-to", default="none", help="Trainer loggers, e.g. tensorboard, wandb (default: none)."
    )
    parser.add_argument("--use-cpu", action="store_true", help="Train on the CPU even when a GPU is present.")
    return parser


def run_train(args: argparse.Namespace) -> int:
    """Runs `llava-multilayer train` from the namespace `add_train_arguments` parses; returns 0."""
    from llava_multilayer.training import RecordError, train

    overrides = {name: getattr(args, name) for name in RECIPE_FLAGS if getattr(args, name) is not None}
    for name in ("bf16", "gradient_checkpointing", "group_by_modality_length"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    training_arguments = {
        "dataloader_num_workers": args.dataloader_num_workers,
        "report_to": args.report_to,
        "use_cpu": args.use_cpu,
    }
    if args.deepspeed:
        training_arguments["deepspeed"] = args.deepspeed
    try:
        train(
            args.model,
            args.data,
            args.output_dir,
            args.recipe,
            image_folder=args.image_folder,
            instruction_embeds_folder=args.sentence_embed_folder,
            family=args.family,
            resume_from_checkpoint=args.resume_from_checkpoint,
            seed=args.seed,
            data_split=args.data_split,
            streaming=args.streaming,
            sentence_encoder=args.sentence_encoder,
            dtype=args.dtype,
            recipe_overrides=overrides,
            **training_arguments,
        )
    except (RecordError, ValueError, FileNotFoundError) as error:
        raise CommandError(str(error)) from error
    return 0


__all__ = ["add_train_arguments", "run_train"]
