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
forward pre-hook to the language model that gives those rows the cross-attention keys/values of the zero image's
internal features in its `internal_fusion_inputs` (computed in the graph, once per forward). It acts only on
forwards without a cache (training and scoring), not on generation.
"""

from __future__ import annotations

import torch
from torch import nn

from llava_multilayer.compatibility_llava_multilayer import CACHE_ARGUMENT
from llava_multilayer.internal_fusion_llava_multilayer import CrossAttentionInputs


def zero_image_features(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """The internal features of an all-zero image, one `(tokens, hidden)` tensor per internal feature."""
    vision_config = model.config.vision_config
    size = vision_config.image_size
    parameter = next(model.multi_modal_projector.parameters())
    pixels = torch.zeros(1, vision_config.num_channels, size, size, device=parameter.device, dtype=parameter.dtype)
    return tuple(feature[0] for feature in model.get_image_features(pixels).internal_image_features)


def _pad_tokens(tensor: torch.Tensor, num_tokens: int, dim: int, value=0) -> torch.Tensor:
    """Pads the token dimension `dim` of `tensor` with `value` to at least `num_tokens`."""
    missing = num_tokens - tensor.shape[dim]
    if missing <= 0:
        return tensor
    padding = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim()) + [0, missing]
    return nn.functional.pad(tensor, padding, value=value)


def _fill_text_only_rows(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Gives the rows without image tokens the keys/values of the zero image's internal features, in the
    `internal_fusion_inputs` the language model hands its decoder layers."""
    if kwargs.get(CACHE_ARGUMENT) is not None:
        return None
    layers = model.internal_fusion_layers
    inputs_embeds = kwargs.get("inputs_embeds")
    if not layers or inputs_embeds is None:
        return None
    batch_size = inputs_embeds.shape[0]
    current = kwargs.get("internal_fusion_inputs") or {}
    if current:
        text_only = ~next(iter(current.values())).feature_mask.any(-1)
    else:
        text_only = torch.ones(batch_size, dtype=torch.bool, device=inputs_embeds.device)
    if not text_only.any():
        return None
    zero = zero_image_features(model)
    layer_to_feature = model.config.internal_layer_to_feature
    filled = {}
    for layer in layers:
        feature = zero[layer_to_feature[layer.layer_idx]].to(inputs_embeds.dtype)
        num_tokens = feature.shape[0]
        zero_keys, zero_values = layer.cross_attn.key_values(feature[None].expand(batch_size, -1, -1))
        inputs = current.get(layer.layer_idx)
        if inputs is None:
            keys, values = torch.zeros_like(zero_keys), torch.zeros_like(zero_values)
            mask = torch.zeros(batch_size, num_tokens, dtype=torch.bool, device=zero_keys.device)
        else:
            keys, values = _pad_tokens(inputs.keys, num_tokens, 2), _pad_tokens(inputs.values, num_tokens, 2)
            mask = _pad_tokens(inputs.feature_mask, num_tokens, 1, value=False)
        rows = text_only.to(keys.device)
        row_mask = torch.zeros_like(mask)
        row_mask[:, :num_tokens] = True
        filled[layer.layer_idx] = CrossAttentionInputs(
            torch.where(rows[:, None, None, None], _pad_tokens(zero_keys, keys.shape[2], 2), keys),
            torch.where(rows[:, None, None, None], _pad_tokens(zero_values, values.shape[2], 2), values),
            torch.where(rows[:, None], row_mask, mask),
        )
    return args, {**kwargs, "internal_fusion_inputs": filled}


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
            return _fill_text_only_rows(base, args, kwargs)

        setattr(base, _HANDLE, base.language_model.register_forward_pre_hook(hook, with_kwargs=True))


__all__ = ["set_enabled", "zero_image_features"]
