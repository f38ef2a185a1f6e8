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
"""The LLaVA-1.5 MLP projector and the two baseline external fusers built on it (`single`, `concat`)."""

from dataclasses import dataclass

import torch
from torch import nn

from .compatibility_llava_multilayer import ACT2FN
from .configuration_llava_multilayer import LlavaMultiLayerConfig


@dataclass
class FusionOutput:
    """What an external fuser returns.

    Args:
        image_features (`torch.Tensor` of shape `(num_images, num_image_tokens, text_hidden_size)`):
            Visual tokens in the language model's width, spliced at the image-token positions.
        fusion_weights (`torch.Tensor` of shape `(num_images, num_groups)`, *optional*):
            Per-image weights of the layer groups (instruction-guided fusion only).
    """

    image_features: torch.Tensor
    fusion_weights: torch.Tensor | None = None


def select_vision_feature(
    hidden_states: tuple[torch.Tensor, ...], layer: int | list[int], strategy: str
) -> torch.Tensor:
    """Returns `hidden_states[layer]` (or the mean over a list of layers), `(num_images, tokens, vision_hidden)`.

    With `strategy="default"` the first token is dropped (CLIP's CLS; SigLIP's first patch, as in the originals).
    """
    if isinstance(layer, int):
        feature = hidden_states[layer]
    else:
        feature = mean_of_hidden_states(hidden_states, layer)
    return feature[:, 1:] if strategy == "default" else feature


def mean_of_hidden_states(hidden_states: tuple[torch.Tensor, ...], layers: list[int]) -> torch.Tensor:
    """Arithmetic mean of `hidden_states[i]` over `layers`, summed in list order without stacking the layers."""
    total = hidden_states[layers[0]].clone()
    for index in layers[1:]:
        total += hidden_states[index]
    return total / len(layers)


class LlavaMultiLayerMLPProjector(nn.Module):
    """LLaVA-1.5's two-layer MLP (`linear_1` -> act -> `linear_2`) from `in_features` to the language model width."""

    def __init__(self, config: LlavaMultiLayerConfig, in_features: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, config.text_config.hidden_size, bias=config.multimodal_projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(
            config.text_config.hidden_size, config.text_config.hidden_size, bias=config.multimodal_projector_bias
        )

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """`(..., in_features)` -> `(..., text_hidden_size)`."""
        return self.linear_2(self.act(self.linear_1(features)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.project(features)


class SingleLayerProjector(LlavaMultiLayerMLPProjector):
    """`single` fuser (LLaVA-1.5): one vision layer through the MLP projector."""

    def __init__(self, config: LlavaMultiLayerConfig):
        super().__init__(config, config.vision_config.hidden_size)
        self.layer = config.vision_feature_layer
        self.strategy = config.vision_feature_select_strategy

    def forward(self, vision_hidden_states: tuple[torch.Tensor, ...], **kwargs) -> FusionOutput:
        feature = select_vision_feature(vision_hidden_states, self.layer, self.strategy)
        return FusionOutput(self.project(feature))


class ConcatProjector(LlavaMultiLayerMLPProjector):
    """`concat` fuser: selected layers (or means over layer groups) concatenated on channels, then the MLP.

    This is transformers' list-valued `vision_feature_layer` and Layer_Select_Fuse's external direct fusion (E_D).
    """

    def __init__(self, config: LlavaMultiLayerConfig):
        layers = config.vision_feature_layer
        super().__init__(config, config.vision_config.hidden_size * len(layers))
        self.layers = layers
        self.strategy = config.vision_feature_select_strategy

    def forward(self, vision_hidden_states: tuple[torch.Tensor, ...], **kwargs) -> FusionOutput:
        features = [select_vision_feature(vision_hidden_states, layer, self.strategy) for layer in self.layers]
        return FusionOutput(self.project(torch.cat(features, dim=-1)))


__all__ = [
    "ConcatProjector",
    "FusionOutput",
    "LlavaMultiLayerMLPProjector",
    "SingleLayerProjector",
    "mean_of_hidden_states",
    "select_vision_feature",
]
