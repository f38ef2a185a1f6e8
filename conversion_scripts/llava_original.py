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
"""What every LLaVA-1.5 fork (MMFuser, Layer_Select_Fuse, IGVA) writes alike, and the conversion built on it.

A family converter is an [`OriginalFamily`] spec: how to recognise its `config.json` ([`Detection`]), which files
mark a pretraining-stage output, and a `build` function holding only the family's own knowledge (its config
mapping and the key rules of its fuser). [`convert_original`] and [`main`] do the rest, the same way for every
family:

- the stage: a finetune checkpoint (`--input-dir`), or a pretraining-stage output (`--pretrain-dir`) over the base
  language model (`--input-dir`), each checked to be what it claims;
- the language model: the LLaMA key rules, its config (from the checkpoint's config.json, or from the base LLM's),
  the tokenizer with the `<image>` token, the generation config;
- the vision tower, by one policy (below), with the CLIP / SigLIP key rules;
- the processor, the strict key accounting and the atomic output of [`run_conversion`], `--verify`, the parity
  check and the command line.

The vision-tower policy. The original trainers save a frozen copy of the tower in the checkpoint
(`model.vision_tower.vision_tower.vision_model.*`), but the original loader never reads it: it builds the tower
lazily and loads the weights named by `mm_vision_tower`. The converted model therefore contains the tower named by
`--vision-tower` (or, without the flag, by `mm_vision_tower`), read from that directory, and the stored copy is
dropped, after a check: a copy of another architecture (layer count, tensor names or shapes) means the named tower
is not the one the model was trained with, and is refused; a copy with other values (compared after rounding the
named tower to the copy's dtype, since the trainers save bf16) is reported with the names of the tensors that
differ, since the original code would run the named tower as well.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedConfig

from llava_multilayer import LlavaMultiLayerConfig

from .checks import fixture_parity_check
from .cli import converter_parser, finish_command
from .components import (
    build_image_processor,
    build_processor,
    generation_config_from_original,
    load_tokenizer_with_image_token,
    load_vision_config,
    text_config_from_original,
)
from .families import FAMILIES
from .key_rules import Drop, KeyMapping, KeyRules, key_mapping
from .pipeline import ConversionReport, describe_location, run_conversion
from .reading import (
    CheckpointReader,
    ConversionError,
    TensorDictReader,
    load_original_config,
    load_torch_file,
    resolve_local_dir,
)


logger = logging.getLogger(__name__)

EMBEDDED_TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."

# --------------------------------------------------------------------------------------------------------------
# Key rules every fork shares
# --------------------------------------------------------------------------------------------------------------

#: The LLaMA language model, as LLaVA-1.5 names it (also the keys of a plain base-LLM checkpoint).
LANGUAGE_MODEL_RULES: KeyRules = {
    r"(?:.+\.)?rotary_emb\.inv_freq": Drop("rotary inv_freq buffer (recomputed from the config)"),
    r"model\.((?:embed_tokens|layers|norm)\..+)": r"model.language_model.\1",
    r"lm_head\.weight": "lm_head.weight",
}

#: The tower copy of a finetune checkpoint, dropped by the vision-tower policy of the module docstring.
EMBEDDED_TOWER_RULES: KeyRules = {
    re.escape(EMBEDDED_TOWER_PREFIX) + r".+": Drop(
        "copy of the frozen vision tower written by the trainer: the original loader ignores it and loads the tower "
        "named by `mm_vision_tower`, which the converted model contains (checked against this copy)"
    ),
}

TIED_HEAD_RULES: KeyRules = {r"lm_head\.weight": Drop("lm_head is tied to the input embeddings")}


def mlp_projector_rules(prefix: str) -> KeyRules:
    """LLaVA-1.5's `mlp2x_gelu` projector (`nn.Sequential(Linear, GELU, Linear)`) saved under `prefix` -> the
    converted MLP projector (index 1, the GELU, has no weights)."""
    prefix = re.escape(prefix)
    return {
        prefix + r"0\.(weight|bias)": r"model.multi_modal_projector.linear_1.\1",
        prefix + r"2\.(weight|bias)": r"model.multi_modal_projector.linear_2.\1",
    }


#: Keys of a plain LLaMA checkpoint (the base LLM of a pretraining-stage conversion) -> converted keys.
base_language_model_key_mapping = key_mapping(LANGUAGE_MODEL_RULES)


def finetune_key_mapping(*family_rules: KeyRules) -> KeyMapping:
    """Keys of a family's finetune checkpoint -> converted keys (`None` for a key none of the rules knows): the
    family's rule tables, tried first so that they can claim keys inside the language model's layers, then the
    language model's, then the embedded tower copy (dropped)."""
    return key_mapping(*family_rules, LANGUAGE_MODEL_RULES, EMBEDDED_TOWER_RULES)


def vision_tower_key_mapping(vision_config: PreTrainedConfig, tower_config: PreTrainedConfig) -> KeyMapping:
    """Keys of a tower directory (`CLIPVisionModel` / `SiglipVisionModel`, or a full `CLIPModel` / `SiglipModel`,
    with or without the `vision_model.` prefix) -> `model.vision_tower.*`.

    `vision_config` is the converted tower, `tower_config` the directory's: the layers the converted tower does not
    run (the original SigLIP tower deletes its last layer) and SigLIP's pooling head, which the original replaces by
    Identity, are dropped.
    """
    vision = r"(?:vision_model\.)?"
    rules = {
        r".*position_ids": Drop("position_ids buffer of the vision tower (recomputed)"),
        r"(?:text_model|text_projection|visual_projection)\..+|logit_scale|logit_bias": Drop(
            "text tower / contrastive heads of the image-text model: LLaVA uses only the vision model"
        ),
    }
    if vision_config.model_type == "siglip_vision_model":
        rules[vision + r"head\..+"] = Drop(
            "SigLIP pooling head: the original tower replaces it by Identity and never uses it"
        )
    unused_layers = range(vision_config.num_hidden_layers, tower_config.num_hidden_layers)
    if unused_layers:
        layers = "|".join(str(layer) for layer in unused_layers)
        rules[vision + rf"encoder\.layers\.(?:{layers})\..+"] = Drop(
            "last SigLIP encoder layer: the original SigLipVisionModel deletes it at construction, so it never runs"
        )
    rules[vision + r"((?:embeddings|pre_layrnorm|encoder|post_layernorm)\..+)"] = r"model.vision_tower.\1"
    return key_mapping(rules)


def with_tied_head(mapping: KeyMapping, config: LlavaMultiLayerConfig) -> KeyMapping:
    """`mapping`, with `lm_head.weight` dropped when the converted model ties it to the input embeddings."""
    if not config.tie_word_embeddings:
        return mapping
    tied = key_mapping(TIED_HEAD_RULES)
    return lambda key: tied(key) or mapping(key)


def tensor_reader(reader, keys) -> Callable[[str], torch.Tensor]:
    """`get(key)` for the tensors `keys` of `reader`: memory-mapped one at a time from safetensors, each `.bin`
    shard read once."""
    if reader.format == "safetensors":
        return reader.get_tensor
    keys = set(keys)
    return {key: tensor for key, tensor in reader.iter_tensors(progress=False) if key in keys}.__getitem__


def check_embedded_tower(
    checkpoint: CheckpointReader, tower: CheckpointReader, tower_mapping: KeyMapping, num_layers: int, tower_name: str
) -> None:
    """Applies the vision-tower policy (module docstring) to the tower copy stored in a finetune checkpoint.

    Raises:
        ConversionError: the copy has another number of encoder layers (`num_layers`: those the converted tower
            runs), or a tensor the named tower lacks or holds with another shape.
    """
    embedded = {
        key: "model.vision_tower." + key[len(EMBEDDED_TOWER_PREFIX) :]
        for key in checkpoint.keys()
        if key.startswith(EMBEDDED_TOWER_PREFIX) and not key.endswith("position_ids")
    }
    if not embedded:
        return
    named = {target: key for key in tower.keys() if isinstance(target := tower_mapping(key), str)}
    layer_ids = {int(match[1]) for target in embedded.values() if (match := re.search(r"\.layers\.(\d+)\.", target))}
    stored = tensor_reader(checkpoint, embedded)
    reference = tensor_reader(tower, [named[target] for target in embedded.values() if target in named])
    problems = [f"{len(layer_ids)} encoder layers instead of {num_layers}"] if len(layer_ids) != num_layers else []
    differing = []
    for key, target in sorted(embedded.items()):
        if target not in named:
            problems.append(f"{key[len(EMBEDDED_TOWER_PREFIX) :]}, which the named tower lacks")
            continue
        copy, original = stored(key), reference(named[target])
        if copy.shape != original.shape:
            name = key[len(EMBEDDED_TOWER_PREFIX) :]
            problems.append(f"{name} of shape {tuple(copy.shape)} instead of {tuple(original.shape)}")
        elif not torch.equal(copy, original.to(copy.dtype)):
            differing.append(key)
    if problems:
        raise ConversionError(
            f"The vision tower stored in the checkpoint does not match the tower {tower_name!r} "
            f"({'; '.join(problems[:5])}): pass the tower the model was trained with (--vision-tower)."
        )
    if differing:
        logger.warning(
            "%d vision-tower tensor(s) stored in the original checkpoint differ from --vision-tower (e.g. %s). The "
            "original code ignores the stored copy and loads `mm_vision_tower`, so the converted model uses "
            "--vision-tower; check that it is the tower the model was trained with.",
            len(differing),
            ", ".join(differing[:3]),
        )


# --------------------------------------------------------------------------------------------------------------
# Settings every fork shares
# --------------------------------------------------------------------------------------------------------------


def check_llava_settings(original: dict, family: str, vision_config: PreTrainedConfig | None = None) -> None:
    """Refuses the LLaVA-1.5 options none of the forks trains with (`mm_use_im_start_end`, `mm_use_im_patch_token`)
    and, given the tower's config, an `mm_hidden_size` the tower does not produce."""
    for flag in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if original.get(flag):
            raise ConversionError(f"{flag}=true is not supported ({family} trains with it false).")
    mm_hidden_size = original.get("mm_hidden_size")
    if vision_config is not None and mm_hidden_size is not None and mm_hidden_size != vision_config.hidden_size:
        raise ConversionError(
            f"The original config has mm_hidden_size={mm_hidden_size}, but the vision tower given has hidden_size "
            f"{vision_config.hidden_size}: pass the tower the model was trained with (--vision-tower)."
        )


def is_hub_id(name) -> bool:
    """Whether `name` reads as a Hub repo id (`owner/name`) and is not a local path."""
    return isinstance(name, str) and bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not Path(name).exists()


# --------------------------------------------------------------------------------------------------------------
# Family specs
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detection:
    """How a family's `config.json` is recognised.

    Args:
        markers: fields only this family writes; any of them makes a config a candidate.
        required: fields a config of this family must have, with a check of the value and what it should be.
        excluded: fields of other families; a config with any of them is not this family's.
        marker_check: further evidence besides `markers` (e.g. MMFuser's list-valued `mm_vision_select_layer`),
            returning a description of the evidence or `None`; `marker_description` says what it looks for.
    """

    markers: tuple[str, ...]
    required: dict[str, tuple[Callable[[object], bool], str]] = field(default_factory=dict)
    excluded: tuple[str, ...] = ()
    marker_check: Callable[[dict], str | None] | None = None

    marker_description: str = ""

    def evidence(self, original: dict) -> str | None:
        """Why `original` looks like a config of this family (`None`: it does not)."""
        if any(key in original for key in self.excluded):
            return None
        present = [key for key in self.markers if key in original]
        if present:
            return f"it has `{present[0]}`"
        return self.marker_check(original) if self.marker_check is not None else None

    def mismatch(self, original: dict) -> str | None:
        """Why `original` is not a config of this family, naming the field (`None`: it is one)."""
        foreign = [key for key in self.excluded if key in original]
        if foreign:
            return f"it has `{foreign[0]}`, a field of another family"
        if self.evidence(original) is None:
            fields = ", ".join(f"`{key}`" for key in self.markers)
            return f"it has none of its fields {fields}{self.marker_description}"
        for key, (check, expected) in self.required.items():
            if key not in original:
                return f"it has no `{key}` ({expected})"
            if not check(original[key]):
                return f"its `{key}` is {original[key]!r}, expected {expected}"
        return None

    def matches(self, original: dict) -> bool:
        """True iff `original` (an original config.json) was written by this family's training code."""
        return self.mismatch(original) is None


@dataclass
class Stage:
    """The directories of one conversion: a finetune checkpoint, or a pretraining-stage output over its base LLM.

    Attributes:
        input_dir: the finetune checkpoint, or (with `pretrain_dir`) the base language model.
        pretrain_dir: the pretraining-stage output directory, if any.
        original: the family's config.json (of `pretrain_dir` when given).
        base_config: the base language model's config.json (pretraining stage only).
        base_model: Hub ids of the models the checkpoint derives from (for the model card).
    """

    input_dir: Path
    pretrain_dir: Path | None
    original: dict
    base_config: dict | None = None
    base_model: list[str] = field(default_factory=list)

    @property
    def is_pretrain(self) -> bool:
        return self.pretrain_dir is not None

    @property
    def source_dir(self) -> str:
        return str(self.input_dir) if self.pretrain_dir is None else f"{self.input_dir} + {self.pretrain_dir}"


@dataclass
class VisionTower:
    """The tower named by `--vision-tower` or `mm_vision_tower`: its directory, config and weights."""

    name: str
    directory: Path
    config: PreTrainedConfig
    description: str

    def reader(self) -> CheckpointReader:
        """The tower's weights (their errors name the tower directory)."""
        try:
            return CheckpointReader(self.directory)
        except ConversionError as error:
            message = f"The vision tower's weights are read from {self.directory}, but: {error}"
            raise ConversionError(message) from error


@dataclass
class FamilyInputs:
    """What a family's `build` works from.

    Attributes:
        checkpoint: the finetune checkpoint, or the base language model (pretraining stage).
        text_config: the language model's config (LLaMA fields).
        options: the family's own keyword options (e.g. IGVA's `sentence_encoder`).
    """

    stage: Stage
    tower: VisionTower
    checkpoint: CheckpointReader
    tokenizer: object
    image_token_id: int
    text_config: dict
    options: dict
    parity_fixture: Path | None


@dataclass
class FamilyConversion:
    """What a family's `build` returns.

    Attributes:
        config: the converted model's config.
        sources: `(reader, mapping)` pairs of the checkpoint (language model and fuser) and of any extra files; the
            vision tower is added by [`convert_original`].
        settings: what the model card lists under the family's settings.
        image_processor: overrides the tower's image processor (e.g. the original SigLIP preprocessing).
        processor_kwargs: extra arguments of [`build_processor`] (e.g. an instruction processor class).
        parity_check: overrides the generic [`fixture_parity_check`].
    """

    config: LlavaMultiLayerConfig
    sources: list[tuple[object, KeyMapping]]
    settings: dict
    image_processor: object | None = None
    processor_kwargs: dict = field(default_factory=dict)
    parity_check: Callable[[Path], dict] | None = None


@dataclass(frozen=True)
class OriginalFamily:
    """One original-checkpoint family: everything [`convert_original`] cannot know.

    Args:
        name: the family's name (`llava-multilayer convert --family NAME`, `conversion_report.json`).
        detection: how its config.json is recognised.
        pretrain_files: files only its pretraining-stage output holds (refused as `--input-dir`).
        build: the config mapping and key rules of the family.
        title: its name in messages, with the article (`"an MMFuser"`); by default the one of its entry in the
            family registry ([`FAMILIES`]).
        check_original: cheap checks of the original config, run before any tower is downloaded.
        add_arguments: its own command-line flags, whose values reach `build` as `options`.
        options: the names of those options.
    """

    name: str
    detection: Detection
    pretrain_files: tuple[str, ...]
    build: Callable[[FamilyInputs], FamilyConversion]
    title: str | None = None
    check_original: Callable[[Stage], None] | None = None
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    options: tuple[str, ...] = ()

    def __post_init__(self):
        if self.title is None:
            if self.name not in FAMILIES:
                raise ValueError(f"Family {self.name!r} is not in the family registry (FAMILIES): pass its `title`.")
            object.__setattr__(self, "title", FAMILIES[self.name].title)


# --------------------------------------------------------------------------------------------------------------
# Stage and components
# --------------------------------------------------------------------------------------------------------------

#: The language-model fields a pretraining-stage config.json must share with the base LLM it was trained on.
BASE_MODEL_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def resolve_stage(family: OriginalFamily, input_dir, pretrain_dir) -> Stage:
    """Reads and checks the directories of a conversion (see [`Stage`])."""
    what = "base language model" if pretrain_dir is not None else "original checkpoint"
    base_model = [str(input_dir)] if pretrain_dir is not None and is_hub_id(str(input_dir)) else []
    input_dir = resolve_local_dir(str(input_dir), what, "--input-dir")
    if pretrain_dir is None:
        for name in family.pretrain_files:
            if (input_dir / name).is_file():
                raise ConversionError(
                    f"{input_dir} holds {name}, i.e. it is a pretraining-stage output: pass it as --pretrain-dir and "
                    "the base language model (e.g. lmsys/vicuna-7b-v1.5) as --input-dir."
                )
        has_weights = any(input_dir.glob("model*.safetensors")) or any(input_dir.glob("pytorch_model*.bin"))
        if (input_dir / "adapter_config.json").is_file() and not has_weights:
            raise ConversionError(
                f"{input_dir} is a LoRA adapter checkpoint (adapter_config.json, non_lora_trainables.bin): convert it "
                "with conversion_scripts/convert_original_lora.py, which merges it into the base model first."
            )
        stage = Stage(input_dir, None, load_original_config(input_dir))
    else:
        pretrain_dir = Path(pretrain_dir)
        if not pretrain_dir.is_dir():
            raise ConversionError(f"--pretrain-dir {pretrain_dir} is not a directory.")
        base_config = load_original_config(input_dir)
        if family.detection.matches(base_config):
            raise ConversionError(
                f"With --pretrain-dir, --input-dir must be the base language model (plain LLaMA weights and "
                f"tokenizer), but {input_dir} is {family.title} checkpoint."
            )
        if base_config.get("model_type", "llama") != "llama":
            raise ConversionError(
                f"--input-dir {input_dir} holds a {base_config.get('model_type')!r} model; with --pretrain-dir it "
                "must be the base LLaMA language model (e.g. lmsys/vicuna-7b-v1.5)."
            )
        stage = Stage(input_dir, pretrain_dir, load_original_config(pretrain_dir), base_config)
    reason = family.detection.mismatch(stage.original)
    if reason is not None:
        config_path = (stage.pretrain_dir or stage.input_dir) / "config.json"
        raise ConversionError(
            f"{config_path} is not {family.title} config ({reason}); use the converter of its family."
        )
    if stage.is_pretrain:
        for key in BASE_MODEL_FIELDS:
            if key in stage.original and stage.original[key] != stage.base_config.get(key):
                raise ConversionError(
                    f"--input-dir {input_dir} has {key}={stage.base_config.get(key)}, but the pretrain config has "
                    f"{stage.original[key]}: pass the base LLM the projectors were trained on."
                )
    name_or_path = stage.original.get("_name_or_path")
    if is_hub_id(name_or_path) and name_or_path not in base_model:
        base_model.append(name_or_path)
    stage.base_model = base_model
    return stage


def resolve_vision_tower(vision_tower: str | None, original: dict) -> VisionTower:
    """The tower named by `--vision-tower` (`vision_tower`), else by the config's `mm_vision_tower`."""
    name = vision_tower or original.get("mm_vision_tower")
    directory = resolve_local_dir(name, "vision tower", "--vision-tower")
    flag = "--vision-tower" if vision_tower else "the config's mm_vision_tower"
    description = describe_location(name, flag, original.get("mm_vision_tower"))
    return VisionTower(str(name), directory, load_vision_config(directory), description)


def language_model_config(stage: Stage) -> dict:
    """The LLaMA config of the converted model: the checkpoint's, or in the pretraining stage the base LLM's."""
    return text_config_from_original(stage.base_config if stage.is_pretrain else stage.original)


def pretrain_stage_sources(
    inputs: FamilyInputs, projector_file: str, projector_mapping: KeyMapping
) -> list[tuple[object, KeyMapping]]:
    """The sources of a pretraining-stage conversion whose trained weights are one file of `--pretrain-dir`: the
    base language model, and `projector_file` read with `projector_mapping`."""
    path = inputs.stage.pretrain_dir / projector_file
    if not path.is_file():
        raise ConversionError(f"--pretrain-dir {inputs.stage.pretrain_dir} has no {projector_file}.")
    projector = TensorDictReader(load_torch_file(path), str(path))
    projector.files = [path]
    return [(inputs.checkpoint, base_language_model_key_mapping), (projector, projector_mapping)]


# --------------------------------------------------------------------------------------------------------------
# Conversion and command line
# --------------------------------------------------------------------------------------------------------------


def convert_original(
    family: OriginalFamily,
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
    **options,
) -> ConversionReport:
    """Converts a checkpoint of `family` into a llava-multilayer directory (written atomically).

    Args:
        input_dir: the finetune checkpoint directory; with `pretrain_dir`, the base language model (HF LLaMA
            format with its tokenizer), a directory or a hub id.
        output_dir: where the converted checkpoint is written.
        vision_tower: local directory or hub id of the tower (default: the config's `mm_vision_tower`).
        pretrain_dir: the output directory of the original pretraining stage.
        dtype: `"float32"`, `"bfloat16"` or `"float16"` to cast floating-point weights; `None` keeps them.
        overwrite: replace a non-empty `output_dir`.
        verify: reload the result and compare every tensor with its source.
        parity_fixture: golden-data directory produced by the original code; the measured differences go into the
            report and the model card.
        max_shard_size: bytes per output shard.
        progress: show progress bars.
        options: the family's own options (`family.options`).
    """
    unknown = sorted(set(options) - set(family.options))
    if unknown:
        raise TypeError(f"The {family.name} converter has no option(s) {unknown}; it has {list(family.options)}.")
    stage = resolve_stage(family, input_dir, pretrain_dir)
    if family.check_original is not None:
        family.check_original(stage)
    tower = resolve_vision_tower(vision_tower, stage.original)
    checkpoint = CheckpointReader(stage.input_dir)
    tokenizer, image_token_id = load_tokenizer_with_image_token(stage.input_dir)
    inputs = FamilyInputs(
        stage=stage,
        tower=tower,
        checkpoint=checkpoint,
        tokenizer=tokenizer,
        image_token_id=image_token_id,
        text_config=language_model_config(stage),
        options={name: options.get(name) for name in family.options},
        parity_fixture=Path(parity_fixture) if parity_fixture else None,
    )
    conversion = family.build(inputs)
    config = conversion.config

    tower_reader = tower.reader()
    tower_mapping = vision_tower_key_mapping(config.vision_config, tower.config)
    if not stage.is_pretrain:
        num_layers = config.vision_config.num_hidden_layers
        check_embedded_tower(checkpoint, tower_reader, tower_mapping, num_layers, tower.name)
    sources = [
        (reader, with_tied_head(mapping, config))
        for reader, mapping in [(tower_reader, tower_mapping), *conversion.sources]
    ]

    pad_to_square = stage.original.get("image_aspect_ratio", "square") == "pad"
    image_processor = conversion.image_processor or build_image_processor(tower.directory, pad_to_square)
    processor = build_processor(config, tokenizer, image_processor, **conversion.processor_kwargs)
    parity_check = conversion.parity_check
    if parity_check is None and inputs.parity_fixture is not None:
        parity_check = fixture_parity_check(inputs.parity_fixture)
    settings = {
        "stage": "pretrain" if stage.is_pretrain else "finetune",
        **conversion.settings,
        "vision_tower": tower.description,
        "vision_tower_weights": "read from the vision tower (the copy stored in a finetune checkpoint is checked and "
        "dropped: the original loader ignores it)",
        "chat_template": "vicuna_v1",
    }
    return run_conversion(
        family=family.name,
        config=config,
        sources=sources,
        output_dir=output_dir,
        processor=processor,
        generation_config=generation_config_from_original(stage.input_dir),
        dtype=dtype,
        overwrite=overwrite,
        verify=verify,
        parity_check=parity_check,
        settings=settings,
        base_model=stage.base_model,
        source_dir=stage.source_dir,
        progress=progress,
        **({"max_shard_size": max_shard_size} if max_shard_size else {}),
    )


def main(family: OriginalFamily, description: str, argv: list[str] | None = None, prog: str | None = None) -> None:
    """The command line of a family converter: the common flags, the family's own, then [`convert_original`]."""
    parser = converter_parser(description, family.add_arguments, prog)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        report = convert_original(
            family,
            args.input_dir,
            args.output_dir,
            vision_tower=args.vision_tower,
            pretrain_dir=args.pretrain_dir,
            dtype=args.dtype,
            overwrite=args.overwrite,
            verify=args.verify,
            parity_fixture=args.parity_fixture,
            max_shard_size=args.max_shard_size,
            **{name: getattr(args, name) for name in family.options},
        )
    except ConversionError as error:
        parser.exit(1, f"{prog + ': ' if prog else ''}error: {error}\n")
    logger.info("Converted %d tensors into %s.", report.num_target_tensors, args.output_dir)
    finish_command(args, report)
