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
"""Converts checkpoints of Layer_Select_Fuse (Lin et al., *Multi-Layer Visual Feature Fusion in Multimodal LLMs:
Methods, Analysis, and Best Practices*, CVPR 2025, arXiv 2503.06063; code EIT-NLP/Layer_Select_Fuse_for_MLLM) into
the llava-multilayer Hub format.

The original config.json has `model_type: "llama"`; the family is recognised by its `layer_fusing_strategy` (E_D,
E_M, I_D, I_M) and `mm_vision_tower`. The strategy and the layer selection (`layer_using_strategy`: 18, 3-18,
3-18-23, former, latter, all) map onto the converted config as follows:

- E_D (external direct): `fusion_type="concat"`, `vision_feature_layer` lists the concatenated layers; a nested list
  is a group of layers averaged first (`former` -> `[[1, ..., 12], 23]`).
- E_M (external modular): `fusion_type="mmfuser"`, value levels then the query layer (`3-18-23` -> `[3, 18, 23]`).
- I_D / I_M (internal direct / modular): `fusion_type="single"` on the main layer (CLIP 23, SigLIP 25), plus
  `internal_fusion_type="add"` / `"cross_attention"` (placement `pre_cross`) with one projector per internal layer and
  the decoder-layer map of the original code.

Finetune (stage 2) checkpoint, as written by the original trainer (config.json, safetensors, tokenizer). The config
names the vision tower by hub id; pass a local copy or hub id with --vision-tower:

    python conversion_scripts/convert_layer_select_fuse_to_hf.py \\
        --input-dir ./checkpoint/-I_M-finetune-3-18-23 \\
        --vision-tower openai/clip-vit-large-patch14-336 \\
        --output-dir lsf-I_M-3-18-23-hf --dtype bfloat16 --verify

Pretrain (stage 1) artifacts (`mm_projector_f.bin`, `mm_projector_{k}.bin`, `ucross.bin`, config.json): the
language model comes from the base LLM directory (e.g. MobileLLaMA-1.4B-Base) given as --input-dir:

    python conversion_scripts/convert_layer_select_fuse_to_hf.py \\
        --input-dir mtgv/MobileLLaMA-1.4B-Base --pretrain-dir ./checkpoint/-I_M-pretrain-3-18-23 \\
        --vision-tower openai/clip-vit-large-patch14-336 --output-dir lsf-I_M-3-18-23-pretrain-hf

Settings the original code cannot run (E_D or E_M with `3-18`, E_M with SigLIP, SigLIP with selections other than
`3-18-23` and `latter`) are refused: no such checkpoint can exist.
"""

from __future__ import annotations

import copy
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlavaImageProcessorPil, PreTrainedConfig

from llava_multilayer import LlavaMultiLayerConfig
from llava_multilayer.conversion.components import build_image_processor, num_image_tokens, text_config_from_original
from llava_multilayer.conversion.convert_mmfuser_to_hf import projector_rules as mmfuser_projector_rules
from llava_multilayer.conversion.key_rules import Drop, KeyMapping, KeyRules, key_mapping
from llava_multilayer.conversion.llava_original import (
    LANGUAGE_MODEL_RULES,
    Detection,
    FamilyConversion,
    FamilyInputs,
    OriginalFamily,
    Stage,
    base_language_model_key_mapping,
    check_llava_settings,
    convert_original,
    finetune_key_mapping,
    mlp_projector_rules,
)
from llava_multilayer.conversion.llava_original import main as convert_main
from llava_multilayer.conversion.pipeline import ConversionReport
from llava_multilayer.conversion.reading import ConversionError, TensorDictReader, load_torch_file


logger = logging.getLogger(__name__)

FAMILY = "layer_select_fuse"
STRATEGIES = ("E_D", "E_M", "I_D", "I_M")
SELECTIONS = ("18", "3-18", "3-18-23", "former", "latter", "all")
ENCODERS = ("clip", "siglip")

#: The vision hidden-state indices each original tower returns, in list order; the last entry is the main layer
#: (spliced into the sequence by I_D/I_M, the query of E_M). CLIP runs all 24 layers of ViT-L; the original SigLIP
#: tower deletes the last of so400m's 27 layers, so index 25 is the second-to-last layer that runs.
TOWER_LAYERS = {
    "clip": {
        "18": [18, 23],
        "3-18": [3, 18, 23],
        "3-18-23": [3, 18, 23, 23],
        "former": [*range(1, 13), 23],
        "latter": [*range(13, 25), 23],
        "all": [*range(1, 25), 23],
    },
    "siglip": {
        "3-18-23": [3, 20, 25, 25],
        "latter": [*range(15, 27), 25],
    },
}

#: Number of value levels of the E_M (MMFuser) block per selection: the first `n` entries of the tower's list.
MMFUSER_LEVELS = {"18": 1, "3-18-23": 2, "former": 12, "latter": 12, "all": 24}

MMFUSER_NUM_HEADS = 16
MMFUSER_NUM_POINTS = 4
MMFUSER_LAYER_NORM_EPS = 1e-6

#: Layer_Select_Fuse configs (`model_type: "llama"`) are recognised by the fork's strategy fields.
DETECTION = Detection(
    markers=("layer_fusing_strategy", "layer_using_strategy"),
    required={
        "layer_fusing_strategy": (lambda value: isinstance(value, str), f"a string, one of {list(STRATEGIES)}"),
        "layer_using_strategy": (lambda value: isinstance(value, str), f"a string, one of {list(SELECTIONS)}"),
    },
)
detect = DETECTION.matches


# --------------------------------------------------------------------------------------------------------------
# Strategies and layer selections
# --------------------------------------------------------------------------------------------------------------


def check_supported(strategy: str, selection: str, encoder: str | None) -> None:
    """Raises a [`ConversionError`] for a combination the original code cannot build or run.

    Args:
        strategy: `layer_fusing_strategy` (`E_D`, `E_M`, `I_D`, `I_M`).
        selection: `layer_using_strategy` (`18`, `3-18`, `3-18-23`, `former`, `latter`, `all`).
        encoder: `clip`, `siglip`, or `None` to check only what does not depend on the tower.
    """
    if strategy not in STRATEGIES:
        raise ConversionError(
            f"layer_fusing_strategy={strategy!r} is not one of the original code's strategies {list(STRATEGIES)}."
        )
    if selection not in SELECTIONS:
        raise ConversionError(
            f"layer_using_strategy={selection!r} is not one of the original code's layer selections "
            f"{list(SELECTIONS)}."
        )
    if encoder is not None and encoder not in ENCODERS:
        raise ConversionError(f"Unknown vision encoder {encoder!r}; expected one of {list(ENCODERS)}.")
    if strategy in ("E_D", "E_M") and selection == "3-18":
        raise ConversionError(
            f"layer_fusing_strategy={strategy!r} with layer_using_strategy='3-18' cannot come from the original code: "
            "its projector builder has no branch for it, so `mm_projector_f` is None and the first forward crashes. "
            "No such checkpoint can exist; '3-18-23' is the three-layer selection that works."
        )
    if encoder == "siglip" and selection not in TOWER_LAYERS["siglip"]:
        raise ConversionError(
            f"layer_using_strategy={selection!r} with a SigLIP tower cannot come from the original code: its SigLIP "
            f"tower only implements {sorted(TOWER_LAYERS['siglip'])} (any other value raises UnboundLocalError)."
        )
    if encoder == "siglip" and strategy == "E_M":
        raise ConversionError(
            "layer_fusing_strategy='E_M' with a SigLIP tower cannot run in the original code: SigLIP gives 728 "
            "tokens per image (the first patch is dropped) but the MMFuser block builds 26x26 = 676 reference points, "
            "and the forward fails to broadcast. No such checkpoint can exist; only CLIP E_M models are convertible."
        )


def decoder_layer_order(selection: str, num_decoder_layers: int) -> list[int]:
    """The original's ordered list of decoder layers receiving internal features (may hold duplicates, negative
    entries or entries `>= num_decoder_layers`, which never match a layer).

    `t(v) = int(v * L / 24 - 1)` (truncation toward zero) places ViT layer `v` of a 24-layer tower at the same depth
    of an `L`-layer language model; `former`/`latter` use the first/last 12 decoder layers, `all` both.
    """
    layers = num_decoder_layers

    def depth(vit_layer: int) -> int:
        return int(vit_layer * layers / 24 - 1)

    first = list(range(12))
    last = list(range(layers - 12, layers))
    return {
        "18": [depth(18)],
        "3-18": [depth(3), depth(18)],
        "3-18-23": [depth(3), depth(18), depth(23)],
        "former": first,
        "latter": last,
        "all": first + last,
    }[selection]


def internal_layer_map(selection: str, num_decoder_layers: int) -> list[list[int]]:
    """`[[decoder_layer, k], ...]`: decoder layer `decoder_layer` receives internal feature `k` (the output of
    `mm_projectors[k]`), for every decoder layer the original treats as a fusion layer, in layer order.

    A decoder layer `l` is a fusion layer iff it occurs in [`decoder_layer_order`]; it takes the feature at its
    first occurrence. Examples: 24 layers, `3-18-23` -> layers 2, 17, 22; 32 layers -> 3, 23, 29; 5 layers ->
    `[[0, 0], [2, 1], [3, 2]]`.
    """
    order = decoder_layer_order(selection, num_decoder_layers)
    return [[layer, order.index(layer)] for layer in range(num_decoder_layers) if layer in order]


@dataclass
class FusionSettings:
    """The converted config's fusion fields for one original (strategy, selection, encoder)."""

    fusion_type: str
    vision_feature_layer: int | list
    internal_fusion_type: str | None = None
    internal_feature_layers: list[int] | None = None
    internal_layer_map: list[list[int]] | None = None

    def config_kwargs(self) -> dict:
        kwargs = {"fusion_type": self.fusion_type, "vision_feature_layer": self.vision_feature_layer}
        if self.fusion_type == "mmfuser":
            kwargs.update(
                mmfuser_num_heads=MMFUSER_NUM_HEADS,
                mmfuser_num_points=MMFUSER_NUM_POINTS,
                mmfuser_layer_norm_eps=MMFUSER_LAYER_NORM_EPS,
            )
        if self.internal_fusion_type is not None:
            kwargs.update(
                internal_fusion_type=self.internal_fusion_type,
                internal_fusion_placement="pre_cross",
                internal_feature_layers=self.internal_feature_layers,
                internal_layer_map=self.internal_layer_map,
            )
        return kwargs


def fusion_settings(strategy: str, selection: str, encoder: str, num_decoder_layers: int) -> FusionSettings:
    """How the original (strategy, selection, encoder) maps onto the converted config's fusion fields.

    Example: `fusion_settings("E_D", "all", "clip", 24).vision_feature_layer == [[1, ..., 12], [13, ..., 24], 23]`.
    """
    check_supported(strategy, selection, encoder)
    layers = TOWER_LAYERS[encoder][selection]
    main = layers[-1]
    if strategy == "E_D":
        if selection in ("former", "latter"):
            feature_layers = [layers[:12], main]
        elif selection == "all":
            feature_layers = [layers[:12], layers[12:24], main]
        elif selection == "18":
            feature_layers = layers[:2]
        else:  # 3-18-23: the three distinct layers (the list's 4th entry repeats the main layer)
            feature_layers = layers[:3]
        return FusionSettings("concat", feature_layers)
    if strategy == "E_M":
        return FusionSettings("mmfuser", layers[: MMFUSER_LEVELS[selection]] + [main])
    return FusionSettings(
        "single",
        main,
        internal_fusion_type="add" if strategy == "I_D" else "cross_attention",
        internal_feature_layers=layers[:-1],
        internal_layer_map=internal_layer_map(selection, num_decoder_layers),
    )


# --------------------------------------------------------------------------------------------------------------
# Original config, vision tower
# --------------------------------------------------------------------------------------------------------------


def _strategy_fields(original: dict) -> tuple[str, str]:
    strategy = original.get("layer_fusing_strategy")
    selection = original.get("layer_using_strategy")
    if not isinstance(strategy, str) or not isinstance(selection, str):
        raise ConversionError(
            "The original config must give `layer_fusing_strategy` and `layer_using_strategy` as strings, got "
            f"{strategy!r} and {selection!r}."
        )
    return strategy, selection


def _check_original_settings(original: dict) -> None:
    """Refuses original settings the converted model does not implement."""
    merge_type = original.get("mm_patch_merge_type", "flat")
    if merge_type != "flat":
        raise ConversionError(f"mm_patch_merge_type={merge_type!r} is not supported (Layer_Select_Fuse uses 'flat').")
    aspect_ratio = original.get("image_aspect_ratio", "square")
    if aspect_ratio not in ("pad", "square", None):
        raise ConversionError(
            f"image_aspect_ratio={aspect_ratio!r} is not supported: Layer_Select_Fuse trains with 'pad' (finetune) or "
            "'square' (pretrain)."
        )
    select_feature = original.get("mm_vision_select_feature", "patch")
    if select_feature != "patch":
        raise ConversionError(
            f"mm_vision_select_feature={select_feature!r} is not supported: Layer_Select_Fuse uses 'patch' (drop the "
            "first token)."
        )


def encoder_of(vision_config: PreTrainedConfig, tower_name: str | None) -> str:
    """`clip` or `siglip` from the tower's config, checked against the original config's `mm_vision_tower`."""
    model_type = vision_config.model_type
    encoder = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}.get(model_type)
    if encoder is None:
        raise ConversionError(
            f"The vision tower is a {model_type!r} model; Layer_Select_Fuse uses CLIP or SigLIP towers."
        )
    named = (tower_name or "").lower()
    if encoder == "clip" and "siglip" in named:
        raise ConversionError(
            f"The original config names a SigLIP tower ({tower_name!r}) but --vision-tower is a CLIP tower."
        )
    if encoder == "siglip" and "siglip" not in named and "clip" in named:
        raise ConversionError(
            f"The original config names a CLIP tower ({tower_name!r}) but --vision-tower is a SigLIP tower."
        )
    return encoder


def converted_vision_config(tower_config: PreTrainedConfig, encoder: str) -> PreTrainedConfig:
    """The vision config of the converted model: the tower's, with SigLIP's last layer and pooling head removed, as
    the original SigLIP tower runs it (so400m: 26 of 27 layers; hidden states 0..26 are unchanged)."""
    vision_config = copy.deepcopy(tower_config)
    if encoder == "siglip":
        vision_config.num_hidden_layers = tower_config.num_hidden_layers - 1
        vision_config.vision_use_head = False
    return vision_config


def _check_tower_depth(vision_config: PreTrainedConfig, encoder: str, selection: str, tower: str) -> None:
    needed = max(TOWER_LAYERS[encoder][selection])
    available = vision_config.num_hidden_layers
    if needed > available:
        run = " (after the original drops its last layer)" if encoder == "siglip" else ""
        raise ConversionError(
            f"layer_using_strategy={selection!r} reads hidden state {needed} of the {encoder} tower, but the tower "
            f"{tower} has {available} layers{run}: pass the tower the model was trained with (--vision-tower)."
        )


def build_image_processor_for(
    tower_dir: Path, vision_config: PreTrainedConfig, encoder: str, pad_to_square: bool
) -> LlavaImageProcessorPil:
    """The original preprocessing: CLIP's processor from the tower directory (resize shortest edge, centre crop), or
    the original SigLIP processor (a plain bicubic resize to the tower's image size, mean/std 0.5), both after padding
    to a square with the mean colour when `pad_to_square`."""
    if encoder == "clip":
        return build_image_processor(tower_dir, pad_to_square=pad_to_square)
    size = vision_config.image_size
    return LlavaImageProcessorPil(
        size={"height": size, "width": size},
        do_center_crop=False,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=3,
        rescale_factor=1 / 255,
        do_pad=pad_to_square,
    )


def build_config(
    original: dict,
    tower_config: PreTrainedConfig,
    image_token_id: int,
    text_config: dict | None = None,
    tower: str = "--vision-tower",
) -> tuple[LlavaMultiLayerConfig, str]:
    """The converted model's config from an original config.json, and the encoder (`clip`/`siglip`).

    Args:
        original: the original config.json.
        tower_config: the vision tower's config (as loaded from its directory).
        image_token_id: id of `<image>` in the converted tokenizer.
        text_config: the language model's config; by default the LLaMA fields of `original`.
        tower: how to name the tower in error messages.
    """
    _check_original_settings(original)
    check_llava_settings(original, "Layer_Select_Fuse")
    strategy, selection = _strategy_fields(original)
    encoder = encoder_of(tower_config, original.get("mm_vision_tower"))
    check_supported(strategy, selection, encoder)
    vision_config = converted_vision_config(tower_config, encoder)
    _check_tower_depth(vision_config, encoder, selection, tower)
    mm_hidden_size = original.get("mm_hidden_size")
    # The original SigLIP tower reports a default so400m config, so mm_hidden_size is always 1152 there: only the
    # weight shapes (checked during the conversion) tell whether a SigLIP tower fits.
    if encoder == "clip" and mm_hidden_size is not None and mm_hidden_size != vision_config.hidden_size:
        raise ConversionError(
            f"The original config has mm_hidden_size={mm_hidden_size}, but the CLIP tower {tower} has hidden_size "
            f"{vision_config.hidden_size}: pass the tower the model was trained with (--vision-tower)."
        )
    text_config = text_config if text_config is not None else text_config_from_original(original)
    settings = fusion_settings(strategy, selection, encoder, text_config["num_hidden_layers"])
    select_strategy = "default"  # mm_vision_select_feature "patch": the first token is dropped (SigLIP: a patch)
    config = LlavaMultiLayerConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=num_image_tokens(vision_config, select_strategy),
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        vision_feature_select_strategy=select_strategy,
        tie_word_embeddings=bool(text_config.get("tie_word_embeddings", False)),
        **settings.config_kwargs(),
    )
    return config, encoder


# --------------------------------------------------------------------------------------------------------------
# Key mappings
# --------------------------------------------------------------------------------------------------------------

_PROJECTORS_KEY = re.compile(r"^model\.mm_projectors\.(\d+)\.(\d+)\.(weight|bias)$")

#: The I_M cross-fusion modules of a fusion layer (`ucross_*`): cross-attention, MLP and their tanh gates.
UCROSS_RULES: KeyRules = {
    r"model\.layers\.(\d+)\.ucross_attn\.(.+)": r"model.language_model.layers.\1.cross_attn.\2",
    r"model\.layers\.(\d+)\.ucross_mlp\.(.+)": r"model.language_model.layers.\1.cross_mlp.\2",
    r"model\.layers\.(\d+)\.ucross_xattn\.weight": r"model.language_model.layers.\1.cross_attn_gate",
    r"model\.layers\.(\d+)\.ucross_xmlp\.weight": r"model.language_model.layers.\1.cross_mlp_gate",
}

#: The external MLP projector `mm_projector_f` (Linear, GELU, Linear) of E_D, I_D and I_M.
MLP_PROJECTOR_RULES = mlp_projector_rules("model.mm_projector_f.")

#: The internal projectors `mm_projectors.{k}` of I_D and I_M, one per internal vision layer.
INTERNAL_PROJECTOR_RULES: KeyRules = {
    r"model\.mm_projectors\.(\d+)\.0\.(weight|bias)": r"model.internal_projectors.\1.linear_1.\2",
    r"model\.mm_projectors\.(\d+)\.2\.(weight|bias)": r"model.internal_projectors.\1.linear_2.\2",
}

#: LLaMA keys and the I_M `ucross_*` modules of a fusion layer -> converted keys.
language_model_key_mapping = key_mapping(UCROSS_RULES, LANGUAGE_MODEL_RULES)


def projector_rules(strategy: str) -> KeyRules:
    """The rules of `model.mm_projector_f.*` / `model.mm_projectors.{k}.*` for `strategy`: E_M's projector is an
    MMFuser block plus MLP, the others' an MLP; only I_D and I_M have internal projectors."""
    if strategy == "E_M":
        return mmfuser_projector_rules("model.mm_projector_f.")
    return {**MLP_PROJECTOR_RULES, **(INTERNAL_PROJECTOR_RULES if strategy in ("I_D", "I_M") else {})}


def projector_key_mapping(strategy: str) -> KeyMapping:
    """`model.mm_projector_f.*` / `model.mm_projectors.{k}.*` -> the converted projectors, for `strategy`."""
    return key_mapping(projector_rules(strategy))


def original_key_mapping(strategy: str) -> KeyMapping:
    """Keys of an original finetune checkpoint -> converted keys (`None` for a key the original model lacks)."""
    return finetune_key_mapping(projector_rules(strategy), UCROSS_RULES)


# --------------------------------------------------------------------------------------------------------------
# Pretrain-stage artifacts
# --------------------------------------------------------------------------------------------------------------

_PROJECTOR_FILE = re.compile(r"^mm_projector_(\d+)\.bin$")


def read_pretrain_projectors(
    pretrain_dir: Path, strategy: str, num_projectors: int
) -> list[tuple[object, KeyMapping]]:
    """Readers of `mm_projector_f.bin`, `mm_projector_{k}.bin` and `ucross.bin` with their key mappings.

    The original saver puts every key *containing* `mm_projectors.{k}` into `mm_projector_{k}.bin`, so
    `mm_projector_1.bin` also holds `mm_projectors.10.*`-`.19.*`, `mm_projector_2.bin` `mm_projectors.20.*`-`.23.*`.
    Each key is assigned to its true projector by its full name and read once (from `mm_projector_{true}.bin`
    when present); the other copies are checked to be identical and listed as dropped.
    """
    path = pretrain_dir / "mm_projector_f.bin"
    if not path.is_file():
        raise ConversionError(
            f"{pretrain_dir} has no mm_projector_f.bin: --pretrain-dir must be the output directory of the original "
            "pretraining stage (tune_mm_mlp_adapter=True)."
        )
    projector_f = load_torch_file(path)
    stray = sorted(key for key in projector_f if not key.startswith("model.mm_projector_f."))
    if stray:
        raise ConversionError(f"{path} holds keys that are not `model.mm_projector_f.*`: {stray[:5]}.")
    sources: list[tuple[object, KeyMapping]] = [
        (TensorDictReader(projector_f, str(path)), projector_key_mapping(strategy))
    ]

    files = {}
    for file in sorted(pretrain_dir.iterdir()):
        match = _PROJECTOR_FILE.match(file.name)
        if match:
            files[int(match[1])] = file
    if strategy in ("E_D", "E_M"):
        if files:
            raise ConversionError(
                f"{pretrain_dir} holds {sorted(p.name for p in files.values())}, but a {strategy} model has no "
                "internal projectors (mm_projectors): the directory does not match its config.json."
            )
    else:
        expected = set(range(num_projectors))
        if set(files) != expected:
            raise ConversionError(
                f"{pretrain_dir} must hold mm_projector_0.bin .. mm_projector_{num_projectors - 1}.bin (one per "
                f"internal projector of this {strategy} model), found {sorted(p.name for p in files.values())}."
            )
        chosen: dict[str, torch.Tensor] = {}
        copies: dict[str, torch.Tensor] = {}
        copy_reasons: dict[str, str] = {}
        contents = {k: load_torch_file(path) for k, path in sorted(files.items())}
        for k, tensors in contents.items():
            for key, tensor in tensors.items():
                match = _PROJECTORS_KEY.match(key)
                if match is None:
                    raise ConversionError(f"{files[k]} holds {key!r}, which is not a `model.mm_projectors.*` key.")
                true_index = int(match[1])
                if f"mm_projectors.{k}" not in key:
                    raise ConversionError(f"{files[k]} holds {key!r}, which the original saver never writes there.")
                owner = true_index if true_index in contents and key in contents[true_index] else k
                if owner == k:
                    chosen[key] = tensor
                    continue
                reference = contents[owner][key]
                if reference.shape != tensor.shape or not torch.equal(reference, tensor):
                    raise ConversionError(
                        f"{key!r} differs between {files[owner].name} and {files[k].name}; both copies were written "
                        "from the same model, so one of the files is corrupt."
                    )
                copy_key = f"{files[k].name}:{key}"
                copies[copy_key] = tensor
                copy_reasons[copy_key] = (
                    f"duplicate of {key} that the original saver's substring match put into {files[k].name}; read "
                    f"from {files[owner].name}"
                )
        chosen_reader = TensorDictReader(chosen, f"{pretrain_dir}/mm_projector_*.bin")
        sources.append((chosen_reader, projector_key_mapping(strategy)))
        if copies:
            sources.append((TensorDictReader(copies, "prefix-collision copies"), lambda key: Drop(copy_reasons[key])))

    ucross_path = pretrain_dir / "ucross.bin"
    ucross = load_torch_file(ucross_path) if ucross_path.is_file() else {}
    if strategy == "I_M" and not ucross:
        raise ConversionError(
            f"{pretrain_dir} has no (or an empty) ucross.bin, but an I_M model's gated cross-attention modules are "
            "trained in the pretraining stage and saved there."
        )
    if ucross:
        sources.append((TensorDictReader(ucross, str(ucross_path)), language_model_key_mapping))
    return sources


# --------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------


def check_original(stage: Stage) -> None:
    """Refuses what the original code cannot produce before anything is downloaded (the tower type is confirmed by
    [`build_config`])."""
    strategy, selection = _strategy_fields(stage.original)
    named_tower = str(stage.original.get("mm_vision_tower") or "").lower()
    check_supported(strategy, selection, "siglip" if "siglip" in named_tower else None)


def build(inputs: FamilyInputs) -> FamilyConversion:
    """The Layer_Select_Fuse part of a conversion: config, projector (and I_M cross-fusion) sources, settings."""
    stage, tower = inputs.stage, inputs.tower
    strategy, selection = _strategy_fields(stage.original)
    config, encoder = build_config(
        stage.original, tower.config, inputs.image_token_id, inputs.text_config, tower=str(tower.directory)
    )
    if stage.is_pretrain:
        num_projectors = len(config.internal_feature_layers or [])
        sources = [(inputs.checkpoint, base_language_model_key_mapping)]
        sources += read_pretrain_projectors(stage.pretrain_dir, strategy, num_projectors)
    else:
        sources = [(inputs.checkpoint, original_key_mapping(strategy))]
    pad_to_square = stage.original.get("image_aspect_ratio", "square") == "pad"
    layer_map = {str(layer): config.internal_feature_layers[k] for layer, k in (config.internal_layer_map or [])}
    settings = {
        "layer_fusing_strategy": strategy,
        "layer_using_strategy": selection,
        "encoder": encoder,
        "stage": "pretrain" if stage.is_pretrain else "finetune",
        "fusion_type": config.fusion_type,
        "vision_feature_layer": config.vision_feature_layer,
        "image_aspect_ratio": "pad" if pad_to_square else "square",
    }
    if config.internal_fusion_type is not None:
        settings.update(
            internal_fusion_type=config.internal_fusion_type,
            internal_fusion_placement=config.internal_fusion_placement,
            internal_feature_layers=config.internal_feature_layers,
            internal_layer_map=config.internal_layer_map,
            decoder_layer_to_vision_layer=layer_map,
        )
    if encoder == "siglip":
        settings["vision_layers_run"] = config.vision_config.num_hidden_layers
    image_processor = build_image_processor_for(tower.directory, config.vision_config, encoder, pad_to_square)
    return FamilyConversion(config=config, sources=sources, settings=settings, image_processor=image_processor)


SPEC = OriginalFamily(
    name=FAMILY,
    detection=DETECTION,
    pretrain_files=("mm_projector_f.bin",),
    build=build,
    check_original=check_original,
)

#: Layer_Select_Fuse has no flags beyond the common ones (`--pretrain-dir`: config.json, mm_projector_f.bin,
#: mm_projector_{k}.bin, ucross.bin; --input-dir is then the base language model with its tokenizer).
add_arguments = SPEC.add_arguments


def convert_layer_select_fuse(
    input_dir: str | Path, output_dir: str | Path, vision_tower: str | None = None, **kwargs
) -> ConversionReport:
    """Converts a Layer_Select_Fuse checkpoint (see the module docstring); `kwargs` are those of
    [`convert_original`] (`pretrain_dir`: `mm_projector_f.bin`, `mm_projector_{k}.bin`, `ucross.bin`, config.json;
    `dtype`, `verify`, `parity_fixture`, ...)."""
    return convert_original(SPEC, input_dir, output_dir, vision_tower, **kwargs)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    convert_main(SPEC, __doc__, argv, prog)


if __name__ == "__main__":
    main(sys.argv[1:])
