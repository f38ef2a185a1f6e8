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
"""LLaVA with multi-layer visual feature fusion (MMFuser, Layer_Select_Fuse, IGVA) for transformers.

Importing the package registers the model family with transformers' Auto classes. The modules of this directory
are also the remote code of saved checkpoints, so they import each other with single-dot relative imports only.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_llava_multilayer import LlavaMultiLayerConfig
from .modeling_llava_multilayer import (
    LlavaMultiLayerCausalLMOutputWithPast,
    LlavaMultiLayerForConditionalGeneration,
    LlavaMultiLayerImageFeaturesOutput,
    LlavaMultiLayerModel,
    LlavaMultiLayerModelOutputWithPast,
    LlavaMultiLayerPreTrainedModel,
)
from .processing_llava_multilayer import LlavaMultiLayerInstructionProcessor, LlavaMultiLayerProcessor

__version__ = "0.1.0"

AutoConfig.register(LlavaMultiLayerConfig.model_type, LlavaMultiLayerConfig, exist_ok=True)
AutoModel.register(LlavaMultiLayerConfig, LlavaMultiLayerModel, exist_ok=True)
AutoModelForImageTextToText.register(LlavaMultiLayerConfig, LlavaMultiLayerForConditionalGeneration, exist_ok=True)
AutoProcessor.register(LlavaMultiLayerConfig, LlavaMultiLayerProcessor, exist_ok=True)

# `save_pretrained` writes an `auto_map` and copies this directory's modules, so that saved checkpoints also load
# with `trust_remote_code=True` where this package is not installed.
LlavaMultiLayerConfig.register_for_auto_class()
LlavaMultiLayerModel.register_for_auto_class("AutoModel")
LlavaMultiLayerForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
LlavaMultiLayerProcessor.register_for_auto_class("AutoProcessor")
LlavaMultiLayerInstructionProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "LlavaMultiLayerCausalLMOutputWithPast",
    "LlavaMultiLayerConfig",
    "LlavaMultiLayerForConditionalGeneration",
    "LlavaMultiLayerImageFeaturesOutput",
    "LlavaMultiLayerInstructionProcessor",
    "LlavaMultiLayerModel",
    "LlavaMultiLayerModelOutputWithPast",
    "LlavaMultiLayerPreTrainedModel",
    "LlavaMultiLayerProcessor",
    "__version__",
]
