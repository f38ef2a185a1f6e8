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
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoTokenizer, PreTrainedConfig

from llava_multilayer import LlavaMultiLayerConfig, LlavaMultiLayerInstructionProcessor
from llava_multilayer.instruction_guided_fusion_llava_multilayer import InstructionEncoder
from llava_multilayer.conversion.conversion_utils import (
    ORIGINAL_VISION_TOWER_PREFIX,
    CheckpointReader,
    ConversionError,
    ConversionReport,
    Drop,
    KeyMapping,
    TensorDictReader,
    _load_json,
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

FAMILY = "igva"
DEFAULT_VISION_TOWER = "openai/clip-vit-large-patch14-336"
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


def detect(original_config: dict) -> bool:
    """True iff `original_config` (an original config.json) was written by IGVA's training code."""
    return "vit_aggregate_groups" in original_config and "vit_base_layer" in original_config


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
    for flag in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if original.get(flag):
            raise ConversionError(f"{flag}=true is not supported (IGVA trains with it false).")
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
    modules = _load_json(modules_path)
    if not isinstance(modules, list) or not all(isinstance(entry, dict) for entry in modules):
        raise ConversionError(f"{modules_path} must be a list of module entries.")
    kinds = tuple(_module_kind(entry) for entry in modules)
    if kinds != _SENTENCE_TRANSFORMERS_MODULES:
        raise ConversionError(
            f"{modules_path} describes the pipeline {list(kinds)}, but the converted model computes "
            f"{list(_SENTENCE_TRANSFORMERS_MODULES)} (mean pooling over the attended tokens, then L2 normalisation), "
            "as sentence-transformers/all-mpnet-base-v2 does. Refusing to convert an encoder that would give different "
            "instruction embeddings."
        )
    transformer_dir = directory / modules[0].get("path", "")
    pooling_path = directory / modules[1].get("path", "") / "config.json"
    if not pooling_path.is_file():
        raise ConversionError(f"{directory}: the Pooling module has no {pooling_path.relative_to(directory)}.")
    pooling = _load_json(pooling_path)
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
    bert_config = _load_json(bert_config_path)
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
                f"{bert_config_path} sets do_lower_case=true but the tokenizer of {transformer_dir} is case-sensitive; "
                "the converted processor does not lower-case instructions itself."
            )
    return encoder


def sentence_encoder_key_mapping(key: str) -> str | Drop:
    """Keys of the encoder's transformer model (`MPNetModel` state dict) -> `model.instruction_encoder.encoder.*`."""
    if key.startswith("pooler."):
        return Drop(
            "pooler of the sentence encoder's transformer: sentence-transformers mean-pools the token embeddings and "
            "never uses it"
        )
    if key.endswith("embeddings.position_ids"):
        return Drop("position_ids buffer (recomputed from the input ids)")
    return "model.instruction_encoder.encoder." + key


# --------------------------------------------------------------------------------------------------------------
# Key mappings
# --------------------------------------------------------------------------------------------------------------

_LLM_KEY = re.compile(r"^model\.(embed_tokens|layers|norm)\.")
_AGGREGATOR_BLOCK_KEY = re.compile(r"^model\.vision_aggregator\.transformers\.(\d+)\.(.+)$")
_AGGREGATOR_KEY = re.compile(r"^model\.vision_aggregator\.((?:sentence_proj|cls_proj|linear)\..+)$")
_PROJECTOR_KEY = re.compile(r"^model\.mm_projector\.([02])\.(weight|bias)$")

VISION_TOWER_DROP_REASON = "frozen tower copy, ignored by the original loader (the tower comes from --vision-tower)"


ROTARY_DROP_REASON = "rotary inv_freq buffer (recomputed from the config)"


def original_key_mapping(key: str) -> str | Drop | None:
    """Original IGVA keys -> converted keys (`None` for a key the original model does not have)."""
    if key.endswith("rotary_emb.inv_freq"):
        return Drop(ROTARY_DROP_REASON)
    if _LLM_KEY.match(key):
        return "model.language_model." + key[len("model.") :]
    if key == "lm_head.weight":
        return key
    match = _PROJECTOR_KEY.match(key)
    if match:
        return f"model.multi_modal_projector.linear_{1 if match[1] == '0' else 2}.{match[2]}"
    match = _AGGREGATOR_BLOCK_KEY.match(key)
    if match:
        return f"model.multi_modal_projector.aggregator.blocks.{match[1]}.{match[2]}"
    match = _AGGREGATOR_KEY.match(key)
    if match:
        return "model.multi_modal_projector.aggregator." + match[1]
    if key.startswith("model.vision_tower."):
        return Drop(VISION_TOWER_DROP_REASON)
    return None


def base_language_model_key_mapping(key: str) -> str | None:
    """Keys of a plain LLaMA checkpoint (the base LLM of a stage-1 conversion) -> converted keys."""
    if key.endswith("rotary_emb.inv_freq"):
        return Drop(ROTARY_DROP_REASON)
    if _LLM_KEY.match(key):
        return "model.language_model." + key[len("model.") :]
    if key == "lm_head.weight":
        return key
    return None


def pretrain_projector_key_mapping(key: str) -> str | None:
    """Keys of a stage-1 `mm_projector.bin` -> converted keys."""
    match = _PROJECTOR_KEY.match(key)
    if match:
        return f"model.multi_modal_projector.linear_{1 if match[1] == '0' else 2}.{match[2]}"
    return None


def vision_tower_key_mapping(key: str) -> str | Drop | None:
    """Keys of a CLIP tower directory (`CLIPVisionModel` or a full `CLIPModel`) -> `model.vision_tower.*`."""
    if key.endswith("position_ids"):
        return Drop("position_ids buffer of the vision tower (recomputed)")
    if key.startswith(("text_model.", "text_projection.", "visual_projection.")) or key == "logit_scale":
        return Drop("CLIP text tower / contrastive heads: LLaVA uses only the vision model")
    if key.startswith("vision_model."):
        return "model.vision_tower." + key[len("vision_model.") :]
    if key.startswith(("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")):
        return "model.vision_tower." + key
    return None


def _read_tensors(reader: CheckpointReader, keys: set[str]) -> dict[str, torch.Tensor]:
    """The tensors `keys` of `reader`, reading each `.bin` shard at most once."""
    if reader.format == "safetensors":
        return {key: reader.get_tensor(key) for key in keys}
    return {key: tensor for key, tensor in reader.iter_tensors(progress=False) if key in keys}


def _warn_if_checkpoint_tower_differs(reader: CheckpointReader, tower: CheckpointReader) -> None:
    """The original checkpoint's (ignored) tower copy should equal the tower that is converted; say so if not."""
    pairs = {}
    for key in reader.keys():
        if key.startswith(ORIGINAL_VISION_TOWER_PREFIX) and not key.endswith("position_ids"):
            rest = key[len(ORIGINAL_VISION_TOWER_PREFIX) :]
            pairs[key] = next((name for name in (f"vision_model.{rest}", rest) if name in tower), None)
    stored = _read_tensors(reader, set(pairs))
    loaded = _read_tensors(tower, {name for name in pairs.values() if name is not None})
    differing = [
        key
        for key, name in pairs.items()
        if name is None or not torch.equal(stored[key].float(), loaded[name].float())
    ]
    if differing:
        logger.warning(
            "%d vision-tower tensor(s) stored in the original checkpoint differ from --vision-tower (e.g. %s). The "
            "original code ignores the stored copy and loads `mm_vision_tower`, so the converted model uses "
            "--vision-tower; check that it is the tower the model was trained with.",
            len(differing),
            differing[0],
        )


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
    mm_hidden_size = original.get("mm_hidden_size")
    if mm_hidden_size is not None and mm_hidden_size != vision_config.hidden_size:
        raise ConversionError(
            f"The original config has mm_hidden_size={mm_hidden_size}, but the vision tower given has hidden_size "
            f"{vision_config.hidden_size}: pass the tower the model was trained with (--vision-tower)."
        )
    groups = parse_layer_groups(original.get("vit_aggregate_groups"))
    by_average = _aggregate_by_average(original)
    igva = {}
    if not by_average:
        missing = [
            key
            for key in ("aggregator_num_transformers", "aggregator_num_heads", "aggregator_hidden_dim", "sentence_embed_dim")
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


def convert_igva(
    input_dir: str | Path,
    output_dir: str | Path,
    vision_tower: str | None = None,
    sentence_encoder: str | None = None,
    pretrain_dir: str | Path | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    verify: bool = False,
    parity_fixture: str | Path | None = None,
    max_shard_size: int | None = None,
    progress: bool = True,
) -> ConversionReport:
    """Converts an IGVA checkpoint; see the module docstring.

    Args:
        input_dir: the finetune (stage 2) checkpoint directory, or with `pretrain_dir` the base LLM directory.
        vision_tower: local directory or hub id of the CLIP tower (default: the config's `mm_vision_tower`).
        sentence_encoder: sentence-transformers directory or hub id (default: the config's `sentence_embedder`).
        pretrain_dir: a stage-1 output directory (config.json + mm_projector.bin).
    """
    input_dir = resolve_local_dir(
        str(input_dir), "base language model" if pretrain_dir is not None else "original checkpoint", "--input-dir"
    )
    if (input_dir / "adapter_config.json").is_file():
        raise ConversionError(
            f"{input_dir} is a LoRA adapter (adapter_config.json): IGVA ships no LoRA recipe and this converter reads "
            "full checkpoints only; merge the adapter (and non_lora_trainables.bin) into the model first."
        )
    config_dir = Path(pretrain_dir) if pretrain_dir is not None else input_dir
    original = load_original_config(config_dir)
    if not detect(original):
        raise ConversionError(
            f"{config_dir}/config.json is not an IGVA config (no `vit_aggregate_groups`/`vit_base_layer`); use the "
            "converter of its family."
        )
    by_average = _aggregate_by_average(original)
    if pretrain_dir is not None and not by_average:
        raise ConversionError(
            f"--pretrain-dir {pretrain_dir} holds a config with aggregate_by_average=false, i.e. a finetune-stage "
            "config; convert finetune checkpoints with --input-dir alone."
        )
    if pretrain_dir is None and (input_dir / "mm_projector.bin").is_file():
        raise ConversionError(
            f"{input_dir} is a stage-1 (pretrain) output without language-model weights: pass it as --pretrain-dir and "
            "the base LLM directory as --input-dir."
        )

    tower_dir = resolve_local_dir(vision_tower or original.get("mm_vision_tower"), "vision tower", "--vision-tower")
    vision_config = load_vision_config(tower_dir)
    if vision_config.model_type != "clip_vision_model":
        raise ConversionError(
            f"IGVA uses a CLIP vision tower; {tower_dir} holds a {vision_config.model_type!r} model."
        )
    tower_reader = CheckpointReader(tower_dir)

    encoder = None
    if not by_average:
        encoder_dir = resolve_local_dir(
            sentence_encoder or original.get("sentence_embedder"), "sentence encoder", "--sentence-encoder"
        )
        encoder = load_sentence_encoder(encoder_dir)
    elif sentence_encoder is not None:
        logger.warning("--sentence-encoder is ignored: an aggregate_by_average (stage-1) model has no instruction encoder.")

    text_config = None
    if pretrain_dir is not None:
        base_config = load_original_config(input_dir)
        text_config = text_config_from_original(base_config)
        for key in ("hidden_size", "vocab_size", "num_hidden_layers"):
            if key in original and base_config.get(key) != original[key]:
                raise ConversionError(
                    f"--input-dir {input_dir} has {key}={base_config.get(key)}, but the pretrain config has "
                    f"{original[key]}: pass the base LLM the projector was trained on."
                )

    tokenizer, image_token_id = load_tokenizer_with_image_token(input_dir)
    config = build_config(original, vision_config, image_token_id, encoder, text_config)
    image_processor = build_image_processor(tower_dir, pad_to_square=original.get("image_aspect_ratio") == "pad")

    if encoder is not None:
        instruction_tokenizer = AutoTokenizer.from_pretrained(encoder.transformer_dir)
        processor = build_processor(
            config,
            tokenizer,
            image_processor,
            processor_class=LlavaMultiLayerInstructionProcessor,
            instruction_tokenizer=instruction_tokenizer,
            instruction_max_length=encoder.max_seq_length,
        )
    else:
        processor = build_processor(config, tokenizer, image_processor)

    reader = CheckpointReader(input_dir)
    if pretrain_dir is not None:
        projector_path = Path(pretrain_dir) / "mm_projector.bin"
        if not projector_path.is_file():
            raise ConversionError(f"--pretrain-dir {pretrain_dir} has no mm_projector.bin.")
        projector = TensorDictReader(load_torch_file(projector_path), str(projector_path))
        projector.files = [projector_path]
        sources: list[tuple[object, KeyMapping]] = [
            (reader, base_language_model_key_mapping),
            (projector, pretrain_projector_key_mapping),
        ]
    else:
        _warn_if_checkpoint_tower_differs(reader, tower_reader)
        sources = [(reader, original_key_mapping)]
    sources.append((tower_reader, vision_tower_key_mapping))
    if encoder is not None:
        sources.append((CheckpointReader(encoder.transformer_dir), sentence_encoder_key_mapping))

    settings = {
        "stage": "pretrain (aggregate_by_average)" if by_average else "finetune (instruction-guided aggregator)",
        "igva_layer_groups": config.igva_layer_groups,
        "num_groups": len(config.igva_layer_groups),
        "base_layer (vision_feature_layer)": config.vision_feature_layer,
        "concat_order": "[base-layer patches, fused patches]",
        "igva_aggregate_by_average": config.igva_aggregate_by_average,
        "vision_tower": describe_location(
            vision_tower or original.get("mm_vision_tower"),
            "--vision-tower" if vision_tower else "the config's mm_vision_tower",
            original.get("mm_vision_tower"),
        ),
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
    name_or_path = original.get("_name_or_path") or ""
    base_model = [name_or_path] if re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path) else []
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
        parity_check=fixture_parity_check(parity_fixture) if parity_fixture else None,
        settings=settings,
        base_model=base_model,
        source_dir=str(config_dir if pretrain_dir is None else f"{input_dir} + {pretrain_dir}"),
        progress=progress,
        **({"max_shard_size": max_shard_size} if max_shard_size else {}),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the IGVA converter beyond the common ones."""
    parser.add_argument(
        "--sentence-encoder",
        "--sentence-embedder",
        dest="sentence_encoder",
        help="Local sentence-transformers directory or hub id of the instruction encoder (overrides the config's "
        f"`sentence_embedder`, usually a local path; the authors used {DEFAULT_SENTENCE_ENCODER}).",
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = converter_parser(__doc__, add_arguments, prog)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        report = convert_igva(
            args.input_dir,
            args.output_dir,
            vision_tower=args.vision_tower,
            sentence_encoder=args.sentence_encoder,
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
