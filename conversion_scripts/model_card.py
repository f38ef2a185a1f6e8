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
"""Model cards of converted checkpoints, filled from what the converter knows (`huggingface_hub.ModelCard`).

Each family has a Jinja template in `model_cards/<family>.md` (method, paper, citation, loading and chat examples);
this module fills it with the [`ConversionReport`] of the conversion: YAML metadata (library, pipeline tag, base
models, license when the source states one, tags including `custom_code`), the fusion settings, the provenance
(source format and files, converter version, date, dropped tensors) and the numbers of the parity check.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from llava_multilayer.conversion.families import FAMILIES


#: Stands for the model's location in the templates' code examples; `push_to_hub` replaces it by the repo id.
MODEL_ID_PLACEHOLDER = "REPO_OR_DIR"

BASE_TAGS = ["llava", "llava-multilayer", "multi-layer-fusion", "vision-language", "custom_code"]

#: Parity standards of the project: metric name -> largest accepted value (float32, CPU).
PARITY_TOLERANCES = {"logits_max_abs_diff": 1e-4, "image_features_max_abs_diff": 1e-5}


def _tags(family: str) -> list[str]:
    """The Hub tags of a checkpoint of `family`: those of every checkpoint, then the family's (see [`FAMILIES`])."""
    return [*BASE_TAGS, *(FAMILIES[family].hub_tags if family in FAMILIES else ())]


def _template(family: str) -> str:
    return resources.files("llava_multilayer.model_cards").joinpath(f"{family}.md").read_text(encoding="utf-8")


def _bullets(mapping: dict) -> str:
    return "\n".join(f"- `{key}`: `{json.dumps(value)}`" for key, value in mapping.items()) or "- (none)"


def _dropped(dropped: dict[str, str]) -> str:
    """The dropped source tensors grouped by reason: count, and the keys' common prefix (or the key itself)."""
    if not dropped:
        return "- (none)"
    by_reason: dict[str, list[str]] = {}
    for key, reason in dropped.items():
        by_reason.setdefault(reason, []).append(key)
    lines = []
    for reason, keys in by_reason.items():
        if len(keys) == 1:
            lines.append(f"- `{keys[0]}`: {reason}")
            continue
        prefix = os.path.commonprefix(keys)
        prefix = prefix[: prefix.rfind(".") + 1] if "." in prefix else prefix
        lines.append(f"- {len(keys)} tensors `{prefix}*`: {reason}")
    return "\n".join(lines)


def _source_file(path: str) -> str:
    """`parent/name` of a source file (several sources often share a file name such as `model.safetensors`)."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _format_value(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.3g}"
    return f"`{json.dumps(value)}`"


def _status(metric: str, value) -> str:
    if isinstance(value, bool):
        return "pass" if value else "**FAIL**"
    tolerance = PARITY_TOLERANCES.get(metric)
    if tolerance is None or not isinstance(value, (int, float)):
        return ""
    return f"pass (<= {tolerance:g})" if value <= tolerance else f"**FAIL** (> {tolerance:g})"


def render_parity(parity: dict | None) -> str:
    """The parity section: one markdown table per checked prompt (or module), or a note that none was run."""
    if not parity:
        return (
            "No parity check was run for this conversion. The converters run one with `--parity-fixture DIR` (inputs "
            "and outputs recorded by running the original implementation) and record the numbers here."
        )
    lines = [
        "The converted checkpoint was run in float32 on CPU on the image and prompt(s) of a golden fixture, and its "
        "outputs were compared with those recorded by running the original implementation on the same inputs "
        "(logits over the original vocabulary; greedy tokens generated after the prompt).",
    ]
    for name, metrics in parity.items():
        lines += ["", f"**{name}**", "", "| metric | value | standard |", "|---|---|---|"]
        if not isinstance(metrics, dict):
            metrics = {"value": metrics}
        for metric, value in metrics.items():
            lines.append(f"| `{metric}` | {_format_value(value)} | {_status(metric, value)} |")
    return "\n".join(lines)


def render_model_card(report) -> ModelCard:
    """Builds the card of a conversion from its [`ConversionReport`]."""
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=report.base_model or None,
        license=report.license,
        tags=_tags(report.family),
    )
    return ModelCard.from_template(
        card_data,
        template_str=_template(report.family),
        model_id=MODEL_ID_PLACEHOLDER,
        settings=_bullets(report.settings),
        source_dir=report.source_dir,
        source_format=report.source_format,
        source_files=", ".join(f"`{_source_file(path)}`" for path in report.source_files) or "-",
        num_source_tensors=report.num_source_tensors,
        num_target_tensors=report.num_target_tensors,
        dropped=_dropped(report.dropped),
        converter_version=report.converter_version,
        date=report.date,
        dtype=report.dtype,
        verified="every written tensor re-read and compared with its source"
        if report.verified
        else "not run (pass --verify)",
        parity=render_parity(report.parity),
    )


MERGED_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_id }}

A {{ family_name }} checkpoint of [llava-multilayer](https://github.com/llava-multilayer/llava-multilayer): a LoRA
adapter finetuned with `llava-multilayer finetune`, merged into its base model with `llava-multilayer merge-lora`.

- base model: {{ base_model }}
- adapter: {{ adapter }} (LoRA r={{ lora_r }}, alpha={{ lora_alpha }}{{ steps }})
- training data: {{ training_data }}
- dtype: {{ dtype }}
- merged by {{ merged_by }}, {{ date }}

## Usage

```python
import llava_multilayer  # or pass trust_remote_code=True
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{{ model_id }}", dtype="auto", device_map="auto")
processor = AutoProcessor.from_pretrained("{{ model_id }}")
```
"""


def write_merged_model_card(directory: str | Path, record: dict) -> Path:
    """Writes `README.md` into a merged directory from its merge record (see `commands.finetune.merge_record`)."""
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=record["base_model_hub_ids"] or None,
        tags=[*_tags(record["family"]), "lora", "merged"],
    )
    steps = record.get("training_steps")
    card = ModelCard.from_template(
        card_data,
        template_str=MERGED_CARD_TEMPLATE,
        model_id=MODEL_ID_PLACEHOLDER,
        family_name=FAMILIES[record["family"]].display_name if record["family"] in FAMILIES else "llava-multilayer",
        base_model=record["base_model"],
        adapter=record["adapter"],
        lora_r=record["lora_r"],
        lora_alpha=record["lora_alpha"],
        steps=f", {steps} steps" if steps else "",
        training_data=record["training_data"] or "not recorded",
        dtype=record["dtype"],
        merged_by=record["merged_by"],
        date=record["date"],
    )
    path = Path(directory) / "README.md"
    card.save(path)
    return path


def write_model_card(directory: str | Path, report) -> Path:
    """Writes `README.md` into a converted directory."""
    path = Path(directory) / "README.md"
    render_model_card(report).save(path)
    return path


__all__ = [
    "MODEL_ID_PLACEHOLDER",
    "PARITY_TOLERANCES",
    "render_model_card",
    "render_parity",
    "write_merged_model_card",
    "write_model_card",
]
