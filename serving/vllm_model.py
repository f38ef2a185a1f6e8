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
"""vLLM's Transformers backend for converted checkpoints, with the two things it cannot infer from them."""

from vllm.model_executor.models.transformers import TransformersMultiModalForCausalLM

from llava_multilayer.modeling_llava_multilayer import refuse_internal_fusion_under_vllm


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
