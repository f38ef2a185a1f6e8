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
"""The command line every family converter shares: its flags and how a conversion ends (verification and parity
results, the upload with `--push-to-hub`, the output path)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from .pipeline import ConversionReport
from .writing import CAST_DTYPES, DEFAULT_MAX_SHARD_SIZE


logger = logging.getLogger(__name__)


def finish_command(args: argparse.Namespace, report: ConversionReport) -> None:
    """The end of every converter's command line: the verification and parity results, the upload with
    --push-to-hub, and the output path, last."""
    from llava_multilayer.commands.push import upload

    if report.verified:
        print(f"Verified {report.num_verified_tensors} tensors: each reloaded tensor equals its source.")
    if report.parity:
        logger.info("Parity: %s", report.parity)
    if args.push_to_hub:
        print(f"Uploaded to {upload(args.output_dir, args.push_to_hub, private=args.private)}")
    print(f"Wrote {args.output_dir}")


def converter_parser(
    description: str, add_family_arguments: Callable[[argparse.ArgumentParser], None] | None, prog: str | None
) -> argparse.ArgumentParser:
    """The command line of a family converter: the common flags, then the family's own."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser)
    if add_family_arguments is not None:
        add_family_arguments(parser.add_argument_group("flags of this family"))
    return parser


def add_common_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The flags every family converter shares (`required=False`: `--input-dir` / `--output-dir` are checked by the
    caller)."""
    parser.add_argument(
        "--input-dir", required=required, help="Checkpoint directory written by the original training code."
    )
    parser.add_argument("--output-dir", required=required, help="Where to write the Hub-format checkpoint.")
    parser.add_argument(
        "--pretrain-dir",
        help="Pretraining-stage output directory (config.json + the stage's module files, e.g. mm_projector.bin); "
        "--input-dir is then the base language model.",
    )
    parser.add_argument(
        "--vision-tower",
        help="Local directory or hub id of the vision tower (overrides the config's `mm_vision_tower`).",
    )
    parser.add_argument("--dtype", choices=sorted(CAST_DTYPES), help="Cast floating-point weights (default: keep).")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="Upload the converted checkpoint to this repo.")
    parser.add_argument("--private", action="store_true", help="With --push-to-hub: create a private repo.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output-dir.")
    parser.add_argument(
        "--verify", action="store_true", help="Reload the output and compare every tensor to the source."
    )
    parser.add_argument(
        "--parity-fixture",
        help="Directory with inputs.safetensors/expected.safetensors/image.png/prompt.json from the original code; "
        "the converter checks the converted model against it and records the numbers in the model card.",
    )
    parser.add_argument("--max-shard-size", type=int, default=DEFAULT_MAX_SHARD_SIZE, help="Bytes per output shard.")
