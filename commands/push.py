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
"""`llava-multilayer push DIR REPO`: uploads a converted or merged directory to the Hub.

    llava-multilayer push OUT USER/REPO [--private] [--commit-message TEXT]

Everything in the directory goes in one commit (Python caches and hidden files excepted); the model card's
`REPO_OR_DIR` placeholders become the repo id. `convert --push-to-hub` ends with this same upload, and says how to
retry it with this command when it fails.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import CommandError


def push_command(directory: str, repo_id: str, private: bool = False) -> str:
    """The `llava-multilayer push` command line that uploads `directory` to `repo_id`."""
    return f"llava-multilayer push {directory} {repo_id}" + (" --private" if private else "")


def hub_is_offline() -> bool:
    """Whether huggingface_hub is in offline mode (`HF_HUB_OFFLINE=1` or `TRANSFORMERS_OFFLINE=1`)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def upload(directory: str, repo_id: str, private: bool = False, commit_message: str | None = None) -> str:
    """Uploads `directory` (see `llava_multilayer.conversion.hub.push_to_hub`) and returns the repo URL.

    Raises:
        CommandError: the directory is no checkpoint, the Hub is off (HF_HUB_OFFLINE=1) or the upload failed; the
            message holds the command that retries it.
    """
    if not (Path(directory) / "config.json").is_file():
        raise CommandError.of(
            "DIR",
            "a converted or merged checkpoint directory (with config.json)",
            f"{directory}, which " + ("has no config.json" if Path(directory).is_dir() else "does not exist"),
            "pass the --output-dir of `llava-multilayer convert` or `merge-lora`.",
        )
    retry = push_command(directory, repo_id, private)
    if hub_is_offline():
        raise CommandError.of(
            "--push-to-hub / push",
            "network access to the Hugging Face Hub",
            f"huggingface_hub in offline mode (HF_HUB_OFFLINE=1), so nothing was uploaded; {directory} is complete",
            f"once online, run `HF_HUB_OFFLINE=0 {retry}`.",
        )
    from llava_multilayer.conversion.hub import push_to_hub

    try:
        return push_to_hub(directory, repo_id, private=private, commit_message=commit_message)
    except Exception as error:  # network, authentication, permissions: all retried the same way
        raise CommandError(
            f"Uploading {directory} to {repo_id} failed ({type(error).__name__}: {error}); {directory} is complete "
            f"and unchanged. To retry: `{retry}` (check the network and `hf auth login` first)."
        ) from error


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="Converted or merged checkpoint directory.")
    parser.add_argument("repo_id", metavar="REPO", help="Hub model repo, e.g. USER/NAME (created if needed).")
    parser.add_argument("--private", action="store_true", help="Create the repo private (a new repo only).")
    parser.add_argument("--commit-message", help="Message of the upload commit.")


def run_push(args: argparse.Namespace) -> int:
    url = upload(args.directory, args.repo_id, private=args.private, commit_message=args.commit_message)
    print(f"Uploaded {args.directory} to {url}")
    return 0


__all__ = ["add_push_arguments", "hub_is_offline", "push_command", "run_push", "upload"]
