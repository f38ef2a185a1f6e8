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
"""`llava-multilayer evaluate DIR --tasks TASKS`: runs lmms-eval on a converted checkpoint (needs
`pip install "llava-multilayer[eval]"`).

    llava-multilayer evaluate OUT --tasks pope,mme [--batch-size 1] [--limit N] [--output-path DIR]
        [--model-args dtype=bfloat16,attn_implementation=sdpa] [--log-samples] [--include-path TASK_DIR]

The same as `python -m lmms_eval --model llava_multilayer --model_args pretrained=OUT,... --tasks TASKS ...`
(docs/evaluation.md lists each paper's tasks). The scores land in `OUTPUT_PATH/<model name>/<date>_results.json`
(and `<date>_samples_<task>.jsonl` with --log-samples).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

from .errors import CommandError, check_model_dir


INSTALL = 'pip install "llava-multilayer[eval]"'
DEFAULT_OUTPUT_PATH = "evaluation_results"


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="DIR", help="Converted checkpoint directory or Hub repo id.")
    parser.add_argument("--tasks", required=True, help="Comma-separated lmms-eval task names (e.g. pope,mme).")
    parser.add_argument("--batch-size", type=int, default=1, help="Documents per forward pass (default: 1).")
    parser.add_argument("--limit", type=float, help="Documents per task (a fraction below 1); for quick checks.")
    parser.add_argument(
        "--output-path",
        default=DEFAULT_OUTPUT_PATH,
        help=f"Where lmms-eval writes the results (default: {DEFAULT_OUTPUT_PATH}).",
    )
    parser.add_argument(
        "--model-args",
        default="",
        help="More adapter arguments, comma-separated key=value (dtype, device, attn_implementation, "
        "instruction_field, loglikelihood, ...; see evaluation/lmms_eval_model.py).",
    )
    parser.add_argument("--log-samples", action="store_true", help="Also write every document's responses.")
    parser.add_argument("--include-path", help="A directory of extra lmms-eval task YAML files.")


def lmms_eval_argv(args: argparse.Namespace) -> list[str]:
    """The `lmms-eval` command line that `evaluate` runs."""
    if "pretrained=" in args.model_args:
        raise CommandError.of(
            "--model-args",
            "adapter arguments other than pretrained",
            f"{args.model_args!r}",
            "pass the checkpoint as DIR: `llava-multilayer evaluate DIR --tasks ...`.",
            exit_code=2,
        )
    model_args = ",".join(part for part in (f"pretrained={args.model}", args.model_args) if part)
    argv = [sys.executable, "-m", "lmms_eval", "--model", "llava_multilayer", "--model_args", model_args]
    argv += ["--tasks", args.tasks, "--batch_size", str(args.batch_size), "--output_path", args.output_path]
    if args.limit is not None:
        argv += ["--limit", f"{args.limit:g}"]
    if args.log_samples:
        argv.append("--log_samples")
    if args.include_path:
        argv += ["--include_path", args.include_path]
    return argv


def run_evaluate(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise CommandError.of("--batch-size", "a positive integer", str(args.batch_size), exit_code=2)
    if importlib.util.find_spec("lmms_eval") is None:
        raise CommandError.of(
            "evaluate", "lmms-eval installed", "that it cannot be imported", f"`{INSTALL}`.", exit_code=1
        )
    check_model_dir("DIR", args.model, "evaluate")
    output_path = Path(args.output_path)
    before = set(output_path.rglob("*_results.json")) if output_path.is_dir() else set()
    status = subprocess.run(lmms_eval_argv(args)).returncode
    if status != 0:
        return status
    written = sorted(set(output_path.rglob("*_results.json")) - before)
    if not written:
        # lmms-eval 0.7.3 logs an error and still exits with status 0: no results file is the sign.
        raise CommandError.of(
            "evaluate",
            f"lmms-eval to write a *_results.json under {output_path}",
            "none (lmms-eval failed; its log above says why)",
        )
    print(f"Results: {written[-1]}", file=sys.stderr)
    return 0
