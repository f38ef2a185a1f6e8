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
"""The transformers components of a converted LLaVA-1.5 fork: the text and vision configs, the tokenizer with the
`<image>` token, the image processor and processor, and the generation config, read from the original files."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

from transformers import (
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    LlavaImageProcessorPil,
    PreTrainedConfig,
)

from llava_multilayer import LlavaMultiLayerConfig, LlavaMultiLayerProcessor, add_image_token

from .reading import ConversionError, load_json


IMAGE_TOKEN = "<image>"


def load_vision_config(vision_tower_dir: Path) -> PreTrainedConfig:
    """The vision config of a tower directory (a full CLIP/SigLIP config contributes its `vision_config`)."""
    try:
        config = AutoConfig.from_pretrained(vision_tower_dir)
    except Exception as error:
        raise ConversionError(f"Could not read the vision tower config of {vision_tower_dir}: {error}") from error
    return getattr(config, "vision_config", None) or config


@contextlib.contextmanager
def quiet_original_config() -> Iterator[None]:
    """Silences the two warnings transformers prints for every original checkpoint, which are expected here:
    `AutoTokenizer` reads the original `config.json` with the base config class, which warns "You are using a model
    of type `llava_llama` to instantiate a model of type ``" (the original model types are not transformers ones),
    and sets its `rope_scaling: null`, which transformers 5 deprecates with a FutureWarning. Neither affects the
    tokenizer, the only thing read there."""
    config_logger = logging.getLogger("transformers.configuration_utils")
    level = config_logger.level
    config_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`rope_scaling` is deprecated", category=FutureWarning)
            yield
    finally:
        config_logger.setLevel(level)


def load_tokenizer_with_image_token(tokenizer_dir: Path):
    """The original (LLaMA SentencePiece) tokenizer as a fast tokenizer, plus the `<image>` token.

    The image token gets the next free id (= the original vocabulary size when no tokens were added), which lies
    outside the language model's vocabulary: the original logits are unchanged and it can never be generated.
    """
    try:
        with quiet_original_config():
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as error:
        raise ConversionError(
            f"Could not load the tokenizer of {tokenizer_dir}: {error}. Reading a SentencePiece tokenizer.model "
            "needs `pip install sentencepiece protobuf`."
        ) from error
    # The originals' per-chunk tokenization around `<image>`, built into the tokenizer (one rule for all callers).
    tokenizer = add_image_token(tokenizer, IMAGE_TOKEN)
    return tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def build_image_processor(vision_tower_dir: Path, pad_to_square: bool) -> LlavaImageProcessorPil:
    """LLaVA's image processor with the tower's size and normalisation; `pad_to_square` pads with the mean colour
    (the originals' `image_aspect_ratio="pad"`)."""
    path = vision_tower_dir / "preprocessor_config.json"
    if not path.is_file():
        raise ConversionError(f"{vision_tower_dir} has no preprocessor_config.json (the tower's image processor).")
    settings = load_json(path)
    missing = [key for key in ("size", "image_mean", "image_std") if key not in settings]
    if missing:
        raise ConversionError(f"{path} lacks {missing}: the converted processor cannot reproduce the preprocessing.")
    crop_size = settings.get("crop_size")
    do_center_crop = settings.get("do_center_crop", crop_size is not None)
    kwargs = {
        "size": settings["size"],
        "do_center_crop": do_center_crop,
        "image_mean": settings["image_mean"],
        "image_std": settings["image_std"],
        "resample": settings.get("resample", 3),
        "rescale_factor": settings.get("rescale_factor", 1 / 255),
        "do_pad": pad_to_square,
    }
    if do_center_crop:
        kwargs["crop_size"] = crop_size
    return LlavaImageProcessorPil(**kwargs)


def build_processor(config: LlavaMultiLayerConfig, tokenizer, image_processor, **kwargs) -> LlavaMultiLayerProcessor:
    """The processor matching `config` (patch size, CLS token, selection strategy)."""
    vision_config = config.vision_config
    has_cls = vision_config.model_type == "clip_vision_model"
    processor_class = kwargs.pop("processor_class", LlavaMultiLayerProcessor)
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if has_cls else 0,
        image_token=IMAGE_TOKEN,
        **kwargs,
    )


def num_image_tokens(vision_config: PreTrainedConfig, select_strategy: str) -> int:
    """Visual tokens per image: the patch grid, plus CLIP's CLS, minus the first token with strategy "default"."""
    count = (vision_config.image_size // vision_config.patch_size) ** 2
    count += 1 if vision_config.model_type == "clip_vision_model" else 0
    return count - 1 if select_strategy == "default" else count


def text_config_from_original(original: dict) -> dict:
    """The LLaMA config embedded in an original LLaVA-style config.json (its non-`mm_*` LLaMA fields)."""
    text_keys = set(AutoConfig.for_model("llama").to_dict()) | {"rope_scaling", "rope_theta", "pretraining_tp"}
    text = {key: value for key, value in original.items() if key in text_keys}
    for key in ("architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype", "auto_map"):
        text.pop(key, None)
    text["model_type"] = "llama"
    return text


def generation_config_from_original(input_dir: Path) -> GenerationConfig:
    """The original `generation_config.json` (if any) without its private and version fields."""
    path = input_dir / "generation_config.json"
    settings = load_json(path) if path.is_file() else {}
    private = ("transformers_version", "attn_implementation")
    settings = {k: v for k, v in settings.items() if not k.startswith("_") and k not in private}
    try:
        return GenerationConfig(**settings)
    except (ValueError, TypeError) as error:
        raise ConversionError(f"{path} does not hold a valid generation config: {error}") from error
