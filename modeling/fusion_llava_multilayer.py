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
"""What every external fuser shares: the [`FusionProjector`] base, LLaVA-1.5's MLP projector it ends in, the
selection of vision hidden states, and the [`FusionOutput`] it returns.

An external fuser turns the vision tower's hidden states into the visual tokens spliced at the image-token positions.
Each fuser lives in its own module and is registered in `fusion_registry_llava_multilayer.FUSION_PROJECTORS`; the core
model, upcycling, the commands and the model cards only use the class attributes and methods declared here.
"""

from dataclasses import dataclass
from typing import ClassVar

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
            Per-image weights of the fused layer groups, for fusers that weight them (labels:
            [`FusionProjector.fusion_weight_labels`]).
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


def normalized_layer(entry: int | list[int], num_hidden_states: int) -> int | None:
    """A `vision_feature_layer` entry as a non-negative hidden-state index, or `None` for an averaged group."""
    return entry % num_hidden_states if isinstance(entry, int) else None


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


class FusionProjector(LlavaMultiLayerMLPProjector):
    """Base of the external fusers (`config.fusion_type`): a fusion of vision hidden states, then LLaVA's MLP.

    A subclass sets `fusion_type`, builds its modules in `__init__(config)` (calling `super().__init__(config,
    in_features)` with the width of what it feeds the MLP), implements `forward(vision_hidden_states,
    instruction_embeds=None) -> FusionOutput`, and overrides the class methods below where the defaults (one vision
    layer, LLaVA's own projector) do not fit. The whole fuser is trained in full and never quantized (the original
    codebases train their `mm_projector` in full).
    """

    #: The value of `config.fusion_type` that selects this fuser.
    fusion_type: ClassVar[str]
    #: The original codebase whose checkpoints use this fuser (conversion, training recipes, model cards); `None`
    #: for LLaVA-1.5's own projector.
    original_family: ClassVar[str | None] = None
    #: Class names of the fuser's own modules that `device_map` must keep on one device (the fuser class is added).
    no_split_modules: ClassVar[tuple[str, ...]] = ()
    #: Config fields only this fuser reads; with another `fusion_type` they must stay `None`.
    exclusive_config_fields: ClassVar[tuple[str, ...]] = ()
    #: Config fields that `llava-multilayer inspect` shows: which layers the fuser reads, and how it fuses them.
    layer_config_fields: ClassVar[tuple[str, ...]] = ()
    strategy_config_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def validate_config(cls, config: LlavaMultiLayerConfig) -> None:
        """Raises `ValueError` unless `config.vision_feature_layer` and the fuser's own fields fit this fuser
        (the range of the layer indices is checked by the config). Default: one hidden-state index."""
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError(
                f"`vision_feature_layer` must be a single int for fusion_type={cls.fusion_type!r}, got "
                f"{config.vision_feature_layer!r}."
            )

    @classmethod
    def layer_list(cls, config: LlavaMultiLayerConfig) -> list:
        """`config.vision_feature_layer`, which must be a non-empty list for this fuser (else `ValueError`)."""
        layers = config.vision_feature_layer
        if not isinstance(layers, list) or not layers:
            raise ValueError(
                f"`vision_feature_layer` must be a non-empty list for fusion_type={cls.fusion_type!r}, got {layers!r}."
            )
        return layers

    @classmethod
    def needs_instruction_encoder(cls, config: LlavaMultiLayerConfig) -> bool:
        """Whether the model embeds an instruction per image (`instruction_embeds` of `forward`) with its frozen
        instruction encoder (`config.instruction_encoder_config`)."""
        return False

    @classmethod
    def describe(cls, config: LlavaMultiLayerConfig) -> str:
        """One human-readable line saying which vision layers the fuser reads, and how."""
        return f"{cls.fusion_type}: vision layer {config.vision_feature_layer}"

    @classmethod
    def fusion_weight_labels(cls, config: LlavaMultiLayerConfig) -> list[str]:
        """Labels of the columns of [`FusionOutput.fusion_weights`]; empty when the fuser returns no weights."""
        return []

    @classmethod
    def init_module_weights(cls, module: nn.Module) -> None:
        """Initialises `module`, any submodule of the model, if it is one of this fuser's modules that transformers'
        `_init_weights` does not know (modules of custom code that own no parameters directly are skipped by it)."""

    @classmethod
    def upcycled_vision_feature_layer(cls, llava_layer: int | list[int]) -> int | list:
        """The `vision_feature_layer` of a model upcycled from a LLaVA model whose `vision_feature_layer` is
        `llava_layer`, when none is given. Default: LLaVA's layer, which must be a single one."""
        layers = [llava_layer] if isinstance(llava_layer, int) else list(llava_layer)
        if len(layers) != 1:
            raise ValueError(
                f"The LLaVA model concatenates layers {llava_layer}; fusion_type={cls.fusion_type!r} needs a single "
                "layer: pass `vision_feature_layer`."
            )
        return layers[0]

    @classmethod
    def upcycling_problems(cls, config: LlavaMultiLayerConfig, llava_layers: list[int]) -> list[str]:
        """Why a model upcycled with `config` cannot start from the LLaVA model's outputs (empty when it can);
        `llava_layers` are LLaVA's layers as non-negative hidden-state indices. Default: the layer must be LLaVA's."""
        layer = normalized_layer(config.vision_feature_layer, config.num_vision_hidden_states)
        if [layer] != llava_layers:
            return [f"vision_feature_layer={config.vision_feature_layer} is not LLaVA's layer {llava_layers}."]
        return []

    @torch.no_grad()
    def init_from_llava(
        self, config: LlavaMultiLayerConfig, llava_projector: nn.Module, llava_layers: list[int]
    ) -> None:
        """Fills the fuser from LLaVA's projector (`linear_1`, `linear_2`) so that it computes what LLaVA computed
        (for the settings [`upcycling_problems`] accepts). Default: both linears are copied."""
        self.linear_1.load_state_dict(llava_projector.linear_1.state_dict())
        self.linear_2.load_state_dict(llava_projector.linear_2.state_dict())



class QueryLayerFusionProjector(FusionProjector):
    """Base of fusers whose last `vision_feature_layer` entry is the query layer, into which the layers listed before
    it are fused (`mmfuser`). Upcycled from LLaVA, the query layer is LLaVA's layer."""

    @classmethod
    def validate_config(cls, config: LlavaMultiLayerConfig) -> None:
        layers = cls.layer_list(config)
        for entry in layers:
            if isinstance(entry, list):
                raise ValueError(
                    f"`vision_feature_layer` of an `{cls.fusion_type}` fuser lists single indices, got the group "
                    f"{entry}."
                )
        if len(layers) < 2:
            raise ValueError(
                f"An `{cls.fusion_type}` fuser needs at least two layers in `vision_feature_layer` (the fused layers, "
                f"then the query layer last), got {layers!r}."
            )

    @classmethod
    def upcycled_vision_feature_layer(cls, llava_layer: int | list[int]) -> list:
        raise ValueError(
            f"fusion_type={cls.fusion_type!r} needs `vision_feature_layer`: the fused layers, then LLaVA's layer "
            f"({llava_layer}) last as the query."
        )

    @classmethod
    def upcycling_problems(cls, config: LlavaMultiLayerConfig, llava_layers: list[int]) -> list[str]:
        layers = config.vision_feature_layer
        if [normalized_layer(layers[-1], config.num_vision_hidden_states)] != llava_layers:
            return [
                f"the query layer (last entry of vision_feature_layer={layers}) is not LLaVA's layer {llava_layers}."
            ]
        return []


__all__ = [
    "FusionOutput",
    "FusionProjector",
    "LlavaMultiLayerMLPProjector",
    "QueryLayerFusionProjector",
    "mean_of_hidden_states",
    "normalized_layer",
    "select_vision_feature",
]
