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
"""The registry of external fusers: `config.fusion_type` -> [`FusionProjector`] subclass.

Adding a fuser is one module (a `FusionProjector` subclass) plus its import and one entry below.
"""

from .concat_fusion_llava_multilayer import ConcatProjector
from .configuration_llava_multilayer import LlavaMultiLayerConfig
from .deformable_fusion_llava_multilayer import MMFuserProjector
from .fusion_llava_multilayer import FusionProjector
from .instruction_guided_fusion_llava_multilayer import InstructionGuidedProjector
from .single_layer_fusion_llava_multilayer import SingleLayerProjector


FUSION_PROJECTORS: dict[str, type[FusionProjector]] = {
    fuser.fusion_type: fuser
    for fuser in (
        SingleLayerProjector,
        ConcatProjector,
        MMFuserProjector,
        InstructionGuidedProjector,
    )
}

#: The original codebase of models with internal fusion (Layer_Select_Fuse's I_D and I_M).
INTERNAL_FUSION_FAMILY = "layer_select_fuse"


def fusion_projector_class(fusion_type: str) -> type[FusionProjector]:
    """The fuser class of `fusion_type`; raises `ValueError` naming the registered ones."""
    if fusion_type not in FUSION_PROJECTORS:
        raise ValueError(
            f"`fusion_type` must be one of {', '.join(map(repr, FUSION_PROJECTORS))}, got {fusion_type!r}."
        )
    return FUSION_PROJECTORS[fusion_type]


def no_split_module_names() -> list[str]:
    """Class names of every registered fuser and of the modules each says `device_map` must not split."""
    names = []
    for fuser in FUSION_PROJECTORS.values():
        names += [fuser.__name__, *fuser.no_split_modules]
    return names


def original_family(config: LlavaMultiLayerConfig) -> str | None:
    """The original codebase a model's fusion settings come from (`None`: LLaVA-1.5's own single layer)."""
    if config.internal_fusion_type is not None:
        return INTERNAL_FUSION_FAMILY
    return fusion_projector_class(config.fusion_type).original_family


__all__ = [
    "FUSION_PROJECTORS",
    "INTERNAL_FUSION_FAMILY",
    "fusion_projector_class",
    "no_split_module_names",
    "original_family",
]
