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

The checkpoint embeds a copy of the frozen tower (`model.vision_tower.vision_tower.vision_model.*`), which the
original loader ignores; the tower is read from the `--vision-tower` directory, as for every family (the policy is
described in `llava_original.py`).

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
from transformers import PreTrainedConfig

from llava_multilayer import LlavaMultiLayerConfig, LlavaMultiLayerForConditionalGeneration
from llava_multilayer.conversion.checks import fixture_parity_check
from llava_multilayer.conversion.components import num_image_tokens, text_config_from_original
from llava_multilayer.conversion.key_rules import KeyRules, key_mapping
from llava_multilayer.conversion.llava_original import (
    Detection,
    FamilyConversion,
    FamilyInputs,
    OriginalFamily,
    check_llava_settings,
    convert_original,
    finetune_key_mapping,
    pretrain_stage_sources,
)
from llava_multilayer.conversion.llava_original import main as convert_main
from llava_multilayer.conversion.pipeline import ConversionReport
from llava_multilayer.conversion.reading import ConversionError


logger = logging.getLogger(__name__)

FAMILY = "mmfuser"

# Constants of the original `MSCrossAttnBlock` (ms_cross_attn.py): none of them is stored in config.json.
NUM_VALUE_LEVELS = 4
NUM_HEADS = 16
NUM_POINTS = 4
LAYER_NORM_EPS = 1e-6
PROJECTOR_TYPE = "mlp2x_gelu"


def projector_rules(prefix: str) -> KeyRules:
    """The rules of an MMFuser projector saved under `prefix` (an `nn.Sequential`): index 0 is the fuser (its `gamma*`
    names are renamed by transformers' legacy loading fix, so the converted model calls them otherwise), 1 and 3 the
    MLP linears (2 is the weightless GELU). Layer_Select_Fuse's E_M projector has the same layout."""
    prefix = re.escape(prefix)
    return {
        prefix + r"0\.gamma1": "model.multi_modal_projector.fuser.cross_attn_scale",
        prefix + r"0\.gamma2": "model.multi_modal_projector.fuser.self_attn_scale",
        prefix + r"0\.(.+)": r"model.multi_modal_projector.fuser.\1",
        prefix + r"1\.(weight|bias)": r"model.multi_modal_projector.linear_1.\1",
        prefix + r"3\.(weight|bias)": r"model.multi_modal_projector.linear_2.\1",
    }


#: `model.mm_projector.*`, in a finetune checkpoint or a pretrain-stage `mm_projector.bin`.
PROJECTOR_RULES = projector_rules("model.mm_projector.")

projector_key_mapping = key_mapping(PROJECTOR_RULES)
#: Original MMFuser finetune keys -> converted keys (`None` for a key the original model does not have).
original_key_mapping = finetune_key_mapping(PROJECTOR_RULES)


def _list_valued_select_layer(original: dict) -> str | None:
    layers = original.get("mm_vision_select_layer")
    if isinstance(layers, list) or (isinstance(layers, str) and layers.startswith("list")):
        return "its `mm_vision_select_layer` is a list"
    return None


#: MMFuser configs carry the fork's own `ms_cross_attn_lr` field and/or a list-valued `mm_vision_select_layer`
#: (plain LLaVA-1.5 stores an int); Layer_Select_Fuse and IGVA configs have their own fields.
DETECTION = Detection(
    markers=("ms_cross_attn_lr",),
    marker_check=_list_valued_select_layer,
    marker_description=" or a list-valued `mm_vision_select_layer`",
    required={"mm_vision_select_layer": (lambda value: True, "the fused vision layers")},
    excluded=("layer_fusing_strategy", "layer_using_strategy", "vit_aggregate_groups", "vit_base_layer"),
)
detect = DETECTION.matches


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
    select_feature = original.get("mm_vision_select_feature", "patch")
    if select_feature == "cls_patch":
        raise ConversionError(
            "mm_vision_select_feature='cls_patch' cannot be used with the MMFuser fuser: it keeps CLIP's CLS token, "
            "so a layer holds a square patch grid plus one token (e.g. 577 = 24*24 + 1), which is not a square grid; "
            "the original fuser's length check fails on it. MMFuser checkpoints use 'patch'."
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
    check_llava_settings(original, "MMFuser", vision_config)
    if vision_config.model_type != "clip_vision_model":
        raise ConversionError(
            f"MMFuser uses a CLIP vision tower (the original builder accepts only CLIP), but the tower given holds a "
            f"{vision_config.model_type!r} model."
        )
    if "mm_vision_select_layer" not in original:
        raise ConversionError("The original config has no `mm_vision_select_layer`: the fused layers are unknown.")
    original_layers = parse_select_layer(original["mm_vision_select_layer"])
    layers, ignored = fuser_layers(original_layers)
    if ignored:
        logger.warning(
            "mm_vision_select_layer=%s has %d entries: the original fuser uses the first %d as key/value levels and "
            "the last as the query, so %s are ignored (as in the original code).",
            original_layers,
            len(original_layers),
            NUM_VALUE_LEVELS,
            ignored,
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


def build(inputs: FamilyInputs) -> FamilyConversion:
    """The MMFuser part of a conversion: config, projector sources, settings."""
    stage, checkpoint = inputs.stage, inputs.checkpoint
    has_projector = any(key.startswith("model.mm_projector.") for key in checkpoint.keys())
    if not stage.is_pretrain and not has_projector:
        raise ConversionError(
            f"{stage.input_dir} has no `model.mm_projector.*` weights, so it is not an MMFuser finetune checkpoint. "
            "For a pretrain-stage output (config.json + mm_projector.bin) pass it as --pretrain-dir and the base LLM "
            "directory as --input-dir."
        )
    if stage.is_pretrain and has_projector:
        raise ConversionError(
            f"With --pretrain-dir, --input-dir must be the base language model (plain LLaMA weights), but "
            f"{stage.input_dir} contains an mm_projector (a finetuned checkpoint)."
        )
    config, original_layers, ignored = build_config(
        stage.original, inputs.tower.config, inputs.image_token_id, inputs.text_config
    )
    if stage.is_pretrain:
        sources = pretrain_stage_sources(inputs, "mm_projector.bin", projector_key_mapping)
    else:
        sources = [(checkpoint, original_key_mapping)]
    value_layers, query_layer = config.vision_feature_layer[:-1], config.vision_feature_layer[-1]
    settings = {
        "stage": "pretrain (mm_projector.bin + base LLM)" if stage.is_pretrain else "finetune",
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
        "image_aspect_ratio": stage.original.get("image_aspect_ratio", "square"),
    }
    fixture = inputs.parity_fixture
    parity_check = mmfuser_parity_check(fixture, original_layers) if fixture is not None else None
    return FamilyConversion(config=config, sources=sources, settings=settings, parity_check=parity_check)


SPEC = OriginalFamily(
    name=FAMILY,
    detection=DETECTION,
    pretrain_files=("mm_projector.bin",),
    build=build,
)

#: MMFuser has no flags beyond the common ones (`--pretrain-dir`: config.json + mm_projector.bin).
add_arguments = SPEC.add_arguments


def convert_mmfuser(
    input_dir: str | Path, output_dir: str | Path, vision_tower: str | None = None, **kwargs
) -> ConversionReport:
    """Converts an MMFuser checkpoint (see the module docstring); `kwargs` are those of [`convert_original`]
    (`pretrain_dir`: config.json + mm_projector.bin, `dtype`, `verify`, `parity_fixture`, ...)."""
    return convert_original(SPEC, input_dir, output_dir, vision_tower, **kwargs)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    convert_main(SPEC, __doc__, argv, prog)


if __name__ == "__main__":
    main(sys.argv[1:])
