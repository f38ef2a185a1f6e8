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
"""Which modules of a model are trained in full beside a LoRA adapter, and which stay out of quantization.

Derived from the fuser and the internal-fusion wrapper a config selects, so that finetuning (`LoraConfig`'s
`modules_to_save`, QLoRA) and quantized inference (`generate --load-in-4bit`) agree. Names are full module names:
transformers matches a quantization skip entry from the start of the module name or as a suffix, so a bare
`"multi_modal_projector"` would not match `model.multi_modal_projector.linear_1`.
"""

from .configuration_llava_multilayer import LlavaMultiLayerConfig
from .internal_fusion_llava_multilayer import internal_fusion_layer_class


def _internal_fusion_layers(config: LlavaMultiLayerConfig) -> list[str]:
    return [f"model.language_model.layers.{layer}" for layer in sorted(config.internal_layer_to_feature)]


def fully_trained_modules(config: LlavaMultiLayerConfig) -> list[str]:
    """The modules trained in full (peft `modules_to_save`): the external fuser with its projector, each internal
    projector and the internal-fusion wrappers' own modules (I_M: `cross_attn`, `cross_mlp` and their norms)."""
    names = ["model.multi_modal_projector"]
    if config.internal_fusion_type is None:
        return names
    names += [f"model.internal_projectors.{index}" for index in range(len(config.internal_feature_layers))]
    wrapper = internal_fusion_layer_class(config.internal_fusion_type)
    for layer in _internal_fusion_layers(config):
        names += [f"{layer}.{name}" for name in wrapper.trained_modules(config)]
    return names


def fully_trained_parameters(config: LlavaMultiLayerConfig) -> list[str]:
    """The trainable bare parameters (the I_M gates), which peft cannot wrap and which are saved beside the adapter."""
    if config.internal_fusion_type is None:
        return []
    wrapper = internal_fusion_layer_class(config.internal_fusion_type)
    return [f"{layer}.{name}" for layer in _internal_fusion_layers(config) for name in wrapper.trained_parameters]


def quantization_skip_modules(config: LlavaMultiLayerConfig) -> list[str]:
    """`llm_int8_skip_modules`: everything but the language model's own linear layers stays unquantized (vision
    tower, fuser, internal projectors and cross-fusion modules, instruction encoder). The list replaces
    transformers' default skips, so `lm_head` is listed too."""
    names = [
        "model.vision_tower",
        "model.multi_modal_projector",
        "model.internal_projectors",
        "model.instruction_encoder",
    ]
    if config.internal_fusion_type is not None:
        wrapper = internal_fusion_layer_class(config.internal_fusion_type)
        for layer in _internal_fusion_layers(config):
            names += [f"{layer}.{name}" for name in wrapper.unquantized_modules]
    return names + ["lm_head"]


__all__ = ["fully_trained_modules", "fully_trained_parameters", "quantization_skip_modules"]
