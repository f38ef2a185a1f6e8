"""The recipes' defaults are the original scripts' values. For MMFuser and Layer_Select_Fuse they are checked against
the arguments the golden fixtures recorded (test_training_parity.py::test_recipe_defaults_are_the_original_scripts);
here, for IGVA, against the values of its released scripts `scripts/v1_5/pretrain_balance.sh` and
`finetune_balance(1).sh` (no golden data: written out here), including its stage 1 padding images to a square, which
LLaVA-1.5's stage 1 does not."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, processor_for
from PIL import Image

from llava_multilayer.training import load_recipe
from llava_multilayer.training.data import expand2square


def test_layer_select_fuse_internal_modular_stage_1_uses_the_same_script():
    """`scripts/MLVF/train.sh` has one pretrain command for every fusing strategy (E_D, E_M, I_D, I_M)."""
    internal = load_recipe("pretrain", make_model("internal_cross_pre"))
    assert internal.family == "layer_select_fuse"
    assert internal.to_dict() == load_recipe("pretrain", family="layer_select_fuse").to_dict()


IGVA_SCRIPTS = {
    # scripts/v1_5/pretrain_balance.sh (8 GPUs: global batch 256)
    "pretrain": {
        "template": "plain",
        "image_aspect_ratio": "pad",
        "learning_rate": 1e-3,
        "weight_decay": 0.0,
        "warmup_ratio": 0.03,
        "lr_scheduler_type": "cosine",
        "num_train_epochs": 1.0,
        "per_device_train_batch_size": 32,
        "gradient_accumulation_steps": 1,
        "group_by_modality_length": False,
        "model_max_length": 2048,
        "save_steps": 24000,
        "save_total_limit": 1,
        "mm_projector_lr": None,
    },
    # scripts/v1_5/finetune_balance(1).sh (8 GPUs: global batch 128)
    "finetune": {
        "template": "vicuna_v1",
        "image_aspect_ratio": "pad",
        "learning_rate": 2e-5,
        "weight_decay": 0.0,
        "warmup_ratio": 0.03,
        "lr_scheduler_type": "cosine",
        "num_train_epochs": 1.0,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 2,
        "group_by_modality_length": True,
        "model_max_length": 2048,
        "save_steps": 1000,
        "save_total_limit": 1,
        "mm_projector_lr": None,
    },
}


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_igva_defaults_are_its_scripts(stage):
    recipe = load_recipe(stage, family="igva")
    assert {field: getattr(recipe, field) for field in IGVA_SCRIPTS[stage]} == IGVA_SCRIPTS[stage]


def test_igva_stage_1_pads_images_to_a_square():
    model = make_model("igva")
    processor = processor_for(model.config)
    image = Image.fromarray((torch.rand(20, 44, 3) * 255).to(torch.uint8).numpy())
    record = {
        "id": "wide",
        "image": image,
        "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A wide picture."}],
    }
    recipe = load_recipe("pretrain", model, model_max_length=256)
    item = recipe.dataset([record], processor)[0]
    mean = tuple(int(value * 255) for value in processor.image_processor.image_mean)

    def pixels(picture):
        return processor.image_processor(picture, do_pad=False, return_tensors="pt")["pixel_values"]

    padded, squashed = pixels(expand2square(image, mean)), pixels(image)
    torch.testing.assert_close(item["pixel_values"], padded)
    assert not torch.allclose(item["pixel_values"], squashed)
