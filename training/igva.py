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
"""IGVA between the stages: stage 1 trains a model that averages the layer groups uniformly (no aggregator, no
instruction encoder); stage 2 trains the instruction-guided aggregator, which the original creates fresh (PyTorch's
default initialisation) at the start of stage 2, next to the frozen sentence encoder. [`add_aggregator`] turns a
stage-1 model into that stage-2 starting point.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn
from transformers import AutoModel, AutoTokenizer

from llava_multilayer import (
    LlavaMultiLayerConfig,
    LlavaMultiLayerForConditionalGeneration,
    LlavaMultiLayerInstructionProcessor,
)


def reset_to_pytorch_defaults(module: nn.Module) -> None:
    """Re-draws every parameter of `module` with PyTorch's own default initialisation (`reset_parameters`)."""
    for child in module.modules():
        if isinstance(child, nn.MultiheadAttention):
            child._reset_parameters()
        elif hasattr(child, "reset_parameters"):
            child.reset_parameters()


def add_aggregator(
    model: LlavaMultiLayerForConditionalGeneration, processor, sentence_encoder: str | os.PathLike
) -> tuple[LlavaMultiLayerForConditionalGeneration, LlavaMultiLayerInstructionProcessor]:
    """A stage-2 IGVA model and processor from a stage-1 (`igva_aggregate_by_average`) `model`: every trained weight
    kept, a fresh aggregator (PyTorch defaults), and the instruction encoder and tokenizer of `sentence_encoder`
    (a sentence-transformers directory such as all-mpnet-base-v2, checked as the converter checks it)."""
    from llava_multilayer.conversion.convert_igva_to_hf import load_sentence_encoder

    if model.config.fusion_type != "igva" or not model.config.igva_aggregate_by_average:
        raise ValueError(
            "add_aggregator expects an igva model with igva_aggregate_by_average=True (a stage-1 model), got "
            f"fusion_type={model.config.fusion_type!r}, igva_aggregate_by_average="
            f"{getattr(model.config, 'igva_aggregate_by_average', None)!r}."
        )
    encoder = load_sentence_encoder(Path(sentence_encoder))
    settings = model.config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map", "_name_or_path"):
        settings.pop(key, None)
    settings.update(
        igva_aggregate_by_average=False,
        instruction_encoder_config=encoder.config.to_dict(),
        igva_sentence_embed_dim=encoder.config.hidden_size,
    )
    config = LlavaMultiLayerConfig(**settings)
    staged = LlavaMultiLayerForConditionalGeneration(config).to(model.dtype)
    missing, unexpected = staged.load_state_dict(model.state_dict(), strict=False)
    fresh = ("model.multi_modal_projector.aggregator.", "model.instruction_encoder.")
    if unexpected or any(not name.startswith(fresh) for name in missing):
        raise ValueError(f"stage-1 weights do not fit the stage-2 model: missing {missing}, unexpected {unexpected}.")
    encoder_model = AutoModel.from_pretrained(encoder.transformer_dir, add_pooling_layer=False)
    staged.model.instruction_encoder.encoder.load_state_dict(encoder_model.state_dict())
    staged.model.instruction_encoder.requires_grad_(False)
    reset_to_pytorch_defaults(staged.model.multi_modal_projector.aggregator)
    staged_processor = LlavaMultiLayerInstructionProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        instruction_tokenizer=AutoTokenizer.from_pretrained(encoder.transformer_dir),
        patch_size=processor.patch_size,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        chat_template=processor.chat_template,
        image_token=processor.image_token,
        num_additional_image_tokens=processor.num_additional_image_tokens,
        instruction_max_length=encoder.max_seq_length,
    )
    return staged, staged_processor


__all__ = ["add_aggregator", "reset_to_pytorch_defaults"]
