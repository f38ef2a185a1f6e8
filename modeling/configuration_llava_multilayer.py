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
"""Configuration of LLaVA models that fuse several vision-encoder layers."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig


# LLaVA-1.5's vision tower, CLIP ViT-L/14 at 336 px, the default of all three original codebases.
DEFAULT_VISION_CONFIG = {
    "intermediate_size": 4096,
    "hidden_size": 1024,
    "patch_size": 14,
    "image_size": 336,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "projection_dim": 768,
}


def _sub_config(value: dict | PreTrainedConfig | None, default_model_type: str, defaults: dict | None = None):
    """A sub-config from a config, a dict (its `model_type` defaults to `default_model_type`) or `None` (defaults)."""
    if isinstance(value, PreTrainedConfig):
        return value
    if value is None:
        return AutoConfig.for_model(default_model_type, **(defaults or {}))
    value = dict(value)
    return AutoConfig.for_model(value.pop("model_type", default_model_type), **value)


def flatten_layers(layers) -> list[int]:
    """Flattens an `int | list[int | list[int]]` layer selection into the list of indices it uses."""
    if isinstance(layers, int):
        return [layers]
    flat = []
    for entry in layers:
        flat.extend(entry if isinstance(entry, list) else [entry])
    return flat


@strict
class LlavaMultiLayerConfig(PreTrainedConfig):
    r"""
    Configuration of a [`LlavaMultiLayerForConditionalGeneration`]: a LLaVA-1.5 style model whose visual tokens are
    built from several layers of the vision encoder ("multi-layer visual feature fusion").

    All layer indices index the vision tower's `hidden_states` tuple (`output_hidden_states=True`): index 0 is the
    embedding output, index `i` the output of encoder layer `i`, negative indices count from the end (so `-2` is the
    penultimate layer, LLaVA-1.5's choice). No post-layernorm is ever applied.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*, defaults to a CLIP ViT-L/14-336 vision config):
            Config of the vision tower, any transformers vision model (`clip_vision_model`, `siglip_vision_model`).
        text_config (`dict` or `PreTrainedConfig`, *optional*, defaults to a LLaMA config):
            Config of the language model (any decoder-only model; internal fusion needs LLaMA-style decoder layers).
        instruction_encoder_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the sentence encoder that embeds the instruction (`fusion_type="igva"` only; an `mpnet` config
            such as `sentence-transformers/all-mpnet-base-v2`).
        image_token_id (`int`, *optional*, defaults to 32000):
            Id of the image placeholder token. It may lie outside the language model's vocabulary, in which case it
            is never embedded and can never be generated.
        image_seq_length (`int`, *optional*, defaults to 576):
            Number of visual tokens per image.
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the two-layer MLP projector(s) (exact erf GELU in all original codebases).
        multimodal_projector_bias (`bool`, *optional*, defaults to `True`):
            Whether the projector linears have a bias.
        vision_feature_select_strategy (`str`, *optional*, defaults to `"default"`):
            `"default"` drops the first token of every selected hidden state (CLIP's CLS token; for SigLIP, which has
            no CLS, the first patch, as Layer_Select_Fuse does), `"full"` keeps all tokens.
        vision_feature_layer (`int` or `list`, *optional*, defaults to -2):
            The layers the external fuser consumes. `single`: one index. `concat`: a list whose entries are an index
            or a list of indices (averaged), concatenated on channels in list order. `mmfuser`: a list, the last
            entry is the query of the deformable cross-attention and the others are its value levels.
            `igva`: the base layer whose patches are concatenated before the fused ones.
        fusion_type (`str`, *optional*, defaults to `"single"`):
            External fuser, one of `fusion_registry_llava_multilayer.FUSION_PROJECTORS`: `"single"` (LLaVA-1.5),
            `"concat"` (channel concatenation, Layer_Select_Fuse E_D), `"mmfuser"` (deformable cross/self-attention,
            MMFuser and Layer_Select_Fuse E_M) or `"igva"` (instruction-guided weighting of layer groups).
        mmfuser_num_heads (`int`, *optional*, defaults to 16):
            Heads of the deformable attentions of the `mmfuser` block.
        mmfuser_num_points (`int`, *optional*, defaults to 4):
            Sampling points per head and level of the `mmfuser` block.
        mmfuser_layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the three LayerNorms of the `mmfuser` block.
        igva_layer_groups (`list[list[int]]`, *optional*):
            `igva`: groups of hidden-state indices; each group is averaged into one CLS vector and one patch map.
        igva_aggregate_by_average (`bool`, *optional*, defaults to `False`):
            `igva`: average the groups uniformly instead of weighting them by the instruction (IGVA stage 1).
        igva_num_blocks (`int`, *optional*, defaults to 4):
            `igva`: number of cross-attention blocks of the weight allocator.
        igva_num_heads (`int`, *optional*, defaults to 4):
            `igva`: heads of each allocator block.
        igva_hidden_size (`int`, *optional*, defaults to 1024):
            `igva`: width of the weight allocator.
        igva_sentence_embed_dim (`int`, *optional*):
            `igva`: width of the instruction embeddings the weight allocator takes (the original `sentence_embed_dim`);
            it must equal `instruction_encoder_config.hidden_size`. Defaults to that width.
        internal_fusion_type (`str`, *optional*):
            Internal fusion inside the language model: `"add"` (Layer_Select_Fuse I_D: projected features are added
            to the image-token positions of the hidden state entering a decoder layer, at prefill) or
            `"cross_attention"` (I_M: gated cross-attention + gated MLP). `None` disables internal fusion.
        internal_fusion_placement (`str`, *optional*, defaults to `"pre_cross"`):
            Where the gated cross-attention sits in a decoder layer: `"pre_cross"` (before self-attention, the only
            placement of the original code), `"post_cross"` (after the decoder layer) or `"parallel"` (beside
            self-attention). Only used with `internal_fusion_type="cross_attention"`.
        internal_feature_layers (`list[int]`, *optional*):
            Hidden-state indices of the internal features; feature `k` gets its own MLP projector.
        internal_layer_map (`list[list[int]]`, *optional*):
            `[decoder_layer, k]` pairs: decoder layer `decoder_layer` (0-based) receives internal feature `k`.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Whether the language model head shares the input embeddings.

    Example:

    ```python
    >>> from llava_multilayer import LlavaMultiLayerConfig, LlavaMultiLayerForConditionalGeneration

    >>> config = LlavaMultiLayerConfig(fusion_type="mmfuser", vision_feature_layer=[3, 8, 13, 18, 23])
    >>> model = LlavaMultiLayerForConditionalGeneration(config)
    ```"""

    model_type = "llava_multilayer"
    attribute_map = {"image_token_index": "image_token_id"}

    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig, "instruction_encoder_config": AutoConfig}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    instruction_encoder_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    image_seq_length: int = 576
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    vision_feature_layer: int | list[int | list[int]] = -2
    fusion_type: str = "single"
    mmfuser_num_heads: int = 16
    mmfuser_num_points: int = 4
    mmfuser_layer_norm_eps: float = 1e-6
    igva_layer_groups: list[list[int]] | None = None
    igva_aggregate_by_average: bool = False
    igva_num_blocks: int = 4
    igva_num_heads: int = 4
    igva_hidden_size: int = 1024
    igva_sentence_embed_dim: int | None = None
    internal_fusion_type: Literal["add", "cross_attention"] | None = None
    internal_fusion_placement: Literal["pre_cross", "post_cross", "parallel"] = "pre_cross"
    internal_feature_layers: list[int] | None = None
    internal_layer_map: list[list[int]] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # Sub-configs are resolved here rather than through `sub_configs_defaults` (transformers >= 5.21 only).
        self.vision_config = _sub_config(self.vision_config, "clip_vision_model", DEFAULT_VISION_CONFIG)
        self.text_config = _sub_config(self.text_config, "llama")
        if self.instruction_encoder_config is not None:
            self.instruction_encoder_config = _sub_config(self.instruction_encoder_config, "mpnet")
        super().__post_init__(**kwargs)
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = self.text_config.tie_word_embeddings

    @property
    def num_vision_hidden_states(self) -> int:
        """Length of the vision tower's `hidden_states` tuple (embeddings + one entry per encoder layer)."""
        return self.vision_config.num_hidden_layers + 1

    def check_layer_indices(self, name: str, indices: list[int]) -> None:
        """Raises unless every index of the field `name` is a hidden-state index of the vision tower."""
        n = self.num_vision_hidden_states
        bad = [i for i in indices if not -n <= i < n]
        if bad:
            raise ValueError(
                f"`{name}` contains {bad}, out of range for a vision tower with {n - 1} layers: hidden-state indices "
                f"must lie in [{-n}, {n - 1}] (0 = embeddings, {n - 1} = last layer)."
            )

    def validate_external_fusion(self):
        """The fuser exists, its settings fit it (its own `validate_config`) and fit the vision tower, and no other
        fuser's own fields are set."""
        from .fusion_registry_llava_multilayer import FUSION_PROJECTORS, fusion_projector_class

        fuser = fusion_projector_class(self.fusion_type)
        fuser.validate_config(self)
        self.check_layer_indices("vision_feature_layer", flatten_layers(self.vision_feature_layer))
        for other in FUSION_PROJECTORS.values():
            for name in other.exclusive_config_fields:
                if other is not fuser and getattr(self, name) is not None:
                    raise ValueError(
                        f"`{name}` is only used with fusion_type={other.fusion_type!r}, not {self.fusion_type!r}."
                    )

    def validate_internal_fusion(self):
        """Internal fusion has its feature layers and decoder-layer map, or none of them."""
        if self.internal_fusion_type is None:
            if self.internal_feature_layers or self.internal_layer_map:
                raise ValueError(
                    "`internal_feature_layers`/`internal_layer_map` are set but `internal_fusion_type` is None; set "
                    "it to 'add' or 'cross_attention'."
                )
            return
        if not self.internal_feature_layers:
            raise ValueError(
                f"internal_fusion_type={self.internal_fusion_type!r} needs `internal_feature_layers`, a non-empty "
                "list."
            )
        self.check_layer_indices("internal_feature_layers", self.internal_feature_layers)
        if not self.internal_layer_map:
            raise ValueError(
                f"internal_fusion_type={self.internal_fusion_type!r} needs `internal_layer_map`, a non-empty list of "
                "[decoder_layer, feature_index] pairs."
            )
        if self.internal_fusion_type == "cross_attention":
            check_divisible(
                "text_config.hidden_size",
                self.text_config.hidden_size,
                "text_config.num_attention_heads",
                self.text_config.num_attention_heads,
            )

    def validate_internal_layer_map(self):
        """Each `[decoder_layer, feature_index]` pair names an existing decoder layer (once) and feature."""
        if self.internal_fusion_type is None or not self.internal_feature_layers:
            return
        num_decoder_layers = self.text_config.num_hidden_layers
        num_features = len(self.internal_feature_layers)
        seen = set()
        for pair in self.internal_layer_map or []:
            if len(pair) != 2:
                raise ValueError(f"`internal_layer_map` entries are [decoder_layer, feature_index] pairs, got {pair}.")
            decoder_layer, feature_index = pair
            if not 0 <= decoder_layer < num_decoder_layers:
                raise ValueError(
                    f"`internal_layer_map` names decoder layer {decoder_layer}, but the language model has "
                    f"{num_decoder_layers} layers (valid: 0..{num_decoder_layers - 1})."
                )
            if not 0 <= feature_index < num_features:
                raise ValueError(
                    f"`internal_layer_map` names feature {feature_index}, but `internal_feature_layers` has "
                    f"{num_features} entries."
                )
            if decoder_layer in seen:
                raise ValueError(f"`internal_layer_map` names decoder layer {decoder_layer} twice.")
            seen.add(decoder_layer)

    @property
    def internal_layer_to_feature(self) -> dict[int, int]:
        """Maps each decoder layer that receives an internal feature to that feature's index."""
        return {layer: feature for layer, feature in (self.internal_layer_map or [])}


def check_layer_group(name: str, group, num_hidden_states: int) -> None:
    """Raises unless `group`, an entry of the field `name`, is a non-empty list naming distinct hidden states."""
    if not isinstance(group, list) or not group:
        raise ValueError(f"`{name}` contains an empty or non-list group: {group!r}.")
    if len(set(group)) != len(group):
        raise ValueError(f"`{name}` contains a group that repeats an index: {group}.")
    # A negative and a positive index can name the same hidden state (-1 and num_hidden_states - 1).
    positions = [index % num_hidden_states for index in group if -num_hidden_states <= index < num_hidden_states]
    if len(set(positions)) != len(positions):
        raise ValueError(
            f"`{name}` contains a group that names the same hidden state twice: {group} (as non-negative indices "
            f"{positions}, with {num_hidden_states} hidden states)."
        )


def check_divisible(name: str, value: int, divisor_name: str, divisor: int) -> None:
    """Raises unless the field `name` (`value`) is divisible by the field `divisor_name` (`divisor`)."""
    if divisor < 1 or value % divisor:
        raise ValueError(f"`{name}` ({value}) must be divisible by `{divisor_name}` ({divisor}).")


__all__ = ["LlavaMultiLayerConfig"]
