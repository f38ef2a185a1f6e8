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
"""Internal fusion: visual features injected into chosen decoder layers of the language model.

Layer_Select_Fuse (arXiv 2503.06063) studies two forms, both implemented here as wrappers around transformers' own
decoder layers. A wrapper adopts the wrapped layer's sub-modules (so parameter names stay those of the language
model) and reuses its `forward` where the residual structure allows it:

- `FeatureInjectionDecoderLayer` (I_D, `internal_fusion_type="add"`): the projected features are added to the
  image-token positions of the hidden state entering the layer, at prefill only.
- `CrossAttentionFusionDecoderLayer` (I_M, `internal_fusion_type="cross_attention"`): a gated cross-attention to the
  projected features plus a gated MLP.

The visual inputs reach the layers as the explicit keyword argument `internal_fusion_inputs` (a dict from decoder
layer index to that layer's inputs), which the language model's forward hands to every decoder layer with its other
keyword arguments; layers that fuse nothing ignore it. The cross-attention keys/values of I_M are computed once per
prompt and kept by a `CrossAttentionKeyValueStore` for the decode steps that continue the same cache.

A wrapper is an instance of the wrapped layer's class too (`FeatureInjectionDecoderLayer(llama_layer, 0)` is a
`LlamaDecoderLayer`), so that what recognises decoder layers by class, such as the language model's recording of
`hidden_states`, recognises the fusing ones.
"""

import weakref
from dataclasses import dataclass, fields
from functools import partial
from typing import ClassVar

import torch
from torch import nn
from transformers import Cache, GradientCheckpointingLayer, PreTrainedConfig
from transformers import initialization as init

from .compatibility_llava_multilayer import unwrap_layer_checkpointing


@dataclass
class FeatureInjectionInputs:
    """Visual inputs of one I_D layer at prefill.

    Args:
        features (`torch.Tensor` of shape `(num_images * num_image_tokens, hidden)`):
            The projected features of every image, flattened in image order.
        image_token_mask (`torch.Tensor` of shape `(batch, seq_len)`):
            `True` at the image-token positions of the sequence.
    """

    features: torch.Tensor
    image_token_mask: torch.Tensor


@dataclass
class CrossAttentionInputs:
    """Visual keys/values of one I_M layer.

    Args:
        keys, values (`torch.Tensor` of shape `(batch, heads, num_visual_tokens, head_dim)`):
            Projections of each row's images, concatenated and padded to the longest row.
        feature_mask (`torch.Tensor` of shape `(batch, num_visual_tokens)`):
            `True` where a row holds a real visual token.
    """

    keys: torch.Tensor
    values: torch.Tensor
    feature_mask: torch.Tensor


class CrossAttentionKeyValueStore:
    """The I_M keys/values of a prompt, kept for the decode steps that continue its cache.

    An entry is written when a prompt's images are encoded and belongs to the cache object of that forward: decode
    steps passing the same cache read it, and it disappears with the cache (weak reference), so its lifetime is that
    of one `generate` call, or of a cache that the caller keeps.
    """

    def __init__(self):
        self._entries: weakref.WeakKeyDictionary[Cache, dict[int, CrossAttentionInputs]] = weakref.WeakKeyDictionary()

    def put(self, cache: Cache, inputs: dict[int, CrossAttentionInputs]) -> None:
        self._entries[cache] = inputs

    def get(self, cache: Cache | None) -> dict[int, CrossAttentionInputs] | None:
        return None if cache is None else self._entries.get(cache)

    def __deepcopy__(self, memo):
        # Entries belong to caches of the original model; a copy starts empty.
        return type(self)()


_SPECIALISED_CLASSES: dict[tuple[type, type], type] = {}


class InternalFusionDecoderLayer(GradientCheckpointingLayer):
    """Base of the internal-fusion wrappers: adopts a decoder layer's modules and attributes.

    Constructing a wrapper around a `decoder_layer` gives an instance of the wrapper class specialised to
    `type(decoder_layer)` (a subclass of both, named as the wrapper). Each kind of internal fusion is one subclass,
    registered in [`INTERNAL_FUSION_LAYERS`]; the class attributes and methods below are what the core model, the
    commands and finetuning need from it.
    """

    #: The value of `config.internal_fusion_type` that selects this wrapper.
    internal_fusion_type: ClassVar[str]
    #: How the features reach the decoder layers, in words ("added to").
    verb: ClassVar[str]
    #: Whether the inputs computed at a prompt's prefill serve the decode steps that continue its cache.
    reuses_prompt_inputs: ClassVar[bool] = False
    #: Config fields of this kind of fusion that `llava-multilayer inspect` shows.
    strategy_config_fields: ClassVar[tuple[str, ...]] = ()
    #: Names of the wrapper's own bare parameters (trained in full beside a LoRA adapter, which cannot wrap them).
    trained_parameters: ClassVar[tuple[str, ...]] = ()
    #: Names of the wrapper's own linear-holding modules, which are kept out of quantization.
    unquantized_modules: ClassVar[tuple[str, ...]] = ()
    #: Whether the wrapper leaves the decoder layer's output unchanged only when the injected features are zero
    #: (it has no gate to close); upcycling then zeroes the internal projectors' last linear.
    starts_unchanged_with_zero_features: ClassVar[bool] = False

    @classmethod
    def upcycling_problems(cls, config) -> list[str]:
        """Why wrappers of `config` cannot start as the plain decoder layers (empty when they can)."""
        return []

    @classmethod
    def wrap(cls, decoder_layer: nn.Module, layer_idx: int, config) -> "InternalFusionDecoderLayer":
        """The wrapper of `decoder_layer` (index `layer_idx`) for a `LlavaMultiLayerConfig`."""
        return cls(decoder_layer, layer_idx)

    @classmethod
    def trained_modules(cls, config) -> list[str]:
        """Names of the wrapper's own modules, trained in full beside a LoRA adapter (peft `modules_to_save`)."""
        return []

    def init_fusion_weights(self) -> None:
        """Initialises the wrapper's own parameters that transformers' `_init_weights` does not know (parameters
        that were loaded stay)."""

    def start_unchanged(self) -> None:
        """Sets the wrapper's own parameters so that it computes what the plain decoder layer computes, where it can
        (see [`upcycling_problems`]); used by upcycling."""

    @classmethod
    def fusion_inputs(
        cls,
        layers: list["InternalFusionDecoderLayer"],
        features: dict[int, torch.Tensor],
        image_token_mask: torch.Tensor,
        num_image_tokens: int,
    ) -> dict:
        """`{layer_idx: inputs}` of one prompt for the wrappers `layers`, from `features[layer_idx]`, each of shape
        `(num_images, num_image_tokens, hidden)`, and the `(batch, seq_len)` image-token mask of the prompts."""
        raise NotImplementedError

    def __new__(cls, decoder_layer: nn.Module | None = None, *args, **kwargs):
        if decoder_layer is not None and not isinstance(decoder_layer, InternalFusionDecoderLayer):
            decoder_class = type(decoder_layer)
            if not issubclass(cls, decoder_class):
                key = (cls, decoder_class)
                if key not in _SPECIALISED_CLASSES:
                    namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
                    _SPECIALISED_CLASSES[key] = type(cls.__name__, (cls, decoder_class), namespace)
                cls = _SPECIALISED_CLASSES[key]
        return super().__new__(cls)

    def __init__(self, decoder_layer: nn.Module, layer_idx: int):
        nn.Module.__init__(self)  # not the wrapped class's `__init__`: its modules are adopted below
        for name, value in vars(decoder_layer).items():
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        for name, child in decoder_layer.named_children():
            self.add_module(name, child)
        self.layer_idx = layer_idx
        self.decoder_layer_class = type(decoder_layer)

    # Activation checkpointing of the whole call would leave this layer's visual inputs in the keyword arguments,
    # outside the checkpoint (reentrant checkpointing then backpropagates through the vision tower twice). The
    # checkpoint is taken inside `forward` instead (`run_checkpointed`), with the visual inputs among its inputs.
    __call__ = nn.Module.__call__

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        unwrap_layer_checkpointing(cls)

    def run_checkpointed(self, function, *args, **kwargs):
        """`function(*args, **kwargs)`, activation-checkpointed when that is on (the tensors in `args` are the
        checkpoint's inputs); the key/value cache is not used then, as transformers' checkpointed layers do."""
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return function(*args, **kwargs)
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        for name in ("cache", "past_key_values", "layer_past"):
            if kwargs.get(name) is not None:
                kwargs[name] = None
        return self._gradient_checkpointing_func(partial(function, **kwargs), *args)

    def decoder_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The wrapped decoder layer's own forward, run on the adopted modules."""
        return self.decoder_layer_class.forward(self, hidden_states, *args, **kwargs)


class FeatureInjectionDecoderLayer(InternalFusionDecoderLayer):
    """I_D: `hidden[image positions] += features` before the decoder layer, at prefill (no gate, no norm)."""

    internal_fusion_type = "add"
    verb = "added to"
    starts_unchanged_with_zero_features = True

    @classmethod
    def fusion_inputs(cls, layers, features, image_token_mask, num_image_tokens) -> dict[int, FeatureInjectionInputs]:
        return {
            layer.layer_idx: FeatureInjectionInputs(features[layer.layer_idx].flatten(0, 1), image_token_mask)
            for layer in layers
        }

    def forward(
        self,
        hidden_states: torch.Tensor,
        *args,
        internal_fusion_inputs: dict[int, FeatureInjectionInputs] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        inputs = internal_fusion_inputs.get(self.layer_idx) if internal_fusion_inputs else None
        if inputs is not None:
            mask = inputs.image_token_mask.unsqueeze(-1).to(hidden_states.device)
            features = inputs.features.to(hidden_states.device, hidden_states.dtype)
            hidden_states = hidden_states + torch.zeros_like(hidden_states).masked_scatter(mask, features)
        return self.run_checkpointed(self.decoder_forward, hidden_states, *args, **kwargs)


class FusionCrossAttention(nn.Module):
    """Multi-head cross-attention from text positions to visual tokens: no RoPE, no bias, softmax in float32.

    A query at sequence position `p` sees visual token `j` only if `j <= p` (Layer_Select_Fuse slices the causal
    self-attention mask to its first columns; positions past the image see every visual token).
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def key_values(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(batch, tokens, hidden)` -> keys and values `(batch, heads, tokens, head_dim)`."""
        batch_size, num_tokens, _ = features.shape
        shape = (batch_size, num_tokens, self.num_heads, self.head_dim)
        features = features.to(self.k_proj.weight.device, self.k_proj.weight.dtype)
        return self.k_proj(features).view(shape).transpose(1, 2), self.v_proj(features).view(shape).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        feature_mask: torch.Tensor,
        position_ids: torch.LongTensor,
    ) -> torch.Tensor:
        """`hidden_states`: `(batch, seq, hidden)`; `feature_mask`: `(batch, tokens)`; `position_ids`: `(batch or 1,
        seq)`. Returns `(batch, seq, hidden)`."""
        batch_size, seq_len, hidden_size = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch_size, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        token_index = torch.arange(keys.shape[2], device=hidden_states.device)
        allowed = token_index[None, None, :] <= position_ids.to(hidden_states.device)[:, :, None]
        allowed = allowed & feature_mask.to(hidden_states.device)[:, None, :]
        scores = torch.matmul(query, keys.transpose(2, 3)) * self.head_dim**-0.5
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
        probs = scores.float().softmax(-1).to(query.dtype)
        probs = probs.masked_fill(~allowed.any(-1)[:, None, :, None], 0.0)
        output = torch.matmul(probs, values).transpose(1, 2).reshape(batch_size, seq_len, hidden_size)
        return self.o_proj(output)


class CrossAttentionFusionDecoderLayer(InternalFusionDecoderLayer):
    """I_M: a decoder layer with a gated cross-attention to visual features and a gated MLP.

    Placements (`internal_fusion_placement`), with `n = input_layernorm(x)` and gates `tanh(g)`:

    - `pre_cross` (Layer_Select_Fuse's code): `h = n + g_a * CA(n)`, `h = h + g_m * XMLP(h)`, `h3 = x + SA(h)`,
      `h4 = post_attention_layernorm(h3)`, `out = h4 + MLP(h4)`. Note the residuals from normed values: the layer
      differs from the plain decoder layer even with closed gates.
    - `post_cross`: `h = Layer(x)`, `h = h + g_a * CA(N_a(h))`, `out = h + g_m * XMLP(N_m(h))`.
    - `parallel`: `h = x + SA(n) + g_a * CA(n)`, `h = h + g_m * XMLP(N_m(h))`, `out = h + MLP(post_norm(h))`.

    `post_cross` and `parallel` equal the plain decoder layer while both gates are zero.
    """

    internal_fusion_type = "cross_attention"
    verb = "cross-attended by"
    reuses_prompt_inputs = True
    strategy_config_fields = ("internal_fusion_placement",)
    trained_parameters = ("cross_attn_gate", "cross_mlp_gate")
    unquantized_modules = ("cross_attn", "cross_mlp")
    #: The norms each placement adds, trained in full with the cross-attention and its MLP.
    placement_norms: ClassVar[dict[str, tuple[str, ...]]] = {
        "post_cross": ("cross_attn_norm", "cross_mlp_norm"),
        "parallel": ("cross_mlp_norm",),
    }

    @classmethod
    def wrap(cls, decoder_layer: nn.Module, layer_idx: int, config) -> "CrossAttentionFusionDecoderLayer":
        return cls(decoder_layer, layer_idx, config.text_config, config.internal_fusion_placement)

    @classmethod
    def trained_modules(cls, config) -> list[str]:
        return ["cross_attn", "cross_mlp", *cls.placement_norms.get(config.internal_fusion_placement, ())]

    @classmethod
    def upcycling_problems(cls, config) -> list[str]:
        if config.internal_fusion_placement != "pre_cross":
            return []
        return [
            "internal_fusion_placement='pre_cross' feeds the self-attention residual from the normed hidden state, "
            "so the decoder layers change even with closed gates; 'post_cross' and 'parallel' start as the plain "
            "layers."
        ]

    def init_fusion_weights(self) -> None:
        """Closed gates: the layer starts as its placement's plain form."""
        init.zeros_(self.cross_attn_gate)
        init.zeros_(self.cross_mlp_gate)

    @torch.no_grad()
    def start_unchanged(self) -> None:
        self.cross_attn_gate.zero_()
        self.cross_mlp_gate.zero_()

    @classmethod
    def fusion_inputs(cls, layers, features, image_token_mask, num_image_tokens) -> dict[int, CrossAttentionInputs]:
        """Each row's images, concatenated and padded to the longest row, as keys/values of each layer."""
        images_per_row = (image_token_mask.sum(-1) // num_image_tokens).tolist()
        batch_size = image_token_mask.shape[0]
        feature_mask = torch.zeros(batch_size, max(max(images_per_row), 1) * num_image_tokens, dtype=torch.bool)
        for row, count in enumerate(images_per_row):
            feature_mask[row, : count * num_image_tokens] = True
        feature_mask = feature_mask.to(image_token_mask.device)
        inputs = {}
        for layer in layers:
            feature = features[layer.layer_idx]
            per_row = feature.new_zeros(batch_size, feature_mask.shape[1], feature.shape[-1])
            per_row[feature_mask] = feature.flatten(0, 1)
            inputs[layer.layer_idx] = layer.cross_attention_inputs(per_row, feature_mask)
        return inputs

    def __init__(self, decoder_layer: nn.Module, layer_idx: int, text_config: PreTrainedConfig, placement: str):
        super().__init__(decoder_layer, layer_idx)
        self.placement = placement
        hidden_size = text_config.hidden_size
        self.cross_attn = FusionCrossAttention(hidden_size, text_config.num_attention_heads)
        self.cross_attn_gate = nn.Parameter(torch.zeros(1))
        self.cross_mlp = type(decoder_layer.mlp)(text_config)
        self.cross_mlp_gate = nn.Parameter(torch.zeros(1))
        norm_class = type(decoder_layer.input_layernorm)
        eps = getattr(text_config, "rms_norm_eps", 1e-6)
        if placement == "post_cross":
            self.cross_attn_norm = norm_class(hidden_size, eps=eps)
        if placement in ("post_cross", "parallel"):
            self.cross_mlp_norm = norm_class(hidden_size, eps=eps)

    def cross_attention_inputs(self, features: torch.Tensor, feature_mask: torch.Tensor) -> CrossAttentionInputs:
        """Keys/values of the `(batch, num_visual_tokens, hidden)` features, once per prompt."""
        keys, values = self.cross_attn.key_values(features)
        return CrossAttentionInputs(keys, values, feature_mask)

    def _gated_cross_attention(self, hidden_states, inputs: CrossAttentionInputs | None, position_ids):
        if inputs is None:
            return torch.zeros_like(hidden_states)
        attended = self.cross_attn(hidden_states, inputs.keys, inputs.values, inputs.feature_mask, position_ids)
        return self.cross_attn_gate.tanh() * attended

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.LongTensor | None = None,
        internal_fusion_inputs: dict[int, CrossAttentionInputs] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if position_ids is None:
            raise ValueError("Cross-attention fusion needs the `position_ids` the language model passes its layers.")
        cross_inputs = internal_fusion_inputs.get(self.layer_idx) if internal_fusion_inputs else None
        visual = () if cross_inputs is None else tuple(getattr(cross_inputs, f.name) for f in fields(cross_inputs))
        return self.run_checkpointed(self.fused_forward, hidden_states, *visual, position_ids=position_ids, **kwargs)

    def fused_forward(
        self,
        hidden_states: torch.Tensor,
        keys: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        feature_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.LongTensor,
        **kwargs,
    ) -> torch.Tensor:
        """The layer on `(batch, seq, hidden)` states, with the `CrossAttentionInputs` fields as tensors (or none)."""
        cross_inputs = None if keys is None else CrossAttentionInputs(keys, values, feature_mask)
        attention_kwargs = {"position_ids": position_ids, **kwargs}
        if self.placement == "post_cross":
            hidden_states = self.decoder_forward(hidden_states, **attention_kwargs)
            hidden_states = hidden_states + self._gated_cross_attention(
                self.cross_attn_norm(hidden_states), cross_inputs, position_ids
            )
            return hidden_states + self.cross_mlp_gate.tanh() * self.cross_mlp(self.cross_mlp_norm(hidden_states))

        normed = self.input_layernorm(hidden_states)
        if self.placement == "pre_cross":
            fused = normed + self._gated_cross_attention(normed, cross_inputs, position_ids)
            fused = fused + self.cross_mlp_gate.tanh() * self.cross_mlp(fused)
            attended, _ = self.self_attn(hidden_states=fused, **attention_kwargs)
            hidden_states = self.post_attention_layernorm(hidden_states + attended)
            return hidden_states + self.mlp(hidden_states)

        attended, _ = self.self_attn(hidden_states=normed, **attention_kwargs)
        hidden_states = hidden_states + attended + self._gated_cross_attention(normed, cross_inputs, position_ids)
        hidden_states = hidden_states + self.cross_mlp_gate.tanh() * self.cross_mlp(self.cross_mlp_norm(hidden_states))
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


INTERNAL_FUSION_LAYERS: dict[str, type[InternalFusionDecoderLayer]] = {
    layer.internal_fusion_type: layer for layer in (FeatureInjectionDecoderLayer, CrossAttentionFusionDecoderLayer)
}


def internal_fusion_layer_class(internal_fusion_type: str) -> type[InternalFusionDecoderLayer]:
    """The decoder-layer wrapper of `internal_fusion_type`."""
    return INTERNAL_FUSION_LAYERS[internal_fusion_type]


def no_split_internal_fusion_layers() -> list[str]:
    """Class names of the wrappers, which `device_map` keeps on one device with their cross-fusion modules."""
    return [layer.__name__ for layer in INTERNAL_FUSION_LAYERS.values()]


__all__ = [
    "INTERNAL_FUSION_LAYERS",
    "CrossAttentionFusionDecoderLayer",
    "CrossAttentionInputs",
    "CrossAttentionKeyValueStore",
    "FeatureInjectionDecoderLayer",
    "FeatureInjectionInputs",
    "FusionCrossAttention",
    "InternalFusionDecoderLayer",
    "internal_fusion_layer_class",
    "no_split_internal_fusion_layers",
]
