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
"""IGVA's instruction-guided fusion of layer groups (arXiv 2501.08443)."""

import torch
from torch import nn
from transformers import initialization as init

from .configuration_llava_multilayer import LlavaMultiLayerConfig, check_divisible, check_layer_group
from .fusion_llava_multilayer import FusionOutput, FusionProjector, mean_of_hidden_states, normalized_layer


class InstructionCrossAttention(nn.Module):
    """`nn.MultiheadAttention(batch_first=True)` with its parameter names (`in_proj_weight`, `in_proj_bias`,
    `out_proj`) and initialisation, computed with module calls only: serving engines (vLLM) replace `nn.Linear`
    submodules by their own layers, which `nn.MultiheadAttention` breaks by reading `out_proj.weight` directly."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * hidden_size))
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """`query`: `(batch, queries, hidden)`, `keys` (also the values): `(batch, keys, hidden)` -> like `query`."""
        weight_q, weight_k, weight_v = self.in_proj_weight.chunk(3)
        bias_q, bias_k, bias_v = self.in_proj_bias.chunk(3)

        def heads(states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            projected = nn.functional.linear(states, weight, bias)
            return projected.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        attended = nn.functional.scaled_dot_product_attention(
            heads(query, weight_q, bias_q), heads(keys, weight_k, bias_k), heads(keys, weight_v, bias_v)
        )
        return self.out_proj(attended.transpose(1, 2).flatten(-2))


class InstructionGuidedAggregatorBlock(nn.Module):
    """One block of the weight allocator: the query attends to the group CLS vectors, post-norm residuals, ReLU FFN."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.cross_attention = InstructionCrossAttention(hidden_size, num_heads)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.ffn = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, hidden_size))
        self.norm2 = nn.LayerNorm(hidden_size)

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """`query`: `(batch, 1, hidden)`, `keys`: `(batch, groups, hidden)` -> `(batch, 1, hidden)`."""
        attended = self.cross_attention(query, keys)
        hidden = self.norm1(attended + query)
        return self.norm2(self.ffn(hidden) + hidden)


class InstructionGuidedAggregator(nn.Module):
    """IGVA's weight allocator: one query (the instruction embedding) attends to the K group CLS vectors through
    a stack of blocks; a linear head and a softmax give one weight per group.
    """

    def __init__(self, vision_hidden_size: int, instruction_hidden_size: int, config: LlavaMultiLayerConfig):
        super().__init__()
        hidden_size = config.igva_hidden_size
        # Kept as a number: serving engines (vLLM) swap `nn.Linear` for layers without `in_features`.
        self.instruction_hidden_size = instruction_hidden_size
        self.sentence_proj = nn.Linear(instruction_hidden_size, hidden_size)
        self.cls_proj = nn.Linear(vision_hidden_size, hidden_size)
        self.blocks = nn.ModuleList(
            InstructionGuidedAggregatorBlock(hidden_size, config.igva_num_heads) for _ in range(config.igva_num_blocks)
        )
        self.linear = nn.Linear(hidden_size, len(config.igva_layer_groups))

    def forward(self, group_cls: torch.Tensor, instruction_embeds: torch.Tensor) -> torch.Tensor:
        """`group_cls`: `(batch, groups, vision_hidden)`, `instruction_embeds`: `(batch, instruction_hidden)` ->
        softmax weights `(batch, groups)`."""
        query = self.sentence_proj(instruction_embeds)[:, None]
        keys = self.cls_proj(group_cls)
        for block in self.blocks:
            query = block(query, keys)
        return self.linear(query).softmax(-1).squeeze(1)


class InstructionGuidedProjector(FusionProjector):
    """`igva` fuser: `MLP(concat([base patches, sum_g w_g * group_patches_g]))`, weights from the instruction.

    Each group's hidden states are averaged (CLS included); with `igva_aggregate_by_average` the groups are
    averaged uniformly and no instruction is needed.
    """

    fusion_type = "igva"
    original_family = "igva"
    exclusive_config_fields = ("igva_layer_groups",)
    layer_config_fields = ("igva_layer_groups",)
    strategy_config_fields = ("igva_aggregate_by_average",)

    def __init__(self, config: LlavaMultiLayerConfig):
        super().__init__(config, 2 * config.vision_config.hidden_size)
        self.base_layer = config.vision_feature_layer
        self.layer_groups = config.igva_layer_groups
        self.aggregate_by_average = config.igva_aggregate_by_average
        if self.aggregate_by_average:
            self.aggregator = None
        else:
            self.aggregator = InstructionGuidedAggregator(
                config.vision_config.hidden_size, config.instruction_encoder_config.hidden_size, config
            )

    @classmethod
    def validate_config(cls, config: LlavaMultiLayerConfig) -> None:
        super().validate_config(config)
        groups = config.igva_layer_groups
        if not groups:
            raise ValueError("fusion_type='igva' needs `igva_layer_groups`, a non-empty list of index lists.")
        for group in groups:
            check_layer_group("igva_layer_groups", group, config.num_vision_hidden_states)
        config.check_layer_indices("igva_layer_groups", [index for group in groups for index in group])
        if config.igva_aggregate_by_average:
            return
        if config.instruction_encoder_config is None:
            raise ValueError(
                "fusion_type='igva' with igva_aggregate_by_average=False needs `instruction_encoder_config` "
                "(the sentence encoder that embeds the instruction, e.g. an `mpnet` config)."
            )
        check_divisible("igva_hidden_size", config.igva_hidden_size, "igva_num_heads", config.igva_num_heads)
        encoder_width = config.instruction_encoder_config.hidden_size
        if config.igva_sentence_embed_dim is not None and config.igva_sentence_embed_dim != encoder_width:
            raise ValueError(
                f"`igva_sentence_embed_dim` ({config.igva_sentence_embed_dim}) is the input width of the weight "
                f"allocator, but the instruction encoder (`instruction_encoder_config.hidden_size`) produces "
                f"{encoder_width}-wide embeddings: use the encoder the allocator was trained with."
            )

    @classmethod
    def needs_instruction_encoder(cls, config: LlavaMultiLayerConfig) -> bool:
        return not config.igva_aggregate_by_average

    @classmethod
    def describe(cls, config: LlavaMultiLayerConfig) -> str:
        groups = ", ".join(f"{group[0]}-{group[-1]}" for group in config.igva_layer_groups)
        rule = "uniform average" if config.igva_aggregate_by_average else "weighted by the instruction"
        return f"IGVA: base layer {config.vision_feature_layer} + groups of layers {groups} ({rule})"

    @classmethod
    def fusion_weight_labels(cls, config: LlavaMultiLayerConfig) -> list[str]:
        groups = config.igva_layer_groups
        return [f"layers {group[0]}-{group[-1]}" if len(group) > 1 else f"layer {group[0]}" for group in groups]

    @classmethod
    def init_module_weights(cls, module: nn.Module) -> None:
        if isinstance(module, InstructionCrossAttention):
            # `nn.MultiheadAttention`'s own initialisation, which transformers applies to that class.
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)
            init.zeros_(module.out_proj.bias)

    @classmethod
    def upcycling_problems(cls, config: LlavaMultiLayerConfig, llava_layers: list[int]) -> list[str]:
        problems = []
        if [normalized_layer(config.vision_feature_layer, config.num_vision_hidden_states)] != llava_layers:
            problems.append(f"the igva base layer {config.vision_feature_layer} is not LLaVA's layer {llava_layers}.")
        if config.vision_feature_select_strategy != "default":
            problems.append("igva always drops the first vision token, but the LLaVA model keeps it ('full').")
        return problems

    @torch.no_grad()
    def init_from_llava(
        self, config: LlavaMultiLayerConfig, llava_projector: nn.Module, llava_layers: list[int]
    ) -> None:
        """LLaVA's MLP on the base layer's half of `linear_1`'s input columns; the fused half is zero."""
        self.linear_2.load_state_dict(llava_projector.linear_2.state_dict())
        source = llava_projector.linear_1
        if self.linear_1.bias is not None:
            self.linear_1.bias.copy_(source.bias)
        self.linear_1.weight.zero_()
        self.linear_1.weight[:, : source.weight.shape[1]] = source.weight

    def fuse(
        self, vision_hidden_states: tuple[torch.Tensor, ...], instruction_embeds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the concatenated `(num_images, tokens, 2 * vision_hidden)` features and the group weights."""
        # One (num_images, 1 + tokens, vision_hidden) mean per group.
        groups = [mean_of_hidden_states(vision_hidden_states, group) for group in self.layer_groups]
        if self.aggregate_by_average:
            weights = groups[0].new_full((groups[0].shape[0], len(groups)), 1.0 / len(groups))
        else:
            if instruction_embeds is None:
                raise ValueError(
                    "This instruction-guided (igva) model needs the instruction: pass `instructions=[...]` to the "
                    "processor (or `instruction_input_ids`/`instruction_attention_mask`, or `instruction_embeds`, "
                    "to the model)."
                )
            expected_width = self.aggregator.instruction_hidden_size
            if instruction_embeds.dim() != 2 or instruction_embeds.shape[-1] != expected_width:
                raise ValueError(
                    f"`instruction_embeds` must have shape (num_images, {expected_width}) (one instruction embedding "
                    f"per image), got {tuple(instruction_embeds.shape)}."
                )
            group_cls = torch.stack([group[:, 0] for group in groups], dim=1)  # (num_images, groups, vision_hidden)
            weights = self.aggregator(group_cls, instruction_embeds.to(group_cls.dtype))
        fused = weights[:, 0, None, None] * groups[0][:, 1:]
        for index in range(1, len(groups)):
            fused = fused + weights[:, index, None, None] * groups[index][:, 1:]
        base = vision_hidden_states[self.base_layer][:, 1:]
        return torch.cat([base, fused], dim=-1), weights

    def forward(
        self, vision_hidden_states: tuple[torch.Tensor, ...], instruction_embeds: torch.Tensor | None = None, **kwargs
    ) -> FusionOutput:
        features, weights = self.fuse(vision_hidden_states, instruction_embeds)
        return FusionOutput(self.project(features), fusion_weights=weights)


__all__ = [
    "InstructionCrossAttention",
    "InstructionGuidedAggregator",
    "InstructionGuidedAggregatorBlock",
    "InstructionGuidedProjector",
]
