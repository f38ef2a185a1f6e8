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
"""vLLM's Transformers backend for converted checkpoints, with what it cannot infer from them.

IGVA (instruction-guided fusion) needs each request's instruction, which vLLM's multimodal processing cannot derive
(it hands the processor the images with a placeholder text, not the prompt): pass it per request as
`mm_processor_kwargs={"instructions": ["..."]}` (one per prompt, the same text the processor derives in
transformers: the last user turn without the image placeholder). A request without it is refused by the processor.
"""

import dataclasses

from vllm.model_executor.models.transformers import TransformersMultiModalForCausalLM
from vllm.model_executor.models.transformers.multimodal import (
    MultiModalDummyInputsBuilder,
    MultiModalProcessingInfo,
    MultiModalProcessor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from llava_multilayer.modeling_llava_multilayer import refuse_internal_fusion_under_vllm


#: The instruction of vLLM's memory-profiling run (dummy images, no request): it only sizes the run.
PROFILING_INSTRUCTION = "Describe the image."


class LlavaMultiLayerVllmProcessor(MultiModalProcessor):
    """vLLM's multimodal processing of the Transformers backend; IGVA's profiling run gets an instruction."""

    def get_dummy_inputs(self, *args, **kwargs):
        inputs = super().get_dummy_inputs(*args, **kwargs)
        if hasattr(self.info.get_hf_processor(), "instruction_tokenizer"):
            mm_kwargs = {"instructions": [PROFILING_INSTRUCTION], **inputs.hf_processor_mm_kwargs}
            inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs=mm_kwargs)
        return inputs


@MULTIMODAL_REGISTRY.register_processor(
    LlavaMultiLayerVllmProcessor, info=MultiModalProcessingInfo, dummy_inputs=MultiModalDummyInputsBuilder
)
class LlavaMultiLayerForVllm(TransformersMultiModalForCausalLM):
    """vLLM's Transformers backend running `LlavaMultiLayerForConditionalGeneration` (external fusion only).

    - The image token lies outside the language model's vocabulary (so that the converted logits stay those of the
      original models): vLLM's own mechanism for such tokens, `configure_mm_token_handling`, masks the image
      positions before the embedding lookup; the image features replace them afterwards.
    - Internal fusion (I_D, I_M) feeds visual features into decoder layers, which the backend cannot do (it hands
      the language model input embeddings only): such checkpoints are refused here, before any weight is loaded.
    """

    def __init__(self, *, vllm_config, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        refuse_internal_fusion_under_vllm(config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.configure_mm_token_handling(config.text_config.vocab_size, [config.image_token_id])
