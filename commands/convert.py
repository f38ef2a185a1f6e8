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
"""`llava-multilayer convert`: recognises the family of an original checkpoint and runs its converter.

    llava-multilayer convert --input-dir ORIGINAL_DIR --output-dir OUT_DIR [--vision-tower DIR_OR_HUB_ID] \\
        [--dtype bfloat16] [--verify] [--push-to-hub USER/REPO [--private]] [family flags ...]

The family is read from the checkpoint's `config.json` (from `--pretrain-dir` when that is given: a pretraining-stage
directory, whose `--input-dir` is then the base language model). Each family converter
(`llava_multilayer.conversion.convert_<family>_to_hf`, listed in `llava_multilayer.conversion.families`) exposes
`detect(original_config) -> bool`; exactly one must accept the config, or `--family` names it (the error names the
field at fault when a config almost matches a family). Every other flag goes unchanged to that converter's `main`;
`llava-multilayer convert --help` lists the common flags and, grouped, those of each family.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llava_multilayer.conversion.families import (
    FAMILY_MODULES,
    UnknownFamilyError,
    available_family_modules,
    detect_family,
    family_of_directory,
    load_family_module,
)

from .errors import CommandError, check_output_dir, is_repo_id


PROG = "llava-multilayer convert"


def build_parser() -> argparse.ArgumentParser:
    """The flags of `convert`: the common ones, then those of each family, grouped."""
    from llava_multilayer.conversion.cli import add_common_arguments

    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--family", choices=sorted(FAMILY_MODULES), help="Skip auto-detection and use this family's converter."
    )
    add_common_arguments(parser, required=False)
    modules, _ = available_family_modules()
    for family, module in modules.items():
        if module.add_arguments is not None:
            module.add_arguments(parser.add_argument_group(f"{family} only ({FAMILY_MODULES[family]})"))
    return parser


def _without_family_flag(argv: list[str]) -> list[str]:
    """`argv` without `--family NAME` / `--family=NAME` (the family converters do not know it)."""
    forwarded, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--family":
            skip = True
        elif not arg.startswith("--family="):
            forwarded.append(arg)
    return forwarded


def check_arguments(args: argparse.Namespace) -> None:
    """The cheap checks of `convert`, run before anything is read or written."""
    usage = f"{PROG} --input-dir ORIGINAL_DIR --output-dir OUT_DIR"
    for flag, value in (("--input-dir", args.input_dir), ("--output-dir", args.output_dir)):
        if value is None:
            raise CommandError.of(
                flag, "a directory (" + flag + " is required)", f"no {flag}", f"`{usage}`.", exit_code=2
            )
    directories = [("--pretrain-dir", args.pretrain_dir)]
    # With --pretrain-dir, --input-dir is the base language model, which may be a Hub repo id.
    if args.pretrain_dir is None or not is_repo_id(args.input_dir):
        directories.append(("--input-dir", args.input_dir))
    for flag, value in directories:
        if value is not None and not Path(value).is_dir():
            found = f"{value}, which " + ("is a file" if Path(value).exists() else "does not exist")
            raise CommandError.of(
                flag,
                "the checkpoint directory written by the original training code",
                found,
                f"check the path: `{usage}`.",
            )
    check_output_dir(args.output_dir, args.overwrite, "convert")


def run_convert(argv: list[str]) -> int:
    """Runs `llava-multilayer convert` with the arguments after the sub-command; returns the exit code."""
    args = build_parser().parse_args(argv)
    check_arguments(args)
    family = args.family
    if family is None:
        try:
            family = family_of_directory(args.pretrain_dir or args.input_dir)
        except ValueError as error:  # UnknownFamilyError, or ConversionError for a missing/invalid config.json
            raise CommandError(str(error)) from error
    how = "given by --family" if args.family else "detected"
    print(f"Family: {family} ({how}); converter: {FAMILY_MODULES[family]}", file=sys.stderr, flush=True)
    try:
        load_family_module(family).main(_without_family_flag(argv), prog=PROG)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return 0


__all__ = [
    "FAMILY_MODULES",
    "UnknownFamilyError",
    "detect_family",
    "family_of_directory",
    "load_family_module",
    "run_convert",
]
