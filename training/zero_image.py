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
"""The zero image of text-only records, for internal cross-attention fusion (Layer_Select_Fuse I_M).

The original collator gives every text-only record of a multimodal run an all-zero image. For external fusion that
image changes nothing (none of its features is spliced in), but in I_M every decoder layer with cross-attention
attends to the internal features of the row's image, so a text-only row attends to the zero image's features
(with the causal rule of the original: query position `p` sees visual token `j <= p`), and the internal projectors
get gradients from it. This model gives rows without image tokens no visual features, so [`set_enabled`] adds a
forward pre-hook to the language model that fills those rows with the zero image's internal features (computed in
the graph, once per forward). It acts only on forwards without a cache (training and scoring), not on generation.
"""

from __future__ import annotations

import torch
from torch import nn

from llava_multilayer.internal_fusion_llava_multilayer import InternalFusionInputs


def zero_image_features(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """The internal features of an all-zero image, one `(tokens, hidden)` tensor per internal feature."""
    vision_config = model.config.vision_config
    size = vision_config.image_size
    parameter = next(model.multi_modal_projector.parameters())
    pixels = torch.zeros(1, vision_config.num_channels, size, size, device=parameter.device, dtype=parameter.dtype)
    return tuple(feature[0] for feature in model.get_image_features(pixels).internal_image_features)


def _fill_text_only_rows(model: nn.Module, args: tuple, kwargs: dict) -> None:
    if kwargs.get("past_key_values") is not None:
        return
    layers = model.internal_fusion_layers
    inputs_embeds = kwargs.get("inputs_embeds")
    if not layers or inputs_embeds is None:
        return
    batch_size = inputs_embeds.shape[0]
    current = [layer.fusion_inputs for layer in layers]
    if current[0] is None:
        text_only = torch.ones(batch_size, dtype=torch.bool, device=inputs_embeds.device)
    else:
        text_only = ~current[0].feature_mask.any(-1)
    if not text_only.any():
        return
    zero = zero_image_features(model)
    layer_to_feature = model.config.internal_layer_to_feature
    for layer, inputs in zip(layers, current):
        feature = zero[layer_to_feature[layer.layer_idx]].to(inputs_embeds.dtype)
        num_tokens = feature.shape[0]
        if inputs is None:
            features = feature.new_zeros(batch_size, num_tokens, feature.shape[-1])
            mask = torch.zeros(batch_size, num_tokens, dtype=torch.bool, device=feature.device)
        else:
            features, mask = inputs.features, inputs.feature_mask
            if features.shape[1] < num_tokens:
                pad = num_tokens - features.shape[1]
                features = nn.functional.pad(features, (0, 0, 0, pad))
                mask = nn.functional.pad(mask, (0, pad), value=False)
        rows = text_only.to(features.device)
        filled = torch.zeros_like(features)
        filled[:, :num_tokens] = feature
        features = torch.where(rows[:, None, None], filled, features)
        row_mask = torch.zeros_like(mask)
        row_mask[:, :num_tokens] = True
        mask = torch.where(rows[:, None], row_mask, mask)
        layer.fusion_inputs = InternalFusionInputs(features, feature_mask=mask)


_HANDLE = "_zero_image_hook"


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Installs (`enabled`) or removes the zero-image pre-hook of `model` (a `LlavaMultiLayerForConditionalGeneration`)
    when it has internal cross-attention fusion; other models are left alone. Installing twice is a no-op."""
    base = model.model
    if base.config.internal_fusion_type != "cross_attention":
        return
    handle = getattr(base, _HANDLE, None)
    if not enabled:
        if handle is not None:
            handle.remove()
            delattr(base, _HANDLE)
        return
    if handle is None:

        def hook(module, args, kwargs):
            _fill_text_only_rows(base, args, kwargs)

        setattr(base, _HANDLE, base.language_model.register_forward_pre_hook(hook, with_kwargs=True))


__all__ = ["set_enabled", "zero_image_features"]
