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
"""The `vllm.general_plugins` entry point: registers the vLLM model class of converted checkpoints.

It only registers a lazy reference (no vLLM model code is imported here), so it is cheap in every vLLM process.
"""

ARCHITECTURE = "LlavaMultiLayerForConditionalGeneration"


def register() -> None:
    """Registers [`LlavaMultiLayerForVllm`] for `ARCHITECTURE` (idempotent: vLLM may call it in several processes)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "llava_multilayer.serving.vllm_model:LlavaMultiLayerForVllm")
