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
"""Upcycling: a multi-layer fusion model built from a trained transformers LLaVA model.

The vision tower, language model, `lm_head` and LLaVA's MLP projector are copied, and every new part is initialised
so that the new model computes exactly what the LLaVA model computed, until finetuning moves it. Each fuser says how
(`FusionProjector.upcycled_vision_feature_layer`, `upcycling_problems`, `init_from_llava`):

| fusion | initialisation that keeps LLaVA's outputs |
|---|---|
| `single` | the projector is copied (the layer must be LLaVA's) |
| `concat` | `linear_1` columns of LLaVA's layer(s) get LLaVA's weights, the columns of the extra layers are zero |
| `mmfuser` | the query layer (last entry) is LLaVA's layer; both residual scales are zero: the block is the identity |
| `igva` | the base layer is LLaVA's layer and the fused half of `linear_1`'s input columns is zero |
| internal `add` | the internal projectors' `linear_2` is zero, so the injected features are zero |
| internal `cross_attention`, `post_cross`/`parallel` | both gates are zero, so the layer is the plain decoder layer |

Internal `cross_attention` with `internal_fusion_placement="pre_cross"` (Layer_Select_Fuse's own placement) cannot
keep LLaVA's outputs: its self-attention residual starts from the *normed* hidden state even with closed gates.
Such cases raise, unless `strict=False`, in which case they are built with a warning.
"""

import copy
import dataclasses
import os
import warnings
from types import SimpleNamespace

import torch
from torch import nn
from transformers import AutoModel, LlavaForConditionalGeneration, PreTrainedModel

from .configuration_llava_multilayer import LlavaMultiLayerConfig
from .fusion_registry_llava_multilayer import fusion_projector_class
from .internal_fusion_llava_multilayer import internal_fusion_layer_class
from .processing_llava_multilayer import (
    VICUNA_V1_CHAT_TEMPLATE,
    LlavaMultiLayerInstructionProcessor,
    LlavaMultiLayerProcessor,
)
from .tokenization_llava_multilayer import add_image_token


# Config fields that are LLaVA's own and copied as they are.
_LLAVA_CONFIG_FIELDS = (
    "image_token_id",
    "image_seq_length",
    "projector_hidden_act",
    "multimodal_projector_bias",
    "vision_feature_select_strategy",
    "tie_word_embeddings",
)


class UpcyclingError(ValueError):
    """The requested fusion cannot start from the LLaVA model's outputs (raised with `strict=True`)."""


def upcycle_llava(
    model_class: type[PreTrainedModel],
    llava_model_or_path: "LlavaForConditionalGeneration | str | os.PathLike",
    fusion_type: str = "single",
    strict: bool = True,
    instruction_encoder: "PreTrainedModel | str | os.PathLike | None" = None,
    **config_kwargs,
) -> PreTrainedModel:
    """Builds a `model_class` (a `LlavaMultiLayerForConditionalGeneration`) from a transformers LLaVA model.

    Args:
        model_class: The class to instantiate.
        llava_model_or_path: A [`LlavaForConditionalGeneration`] or a directory / Hub id it loads from.
        fusion_type: The fuser, a key of `FUSION_PROJECTORS` (see [`LlavaMultiLayerConfig`]).
        strict: Raise [`UpcyclingError`] when the new model cannot reproduce LLaVA's outputs; with `False`, build it
            anyway and warn.
        instruction_encoder: Fusers that embed an instruction only (`igva` with an aggregator): the sentence
            encoder (a transformers model, e.g. `sentence-transformers/all-mpnet-base-v2`, or where it loads from)
            whose weights fill the frozen instruction encoder. Without it the encoder stays randomly initialised (an
            error with `strict=True`).
        config_kwargs: Any other [`LlavaMultiLayerConfig`] field (`vision_feature_layer`, `internal_fusion_type`,
            ...). `vision_feature_layer` defaults to LLaVA's.

    Returns:
        The new model, in evaluation mode, in LLaVA's dtype, on the CPU.
    """
    llava = _load_llava(llava_model_or_path)
    num_hidden_states = llava.config.vision_config.num_hidden_layers + 1
    llava_layers = _as_layer_list(llava.config.vision_feature_layer, num_hidden_states)
    if instruction_encoder is not None and not isinstance(instruction_encoder, PreTrainedModel):
        instruction_encoder = AutoModel.from_pretrained(instruction_encoder, add_pooling_layer=False)
    config = _upcycled_config(model_class, llava.config, fusion_type, instruction_encoder, config_kwargs)

    problems = _unreproducible_settings(config, llava_layers, instruction_encoder)
    if problems:
        message = "The upcycled model will not reproduce the LLaVA model's outputs: " + " ".join(problems)
        if strict:
            raise UpcyclingError(message + " Pass `strict=False` to build it anyway.")
        warnings.warn(message, stacklevel=3)

    model = model_class._from_config(config, dtype=llava.dtype)
    _copy_llava_weights(model, llava, llava_layers, instruction_encoder)
    if llava.generation_config is not None:
        model.generation_config = copy.deepcopy(llava.generation_config)
    return model.eval()


def _upcycled_config(model_class, llava_config, fusion_type: str, instruction_encoder, config_kwargs: dict):
    """The new model's config: LLaVA's towers and fields, the fuser's defaults for what `config_kwargs` leaves out."""
    fuser = fusion_projector_class(fusion_type)
    config_kwargs = dict(config_kwargs)
    if "vision_feature_layer" not in config_kwargs:
        config_kwargs["vision_feature_layer"] = fuser.upcycled_vision_feature_layer(llava_config.vision_feature_layer)
    if instruction_encoder is not None:
        config_kwargs.setdefault("instruction_encoder_config", instruction_encoder.config.to_dict())
    elif config_kwargs.get("instruction_encoder_config") is None and fuser.needs_instruction_encoder(
        _requested_settings(fusion_type, config_kwargs)
    ):
        raise ValueError(
            f"fusion_type={fusion_type!r} with these settings embeds an instruction and needs the sentence encoder: "
            "pass `instruction_encoder` (a transformers model such as sentence-transformers/all-mpnet-base-v2, or "
            "where it loads from)."
        )
    for name in _LLAVA_CONFIG_FIELDS:
        if name in config_kwargs:
            raise ValueError(f"`{name}` is taken from the LLaVA model and cannot be passed to `from_llava`.")
    config = LlavaMultiLayerConfig(
        vision_config=llava_config.vision_config.to_dict(),
        text_config=llava_config.text_config.to_dict(),
        fusion_type=fusion_type,
        **{name: getattr(llava_config, name) for name in _LLAVA_CONFIG_FIELDS},
        **config_kwargs,
    )
    config.architectures = [model_class.__name__]
    return config


@torch.no_grad()
def _copy_llava_weights(model, llava, llava_layers: list[int], instruction_encoder) -> None:
    """Copies LLaVA's weights into `model` and sets the new parts so that it computes what LLaVA computed."""
    target = model.model
    target.vision_tower.load_state_dict(llava.model.vision_tower.state_dict())
    _load_language_model(target.language_model, llava.model.language_model.state_dict())
    if not model.config.tie_word_embeddings:
        model.lm_head.load_state_dict(llava.lm_head.state_dict())
    target.multi_modal_projector.init_from_llava(model.config, llava.model.multi_modal_projector, llava_layers)
    wrapper = target.internal_fusion_wrapper
    if wrapper is not None and wrapper.starts_unchanged_with_zero_features:
        for projector in target.internal_projectors:
            _zero_linear(projector.linear_2)
    for layer in target.internal_fusion_layers:
        layer.start_unchanged()
    if instruction_encoder is not None:
        result = target.instruction_encoder.encoder.load_state_dict(instruction_encoder.state_dict(), strict=False)
        if result.missing_keys:
            raise ValueError(
                "`instruction_encoder` does not fit the model's instruction encoder: missing "
                f"{result.missing_keys[:5]}."
            )


def processor_from_llava(
    llava_processor,
    chat_template: str | None = None,
    instruction_tokenizer=None,
) -> LlavaMultiLayerProcessor:
    """The processor of an upcycled model, from the LLaVA model's `LlavaProcessor` (same image processor, tokenizer,
    patch size and token counts).

    Args:
        llava_processor (`LlavaProcessor`): The LLaVA model's processor.
        chat_template (`str`, *optional*): Defaults to LLaVA-1.5's `vicuna_v1` conversation, which marks the
            assistant turns with `{% generation %}` as finetuning needs.
        instruction_tokenizer (*optional*): `igva` with an aggregator: the instruction encoder's tokenizer.
    """
    kwargs = {
        "image_processor": llava_processor.image_processor,
        # The originals' per-chunk tokenization around `<image>` (LLaVA's processor tokenizes the whole prompt).
        "tokenizer": add_image_token(llava_processor.tokenizer, llava_processor.image_token),
        "patch_size": llava_processor.patch_size,
        "vision_feature_select_strategy": llava_processor.vision_feature_select_strategy,
        "chat_template": chat_template or VICUNA_V1_CHAT_TEMPLATE,
        "image_token": llava_processor.image_token,
        "num_additional_image_tokens": llava_processor.num_additional_image_tokens,
    }
    if instruction_tokenizer is not None:
        return LlavaMultiLayerInstructionProcessor(instruction_tokenizer=instruction_tokenizer, **kwargs)
    return LlavaMultiLayerProcessor(**kwargs)


def _load_llava(llava_model_or_path) -> LlavaForConditionalGeneration:
    if isinstance(llava_model_or_path, (str, os.PathLike)):
        return LlavaForConditionalGeneration.from_pretrained(llava_model_or_path, dtype="auto")
    if not isinstance(llava_model_or_path, LlavaForConditionalGeneration):
        raise TypeError(
            "`llava_model_or_path` must be a LlavaForConditionalGeneration or the path / Hub id of one, got "
            f"{type(llava_model_or_path).__name__}."
        )
    return llava_model_or_path


def _as_layer_list(layers: int | list[int], num_hidden_states: int) -> list[int]:
    """LLaVA's `vision_feature_layer` as non-negative hidden-state indices, in concatenation order."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    return [layer % num_hidden_states for layer in layers]


def _requested_settings(fusion_type: str, config_kwargs: dict) -> SimpleNamespace:
    """The config fields `from_llava` was asked for, over the config's defaults (before the config can be built)."""
    defaults = {
        field.name: field.default
        for field in dataclasses.fields(LlavaMultiLayerConfig)
        if field.default is not dataclasses.MISSING
    }
    return SimpleNamespace(**{**defaults, **config_kwargs, "fusion_type": fusion_type})


def _unreproducible_settings(config, llava_layers, instruction_encoder) -> list[str]:
    """Reasons why the upcycled model cannot start from LLaVA's outputs (empty when it can)."""
    fuser = fusion_projector_class(config.fusion_type)
    problems = fuser.upcycling_problems(config, llava_layers)
    if fuser.needs_instruction_encoder(config) and instruction_encoder is None:
        problems.append(
            "the instruction encoder stays randomly initialised: pass `instruction_encoder` (the outputs still "
            "match LLaVA's at first, but the trained fuser would be fed noise)."
        )
    if config.internal_fusion_type is not None:
        problems += internal_fusion_layer_class(config.internal_fusion_type).upcycling_problems(config)
    return problems


def _load_language_model(language_model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Loads LLaVA's language model; only the new cross-fusion parameters of internal-fusion layers stay missing."""
    result = language_model.load_state_dict(state_dict, strict=False)
    missing = [key for key in result.missing_keys if ".cross_" not in key]
    if missing or result.unexpected_keys:
        raise UpcyclingError(
            f"The LLaVA language model does not fit the new one: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}."
        )


def _zero_linear(linear: nn.Linear) -> None:
    linear.weight.zero_()
    if linear.bias is not None:
        linear.bias.zero_()


__all__ = ["UpcyclingError", "processor_from_llava", "upcycle_llava"]
