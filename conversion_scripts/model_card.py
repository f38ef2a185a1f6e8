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
"""Model cards of converted checkpoints, filled from what the converter knows (`huggingface_hub.ModelCard`)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

FAMILY_TAGS = {
    "mmfuser": ["mmfuser", "deformable-attention"],
    "layer_select_fuse": ["layer-select-fuse"],
    "igva": ["igva", "instruction-guided"],
}


def _template(family: str) -> str:
    return resources.files("llava_multilayer.model_cards").joinpath(f"{family}.md").read_text(encoding="utf-8")


def _bullets(mapping: dict) -> str:
    return "\n".join(f"- `{key}`: `{json.dumps(value)}`" for key, value in mapping.items()) or "- (none)"


def render_model_card(report) -> ModelCard:
    """Builds the card of a conversion from its [`ConversionReport`]."""
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=report.base_model or None,
        license=report.license,
        tags=["llava", "llava-multilayer", "multi-layer-fusion", "custom_code", *FAMILY_TAGS.get(report.family, [])],
    )
    parity = report.parity or {}
    return ModelCard.from_template(
        card_data,
        template_str=_template(report.family),
        settings=_bullets(report.settings),
        source_dir=report.source_dir,
        source_format=report.source_format,
        num_source_tensors=report.num_source_tensors,
        num_target_tensors=report.num_target_tensors,
        dropped=_bullets(report.dropped) if report.dropped else "- (none)",
        converter_version=report.converter_version,
        date=report.date,
        dtype=report.dtype,
        verified="yes, every tensor re-read and compared" if report.verified else "not run (pass --verify)",
        parity=("```json\n" + json.dumps(parity, indent=2) + "\n```") if parity else "Not run (pass --parity-fixture).",
    )


def write_model_card(directory: str | Path, report) -> Path:
    """Writes `README.md` into a converted directory."""
    path = Path(directory) / "README.md"
    render_model_card(report).save(path)
    return path
