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
"""An example fuser, `layer_mix`: the query layer (last entry of `vision_feature_layer`) moved towards the mean of
the other layers by a learned amount, `h_q + mix * (mean(h_others) - h_q)`, then LLaVA's MLP.

It is the fuser that README's "Adding a fusion method" walks through: copied into the package directory
(`modeling/`) and registered in `fusion_registry_llava_multilayer.py`, it saves, loads as remote code, generates,
upcycles from a LLaVA model and finetunes (tests/test_adding_a_fuser.py does exactly that).
"""

import torch
from torch import nn
from transformers import initialization as init

from .configuration_llava_multilayer import LlavaMultiLayerConfig
from .fusion_llava_multilayer import FusionOutput, QueryLayerFusionProjector, select_vision_feature


class LayerMixProjector(QueryLayerFusionProjector):
    """`layer_mix` fuser: `MLP(h_q + mix * (mean(h_others) - h_q))`, with one learned scalar `mix` (zero at init).

    `QueryLayerFusionProjector` brings the checks of a query-last `vision_feature_layer` and the upcycling rule (the
    query layer must be LLaVA's); the rest of `FusionProjector`'s defaults fit as they are.
    """

    fusion_type = "layer_mix"

    def __init__(self, config: LlavaMultiLayerConfig):
        super().__init__(config, config.vision_config.hidden_size)
        self.layers = config.vision_feature_layer
        self.strategy = config.vision_feature_select_strategy
        self.mix = nn.Parameter(torch.zeros(1))

    @classmethod
    def describe(cls, config: LlavaMultiLayerConfig) -> str:
        layers = config.vision_feature_layer
        return f"layer mix: vision layer {layers[-1]} mixed with the mean of layers {layers[:-1]}"

    @classmethod
    def init_module_weights(cls, module: nn.Module) -> None:
        if isinstance(module, cls):
            init.zeros_(module.mix)

    @torch.no_grad()
    def init_from_llava(
        self, config: LlavaMultiLayerConfig, llava_projector: nn.Module, llava_layers: list[int]
    ) -> None:
        """LLaVA's MLP, and `mix = 0`: the fuser passes LLaVA's layer through unchanged."""
        super().init_from_llava(config, llava_projector, llava_layers)
        self.mix.zero_()

    def forward(self, vision_hidden_states: tuple[torch.Tensor, ...], **kwargs) -> FusionOutput:
        query = select_vision_feature(vision_hidden_states, self.layers[-1], self.strategy)
        mean = select_vision_feature(vision_hidden_states, self.layers[:-1], self.strategy)
        return FusionOutput(self.project(query + self.mix * (mean - query)))


__all__ = ["LayerMixProjector"]
