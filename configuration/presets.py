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
"""Named configurations of the published methods at their real sizes (for training from scratch or upcycling).

`get_preset(name)` returns a fresh [`LlavaMultiLayerConfig`]; `PRESETS` lists the names. The vision and text
configs are the architectures of the public checkpoints the papers start from (`openai/clip-vit-large-patch14-336`,
`google/siglip-so400m-patch14-384`, `lmsys/vicuna-7b-v1.5`, `lmsys/vicuna-13b-v1.5`, `mtgv/MobileLLaMA-1.4B-Base`);
no weights are downloaded.
"""

from collections.abc import Callable

from llava_multilayer import LlavaMultiLayerConfig


CLIP_L_336 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}
SIGLIP_SO400M_384 = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 26,  # Layer_Select_Fuse drops the last of the 27 layers
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
VICUNA_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
}
VICUNA_13B = {
    **VICUNA_7B,
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 40,
}
MOBILELLAMA_1_4B = {
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
}
MPNET_BASE = {
    "model_type": "mpnet",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "vocab_size": 30527,
}
IMAGE_TOKEN_ID = 32000  # outside the 32000-token LLaMA vocabulary: never embedded, never generated


def _config(vision: dict, text: dict, **fusion) -> LlavaMultiLayerConfig:
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    return LlavaMultiLayerConfig(
        vision_config=dict(vision),
        text_config=dict(text),
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=tokens if vision["model_type"] == "clip_vision_model" else tokens - 1,
        **fusion,
    )


PRESETS: dict[str, Callable[[], LlavaMultiLayerConfig]] = {
    "llava-1.5-7b": lambda: _config(CLIP_L_336, VICUNA_7B, fusion_type="single", vision_feature_layer=-2),
    "mmfuser-7b": lambda: _config(
        CLIP_L_336, VICUNA_7B, fusion_type="mmfuser", vision_feature_layer=[3, 8, 13, 18, 23]
    ),
    "mmfuser-13b": lambda: _config(
        CLIP_L_336, VICUNA_13B, fusion_type="mmfuser", vision_feature_layer=[3, 8, 13, 18, 23]
    ),
    "lsf-E_D-clip-3-18-23-mobilellama-1.4b": lambda: _config(
        CLIP_L_336, MOBILELLAMA_1_4B, fusion_type="concat", vision_feature_layer=[3, 18, 23]
    ),
    "lsf-E_M-clip-3-18-23-mobilellama-1.4b": lambda: _config(
        CLIP_L_336, MOBILELLAMA_1_4B, fusion_type="mmfuser", vision_feature_layer=[3, 18, 23]
    ),
    "lsf-I_D-clip-3-18-23-mobilellama-1.4b": lambda: _config(
        CLIP_L_336,
        MOBILELLAMA_1_4B,
        fusion_type="single",
        vision_feature_layer=23,
        internal_fusion_type="add",
        internal_feature_layers=[3, 18, 23],
        internal_layer_map=[[2, 0], [17, 1], [22, 2]],
    ),
    "lsf-I_M-clip-3-18-23-mobilellama-1.4b": lambda: _config(
        CLIP_L_336,
        MOBILELLAMA_1_4B,
        fusion_type="single",
        vision_feature_layer=23,
        internal_fusion_type="cross_attention",
        internal_feature_layers=[3, 18, 23],
        internal_layer_map=[[2, 0], [17, 1], [22, 2]],
    ),
    "lsf-E_D-siglip-3-18-23-mobilellama-1.4b": lambda: _config(
        SIGLIP_SO400M_384, MOBILELLAMA_1_4B, fusion_type="concat", vision_feature_layer=[3, 20, 25]
    ),
    "igva-7b": lambda: _config(
        CLIP_L_336,
        VICUNA_7B,
        fusion_type="igva",
        vision_feature_layer=-2,
        igva_layer_groups=[list(range(start, start + 6)) for start in (1, 7, 13, 19)],
        igva_num_blocks=4,
        igva_num_heads=4,
        igva_hidden_size=1024,
        instruction_encoder_config=dict(MPNET_BASE),
    ),
}


def get_preset(name: str) -> LlavaMultiLayerConfig:
    """A fresh configuration of the named preset (see `PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; available: {sorted(PRESETS)}.")
    return PRESETS[name]()


__all__ = ["PRESETS", "get_preset"]
