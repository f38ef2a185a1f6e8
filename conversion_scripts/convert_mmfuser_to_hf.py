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
"""Converts checkpoints of MMFuser (multi-layer deformable-attention fuser, arXiv 2410.11829) into the
llava-multilayer Hub format (`fusion_type="mmfuser"`).

Finetune (stage 2) checkpoint, as written by the original trainer (config.json + single or sharded safetensors/.bin
+ SentencePiece tokenizer). `config.json` names the CLIP tower by hub id (`mm_vision_tower`); `--vision-tower`
overrides it with a local copy or another hub id:

    python conversion_scripts/convert_mmfuser_to_hf.py \\
        --input-dir checkpoints/llava-mmfuser-7b \\
        --vision-tower openai/clip-vit-large-patch14-336 \\
        --output-dir mmfuser-7b-hf --dtype bfloat16 --verify

The checkpoint embeds a copy of the frozen tower (`model.vision_tower.vision_tower.vision_model.*`); when present
it is converted (its shapes must fit the tower named by `--vision-tower`, whose config and image processor are
used); otherwise the tower's own weights are read from the `--vision-tower` directory.

Pretrain (stage 1) output: only `config.json` + `mm_projector.bin` (fuser + MLP) are written, so the language model
comes from the base LLM directory (e.g. lmsys/vicuna-7b-v1.5), given as `--input-dir` (the convention of all
converters of this package):

    python conversion_scripts/convert_mmfuser_to_hf.py \\
        --input-dir lmsys/vicuna-7b-v1.5 --pretrain-dir checkpoints/llava-mmfuser-pretrain-7b \\
        --vision-tower openai/clip-vit-large-patch14-336 --output-dir mmfuser-7b-pretrain-hf

Layer semantics. The original `mm_vision_select_layer` is a list (or a `"list-22/-17/-12/-7/-2"` string) of CLIP
hidden-state indices; the fuser uses its FIRST FOUR entries as the key/value levels of the deformable
cross-attention and its LAST entry as the query (`n_levels = 4` is hard-coded). The converted config states this
explicitly: `vision_feature_layer = first four entries + [last entry]` (five entries, so `num_levels == 4`). Entries
between the fourth and the last are ignored by the original code; the converter warns about them. Fewer than four
entries, or a single int, cannot be used by the fuser and are refused.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, PreTrainedConfig

from llava_multilayer import LlavaMultiLayerConfig, LlavaMultiLayerForConditionalGeneration
from llava_multilayer.conversion.conversion_utils import (
    ORIGINAL_VISION_TOWER_PREFIX,
    CheckpointReader,
    ConversionError,
    ConversionReport,
    Drop,
    KeyMapping,
    TensorDictReader,
    converter_parser,
    describe_location,
    build_image_processor,
    build_processor,
    finish_command,
    fixture_parity_check,
    generation_config_from_original,
    load_original_config,
    load_tokenizer_with_image_token,
    load_torch_file,
    load_vision_config,
    num_image_tokens,
    resolve_local_dir,
    run_conversion,
    text_config_from_original,
)

logger = logging.getLogger(__name__)

FAMILY = "mmfuser"
DEFAULT_VISION_TOWER = "openai/clip-vit-large-patch14-336"

# Constants of the original `MSCrossAttnBlock` (ms_cross_attn.py): none of them is stored in config.json.
NUM_VALUE_LEVELS = 4
NUM_HEADS = 16
NUM_POINTS = 4
LAYER_NORM_EPS = 1e-6
PROJECTOR_TYPE = "mlp2x_gelu"

# Keys of other families' original configs: Layer_Select_Fuse and IGVA.
_OTHER_FAMILY_KEYS = ("layer_fusing_strategy", "layer_using_strategy", "vit_aggregate_groups", "vit_base_layer")

_LLM_KEY = re.compile(r"^model\.(embed_tokens|layers|norm)\.")
_FUSER_KEY = re.compile(r"^model\.mm_projector\.0\.(.+)$")
_MLP_KEY = re.compile(r"^model\.mm_projector\.([13])\.(weight|bias)$")
# `gamma*` names are renamed by transformers' legacy loading fix, so the converted model calls them otherwise.
_FUSER_RENAMES = {"gamma1": "cross_attn_scale", "gamma2": "self_attn_scale"}


def detect(original_config: dict) -> bool:
    """True iff `original_config` (an original config.json) was written by MMFuser's training code.

    MMFuser configs carry the fork's own `ms_cross_attn_lr` field and/or a list-valued `mm_vision_select_layer`
    (plain LLaVA-1.5 stores an int); Layer_Select_Fuse and IGVA configs have their own marker fields.
    """
    if any(key in original_config for key in _OTHER_FAMILY_KEYS):
        return False
    layers = original_config.get("mm_vision_select_layer")
    list_valued = isinstance(layers, list) or (isinstance(layers, str) and layers.startswith("list"))
    return "mm_vision_tower" in original_config and ("ms_cross_attn_lr" in original_config or list_valued)


# --------------------------------------------------------------------------------------------------------------
# Original config
# --------------------------------------------------------------------------------------------------------------


def parse_select_layer(value) -> int | list[int]:
    """The original `phase_select_layer`: `mm_vision_select_layer` as an int or a list of ints.

    Ints and lists are kept; a string starting with `"list"` drops those 4 characters, is split on `"/"` and each
    piece (spaces stripped) becomes an int (`"list-22/-17/-12/-7/-2"` -> `[-22, -17, -12, -7, -2]`); any other
    string is one int.
    """
    if isinstance(value, bool):
        raise ConversionError(f"`mm_vision_select_layer` must be an int, a list or a string, got {value!r}.")
    if isinstance(value, int):
        return value
    if isinstance(value, list):
        if not all(isinstance(entry, int) and not isinstance(entry, bool) for entry in value):
            raise ConversionError(f"`mm_vision_select_layer` must be a list of ints, got {value!r}.")
        return list(value)
    if isinstance(value, str):
        try:
            if value.startswith("list"):
                return [int(piece.strip()) for piece in value[4:].split("/")]
            return int(value.strip())
        except ValueError as error:
            raise ConversionError(
                f"`mm_vision_select_layer` {value!r} cannot be parsed: expected an int or 'list' followed by "
                "'/'-separated ints, such as 'list-22/-17/-12/-7/-2'."
            ) from error
    raise ConversionError(f"`mm_vision_select_layer` must be an int, a list or a string, got {value!r}.")


def fuser_layers(select_layer: int | list[int]) -> tuple[list[int], list[int]]:
    """Maps the original layer list to the converted `vision_feature_layer` (value levels, then the query).

    Returns:
        `(vision_feature_layer, ignored)`: the first four entries followed by the last entry, and the entries the
        original fuser never reads (those between the fourth and the last).
    """
    if isinstance(select_layer, int):
        raise ConversionError(
            f"mm_vision_select_layer={select_layer} is a single layer, but the MMFuser fuser needs a list of at least "
            f"{NUM_VALUE_LEVELS} layers (the original code indexes the batch dimension instead and produces garbage); "
            "train with e.g. --mm_vision_select_layer list-22/-17/-12/-7/-2."
        )
    if len(select_layer) < NUM_VALUE_LEVELS:
        raise ConversionError(
            f"mm_vision_select_layer={select_layer} has {len(select_layer)} entries, but the MMFuser fuser reads "
            f"{NUM_VALUE_LEVELS} key/value levels (the first four entries) plus the query (the last entry), so it "
            f"needs at least {NUM_VALUE_LEVELS}; the original code fails on this list."
        )
    return select_layer[:NUM_VALUE_LEVELS] + select_layer[-1:], select_layer[NUM_VALUE_LEVELS:-1]


def _check_supported(original: dict) -> None:
    """Refuses settings of the original code that the converted model does not implement."""
    projector_type = original.get("mm_projector_type", "linear")
    if projector_type != PROJECTOR_TYPE:
        raise ConversionError(
            f"mm_projector_type={projector_type!r} is not supported: the converted projector is MMFuser's fuser "
            f"followed by '{PROJECTOR_TYPE}' (Linear, GELU, Linear), what every MMFuser script trains; a "
            "'linear', 'identity' or other 'mlpNx_gelu' projector has a different number of linears."
        )
    aspect_ratio = original.get("image_aspect_ratio", "square")
    if aspect_ratio == "anyres":
        raise ConversionError(
            "image_aspect_ratio='anyres' is not supported: no MMFuser script uses it, and the converted processor "
            "implements 'pad' (pad to a square with the mean colour) and plain resize + centre crop."
        )
    for flag in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if original.get(flag):
            raise ConversionError(f"{flag}=true is not supported (MMFuser trains with it false).")
    select_feature = original.get("mm_vision_select_feature", "patch")
    if select_feature == "cls_patch":
        raise ConversionError(
            "mm_vision_select_feature='cls_patch' cannot be used with the MMFuser fuser: it keeps CLIP's CLS token, so "
            "a layer holds a square patch grid plus one token (e.g. 577 = 24*24 + 1), which is not a square grid; the "
            "original fuser's length check fails on it. MMFuser checkpoints use 'patch'."
        )
    if select_feature != "patch":
        raise ConversionError(f"mm_vision_select_feature={select_feature!r} is not supported (expected 'patch').")


def build_config(
    original: dict,
    vision_config: PreTrainedConfig,
    image_token_id: int,
    text_config: dict | None = None,
) -> tuple[LlavaMultiLayerConfig, list[int], list[int]]:
    """The converted model's config from an original MMFuser config.json.

    Returns:
        `(config, original_layers, ignored_layers)`: the config, the parsed original `mm_vision_select_layer` and
        the entries of it the fuser does not use.
    """
    _check_supported(original)
    if vision_config.model_type != "clip_vision_model":
        raise ConversionError(
            f"MMFuser uses a CLIP vision tower (the original builder accepts only CLIP), but the tower given holds a "
            f"{vision_config.model_type!r} model."
        )
    mm_hidden_size = original.get("mm_hidden_size")
    if mm_hidden_size is not None and mm_hidden_size != vision_config.hidden_size:
        raise ConversionError(
            f"The original config has mm_hidden_size={mm_hidden_size}, but the vision tower given has hidden_size "
            f"{vision_config.hidden_size}: pass the tower the model was trained with (--vision-tower)."
        )
    if "mm_vision_select_layer" not in original:
        raise ConversionError("The original config has no `mm_vision_select_layer`: the fused layers are unknown.")
    original_layers = parse_select_layer(original["mm_vision_select_layer"])
    layers, ignored = fuser_layers(original_layers)
    if ignored:
        logger.warning(
            "mm_vision_select_layer=%s has %d entries: the original fuser uses the first %d as key/value levels and "
            "the last as the query, so %s are ignored (as in the original code).",
            original_layers, len(original_layers), NUM_VALUE_LEVELS, ignored,
        )
    image_seq_length = num_image_tokens(vision_config, "default")
    side = math.isqrt(image_seq_length)
    if side * side != image_seq_length:
        raise ConversionError(
            f"The vision tower gives {image_seq_length} patch tokens per layer, which is not a square grid; the "
            "MMFuser fuser needs a square patch grid."
        )
    if vision_config.hidden_size % NUM_HEADS:
        raise ConversionError(
            f"The vision tower's hidden_size {vision_config.hidden_size} is not divisible by the fuser's {NUM_HEADS} "
            "heads."
        )
    try:
        config = LlavaMultiLayerConfig(
            vision_config=vision_config.to_dict(),
            text_config=text_config if text_config is not None else text_config_from_original(original),
            image_token_id=image_token_id,
            image_seq_length=image_seq_length,
            projector_hidden_act="gelu",
            vision_feature_select_strategy="default",
            vision_feature_layer=layers,
            fusion_type="mmfuser",
            mmfuser_num_heads=NUM_HEADS,
            mmfuser_num_points=NUM_POINTS,
            mmfuser_layer_norm_eps=LAYER_NORM_EPS,
        )
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise ConversionError(f"The original MMFuser settings do not form a valid config: {error}") from error
    return config, original_layers, ignored


# --------------------------------------------------------------------------------------------------------------
# Key mappings
# --------------------------------------------------------------------------------------------------------------


def _llm_key(key: str) -> str | Drop | None:
    if _LLM_KEY.match(key):
        if key.endswith("rotary_emb.inv_freq"):
            return Drop("rotary inv_freq buffer (recomputed from the config)")
        return "model.language_model." + key[len("model.") :]
    if key == "lm_head.weight":
        return key
    return None


def projector_key_mapping(key: str) -> str | None:
    """`model.mm_projector.*` keys (finetune checkpoint or pretrain `mm_projector.bin`) -> converted keys.

    Index 0 is the fuser (`gamma1`/`gamma2` renamed), 1 and 3 the MLP linears (2 is the weightless GELU).
    """
    match = _FUSER_KEY.match(key)
    if match and not _MLP_KEY.match(key):
        name = match[1]
        return "model.multi_modal_projector.fuser." + _FUSER_RENAMES.get(name, name)
    match = _MLP_KEY.match(key)
    if match:
        return f"model.multi_modal_projector.linear_{1 if match[1] == '1' else 2}.{match[2]}"
    return None


def original_key_mapping(key: str) -> str | Drop | None:
    """Original MMFuser finetune keys -> converted keys (`None` for a key the original model does not have)."""
    target = _llm_key(key)
    if target is not None:
        return target
    if key.startswith("model.mm_projector."):
        return projector_key_mapping(key)
    if key.startswith(ORIGINAL_VISION_TOWER_PREFIX):
        if key.endswith("position_ids"):
            return Drop("position_ids buffer of the vision tower (recomputed)")
        return "model.vision_tower." + key[len(ORIGINAL_VISION_TOWER_PREFIX) :]
    return None


def base_language_model_key_mapping(key: str) -> str | Drop | None:
    """Keys of a plain LLaMA checkpoint (the base LLM of a pretrain-stage conversion) -> converted keys."""
    return _llm_key(key)


def vision_tower_key_mapping(key: str) -> str | Drop | None:
    """Keys of a CLIP tower directory (`CLIPVisionModel` or a full `CLIPModel`) -> `model.vision_tower.*`."""
    if key.endswith("position_ids"):
        return Drop("position_ids buffer of the vision tower (recomputed)")
    if key.startswith(("text_model.", "text_projection.", "visual_projection.")) or key == "logit_scale":
        return Drop("CLIP text tower / contrastive heads: MMFuser uses only the vision model")
    if key.startswith("vision_model."):
        return "model.vision_tower." + key[len("vision_model.") :]
    if key.startswith(("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")):
        return "model.vision_tower." + key
    return None


def _check_embedded_tower(reader: CheckpointReader, vision_config: PreTrainedConfig, tower_name: str) -> None:
    """The tower copy stored in the checkpoint must have the architecture of the tower named by --vision-tower."""
    layer_ids = {
        int(match[1])
        for key in reader.keys()
        if (match := re.match(re.escape(ORIGINAL_VISION_TOWER_PREFIX) + r"encoder\.layers\.(\d+)\.", key))
    }
    expected = {
        "embeddings.patch_embedding.weight": (
            vision_config.hidden_size, vision_config.num_channels, vision_config.patch_size, vision_config.patch_size
        ),
        "embeddings.position_embedding.weight": (
            (vision_config.image_size // vision_config.patch_size) ** 2 + 1, vision_config.hidden_size
        ),
    }
    problems = []
    if len(layer_ids) != vision_config.num_hidden_layers:
        problems.append(f"{len(layer_ids)} encoder layers instead of {vision_config.num_hidden_layers}")
    for name, shape in expected.items():
        key = ORIGINAL_VISION_TOWER_PREFIX + name
        if key not in reader:
            problems.append(f"no {name}")
        elif tuple(reader.get_tensor(key).shape) != shape:
            problems.append(f"{name} of shape {tuple(reader.get_tensor(key).shape)} instead of {shape}")
    if problems:
        raise ConversionError(
            f"The vision tower stored in the checkpoint does not match the tower {tower_name!r} "
            f"({'; '.join(problems)}): pass the tower the model was trained with (--vision-tower)."
        )


# --------------------------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------------------------


def mmfuser_parity_check(fixture_dir: str | Path, original_layers: list[int]) -> Callable[[Path], dict]:
    """[`fixture_parity_check`] plus the fuser's intermediates, when the fixture has them.

    `selected_features` (`(len(original_layers), 1, tokens, vision_hidden)`, the stacked CLIP hidden states of the
    original list, CLS dropped) and `fused_features` (`(1, tokens, vision_hidden)`, the fuser block's output) are
    compared on the fixture's own `pixel_values`, in float32.
    """
    from safetensors.torch import load_file

    fixture_dir = Path(fixture_dir)
    generic = fixture_parity_check(fixture_dir)

    def check(model_dir: Path) -> dict:
        results = generic(model_dir)
        expected = load_file(fixture_dir / "expected.safetensors")
        if "fused_features" not in expected and "selected_features" not in expected:
            return results
        pixel_values = load_file(fixture_dir / "inputs.safetensors")["pixel_values"]
        model = LlavaMultiLayerForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        projector = model.model.multi_modal_projector
        with torch.no_grad():
            hidden_states = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
            fused = projector.fuse(hidden_states)
        selected = torch.stack([hidden_states[layer][:, 1:] for layer in original_layers])
        results["fuser"] = {}
        if "selected_features" in expected:
            results["fuser"]["selected_features_max_abs_diff"] = float(
                (selected - expected["selected_features"]).abs().max()
            )
        if "fused_features" in expected:
            results["fuser"]["fused_features_max_abs_diff"] = float((fused - expected["fused_features"]).abs().max())
        return results

    return check


# --------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------


def convert_mmfuser(
    input_dir: str | Path,
    output_dir: str | Path,
    vision_tower: str | None = None,
    pretrain_dir: str | Path | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    verify: bool = False,
    parity_fixture: str | Path | None = None,
    max_shard_size: int | None = None,
    progress: bool = True,
) -> ConversionReport:
    """Converts an MMFuser checkpoint; see the module docstring.

    Args:
        input_dir: the finetune (stage 2) checkpoint directory, or with `pretrain_dir` the base LLM directory
            (a LLaMA causal LM with its tokenizer).
        output_dir: where the Hub-format checkpoint is written (atomically).
        vision_tower: local directory or hub id of the CLIP tower (default: the config's `mm_vision_tower`).
        pretrain_dir: a stage-1 output directory (config.json + mm_projector.bin).
        dtype: `"float32"`, `"bfloat16"` or `"float16"` to cast the weights (default: keep the source dtype).
        parity_fixture: golden-data directory produced by the original code; the measured differences go into the
            report and the model card.
    """
    base_model = []
    if pretrain_dir is not None:
        if not Path(input_dir).is_dir():
            base_model.append(str(input_dir))
        input_dir = resolve_local_dir(str(input_dir), "base language model", "--input-dir")
    input_dir = Path(input_dir)
    config_dir = Path(pretrain_dir) if pretrain_dir is not None else input_dir
    original = load_original_config(config_dir)
    if not detect(original):
        raise ConversionError(
            f"{config_dir}/config.json is not an MMFuser config (MMFuser configs have a list-valued "
            "`mm_vision_select_layer` and `ms_cross_attn_lr`, and no Layer_Select_Fuse/IGVA fields); use the "
            "converter of its family."
        )
    if pretrain_dir is None and (input_dir / "mm_projector.bin").is_file():
        raise ConversionError(
            f"{input_dir} holds mm_projector.bin, i.e. it is a pretrain-stage output: pass it as --pretrain-dir and "
            "the base LLM directory (e.g. lmsys/vicuna-7b-v1.5) as --input-dir."
        )
    reader = CheckpointReader(input_dir)
    has_llm = any(_LLM_KEY.match(key) for key in reader.keys())
    has_projector = any(key.startswith("model.mm_projector.") for key in reader.keys())
    if pretrain_dir is None and not has_projector:
        raise ConversionError(
            f"{input_dir} has no `model.mm_projector.*` weights, so it is not an MMFuser finetune checkpoint. For a "
            "pretrain-stage output (config.json + mm_projector.bin) pass it as --pretrain-dir and the base LLM "
            "directory as --input-dir."
        )
    if pretrain_dir is not None and (has_projector or not has_llm):
        raise ConversionError(
            f"With --pretrain-dir, --input-dir must be the base language model (plain LLaMA weights), but {input_dir} "
            f"{'contains an mm_projector (a finetuned checkpoint)' if has_projector else 'has no LLaMA weights'}."
        )

    tower_name = vision_tower or original.get("mm_vision_tower")
    tower_dir = resolve_local_dir(tower_name, "vision tower", "--vision-tower")
    tower_flag = "--vision-tower" if vision_tower else "the config's mm_vision_tower"
    tower_description = describe_location(tower_name, tower_flag, original.get("mm_vision_tower"))
    vision_config = load_vision_config(tower_dir)

    text_config = None
    if pretrain_dir is not None:
        base_config = AutoConfig.from_pretrained(input_dir)
        if base_config.model_type != "llama":
            raise ConversionError(
                f"--input-dir {input_dir} holds a {base_config.model_type!r} model; with --pretrain-dir it must be the "
                "base LLaMA language model (e.g. lmsys/vicuna-7b-v1.5)."
            )
        text_config = text_config_from_original(base_config.to_dict())
        for key in ("hidden_size", "vocab_size", "num_hidden_layers"):
            if key in original and getattr(base_config, key) != original[key]:
                raise ConversionError(
                    f"--input-dir {input_dir} has {key}={getattr(base_config, key)}, but the pretrain config has "
                    f"{original[key]}: pass the base LLM the projector was trained on."
                )

    tokenizer, image_token_id = load_tokenizer_with_image_token(input_dir)
    config, original_layers, ignored = build_config(original, vision_config, image_token_id, text_config)
    pad_to_square = original.get("image_aspect_ratio", "square") == "pad"
    processor = build_processor(config, tokenizer, build_image_processor(tower_dir, pad_to_square=pad_to_square))

    tied = config.tie_word_embeddings

    def with_tied_head(mapping: KeyMapping) -> KeyMapping:
        def mapped(key: str):
            if tied and key == "lm_head.weight":
                return Drop("lm_head is tied to the input embeddings")
            return mapping(key)

        return mapped

    sources: list[tuple[object, KeyMapping]] = []
    embedded_tower = any(key.startswith(ORIGINAL_VISION_TOWER_PREFIX) for key in reader.keys())
    if pretrain_dir is not None:
        projector_path = Path(pretrain_dir) / "mm_projector.bin"
        if not projector_path.is_file():
            raise ConversionError(f"--pretrain-dir {pretrain_dir} has no mm_projector.bin.")
        projector = TensorDictReader(load_torch_file(projector_path), str(projector_path))
        projector.files = [projector_path]
        projector_dtypes = {tensor.dtype for tensor in projector.tensors.values()}
        llm_dtype = reader.get_tensor(next(key for key in reader.keys() if _LLM_KEY.match(key))).dtype
        if dtype is None and projector_dtypes != {llm_dtype}:
            logger.warning(
                "mm_projector.bin holds %s tensors but the base LLM %s: the converted checkpoint would mix dtypes; "
                "pass --dtype to cast everything to one.",
                sorted(str(d).replace("torch.", "") for d in projector_dtypes), str(llm_dtype).replace("torch.", ""),
            )
        sources += [(reader, with_tied_head(base_language_model_key_mapping)), (projector, projector_key_mapping)]
    else:
        sources.append((reader, with_tied_head(original_key_mapping)))
    if embedded_tower:
        _check_embedded_tower(reader, vision_config, str(tower_name))
        tower_source = "the copy stored in the checkpoint"
    else:
        try:
            sources.append((CheckpointReader(tower_dir), vision_tower_key_mapping))
        except ConversionError as error:
            raise ConversionError(
                f"The checkpoint stores no vision tower, so its weights are read from {tower_dir}, but: {error}"
            ) from error
        tower_source = tower_description

    value_layers, query_layer = config.vision_feature_layer[:-1], config.vision_feature_layer[-1]
    settings = {
        "stage": "pretrain (mm_projector.bin + base LLM)" if pretrain_dir is not None else "finetune",
        "fusion_type": "mmfuser",
        "original mm_vision_select_layer": original_layers,
        "vision_feature_layer (value levels, then query)": config.vision_feature_layer,
        "value (key/value) levels": value_layers,
        "query layer": query_layer,
        "ignored original entries": ignored,
        "num_levels": len(value_layers),
        "mmfuser_num_heads": config.mmfuser_num_heads,
        "mmfuser_num_points": config.mmfuser_num_points,
        "mmfuser_layer_norm_eps": config.mmfuser_layer_norm_eps,
        "mm_projector_type": PROJECTOR_TYPE,
        "vision_feature_select_strategy": "default (mm_vision_select_feature='patch': CLS dropped)",
        "image_seq_length": config.image_seq_length,
        "image_aspect_ratio": original.get("image_aspect_ratio", "square"),
        "vision_tower": tower_description,
        "vision_tower_weights": tower_source,
        "chat_template": "vicuna_v1",
    }
    name_or_path = original.get("_name_or_path")
    if not base_model and name_or_path and not Path(name_or_path).is_absolute():
        base_model.append(name_or_path)
    parity_check = mmfuser_parity_check(parity_fixture, original_layers) if parity_fixture else None
    return run_conversion(
        family=FAMILY,
        config=config,
        sources=sources,
        output_dir=output_dir,
        processor=processor,
        generation_config=generation_config_from_original(input_dir, image_token_id),
        dtype=dtype,
        overwrite=overwrite,
        verify=verify,
        parity_check=parity_check,
        settings=settings,
        base_model=base_model,
        source_dir=str(config_dir if pretrain_dir is None else f"{input_dir} + {pretrain_dir}"),
        progress=progress,
        **({"max_shard_size": max_shard_size} if max_shard_size else {}),
    )


#: MMFuser has no flags beyond the common ones (`--pretrain-dir`: config.json + mm_projector.bin).
add_arguments = None


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = converter_parser(__doc__, add_arguments, prog)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        report = convert_mmfuser(
            args.input_dir,
            args.output_dir,
            vision_tower=args.vision_tower,
            pretrain_dir=args.pretrain_dir,
            dtype=args.dtype,
            overwrite=args.overwrite,
            verify=args.verify,
            parity_fixture=args.parity_fixture,
            max_shard_size=args.max_shard_size,
        )
    except ConversionError as error:
        parser.exit(1, f"{prog + ': ' if prog else ''}error: {error}\n")
    logger.info("Converted %d tensors into %s.", report.num_target_tensors, args.output_dir)
    finish_command(args, report)


if __name__ == "__main__":
    main(sys.argv[1:])
