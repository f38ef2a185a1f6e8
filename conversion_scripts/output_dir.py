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
"""Atomic output directories with ordinary permissions, shared by `convert`, `merge-lora` and `finetune`.

A command writes into a hidden staging directory next to `--output-dir`; the staging directory becomes
`--output-dir` only once everything succeeded (a previous `--output-dir` is removed only then), and its mode and the
modes of everything in it follow the umask (0755 / 0644 under umask 022), not the 0700 of a temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path


def current_umask() -> int:
    """The process umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(directory: Path) -> None:
    """Gives `directory` and everything in it the modes a plain `mkdir` / `open` would have: 0o777 (executable
    files and directories) or 0o666 (other files), less the umask. Links are left alone."""
    mask = current_umask()
    os.chmod(directory, 0o777 & ~mask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            executable = os.stat(path).st_mode & stat.S_IXUSR
            os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def created_parents(directory: Path) -> list[Path]:
    """The ancestors of `directory` that do not exist yet, deepest first."""
    return [parent for parent in directory.parents if not parent.exists()]


def remove_empty(directories: list[Path]) -> None:
    """Removes each of `directories` (deepest first) that exists and is empty."""
    for directory in directories:
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()


def replace_directory(output_dir: Path, staging: Path) -> None:
    """Moves `staging` to `output_dir`; a previous `output_dir` is removed only once the new one is in place."""
    if not output_dir.exists() and not output_dir.is_symlink():
        staging.rename(output_dir)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old.", dir=output_dir.parent)) / output_dir.name
    output_dir.rename(backup)
    try:
        staging.rename(output_dir)
    except BaseException:
        backup.rename(output_dir)
        shutil.rmtree(backup.parent, ignore_errors=True)
        raise
    shutil.rmtree(backup.parent)


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Yields a staging directory that becomes `output_dir` (with [`apply_umask`] modes) when the block succeeds;
    on any error the staging directory and the parents created for it are removed, and `output_dir` is untouched.

    Whether an existing `output_dir` may be replaced is the caller's decision, taken before."""
    output_dir = Path(output_dir)
    new_parents = created_parents(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        yield staging
        apply_umask(staging)
        replace_directory(output_dir, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        remove_empty(new_parents)
        raise


__all__ = ["apply_umask", "atomic_output_dir", "created_parents", "current_umask", "remove_empty", "replace_directory"]
