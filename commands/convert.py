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
(`llava_multilayer.conversion.convert_<family>_to_hf`) exposes `detect(original_config) -> bool`; exactly one must
accept the config, or `--family` names it. Every other flag goes unchanged to that converter's `main`;
`llava-multilayer convert --help` lists the common flags and, grouped, those of each family.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

from .errors import CommandError, check_output_dir, is_repo_id

#: Family name -> module of its converter, in detection order.
FAMILY_MODULES = {
    "mmfuser": "llava_multilayer.conversion.convert_mmfuser_to_hf",
    "layer_select_fuse": "llava_multilayer.conversion.convert_layer_select_fuse_to_hf",
    "igva": "llava_multilayer.conversion.convert_igva_to_hf",
}


class UnknownFamilyError(ValueError):
    """No converter (or more than one) accepts a checkpoint's config; the message says what was looked at."""


def load_family_module(family: str) -> ModuleType:
    """Imports the converter module of `family`.

    Raises:
        ValueError: `family` is not one of [`FAMILY_MODULES`].
        ModuleNotFoundError: the converter module is not part of this installation.
    """
    if family not in FAMILY_MODULES:
        raise ValueError(f"Unknown family {family!r}; known families: {', '.join(FAMILY_MODULES)}.")
    return importlib.import_module(FAMILY_MODULES[family])


def _available_family_modules() -> tuple[dict[str, ModuleType], dict[str, str]]:
    """The importable converter modules, and for the others the reason they could not be imported."""
    modules, unavailable = {}, {}
    for family, module_name in FAMILY_MODULES.items():
        try:
            modules[family] = load_family_module(family)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            unavailable[family] = f"{module_name} is not installed"
    return modules, unavailable


def _describe_config(original_config: dict) -> str:
    """The fields of an original config that are not plain LLaMA fields: what tells the families apart."""
    from transformers import AutoConfig

    llama_keys = set(AutoConfig.for_model("llama").to_dict())
    extra = sorted(key for key in original_config if key not in llama_keys)
    identity = {key: original_config.get(key) for key in ("model_type", "architectures")}
    return f"{identity}; non-LLaMA fields: {extra or 'none'}"


def detect_family(original_config: dict, source: str = "config.json") -> str:
    """The family whose converter's `detect` accepts `original_config` (the dict of an original config.json).

    Raises:
        UnknownFamilyError: no converter, or more than one, accepts the config. The message names the file, the
            families checked, the converters that are not installed, and the config's distinguishing fields.
    """
    modules, unavailable = _available_family_modules()
    matches = [family for family, module in modules.items() if module.detect(original_config)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UnknownFamilyError(
            f"{source} is accepted by the converters of several families ({', '.join(matches)}); pass --family to "
            f"choose one. Config: {_describe_config(original_config)}."
        )
    missing = f" Not checked (converter missing): {'; '.join(unavailable.values())}." if unavailable else ""
    raise UnknownFamilyError(
        f"{source} is not a checkpoint of a known family: the `detect` functions of "
        f"{', '.join(f'{family} ({FAMILY_MODULES[family]})' for family in modules)} all rejected it.{missing} "
        f"Config: {_describe_config(original_config)}. Pass the directory written by the original MMFuser, "
        "Layer_Select_Fuse or IGVA training code, or --family to force a converter."
    )


def family_of_directory(directory: str | Path) -> str:
    """[`detect_family`] applied to `directory/config.json`."""
    from llava_multilayer.conversion.conversion_utils import load_original_config

    return detect_family(load_original_config(directory), f"{Path(directory) / 'config.json'}")


PROG = "llava-multilayer convert"


def build_parser() -> argparse.ArgumentParser:
    """The flags of `convert`: the common ones, then those of each family, grouped."""
    from llava_multilayer.conversion.conversion_utils import add_common_arguments

    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--family", choices=sorted(FAMILY_MODULES), help="Skip auto-detection and use this family's converter."
    )
    add_common_arguments(parser, required=False)
    modules, _ = _available_family_modules()
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
