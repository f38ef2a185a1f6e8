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
"""Training of multi-layer fusion LLaVA models as the papers trained them (stage 1 alignment, stage 2 full
finetuning, LoRA / QLoRA), faithful to the original training code. See docs/training.md.

```python
from llava_multilayer.training import load_recipe

recipe = load_recipe("finetune", model, model_max_length=2048)
dataset = recipe.dataset(records, processor, image_folder="images/")
batch = recipe.collate([dataset[0], dataset[1]])
loss = recipe.prepare_model(model)(**batch).loss
```
"""

from .conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID, preprocess
from .data import RecordError, SupervisedCollator, SupervisedDataset, load_records
from .recipes import FAMILIES, RECIPE_DEFAULTS, STAGES, Recipe, detect_family, load_recipe
from .trainer import RecipeTrainer, merge_adapter, train


__all__ = [
    "FAMILIES",
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER_ID",
    "RECIPE_DEFAULTS",
    "STAGES",
    "Recipe",
    "RecipeTrainer",
    "RecordError",
    "SupervisedCollator",
    "SupervisedDataset",
    "detect_family",
    "load_recipe",
    "load_records",
    "merge_adapter",
    "preprocess",
    "train",
]
