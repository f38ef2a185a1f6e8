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
"""Errors of the command line, and the cheap checks every command runs before it loads a model.

Every mistake is reported in one style: one paragraph naming the argument, what was expected, what was found and
the command that fixes it; exit status 2 for a usage error, 1 for a failure. This module imports nothing heavy.
"""

from __future__ import annotations

import json
import re
from pathlib import Path


#: A Hub repo id (`name` or `owner/name`), as opposed to a local path.
REPO_ID_PATTERN = re.compile(r"[\w.-]+(/[\w.-]+)?")


class CommandError(Exception):
    """A mistake in what the user asked for, or a failure they can fix; `llava-multilayer` prints the message and
    exits with `exit_code` (2: usage error, 1: failure)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code

    @classmethod
    def of(cls, argument: str, expected: str, found: str, fix: str | None = None, exit_code: int = 1) -> CommandError:
        """The error in the command line's style: `ARGUMENT: expected ..., found .... To fix it: ...`."""
        message = f"{argument}: expected {expected}, found {found}."
        return cls(message + (f" To fix it: {fix}" if fix else ""), exit_code)


def is_repo_id(name: str) -> bool:
    """Whether `name` reads as a Hub repo id rather than a local path."""
    return bool(REPO_ID_PATTERN.fullmatch(name)) and not name.startswith(".") and not Path(name).exists()


def read_config(directory: Path) -> dict:
    """`directory/config.json` as a dict (`{}` when it is no JSON object)."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def check_model_dir(argument: str, name: str, command: str) -> None:
    """Checks that `name` is a converted llava-multilayer directory (or a Hub repo id, checked when it loads).

    An original checkpoint gets the `convert` command that turns it into one.
    """
    path = Path(name)
    if not path.exists():
        if is_repo_id(name):
            return
        raise CommandError.of(
            argument,
            "a converted llava-multilayer directory or a Hub repo id",
            f"{name}, which does not exist",
            "check the path; `llava-multilayer convert --input-dir ORIGINAL --output-dir OUT` writes such a "
            "directory.",
        )
    if not (path / "config.json").is_file():
        raise CommandError.of(
            argument,
            "a converted llava-multilayer directory (with config.json)",
            f"{name}, which has no config.json: it is no model directory",
            f"pass the --output-dir of `llava-multilayer convert`: `llava-multilayer {command} CONVERTED_DIR ...`.",
        )
    model_type = read_config(path).get("model_type")
    if model_type == "llava_multilayer":
        return
    family = _original_family(path)
    if family is not None:
        raise CommandError.of(
            argument,
            "a converted llava-multilayer directory",
            f"an original {family} checkpoint (written by the original training code)",
            f"convert it first: `llava-multilayer convert --input-dir {name} --output-dir {path.name}-hf`, then "
            f"`llava-multilayer {command} {path.name}-hf ...`.",
        )
    raise CommandError.of(
        argument,
        "a converted llava-multilayer directory (config.json with model_type 'llava_multilayer')",
        f"{name}, whose config.json has model_type {model_type!r}",
        "pass a directory written by `llava-multilayer convert`, `merge-lora` or `save_pretrained`.",
    )


def _original_family(directory: Path) -> str | None:
    """The family of an original checkpoint directory, or `None` when no converter recognises it."""
    from .convert import UnknownFamilyError, detect_family

    try:
        return detect_family(read_config(directory))
    except UnknownFamilyError:
        return None


def check_output_dir(output_dir: str, overwrite: bool, command: str) -> None:
    """Refuses an existing, non-empty `--output-dir` unless `--overwrite` (as `convert` does)."""
    path = Path(output_dir)
    if not path.exists() or overwrite:
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    raise CommandError.of(
        "--output-dir",
        "a new or empty directory",
        f"{output_dir}, which exists and is not empty",
        f"choose another --output-dir, or pass --overwrite to replace it once `{command}` has succeeded.",
    )


__all__ = ["CommandError", "check_model_dir", "check_output_dir", "is_repo_id", "read_config"]
