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
"""Evaluation with [lmms-eval](https://github.com/EvolvingLMMs-Lab/lmms-eval) (`pip install "llava-multilayer[eval]"`).

setup.py registers [`model_manifest`] in the entry-point group `lmms_eval.models`, so that
`lmms-eval --model llava_multilayer --model_args pretrained=DIR ...` finds the adapter
[`lmms_eval_model.LlavaMultiLayerLmms`] without a fork or an environment variable. This module imports nothing
heavy: lmms-eval loads every plugin's entry point whenever it starts.
"""

from __future__ import annotations


#: The name of the model in lmms-eval (`--model llava_multilayer`).
MODEL_ID = "llava_multilayer"
#: The adapter class, imported by lmms-eval only when the model is asked for.
CLASS_PATH = "llava_multilayer.evaluation.lmms_eval_model.LlavaMultiLayerLmms"


def model_manifest():
    """The `lmms_eval.models` entry point: lmms-eval's `ModelManifest` of the `llava_multilayer` adapter."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


__all__ = ["CLASS_PATH", "MODEL_ID", "model_manifest"]
