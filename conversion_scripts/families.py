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
"""The original-checkpoint families and the one place that tells them apart.

Each family is a converter module `convert_<family>_to_hf.py` holding an [`OriginalFamily`] spec (`SPEC`), its
`detect(original_config) -> bool` (the spec's [`Detection`]), `main(argv, prog)` and `add_arguments`, and one entry of
[`FAMILIES`]: the registry of what the rest of the package (command line, model cards, LoRA conversion) knows of a
family without importing its converter. A new family is one such module plus one line in [`FAMILIES`].
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType


@dataclass(frozen=True)
class RegisteredFamily:
    """One original-checkpoint family in the registry.

    Attributes:
        module: its converter module.
        display_name: its name in prose (model cards, messages), as its authors write it.
        article: the indefinite article before `display_name` (`"an"` for `"an MMFuser"`).
        hub_tags: the Hub tags of its converted checkpoints, after the tags every checkpoint has.
    """

    module: str
    display_name: str
    article: str
    hub_tags: tuple[str, ...]

    @property
    def title(self) -> str:
        """The name with its article, for messages (`"an MMFuser"`)."""
        return f"{self.article} {self.display_name}"


#: Family name (`--family NAME`, `conversion_report.json`) -> its registry entry, in detection order.
FAMILIES = {
    "mmfuser": RegisteredFamily(
        "llava_multilayer.conversion.convert_mmfuser_to_hf", "MMFuser", "an", ("mmfuser", "deformable-attention")
    ),
    "layer_select_fuse": RegisteredFamily(
        "llava_multilayer.conversion.convert_layer_select_fuse_to_hf", "Layer_Select_Fuse", "a", ("layer-select-fuse",)
    ),
    "igva": RegisteredFamily(
        "llava_multilayer.conversion.convert_igva_to_hf", "IGVA", "an", ("igva", "instruction-guided")
    ),
}

#: Family name -> module of its converter, in detection order.
FAMILY_MODULES = {family: registered.module for family, registered in FAMILIES.items()}


def display_names() -> str:
    """The display names of the registered families, as prose: `"MMFuser, Layer_Select_Fuse or IGVA"`."""
    *others, last = [registered.display_name for registered in FAMILIES.values()]
    return f"{', '.join(others)} or {last}" if others else last


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


def available_family_modules() -> tuple[dict[str, ModuleType], dict[str, str]]:
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


def near_matches(original_config: dict, modules: dict[str, ModuleType]) -> list[str]:
    """For each family whose fields `original_config` has but which still rejects it, the field at fault."""
    found = []
    for module in modules.values():
        detection = module.SPEC.detection
        evidence = detection.evidence(original_config)
        problem = detection.mismatch(original_config)
        if evidence is not None and problem is not None:
            found.append(f"it looks like {module.SPEC.title} config ({evidence}), but {problem}")
    return found


def detect_family(original_config: dict, source: str = "config.json") -> str:
    """The family whose converter's `detect` accepts `original_config` (the dict of an original config.json).

    Raises:
        UnknownFamilyError: no converter, or more than one, accepts the config. The message names the file, the
            families checked, a family the config almost matches with the field that is missing or wrong, the
            converters that are not installed, and the config's distinguishing fields.
    """
    modules, unavailable = available_family_modules()
    matches = [family for family, module in modules.items() if module.detect(original_config)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UnknownFamilyError(
            f"{source} is accepted by the converters of several families ({', '.join(matches)}); pass --family to "
            f"choose one. Config: {_describe_config(original_config)}."
        )
    near = near_matches(original_config, modules)
    almost = "; ".join(near)
    almost = f" {almost[:1].upper()}{almost[1:]}." if near else ""
    missing = f" Not checked (converter missing): {'; '.join(unavailable.values())}." if unavailable else ""
    raise UnknownFamilyError(
        f"{source} is not a checkpoint of a known family: the `detect` functions of "
        f"{', '.join(f'{family} ({FAMILY_MODULES[family]})' for family in modules)} all rejected it.{almost}"
        f"{missing} Config: {_describe_config(original_config)}. Pass the directory written by the original "
        f"{display_names()} training code, or --family to force a converter."
    )


def family_of_directory(directory: str | Path) -> str:
    """[`detect_family`] applied to `directory/config.json`."""
    from .reading import load_original_config

    return detect_family(load_original_config(directory), f"{Path(directory) / 'config.json'}")
