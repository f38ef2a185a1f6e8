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
"""The frozen sentence encoder that embeds the instruction of instruction-guided fusers."""

import torch
from torch import nn
from transformers import AutoModel, PreTrainedConfig


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


__all__ = ["InstructionEncoder"]
