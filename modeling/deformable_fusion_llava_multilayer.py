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
"""MMFuser's multi-layer fuser: deformable cross-attention from a deep layer to shallow/middle layers.

MMFuser (arXiv 2410.11829) and Layer_Select_Fuse's external modular fusion (E_M, arXiv 2503.06063) use the same
block: Deformable-DETR multi-scale deformable attention (arXiv 2010.04159) over several vision layers.
"""

import math

import torch
from torch import nn
from transformers import initialization as init

from .compatibility_llava_multilayer import MultiScaleDeformableAttention
from .configuration_llava_multilayer import LlavaMultiLayerConfig, check_divisible
from .fusion_llava_multilayer import FusionOutput, QueryLayerFusionProjector, select_vision_feature


def square_grid_side(num_tokens: int, what: str) -> int:
    """Side of the square patch grid holding `num_tokens` tokens; raises if the grid is not square."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"The mmfuser fuser needs a square patch grid, but the {what} has {num_tokens} tokens, which is not a "
            "perfect square. With SigLIP use vision_feature_select_strategy='full' (SigLIP has no CLS token)."
        )
    return side


def grid_reference_points(side: int, device: torch.device) -> torch.Tensor:
    """Centres of a `side x side` grid, row-major, as normalised `(x, y)`: `(1, side*side, 1, 2)`, float32."""
    coords = (torch.arange(side, dtype=torch.float32, device=device) + 0.5) / side
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)[None, :, None]


class MMFuserDeformableSampling(MultiScaleDeformableAttention):
    """transformers' `MultiScaleDeformableAttention` (Deformable-DETR's sampling core) with a faster forward.

    Same signature and math as transformers' pure-PyTorch forward, which permutes every level into an image,
    bilinearly samples it with `grid_sample` (points on the innermost axis), stacks all levels and points and reduces
    them. Here each sampling point instead becomes its four bilinear corners, each a row of `value` (the heads'
    channels are contiguous there, so `value` is used as it is, without per-level copies) with weight `attention
    weight x bilinear weight` (0 outside the map, like `grid_sample`'s zero padding with `align_corners=False`), and
    `embedding_bag` sums the weighted rows. Only the order of the products and sums differs (float32 round-off,
    ~1e-6 relative). Gradients flow to `value`, the locations and the attention weights.

    It stays a `MultiScaleDeformableAttention`, so `from_pretrained(..., use_kernels=True)` still replaces its forward
    by the hub's compiled kernel on CUDA.
    """

    def forward(
        self,
        value: torch.Tensor,
        value_spatial_shapes: torch.Tensor,
        value_spatial_shapes_list: list[tuple[int, int]],
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        im2col_step: int,
    ) -> torch.Tensor:
        """
        Args:
            value: `(batch, sum(h * w), heads, head_dim)`, the levels concatenated row-major.
            value_spatial_shapes: `(levels, 2)` long tensor of `(height, width)`; `value_spatial_shapes_list` the same.
            level_start_index: `(levels,)`, offset of each level in `value`.
            sampling_locations: `(batch, queries, heads, levels, points, 2)`, normalised `(x, y)`.
            attention_weights: `(batch, queries, heads, levels, points)`.
            im2col_step: used by compiled kernels only.

        Returns:
            `(batch, queries, heads * head_dim)`, in the dtype of `sampling_locations`.
        """
        batch_size, num_values, num_heads, head_dim = value.shape
        num_queries = sampling_locations.shape[1]
        dtype = sampling_locations.dtype
        heights = value_spatial_shapes[:, 0, None]  # (levels, 1): broadcasts over the points
        widths = value_spatial_shapes[:, 1, None]
        # Pixel coordinates (batch, queries, heads, levels, points); pixel centres sit at (k + 0.5) / size.
        x = sampling_locations[..., 0] * widths - 0.5
        y = sampling_locations[..., 1] * heights - 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        x0, y0 = x0.long(), y0.long()
        # Bilinear weights of the left/right and top/bottom corners, 0 where a corner lies outside the map.
        left = (1 - fx) * ((x0 >= 0) & (x0 < widths))
        right = fx * ((x0 >= -1) & (x0 < widths - 1))
        attention_weights = attention_weights.to(dtype)
        top = attention_weights * (1 - fy) * ((y0 >= 0) & (y0 < heights))
        bottom = attention_weights * fy * ((y0 >= -1) & (y0 < heights - 1))
        # (batch, queries, heads, 4 corners, levels, points)
        corner_weights = torch.stack([top * left, top * right, bottom * left, bottom * right], dim=3)
        # Row of each corner in `value` viewed as (batch * tokens * heads, head_dim); a corner outside the map weighs
        # 0, so clamping it to any row in range is harmless.
        batch_start = torch.arange(batch_size, device=value.device).view(-1, 1, 1, 1, 1) * num_values
        heads = torch.arange(num_heads, device=value.device).view(1, 1, -1, 1, 1)
        top_left = (batch_start + level_start_index[:, None] + y0 * widths + x0) * num_heads + heads
        row_step = widths * num_heads
        corners = [top_left, top_left + num_heads, top_left + row_step, top_left + row_step + num_heads]
        rows = torch.stack(corners, dim=3)
        rows = rows.clamp_(0, batch_size * num_values * num_heads - 1)
        bags = batch_size * num_queries * num_heads  # one bag per query and head
        output = nn.functional.embedding_bag(
            rows.view(bags, -1),
            value.reshape(-1, head_dim).to(dtype),
            per_sample_weights=corner_weights.view(bags, -1),
            mode="sum",
        )
        return output.view(batch_size, num_queries, num_heads * head_dim)


class MMFuserDeformableAttention(nn.Module):
    """Multi-scale deformable attention (Deformable-DETR) with the sampling done in float32, as MMFuser does.

    The sampling core is [`MMFuserDeformableSampling`], a transformers `MultiScaleDeformableAttention` that picks up
    a compiled kernel where the `kernels` package provides one (`use_kernels=True`).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_levels: int, num_points: int):
        super().__init__()
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(hidden_size, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(hidden_size, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(hidden_size, hidden_size)
        self.output_proj = nn.Linear(hidden_size, hidden_size)
        self.attn = MMFuserDeformableSampling()

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        """
        Args:
            query: `(batch, num_queries, hidden)`.
            reference_points: `(1 or batch, num_queries, 1 or num_levels, 2)`, normalised `(x, y)`.
            value: `(batch, sum(h * w), hidden)`, the levels concatenated row-major.
            spatial_shapes: `(height, width)` of each level.

        Returns:
            `(batch, num_queries, hidden)`.
        """
        batch_size, num_queries, hidden_size = query.shape
        head_dim = hidden_size // self.num_heads
        value = self.value_proj(value).view(batch_size, -1, self.num_heads, head_dim)
        offsets = self.sampling_offsets(query).view(
            batch_size, num_queries, self.num_heads, self.num_levels, self.num_points, 2
        )
        weights = self.attention_weights(query).view(batch_size, num_queries, self.num_heads, -1).softmax(-1)
        weights = weights.view(batch_size, num_queries, self.num_heads, self.num_levels, self.num_points)

        shapes = torch.tensor(spatial_shapes, dtype=torch.long, device=query.device)
        normalizer = shapes.flip(-1)  # (width, height): x is divided by the width, y by the height
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        level_start = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
        output = self.attn(
            value.float(), shapes, spatial_shapes, level_start, locations.float(), weights.float(), im2col_step=64
        )
        return self.output_proj(output.to(self.output_proj.weight.dtype))


class MMFuserBlock(nn.Module):
    """The MMFuser block: the query layer attends to the value layers, then to itself; two per-channel scales.

    `out = q + s1 * (A + s2 * SelfAttn(LN_1(A)))` with `A = CrossAttn(LN_q(q), LN_f(values))`.
    """

    def __init__(self, hidden_size: int, num_levels: int, num_heads: int, num_points: int, layer_norm_eps: float):
        super().__init__()
        self.num_levels = num_levels
        self.query_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.feat_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.norm1 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.cross_attn = MMFuserDeformableAttention(hidden_size, num_heads, num_levels, num_points)
        self.self_attn = MMFuserDeformableAttention(hidden_size, num_heads, 1, num_points)
        # The originals call these `gamma1`/`gamma2`; loaders rename "gamma" keys, so they get neutral names.
        self.cross_attn_scale = nn.Parameter(torch.zeros(hidden_size))
        self.self_attn_scale = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, query: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
        """`query`: `(batch, tokens, hidden)`; `values`: `num_levels` tensors `(batch, tokens_l, hidden)`."""
        spatial_shapes = [(side, side) for side in (square_grid_side(v.shape[1], "value layer") for v in values)]
        query_side = square_grid_side(query.shape[1], "query layer")
        reference_points = grid_reference_points(query_side, query.device)
        attended = self.cross_attn(
            self.query_norm(query), reference_points, self.feat_norm(torch.cat(values, dim=1)), spatial_shapes
        )
        attended_norm = self.norm1(attended)
        refined = self.self_attn(attended_norm, reference_points, attended_norm, [(query_side, query_side)])
        attended = attended + self.self_attn_scale * refined
        return query + self.cross_attn_scale * attended


class MMFuserProjector(QueryLayerFusionProjector):
    """`mmfuser` fuser: the MMFuser block over the selected layers, then the MLP projector.

    `vision_feature_layer[-1]` is the query layer, the other entries are the value levels in order.
    """

    fusion_type = "mmfuser"
    original_family = "mmfuser"

    def __init__(self, config: LlavaMultiLayerConfig):
        super().__init__(config, config.vision_config.hidden_size)
        self.layers = config.vision_feature_layer
        self.strategy = config.vision_feature_select_strategy
        self.fuser = MMFuserBlock(
            hidden_size=config.vision_config.hidden_size,
            num_levels=len(self.layers) - 1,
            num_heads=config.mmfuser_num_heads,
            num_points=config.mmfuser_num_points,
            layer_norm_eps=config.mmfuser_layer_norm_eps,
        )

    @classmethod
    def validate_config(cls, config: LlavaMultiLayerConfig) -> None:
        super().validate_config(config)
        width = config.vision_config.hidden_size
        check_divisible("vision_config.hidden_size", width, "mmfuser_num_heads", config.mmfuser_num_heads)
        if config.mmfuser_num_points < 1:
            raise ValueError(f"`mmfuser_num_points` must be >= 1, got {config.mmfuser_num_points}.")

    @classmethod
    def describe(cls, config: LlavaMultiLayerConfig) -> str:
        layers = config.vision_feature_layer
        return f"MMFuser: vision layer {layers[-1]} queries layers {layers[:-1]}"

    @classmethod
    def init_module_weights(cls, module: nn.Module) -> None:
        if isinstance(module, MMFuserBlock):
            init_deformable_attention(module.cross_attn)
            init_deformable_attention(module.self_attn)
            init.zeros_(module.cross_attn_scale)
            init.zeros_(module.self_attn_scale)

    @torch.no_grad()
    def init_from_llava(
        self, config: LlavaMultiLayerConfig, llava_projector: nn.Module, llava_layers: list[int]
    ) -> None:
        """LLaVA's MLP, and zero residual scales: the block passes the query layer through unchanged."""
        super().init_from_llava(config, llava_projector, llava_layers)
        self.fuser.cross_attn_scale.zero_()
        self.fuser.self_attn_scale.zero_()

    def fuse(self, vision_hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The MMFuser block output, `(num_images, tokens, vision_hidden)`, in the vision tower's dtype."""
        selected = [select_vision_feature(vision_hidden_states, layer, self.strategy) for layer in self.layers]
        return self.fuser(selected[-1], selected[:-1])

    def forward(self, vision_hidden_states: tuple[torch.Tensor, ...], **kwargs) -> FusionOutput:
        return FusionOutput(self.project(self.fuse(vision_hidden_states)))


def init_deformable_attention(module: MMFuserDeformableAttention) -> None:
    """Deformable-DETR's initialisation: zero offsets/weights, a star-shaped offset bias, xavier projections."""
    init.zeros_(module.sampling_offsets.weight)
    thetas = torch.arange(module.num_heads, dtype=torch.float32) * (2.0 * math.pi / module.num_heads)
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)
    grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(module.num_heads, 1, 1, 2)
    grid = grid.repeat(1, module.num_levels, module.num_points, 1)
    grid = grid * torch.arange(1, module.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
    init.copy_(module.sampling_offsets.bias, grid.view(-1))
    init.zeros_(module.attention_weights.weight)
    init.zeros_(module.attention_weights.bias)
    init.xavier_uniform_(module.value_proj.weight)
    init.zeros_(module.value_proj.bias)
    init.xavier_uniform_(module.output_proj.weight)
    init.zeros_(module.output_proj.bias)


__all__ = [
    "MMFuserBlock",
    "MMFuserDeformableAttention",
    "MMFuserDeformableSampling",
    "MMFuserProjector",
    "init_deformable_attention",
]
