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
"""Uploading a converted (or trained, or merged) checkpoint directory to the Hugging Face Hub."""

from __future__ import annotations

import os
from pathlib import Path

import llava_multilayer

from .model_card import MODEL_ID_PLACEHOLDER
from .reading import ConversionError, load_json


def push_to_hub(
    directory: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Uploads a converted directory to the Hub model repo `repo_id`; returns the repo URL.

    The repo is created if needed (`private` applies to a new repo only). Everything in the directory is uploaded in
    one commit, with huggingface_hub's progress bars: `config.json`, `generation_config.json`, the weights
    (`model*.safetensors` and index), the remote code (`*.py`), tokenizer and processor files (`tokenizer*.json`,
    `processor_config.json`, `chat_template.jinja`, `instruction_tokenizer/`), the model card `README.md` (its
    `REPO_OR_DIR` placeholders are first replaced by `repo_id`, in the local copy too) and `conversion_report.json`.
    Python caches and hidden files are left out.
    """
    from huggingface_hub import HfApi

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ConversionError(f"{directory} is not a converted checkpoint (no config.json); nothing to upload.")
    card = directory / "README.md"
    if card.is_file():
        card.write_text(card.read_text(encoding="utf-8").replace(MODEL_ID_PLACEHOLDER, repo_id), encoding="utf-8")
    if commit_message is None:
        report_path = directory / "conversion_report.json"
        family = load_json(report_path).get("family") if report_path.is_file() else None
        what = f"{family} checkpoint" if family else "checkpoint"
        commit_message = f"Upload {what} converted by llava-multilayer {llava_multilayer.__version__}"
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(
        folder_path=str(directory),
        repo_id=repo_id,
        repo_type="model",
        commit_message=commit_message,
        ignore_patterns=["__pycache__", "*/__pycache__/*", "*.pyc", ".*", "*/.*"],
    )
    return str(url)
