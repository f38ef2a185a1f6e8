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
"""Converts checkpoints of IGVA (instruction-guided fusion of vision layer groups, arXiv 2501.08443) into the
llava-multilayer Hub format (`fusion_type="igva"`).

Stage 2 (finetune) checkpoint, as written by the original trainer (config.json + safetensors + tokenizer). The
original config names the CLIP tower and the sentence encoder by local paths or hub ids; override them with local
copies or hub ids:

    python conversion_scripts/convert_igva_to_hf.py \\
        --input-dir /data/igva-7b \\
        --vision-tower openai/clip-vit-large-patch14-336 \\
        --sentence-encoder sentence-transformers/all-mpnet-base-v2 \\
        --output-dir igva-7b-hf --dtype bfloat16 --verify

Stage 1 (pretrain, `aggregate_by_average: true`): only `config.json` and `mm_projector.bin` are written by the
original trainer, so the language model comes from the base LLM directory (e.g. Vicuna-7B-v1.5) given as
`--input-dir`. The result averages the layer groups uniformly and has no instruction encoder:

    python conversion_scripts/convert_igva_to_hf.py \\
        --input-dir lmsys/vicuna-7b-v1.5 --pretrain-dir /data/igva-7b-pretrain \\
        --vision-tower openai/clip-vit-large-patch14-336 --output-dir igva-7b-pretrain-hf

The instruction encoder is not part of an IGVA checkpoint (the original code builds it from
`config.sentence_embedder` at load time); it is bundled into the converted checkpoint: its MPNet weights become
`model.instruction_encoder.encoder.*` and its tokenizer the processor's `instruction_tokenizer/`. Only
sentence-transformers models made of Transformer -> mean Pooling -> Normalize (like all-mpnet-base-v2) are accepted,
since that is what the converted model computes.
"""

from __future__ import annotations

import argparse
import ast
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoTokenizer, PreTrainedConfig

from llava_multilayer import LlavaMultiLayerConfig, LlavaMultiLayerInstructionProcessor
from llava_multilayer.conversion.components import num_image_tokens, text_config_from_original
from llava_multilayer.conversion.key_rules import Drop, KeyRules, key_mapping
from llava_multilayer.conversion.llava_original import (
    Detection,
    FamilyConversion,
    FamilyInputs,
    OriginalFamily,
    Stage,
    check_llava_settings,
    convert_original,
    finetune_key_mapping,
    mlp_projector_rules,
    pretrain_stage_sources,
)
from llava_multilayer.conversion.llava_original import main as convert_main
from llava_multilayer.conversion.pipeline import ConversionReport, describe_location
from llava_multilayer.conversion.reading import (
    CheckpointReader,
    ConversionError,
    load_json,
    resolve_local_dir,
)
from llava_multilayer.instruction_encoder_llava_multilayer import InstructionEncoder


logger = logging.getLogger(__name__)

FAMILY = "igva"
DEFAULT_SENTENCE_ENCODER = "sentence-transformers/all-mpnet-base-v2"

_SENTENCE_TRANSFORMERS_MODULES = ("Transformer", "Pooling", "Normalize")
_POOLING_MODES = (
    "pooling_mode_cls_token",
    "pooling_mode_mean_tokens",
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)


#: IGVA configs are recognised by the fork's layer-group fields.
DETECTION = Detection(
    markers=("vit_aggregate_groups", "vit_base_layer"),
    required={
        "vit_aggregate_groups": (lambda value: True, "the groups of vision layers the aggregator weights"),
        "vit_base_layer": (lambda value: True, "the vision layer whose patches come first"),
    },
)
detect = DETECTION.matches


# --------------------------------------------------------------------------------------------------------------
# Original config
# --------------------------------------------------------------------------------------------------------------


def parse_layer_groups(value) -> list[list[int]]:
    """`vit_aggregate_groups` -> list of hidden-state index lists.

    The original code stores the groups as a STRING holding a Python list literal (parsed with `ast.literal_eval`
    at every forward); an already-parsed list is accepted too.
    """
    groups = value
    if isinstance(value, str):
        try:
            groups = ast.literal_eval(value)
        except (ValueError, SyntaxError) as error:
            raise ConversionError(
                f"`vit_aggregate_groups` must be a Python list literal such as '[[1,2,3],[4,5,6]]', got {value!r}."
            ) from error
    if (
        not isinstance(groups, (list, tuple))
        or not groups
        or not all(isinstance(group, (list, tuple)) and group for group in groups)
        or not all(isinstance(index, int) and not isinstance(index, bool) for group in groups for index in group)
    ):
        raise ConversionError(
            f"`vit_aggregate_groups` must be a non-empty list of non-empty lists of ints, got {value!r}."
        )
    return [list(group) for group in groups]


def _check_supported(original: dict) -> None:
    """Refuses settings of the original code that the converted model does not implement."""
    projector_type = original.get("mm_projector_type", "linear")
    if projector_type != "mlp2x_gelu":
        raise ConversionError(
            f"mm_projector_type={projector_type!r} is not supported: IGVA's scripts use 'mlp2x_gelu' (Linear, GELU, "
            "Linear), which is the only projector the converted model implements."
        )
    merge_type = original.get("mm_patch_merge_type", "flat")
    if merge_type != "flat":
        raise ConversionError(f"mm_patch_merge_type={merge_type!r} is not supported (IGVA uses 'flat').")
    aspect_ratio = original.get("image_aspect_ratio", "square")
    if aspect_ratio not in ("pad", "square", None):
        raise ConversionError(
            f"image_aspect_ratio={aspect_ratio!r} is not supported: only 'pad' and 'square' work in the original IGVA "
            "code (its anyres path crashes)."
        )
    if not isinstance(original.get("vit_base_layer"), int):
        raise ConversionError(f"`vit_base_layer` must be an int, got {original.get('vit_base_layer')!r}.")


def _aggregate_by_average(original: dict) -> bool:
    value = original.get("aggregate_by_average", False)
    if not isinstance(value, bool):
        raise ConversionError(f"`aggregate_by_average` must be true or false, got {value!r}.")
    return value


# --------------------------------------------------------------------------------------------------------------
# Instruction (sentence) encoder
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SentenceEncoder:
    """A sentence-transformers directory checked to compute `normalize(mean_pool(transformer(tokens)))`.

    Attributes:
        directory: the sentence-transformers directory.
        transformer_dir: the folder of its Transformer module (the directory itself or `0_Transformer/`).
        config: the transformer's config (e.g. `mpnet`).
        max_seq_length: the sequence limit of `sentence_bert_config.json`.
    """

    directory: Path
    transformer_dir: Path
    config: PreTrainedConfig
    max_seq_length: int


def _module_kind(entry: dict) -> str:
    return str(entry.get("type", "")).rsplit(".", 1)[-1]


def load_sentence_encoder(directory: Path) -> SentenceEncoder:
    """Reads `modules.json`, the pooling config and `sentence_bert_config.json` of a sentence-transformers directory
    and refuses any pipeline other than Transformer -> mean Pooling -> Normalize."""
    modules_path = directory / "modules.json"
    if not modules_path.is_file():
        raise ConversionError(
            f"{directory} has no modules.json: --sentence-encoder must be a sentence-transformers directory (such as "
            f"{DEFAULT_SENTENCE_ENCODER}), so that its pooling and normalisation can be checked."
        )
    modules = load_json(modules_path)
    if not isinstance(modules, list) or not all(isinstance(entry, dict) for entry in modules):
        raise ConversionError(f"{modules_path} must be a list of module entries.")
    kinds = tuple(_module_kind(entry) for entry in modules)
    if kinds != _SENTENCE_TRANSFORMERS_MODULES:
        raise ConversionError(
            f"{modules_path} describes the pipeline {list(kinds)}, but the converted model computes "
            f"{list(_SENTENCE_TRANSFORMERS_MODULES)} (mean pooling over the attended tokens, then L2 normalisation), "
            "as sentence-transformers/all-mpnet-base-v2 does. Refusing to convert an encoder that would give "
            "different instruction embeddings."
        )
    transformer_dir = directory / modules[0].get("path", "")
    pooling_path = directory / modules[1].get("path", "") / "config.json"
    if not pooling_path.is_file():
        raise ConversionError(f"{directory}: the Pooling module has no {pooling_path.relative_to(directory)}.")
    pooling = load_json(pooling_path)
    enabled = sorted(mode for mode in _POOLING_MODES if pooling.get(mode))
    if enabled != ["pooling_mode_mean_tokens"]:
        raise ConversionError(
            f"{pooling_path} enables {enabled or 'no pooling mode'}; only mean pooling "
            "(`pooling_mode_mean_tokens` alone) is supported, as in sentence-transformers/all-mpnet-base-v2."
        )
    if pooling.get("include_prompt", True) is not True:
        raise ConversionError(f"{pooling_path} sets include_prompt=false, which is not supported.")

    bert_config_path = transformer_dir / "sentence_bert_config.json"
    if not bert_config_path.is_file():
        raise ConversionError(
            f"{transformer_dir} has no sentence_bert_config.json: its `max_seq_length` (the instruction length limit) "
            "cannot be read."
        )
    bert_config = load_json(bert_config_path)
    max_seq_length = bert_config.get("max_seq_length")
    if not isinstance(max_seq_length, int) or max_seq_length < 1:
        raise ConversionError(f"{bert_config_path} must give a positive int `max_seq_length`, got {max_seq_length!r}.")
    config = AutoConfig.from_pretrained(transformer_dir)
    width = pooling.get("word_embedding_dimension", config.hidden_size)
    if width != config.hidden_size:
        raise ConversionError(
            f"{pooling_path} pools {width}-wide token embeddings, but {transformer_dir}/config.json has hidden_size "
            f"{config.hidden_size}."
        )
    try:
        with torch.device("meta"):
            InstructionEncoder(config)
    except (TypeError, ValueError) as error:
        raise ConversionError(
            f"The sentence encoder's transformer ({config.model_type!r}) cannot be built as the instruction encoder "
            f"(a transformers base model without its pooler, e.g. `mpnet` or `bert`): {error}"
        ) from error
    encoder = SentenceEncoder(directory, transformer_dir, config, max_seq_length)
    if bert_config.get("do_lower_case"):
        # sentence-transformers lower-cases the text itself in that case; the processor relies on the tokenizer.
        tokenizer = AutoTokenizer.from_pretrained(transformer_dir)
        if tokenizer("ABC")["input_ids"] != tokenizer("abc")["input_ids"]:
            raise ConversionError(
                f"{bert_config_path} sets do_lower_case=true but the tokenizer of {transformer_dir} is "
                "case-sensitive; the converted processor does not lower-case instructions itself."
            )
    return encoder


#: The sentence encoder's transformer (`MPNetModel` state dict) -> `model.instruction_encoder.encoder.*`.
SENTENCE_ENCODER_RULES: KeyRules = {
    r"pooler\..+": Drop(
        "pooler of the sentence encoder's transformer: sentence-transformers mean-pools the token embeddings and "
        "never uses it"
    ),
    r".*embeddings\.position_ids": Drop("position_ids buffer (recomputed from the input ids)"),
    r"(.+)": r"model.instruction_encoder.encoder.\1",
}
sentence_encoder_key_mapping = key_mapping(SENTENCE_ENCODER_RULES)


# --------------------------------------------------------------------------------------------------------------
# Key mappings
# --------------------------------------------------------------------------------------------------------------

#: The MLP projector `mm_projector` (Linear, GELU, Linear), whose input is [base-layer patches, fused patches].
PROJECTOR_RULES = mlp_projector_rules("model.mm_projector.")

#: The instruction-guided aggregator `vision_aggregator`: its transformer blocks and projections.
AGGREGATOR_RULES: KeyRules = {
    r"model\.vision_aggregator\.transformers\.(\d+)\.(.+)": r"model.multi_modal_projector.aggregator.blocks.\1.\2",
    r"model\.vision_aggregator\.((?:sentence_proj|cls_proj|linear)\..+)": r"model.multi_modal_projector.aggregator.\1",
}

#: Original IGVA keys -> converted keys (`None` for a key the original model does not have).
original_key_mapping = finetune_key_mapping(PROJECTOR_RULES, AGGREGATOR_RULES)
#: Keys of a stage-1 `mm_projector.bin` -> converted keys.
pretrain_projector_key_mapping = key_mapping(PROJECTOR_RULES)


# --------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------


def build_config(
    original: dict,
    vision_config: PreTrainedConfig,
    image_token_id: int,
    encoder: SentenceEncoder | None,
    text_config: dict | None = None,
) -> LlavaMultiLayerConfig:
    """The converted model's config from an original IGVA config.json."""
    _check_supported(original)
    check_llava_settings(original, "IGVA", vision_config)
    groups = parse_layer_groups(original.get("vit_aggregate_groups"))
    by_average = _aggregate_by_average(original)
    igva = {}
    if not by_average:
        missing = [
            key
            for key in (
                "aggregator_num_transformers", "aggregator_num_heads", "aggregator_hidden_dim", "sentence_embed_dim"
            )
            if not isinstance(original.get(key), int)
        ]
        if missing:
            raise ConversionError(f"The original config lacks the aggregator settings {missing} (ints).")
        if encoder is None:
            raise ConversionError("This checkpoint has an aggregator, so it needs the sentence encoder.")
        if original["sentence_embed_dim"] != encoder.config.hidden_size:
            raise ConversionError(
                f"The original config has sentence_embed_dim={original['sentence_embed_dim']} (the input width of the "
                f"aggregator's sentence_proj), but the sentence encoder {encoder.directory} produces "
                f"{encoder.config.hidden_size}-wide embeddings: pass the encoder the model was trained with "
                "(--sentence-encoder)."
            )
        igva = {
            "igva_num_blocks": original["aggregator_num_transformers"],
            "igva_num_heads": original["aggregator_num_heads"],
            "igva_hidden_size": original["aggregator_hidden_dim"],
            "igva_sentence_embed_dim": original["sentence_embed_dim"],
            "instruction_encoder_config": {
                key: value for key, value in encoder.config.to_dict().items() if key != "_name_or_path"
            },
        }
    try:
        return LlavaMultiLayerConfig(
            vision_config=vision_config.to_dict(),
            text_config=text_config if text_config is not None else text_config_from_original(original),
            image_token_id=image_token_id,
            image_seq_length=num_image_tokens(vision_config, "default"),
            vision_feature_select_strategy="default",
            vision_feature_layer=original["vit_base_layer"],
            fusion_type="igva",
            igva_layer_groups=groups,
            igva_aggregate_by_average=by_average,
            **igva,
        )
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise ConversionError(f"The original IGVA settings do not form a valid config: {error}") from error


def check_original(stage: Stage) -> None:
    """A pretraining-stage config must average the layer groups (the aggregator is trained in the finetune stage)."""
    if stage.is_pretrain and not _aggregate_by_average(stage.original):
        raise ConversionError(
            f"--pretrain-dir {stage.pretrain_dir} holds a config with aggregate_by_average=false, i.e. a "
            "finetune-stage config; convert finetune checkpoints with --input-dir alone."
        )


def build(inputs: FamilyInputs) -> FamilyConversion:
    """The IGVA part of a conversion: config, projector / aggregator / instruction-encoder sources, settings."""
    stage, tower, original = inputs.stage, inputs.tower, inputs.stage.original
    if tower.config.model_type != "clip_vision_model":
        raise ConversionError(
            f"IGVA uses a CLIP vision tower; {tower.directory} holds a {tower.config.model_type!r} model."
        )
    sentence_encoder = inputs.options["sentence_encoder"]
    encoder = None
    if not _aggregate_by_average(original):
        encoder_dir = resolve_local_dir(
            sentence_encoder or original.get("sentence_embedder"), "sentence encoder", "--sentence-encoder"
        )
        encoder = load_sentence_encoder(encoder_dir)
    elif sentence_encoder is not None:
        logger.warning(
            "--sentence-encoder is ignored: an aggregate_by_average (stage-1) model has no instruction encoder."
        )
    config = build_config(original, tower.config, inputs.image_token_id, encoder, inputs.text_config)

    if stage.is_pretrain:
        sources = pretrain_stage_sources(inputs, "mm_projector.bin", pretrain_projector_key_mapping)
    else:
        sources = [(inputs.checkpoint, original_key_mapping)]
    processor_kwargs = {}
    if encoder is not None:
        sources.append((CheckpointReader(encoder.transformer_dir), sentence_encoder_key_mapping))
        processor_kwargs = {
            "processor_class": LlavaMultiLayerInstructionProcessor,
            "instruction_tokenizer": AutoTokenizer.from_pretrained(encoder.transformer_dir),
            "instruction_max_length": encoder.max_seq_length,
        }

    settings = {
        "stage": "pretrain (aggregate_by_average)" if encoder is None else "finetune (instruction-guided aggregator)",
        "igva_layer_groups": config.igva_layer_groups,
        "num_groups": len(config.igva_layer_groups),
        "base_layer (vision_feature_layer)": config.vision_feature_layer,
        "concat_order": "[base-layer patches, fused patches]",
        "igva_aggregate_by_average": config.igva_aggregate_by_average,
        "image_aspect_ratio": original.get("image_aspect_ratio"),
    }
    if encoder is not None:
        settings.update(
            {
                "igva_num_blocks": config.igva_num_blocks,
                "igva_num_heads": config.igva_num_heads,
                "igva_hidden_size": config.igva_hidden_size,
                "sentence_encoder": describe_location(
                    sentence_encoder or original.get("sentence_embedder"),
                    "--sentence-encoder" if sentence_encoder else "the config's sentence_embedder",
                    original.get("sentence_embedder"),
                ),
                "sentence_encoder_pipeline": "transformer -> mean pooling over attended tokens -> L2 normalisation",
                "instruction_max_length": encoder.max_seq_length,
            }
        )
    return FamilyConversion(config=config, sources=sources, settings=settings, processor_kwargs=processor_kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the IGVA converter beyond the common ones."""
    parser.add_argument(
        "--sentence-encoder",
        "--sentence-embedder",
        dest="sentence_encoder",
        help="Local sentence-transformers directory or hub id of the instruction encoder (overrides the config's "
        f"`sentence_embedder`, usually a local path; the authors used {DEFAULT_SENTENCE_ENCODER}).",
    )


SPEC = OriginalFamily(
    name=FAMILY,
    detection=DETECTION,
    pretrain_files=("mm_projector.bin",),
    build=build,
    check_original=check_original,
    add_arguments=add_arguments,
    options=("sentence_encoder",),
)


def convert_igva(
    input_dir: str | Path,
    output_dir: str | Path,
    vision_tower: str | None = None,
    sentence_encoder: str | None = None,
    **kwargs,
) -> ConversionReport:
    """Converts an IGVA checkpoint (see the module docstring); `sentence_encoder` is a sentence-transformers
    directory or hub id (default: the config's `sentence_embedder`), `kwargs` are those of [`convert_original`]
    (`pretrain_dir`: config.json + mm_projector.bin, `dtype`, `verify`, `parity_fixture`, ...)."""
    return convert_original(SPEC, input_dir, output_dir, vision_tower, sentence_encoder=sentence_encoder, **kwargs)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    convert_main(SPEC, __doc__, argv, prog)


if __name__ == "__main__":
    main(sys.argv[1:])
