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
"""IGVA's instruction-guided fusion of layer groups (arXiv 2501.08443) and its sentence encoder."""

import torch
from torch import nn
from transformers import AutoModel, PreTrainedConfig

from .configuration_llava_multilayer import LlavaMultiLayerConfig
from .projection_llava_multilayer import FusionOutput, LlavaMultiLayerMLPProjector, mean_of_hidden_states


class InstructionEncoder(nn.Module):
    """A sentence encoder built from transformers classes, as sentence-transformers' all-mpnet-base-v2 is defined:
    the encoder model, mean pooling over the attended tokens, L2 normalisation. It is frozen.
    """

    def __init__(self, config: PreTrainedConfig):
        super().__init__()
        self.encoder = AutoModel.from_config(config, add_pooling_layer=False)
        self.requires_grad_(False)

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`(batch, length)` ids and mask -> unit-norm embeddings `(batch, hidden)`."""
        token_embeddings = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
        pooled = (token_embeddings * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1)


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
            [InstructionGuidedAggregatorBlock(hidden_size, config.igva_num_heads) for _ in range(config.igva_num_blocks)]
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


class InstructionGuidedProjector(LlavaMultiLayerMLPProjector):
    """`igva` fuser: `MLP(concat([base patches, sum_g w_g * group_patches_g]))`, weights from the instruction.

    Each group's hidden states are averaged (CLS included); with `igva_aggregate_by_average` the groups are
    averaged uniformly and no instruction is needed.
    """

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
    "InstructionEncoder",
    "InstructionGuidedAggregator",
    "InstructionGuidedAggregatorBlock",
    "InstructionGuidedProjector",
]
