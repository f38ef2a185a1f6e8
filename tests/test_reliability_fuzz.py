"""Fuzzing of the family converters with malformed checkpoint directories.

Each converter's command line (`main(argv)`, exactly what a user runs) gets copies of its golden fixture broken in
one way at a time: config fields missing or of the wrong type, keys renamed / extra / missing, wrong shapes and
dtypes, truncated and corrupt files, inconsistent shard indexes, malicious pickles, broken vision towers,
tokenizers and pretrain-stage `.bin` files. Every attempt must end in one of two ways:

- refused: exit status 1 with an `error: ...` line naming the problem, and no output directory nor staging
  leftovers; a malicious pickle's payload must not have run;
- converted (only where the mutation is harmless, e.g. a float16 tensor among float32 ones): with `--verify`.

Anything else (a traceback from deep inside torch/transformers, an output left behind, a malformed input that
converts) fails the test. The counts of inputs tried and outcomes are printed per converter.
"""

from __future__ import annotations

import importlib
import json
import pickle
import re
import shutil
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import FIXTURES_DIR
from safetensors import safe_open
from safetensors.torch import load_file, save_file


# The raw-pickle mutations use protocol 4, which torch's weights-only unpickler warns about before refusing them.
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")

# --------------------------------------------------------------------------------------------------------------
# The families
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Family:
    """How to run one converter on its fixture, and its family-specific mutations."""

    name: str
    fixture: str
    extra_dirs: dict[str, str] = field(default_factory=dict)  # fixture sub-directory -> command line flag
    # config field -> values that must be refused (`None` in the list stands for "field deleted")
    config_faults: dict[str, list] = field(default_factory=dict)
    # a key of the original checkpoint that belongs to the family's fuser
    fusion_key: str = ""
    pretrain_files: tuple[str, ...] = ()
    # config field -> values the original code ignores, so converting is as right as refusing
    ignored_config: dict[str, list] = field(default_factory=dict)
    # a finetune conversion takes the tower weights stored in the checkpoint (--vision-tower gives its config only)
    uses_embedded_tower: bool = False

    @property
    def module(self):
        return importlib.import_module(f"llava_multilayer.conversion.convert_{self.name}_to_hf")


DELETED = object()

FAMILIES = {
    "mmfuser": Family(
        name="mmfuser",
        fixture="mmfuser-clip",
        config_faults={
            "mm_vision_select_layer": [DELETED, "abc", [], [-2], [99, -2], [-2, -2.5], "list-a/b"],
            "mm_projector_type": ["linear", "mlp3x_gelu", DELETED],
            "mm_hidden_size": [33],
            "mm_vision_select_feature": ["cls_patch", 7],
            "image_aspect_ratio": ["anyres"],
            "mm_use_im_start_end": [True],
        },
        fusion_key="model.mm_projector.0.cross_attn.sampling_offsets.weight",
        pretrain_files=("mm_projector.bin",),
        uses_embedded_tower=True,
    ),
    "layer_select_fuse": Family(
        name="layer_select_fuse",
        fixture="lsf-I_M-clip-3-18-23",
        config_faults={
            "layer_fusing_strategy": [DELETED, "X_Y", 3],
            "layer_using_strategy": [DELETED, "1-2", "3-18-99", "a-b-c"],
            "mm_hidden_size": [33],
            "mm_vision_select_feature": ["cls_patch"],
            "image_aspect_ratio": ["anyres"],
        },
        fusion_key="model.layers.0.ucross_attn.q_proj.weight",
        pretrain_files=("mm_projector_f.bin", "mm_projector_0.bin", "ucross.bin"),
        # layer_select_fuse.md: the projector builder never reads it (a depth-2 GELU MLP is hard-coded).
        ignored_config={"mm_projector_type": ["linear"]},
    ),
    "igva": Family(
        name="igva",
        fixture="igva-clip",
        extra_dirs={"sentence_embedder": "--sentence-encoder"},
        config_faults={
            "vit_aggregate_groups": [DELETED, "not a list", "[]", "[[1, 1], [2]]", "[[1, 99]]", "[[]]", "[[1.5]]"],
            "vit_base_layer": [DELETED, "x", 99],
            "aggregator_num_heads": [DELETED, 7, "4"],
            "aggregator_hidden_dim": [41],
            "sentence_embed_dim": [33],
            "aggregate_by_average": ["yes"],
            "mm_projector_type": ["linear"],
            "mm_hidden_size": [25],
        },
        fusion_key="model.vision_aggregator.sentence_proj.weight",
        pretrain_files=("mm_projector.bin",),
    ),
}

# LLaMA fields every family shares; each value must be refused (the weights no longer fit, or the config is invalid).
CORE_CONFIG_FAULTS = {
    "hidden_size": [DELETED, 65, "64"],
    "num_hidden_layers": [3, 1],
    "num_attention_heads": [5],
    "vocab_size": [600],
    "intermediate_size": [DELETED, 100],
}

# --------------------------------------------------------------------------------------------------------------
# Running a converter on a (mutated) copy of its fixture
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One malformed input: `mutate(workdir)` breaks the copy; `expect` is "refused" or "either"."""

    name: str
    mutate: Callable[[Path], None]
    hint: str | None = None  # regex the error must match (names the file/key/field at fault)
    expect: str = "refused"
    pretrain: bool = False


class Workdir:
    """A copy of a family's fixture: `original/`, `vision_tower/`, `original_pretrain/`, extras, and `base_llm/`."""

    def __init__(self, family: Family, root: Path):
        self.root = root
        source = FIXTURES_DIR / family.fixture
        for name in ("original", "vision_tower", "original_pretrain", *family.extra_dirs):
            shutil.copytree(source / name, root / name)
        self.original = root / "original"
        self.output = root / "out"
        self.marker = root / "payload-ran"

    def config(self, name: str = "original") -> dict:
        return json.loads((self.root / name / "config.json").read_text())

    def write_config(self, config: dict, name: str = "original") -> None:
        (self.root / name / "config.json").write_text(json.dumps(config))

    def tensors(self) -> dict[str, torch.Tensor]:
        return load_file(self.original / "model.safetensors")

    def write_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(self.original / "model.safetensors"), metadata={"format": "pt"})

    def make_base_llm(self) -> Path:
        """The base LLM of a pretrain-stage conversion: the LLaMA part of `original/` as a plain LLaMA directory."""
        base = self.root / "base_llm"
        base.mkdir()
        config = {
            key: value
            for key, value in self.config().items()
            if not key.startswith(("mm_", "layer_", "vit_", "aggregat", "sentence_", "tune_", "image_", "use_mm"))
        }
        config.update(model_type="llama", architectures=["LlamaForCausalLM"])
        (base / "config.json").write_text(json.dumps(config))
        llama = {
            key: tensor
            for key, tensor in self.tensors().items()
            if key == "lm_head.weight"
            or (key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")) and "ucross" not in key)
        }
        save_file(llama, str(base / "model.safetensors"), metadata={"format": "pt"})
        for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            if (self.original / name).is_file():
                shutil.copy(self.original / name, base / name)
        return base


def argv(family: Family, work: Workdir, pretrain: bool) -> list[str]:
    args = ["--output-dir", str(work.output), "--vision-tower", str(work.root / "vision_tower"), "--verify"]
    if pretrain:
        args += ["--input-dir", str(work.make_base_llm()), "--pretrain-dir", str(work.root / "original_pretrain")]
    else:
        args += ["--input-dir", str(work.original)]
        for name, flag in family.extra_dirs.items():
            args += [flag, str(work.root / name)]
    return args


@dataclass
class Outcome:
    kind: str  # "refused", "converted" or "crashed"
    message: str


def run(family: Family, case: Case, root: Path, capsys) -> Outcome:
    work = Workdir(family, root)
    args = argv(family, work, case.pretrain)
    case.mutate(work)
    capsys.readouterr()
    try:
        family.module.main(args)
    except SystemExit as exit_info:
        message = capsys.readouterr().err.strip()
        if exit_info.code in (0, None):
            return Outcome("crashed", f"exited with status {exit_info.code!r}: {message}")
        outcome = Outcome("refused", message)
    except Exception as error:  # noqa: BLE001 - anything else is what the fuzzer looks for
        frames = traceback.extract_tb(error.__traceback__)
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        return Outcome("crashed", f"{type(error).__name__} at {where}: {error}")
    else:
        outcome = Outcome("converted", "")
    if work.marker.exists():
        return Outcome("crashed", "the pickled payload RAN")
    leftovers = sorted(path.name for path in root.iterdir() if path.name.startswith("."))
    if outcome.kind == "refused" and (work.output.exists() or leftovers):
        return Outcome("crashed", f"refused but left {['out'] if work.output.exists() else []} + {leftovers}")
    return outcome


# --------------------------------------------------------------------------------------------------------------
# Mutations
# --------------------------------------------------------------------------------------------------------------


def _set_config(field_name: str, value, name: str = "original") -> Callable[[Path], None]:
    def mutate(work: Workdir) -> None:
        config = work.config(name)
        if value is DELETED:
            config.pop(field_name, None)
        else:
            config[field_name] = value
        work.write_config(config, name)

    return mutate


def _edit_tensors(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(work: Workdir) -> None:
        tensors = work.tensors()
        edit(tensors)
        work.write_tensors(tensors)

    return mutate


def _rename(old: str, new: str) -> Callable[[dict], None]:
    return lambda tensors: tensors.__setitem__(new, tensors.pop(old))


def _transform(key: str, transform: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    return lambda tensors: tensors.__setitem__(key, transform(tensors[key]))


def _write_bytes(relative: str, transform: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def mutate(work: Workdir) -> None:
        path = work.root / relative
        path.write_bytes(transform(path.read_bytes()))

    return mutate


def _shard(corrupt: str) -> Callable[[Path], None]:
    """Splits `original/model.safetensors` into two shards + index, then breaks the set as `corrupt` says."""

    def mutate(work: Workdir) -> None:
        tensors = work.tensors()
        (work.original / "model.safetensors").unlink()
        keys = sorted(tensors)
        names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        weight_map = {}
        for number, name in enumerate(names):
            part = {key: tensors[key] for key in keys[number::2]}
            save_file(part, str(work.original / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, name))
        key = keys[0]
        text = None
        if corrupt == "missing shard":
            (work.original / names[1]).unlink()
        elif corrupt == "extra shard":
            save_file({"stray": torch.zeros(1)}, str(work.original / "model-00003-of-00003.safetensors"))
        elif corrupt == "wrong shard":
            weight_map[key] = names[1] if weight_map[key] == names[0] else names[0]
        elif corrupt == "tensor listed twice":
            text = json.dumps({"weight_map": weight_map})[:-2] + f', "{key}": "{weight_map[key]}"' + "}}"
        elif corrupt == "corrupt index":
            text = '{"weight_map": {"' + key
        elif corrupt == "index outside the directory":
            weight_map = {k: "../" + v for k, v in weight_map.items()}
        elif corrupt == "unindexed tensor":
            del weight_map[key]
        (work.original / "model.safetensors.index.json").write_text(
            text if text is not None else json.dumps({"metadata": {}, "weight_map": weight_map})
        )

    return mutate


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _malicious_bin(relative: str, replaces: str | None = None) -> Callable[[Path], None]:
    def mutate(work: Workdir) -> None:
        if replaces:
            (work.root / replaces).unlink()
        torch.save({"model.embed_tokens.weight": _Payload(work.marker)}, work.root / relative)

    return mutate


def _pickle_bomb(relative: str, replaces: str | None = None) -> Callable[[Path], None]:
    def mutate(work: Workdir) -> None:
        if replaces:
            (work.root / replaces).unlink()
        nested: list = []
        for _ in range(64):
            nested = [nested, nested]
        torch.save({"bomb": nested}, work.root / relative)

    return mutate


def _raw_pickle_bin(relative: str) -> Callable[[Path], None]:
    def mutate(work: Workdir) -> None:
        (work.root / relative).write_bytes(pickle.dumps({"w": _Payload(work.marker)}))

    return mutate


def _flip_data_byte(relative: str) -> Callable[[Path], None]:
    def mutate(work: Workdir) -> None:
        path = work.root / relative
        tensors = torch.load(path, weights_only=True)
        probe = next(t for t in tensors.values() if t.numel() >= 16).contiguous().numpy().tobytes()[:32]
        data = bytearray(path.read_bytes())
        data[data.find(probe) + 5] ^= 0xFF
        path.write_bytes(bytes(data))

    return mutate


def _rename_bin_key(relative: str) -> Callable[[Path], None]:
    def mutate(work: Workdir) -> None:
        path = work.root / relative
        tensors = torch.load(path, weights_only=True)
        key = sorted(tensors)[0]
        tensors["renamed." + key] = tensors.pop(key)
        torch.save(tensors, path)

    return mutate


def _nest_bin(relative: str) -> Callable[[Path], None]:
    def mutate(work: Workdir) -> None:
        path = work.root / relative
        torch.save({"state_dict": torch.load(path, weights_only=True)}, path)

    return mutate


def _vision_tower_config(**changes) -> Callable[[Path], None]:
    def mutate(work: Workdir) -> None:
        path = work.root / "vision_tower" / "config.json"
        config = json.loads(path.read_text())
        target = config.get("vision_config", config)
        target.update(changes)
        path.write_text(json.dumps(config))

    return mutate


def _remove(*relatives: str) -> Callable[[Path], None]:
    def mutate(work: Workdir) -> None:
        for relative in relatives:
            path = work.root / relative
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    return mutate


def cases_for(family: Family) -> list[Case]:
    with safe_open(FIXTURES_DIR / family.fixture / "original" / "model.safetensors", framework="pt") as handle:
        keys = list(handle.keys())
    llm_key = "model.layers.0.self_attn.q_proj.weight"
    projector_key = next(
        k for k in keys if k.startswith("model.mm_projector") and k.endswith("weight") and k != family.fusion_key
    )
    assert family.fusion_key in keys and llm_key in keys
    cases: list[Case] = []

    # config.json as a whole
    config_json = "original/config.json"
    cases += [
        Case("config.json missing", _remove(config_json), r"config\.json"),
        Case("config.json not JSON", _write_bytes(config_json, lambda d: d[: len(d) // 2]), r"config\.json"),
        Case("config.json a list", _write_bytes(config_json, lambda d: b"[1, 2]"), r"config\.json"),
        Case("config.json empty object", _write_bytes(config_json, lambda d: b"{}"), None),
        Case(
            "config.json duplicate key",
            _write_bytes(config_json, lambda d: d.replace(b'"hidden_size"', b'"hidden_size": 64, "hidden_size"', 1)),
            r"hidden_size",
        ),
    ]
    # config fields: family-specific, then the LLaMA sizes
    for faults in (family.config_faults, CORE_CONFIG_FAULTS):
        for name, values in faults.items():
            for value in values:
                label = "deleted" if value is DELETED else f"= {value!r}"
                cases.append(Case(f"config {name} {label}", _set_config(name, value), None))
    for name, values in family.ignored_config.items():
        for value in values:
            label = f"config {name} = {value!r} (ignored by the original)"
            cases.append(Case(label, _set_config(name, value), None, "either"))
    # weights: keys
    fusion_key = family.fusion_key
    cases += [
        Case(
            "LLM key renamed",
            _edit_tensors(_rename(llm_key, llm_key.replace("q_proj", "query"))),
            r"self_attn\.query",
        ),
        Case("projector key renamed", _edit_tensors(_rename(projector_key, projector_key + "_v2")), r"_v2"),
        Case("fusion key renamed", _edit_tensors(_rename(fusion_key, fusion_key.replace("weight", "w"))), None),
        Case(
            "extra key",
            _edit_tensors(lambda t: t.__setitem__("model.extra_head.weight", torch.zeros(3))),
            r"extra_head",
        ),
        Case("LLM key missing", _edit_tensors(lambda t: t.pop("model.norm.weight")), r"norm\.weight"),
        Case("projector key missing", _edit_tensors(lambda t: t.pop(projector_key)), None),
        Case("fusion key missing", _edit_tensors(lambda t: t.pop(fusion_key)), None),
        Case("all weights missing", _edit_tensors(lambda t: t.clear()), None),
    ]
    # weights: shapes and dtypes
    cases += [
        Case(
            "LLM weight transposed",
            _edit_tensors(_transform("lm_head.weight", lambda w: w.t().contiguous())),
            r"lm_head\.weight",
        ),
        Case(
            "projector weight one row short",
            _edit_tensors(_transform(projector_key, lambda w: w[:-1].contiguous())),
            re.escape(projector_key),
        ),
        Case(
            "fusion weight flattened",
            _edit_tensors(_transform(fusion_key, lambda w: w.flatten())),
            re.escape(fusion_key),
        ),
        Case(
            "LLM weight int64",
            _edit_tensors(_transform(llm_key, lambda w: w.to(torch.int64))),
            re.escape(llm_key) + r".*int64",
        ),
        Case("fusion weight int32", _edit_tensors(_transform(fusion_key, lambda w: w.to(torch.int32))), r"int32"),
        Case("projector weight bool", _edit_tensors(_transform(projector_key, lambda w: w > 0)), r"bool"),
        Case(
            "one LLM weight float16",
            _edit_tensors(_transform(llm_key, lambda w: w.half())),
            None,
            expect="either",
        ),
        Case(
            "all weights bfloat16",
            _edit_tensors(lambda t: t.update({k: v.bfloat16() for k, v in t.items()})),
            None,
            expect="either",
        ),
    ]
    # weights: damaged files
    weights = "original/model.safetensors"
    cases += [
        Case("weights truncated to half", _write_bytes(weights, lambda d: d[: len(d) // 2]), r"model\.safetensors"),
        Case("weights last byte cut", _write_bytes(weights, lambda d: d[:-1]), r"model\.safetensors"),
        Case("weights zero bytes", _write_bytes(weights, lambda d: b""), r"model\.safetensors"),
        Case(
            "weights header garbled",
            _write_bytes(weights, lambda d: d[:8] + b"{{{{" + d[12:]),
            r"model\.safetensors",
        ),
        Case("weights missing", _remove(weights), r"No weights found"),
    ]
    # shard indexes
    for corrupt, hint in (
        ("missing shard", r"model-00002-of-00002\.safetensors"),
        ("extra shard", r"model-00003-of-00003\.safetensors"),
        ("wrong shard", r"shard index lists"),
        ("tensor listed twice", r"more than once"),
        ("corrupt index", r"index\.json is not valid JSON"),
        ("index outside the directory", r"same directory"),
        ("unindexed tensor", r"missing from the shard index"),
    ):
        cases.append(Case(f"sharded: {corrupt}", _shard(corrupt), hint))
    # torch pickles in place of the weights
    cases += [
        Case(
            "pytorch_model.bin with a code payload",
            _malicious_bin("original/pytorch_model.bin", weights),
            r"pytorch_model\.bin",
        ),
        Case(
            "pytorch_model.bin pickle bomb",
            _pickle_bomb("original/pytorch_model.bin", weights),
            r"pytorch_model\.bin",
        ),
    ]
    # vision tower
    cases += [
        Case("vision tower config missing", _remove("vision_tower/config.json"), r"vision_tower"),
        Case(
            "vision tower weights truncated",
            _write_bytes("vision_tower/model.safetensors", lambda d: d[: len(d) // 3]),
            r"vision_tower/model\.safetensors",
            expect="either" if family.uses_embedded_tower else "refused",
        ),
        Case(
            "vision tower weights truncated (pretrain stage)",
            _write_bytes("vision_tower/model.safetensors", lambda d: d[: len(d) // 3]),
            r"vision_tower/model\.safetensors",
            pretrain=True,
        ),
        Case(
            "vision tower preprocessor missing",
            _remove("vision_tower/preprocessor_config.json"),
            r"preprocessor_config\.json",
        ),
        Case("vision tower preprocessor without mean", _edit_preprocessor("image_mean"), r"image_mean"),
        Case("vision tower shallower than the layers used", _vision_tower_config(num_hidden_layers=4), None),
        Case("vision tower of another width", _vision_tower_config(hidden_size=48, intermediate_size=96), None),
        Case("vision tower of another patch size", _vision_tower_config(patch_size=8), None),
    ]
    # tokenizer
    cases += [
        Case(
            "tokenizer.model missing",
            _remove("original/tokenizer.model", "original/tokenizer_config.json", "original/special_tokens_map.json"),
            r"tokenizer",
        ),
        Case(
            "tokenizer.model corrupt",
            _write_bytes("original/tokenizer.model", lambda d: b"\x00garbage" * 10),
            r"tokenizer",
        ),
    ]
    # the instruction encoder (IGVA)
    if "sentence_embedder" in family.extra_dirs:
        cases += [
            Case("sentence encoder modules.json missing", _remove("sentence_embedder/modules.json"), r"modules\.json"),
            Case(
                "sentence encoder with CLS pooling",
                _edit_json(
                    "sentence_embedder/1_Pooling/config.json",
                    pooling_mode_mean_tokens=False,
                    pooling_mode_cls_token=True,
                ),
                r"pooling",
            ),
            Case(
                "sentence encoder weights truncated",
                _write_bytes("sentence_embedder/model.safetensors", lambda d: d[:-100]),
                r"sentence_embedder/model\.safetensors",
            ),
            Case(
                "sentence encoder of another width",
                _edit_json("sentence_embedder/config.json", hidden_size=48, intermediate_size=96),
                None,
            ),
        ]
    # pretrain stage: the .bin files
    first_bin = f"original_pretrain/{family.pretrain_files[0]}"
    first_bin_hint = re.escape(family.pretrain_files[0])
    cases += [
        Case("pretrain .bin with a code payload", _malicious_bin(first_bin), first_bin_hint, pretrain=True),
        Case("pretrain .bin raw pickle payload", _raw_pickle_bin(first_bin), first_bin_hint, pretrain=True),
        Case("pretrain .bin pickle bomb", _pickle_bomb(first_bin), first_bin_hint, pretrain=True),
        Case(
            "pretrain .bin truncated",
            _write_bytes(first_bin, lambda d: d[: len(d) // 2]),
            first_bin_hint,
            pretrain=True,
        ),
        Case("pretrain .bin data byte flipped", _flip_data_byte(first_bin), first_bin_hint, pretrain=True),
        Case("pretrain .bin nested state dict", _nest_bin(first_bin), first_bin_hint, pretrain=True),
        Case("pretrain .bin key renamed", _rename_bin_key(first_bin), r"renamed\.", pretrain=True),
        Case("pretrain config.json missing", _remove("original_pretrain/config.json"), r"config\.json", pretrain=True),
    ]
    for name in family.pretrain_files[1:]:
        cases.append(
            Case(f"pretrain {name} missing", _remove(f"original_pretrain/{name}"), re.escape(name), pretrain=True)
        )
    return cases


def _edit_json(relative: str, **changes) -> Callable[[Path], None]:
    def mutate(work: Workdir) -> None:
        path = work.root / relative
        content = json.loads(path.read_text())
        content.update(changes)
        path.write_text(json.dumps(content))

    return mutate


def _edit_preprocessor(deleted: str) -> Callable[[Path], None]:
    def mutate(work: Workdir) -> None:
        path = work.root / "vision_tower" / "preprocessor_config.json"
        content = json.loads(path.read_text())
        content.pop(deleted)
        path.write_text(json.dumps(content))

    return mutate


# --------------------------------------------------------------------------------------------------------------
# The fuzz test
# --------------------------------------------------------------------------------------------------------------


def _converter_available(name: str) -> bool:
    return (Path(__file__).parents[1] / "conversion_scripts" / f"convert_{name}_to_hf.py").is_file()


# The MMFuser run (the cheapest, ~10 s of CPU) represents the fuzzing by default; IGVA (~40 s) and Layer_Select_Fuse
# (~16 s) run with RUN_SLOW=1, as in CI.
@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=() if name == "mmfuser" else pytest.mark.slow) for name in sorted(FAMILIES)]
)
def test_converter_refuses_malformed_checkpoints_cleanly(name, tmp_path, capsys):
    if not _converter_available(name):
        pytest.skip(f"conversion_scripts/convert_{name}_to_hf.py does not exist yet")
    family = FAMILIES[name]

    baseline = run(family, Case("baseline", lambda work: None), tmp_path / "baseline", capsys)
    assert baseline.kind == "converted", f"the unmodified fixture does not convert: {baseline.message}"
    baseline_pretrain = run(
        family, Case("baseline", lambda work: None, pretrain=True), tmp_path / "baseline_pretrain", capsys
    )
    assert baseline_pretrain.kind == "converted", (
        f"the unmodified pretrain fixture does not convert: {baseline_pretrain.message}"
    )

    cases = cases_for(family)
    results: list[tuple[Case, Outcome]] = []
    for index, case in enumerate(cases):
        results.append((case, run(family, case, tmp_path / f"case{index:03d}", capsys)))

    problems = []
    for case, outcome in results:
        if outcome.kind == "crashed":
            problems.append(f"{case.name}: CRASH {outcome.message}")
        elif outcome.kind == "converted" and case.expect == "refused":
            problems.append(f"{case.name}: converted, but the input is malformed")
        elif outcome.kind == "refused":
            if not outcome.message.startswith("error: ") or "Traceback" in outcome.message:
                problems.append(f"{case.name}: unclear refusal {outcome.message!r}")
            elif case.hint is not None and not re.search(case.hint, outcome.message, flags=re.DOTALL):
                problems.append(
                    f"{case.name}: the message does not name the problem ({case.hint!r}): {outcome.message}"
                )

    counts = Counter(outcome.kind for _, outcome in results)
    with capsys.disabled():
        print(
            f"\n[fuzz] convert_{name}_to_hf: {len(results)} malformed inputs tried: "
            f"{counts['refused']} refused cleanly, "
            f"{counts['converted']} converted (harmless mutations, --verify passed), {counts['crashed']} crashed; "
            f"{len(problems)} problem(s)."
        )
        for case, outcome in results:
            first_line = outcome.message.splitlines()[0][:160] if outcome.message else ""
            print(f"[fuzz]   {outcome.kind:9s} {case.name}: {first_line}")
    assert not problems, "\n".join(problems)
