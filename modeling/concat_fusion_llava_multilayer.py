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
"""The `concat` fuser: selected vision layers concatenated on channels (Layer_Select_Fuse's external direct fusion)."""

import torch

from .configuration_llava_multilayer import LlavaMultiLayerConfig, check_layer_group
from .fusion_llava_multilayer import FusionOutput, FusionProjector, normalized_layer, select_vision_feature


class ConcatProjector(FusionProjector):
    """`concat` fuser: selected layers (or means over layer groups) concatenated on channels, then the MLP.

    This is transformers' list-valued `vision_feature_layer` and Layer_Select_Fuse's external direct fusion (E_D).
    """

    fusion_type = "concat"
    original_family = "layer_select_fuse"

    def __init__(self, config: LlavaMultiLayerConfig):
        layers = config.vision_feature_layer
        super().__init__(config, config.vision_config.hidden_size * len(layers))
        self.layers = layers
        self.strategy = config.vision_feature_select_strategy

    @classmethod
    def validate_config(cls, config: LlavaMultiLayerConfig) -> None:
        for entry in cls.layer_list(config):
            if isinstance(entry, list):
                check_layer_group("vision_feature_layer", entry, config.num_vision_hidden_states)

    @classmethod
    def describe(cls, config: LlavaMultiLayerConfig) -> str:
        return f"concatenation of vision layers {config.vision_feature_layer}"

    @classmethod
    def upcycled_vision_feature_layer(cls, llava_layer: int | list[int]) -> list:
        return [llava_layer] if isinstance(llava_layer, int) else list(llava_layer)

    @classmethod
    def upcycling_problems(cls, config: LlavaMultiLayerConfig, llava_layers: list[int]) -> list[str]:
        layers = config.vision_feature_layer
        entries = [normalized_layer(entry, config.num_vision_hidden_states) for entry in layers]
        missing = [layer for layer in llava_layers if layer not in entries]
        if missing:
            return [f"vision_feature_layer={layers} does not contain LLaVA's layer(s) {missing}."]
        return []

    @torch.no_grad()
    def init_from_llava(self, config: LlavaMultiLayerConfig, llava_projector, llava_layers: list[int]) -> None:
        """LLaVA's `linear_1` columns go to the columns of the same layers; the extra layers' columns are zero."""
        self.linear_2.load_state_dict(llava_projector.linear_2.state_dict())
        source = llava_projector.linear_1
        if self.linear_1.bias is not None:
            self.linear_1.bias.copy_(source.bias)
        width = config.vision_config.hidden_size
        weight = torch.zeros_like(self.linear_1.weight)
        entries = [normalized_layer(entry, config.num_vision_hidden_states) for entry in self.layers]
        for llava_index, layer in enumerate(llava_layers):
            if layer in entries:
                index = entries.index(layer)
                weight[:, index * width : (index + 1) * width] = source.weight[
                    :, llava_index * width : (llava_index + 1) * width
                ]
        self.linear_1.weight.copy_(weight)

    def forward(self, vision_hidden_states: tuple[torch.Tensor, ...], **kwargs) -> FusionOutput:
        features = [select_vision_feature(vision_hidden_states, layer, self.strategy) for layer in self.layers]
        return FusionOutput(self.project(torch.cat(features, dim=-1)))


__all__ = ["ConcatProjector"]
