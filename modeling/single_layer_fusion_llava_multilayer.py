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
"""The `single` fuser: LLaVA-1.5's projector over one vision layer."""

import torch

from .configuration_llava_multilayer import LlavaMultiLayerConfig
from .fusion_llava_multilayer import FusionOutput, FusionProjector, select_vision_feature


class SingleLayerProjector(FusionProjector):
    """`single` fuser (LLaVA-1.5): one vision layer through the MLP projector."""

    fusion_type = "single"

    def __init__(self, config: LlavaMultiLayerConfig):
        super().__init__(config, config.vision_config.hidden_size)
        self.layer = config.vision_feature_layer
        self.strategy = config.vision_feature_select_strategy

    @classmethod
    def describe(cls, config: LlavaMultiLayerConfig) -> str:
        return f"single layer (LLaVA-1.5): vision layer {config.vision_feature_layer}"

    def forward(self, vision_hidden_states: tuple[torch.Tensor, ...], **kwargs) -> FusionOutput:
        feature = select_vision_feature(vision_hidden_states, self.layer, self.strategy)
        return FusionOutput(self.project(feature))


__all__ = ["SingleLayerProjector"]
