"""Reliability of the shared conversion machinery (`conversion_scripts/`: reading, key rules, pipeline, writing,
checks): a conversion never loses or corrupts data, and a broken checkpoint gives a clear error and no output.

The checkpoints here are tiny "original" directories whose keys are already the converted names (identity key
mapping), so that every check exercises `run_conversion` / `CheckpointReader` themselves, independently of any
family converter (those are fuzzed in `test_reliability_fuzz.py`).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_model, processor_for
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig

from llava_multilayer import LlavaMultiLayerForConditionalGeneration
from llava_multilayer.conversion import pipeline
from llava_multilayer.conversion.key_rules import Drop
from llava_multilayer.conversion.pipeline import run_conversion
from llava_multilayer.conversion.reading import CheckpointReader, ConversionError, TensorDictReader, load_torch_file
from llava_multilayer.conversion.writing import ShardedSafetensorsWriter


PROJECTOR_WEIGHT = "model.multi_modal_projector.linear_1.weight"


@pytest.fixture(scope="module")
def tiny():
    """A tiny `concat` model's config, processor and state dict (the "source" tensors)."""
    model = make_model("concat")
    state = {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}
    return model.config, processor_for(model.config), state


def write_single(directory: Path, state: dict, fmt: str = "safetensors") -> Path:
    directory.mkdir(parents=True)
    if fmt == "safetensors":
        save_file(state, str(directory / "model.safetensors"))
    else:
        torch.save(state, directory / "pytorch_model.bin")
    return directory


def write_sharded(directory: Path, state: dict, num_shards: int = 2, fmt: str = "safetensors") -> dict[str, str]:
    """Writes `state` as `num_shards` shards plus an index; returns the index's weight map."""
    directory.mkdir(parents=True)
    keys = sorted(state)
    weight_map = {}
    suffix = "safetensors" if fmt == "safetensors" else "bin"
    prefix = "model" if fmt == "safetensors" else "pytorch_model"
    for number in range(num_shards):
        name = f"{prefix}-{number + 1:05d}-of-{num_shards:05d}.{suffix}"
        part = {key: state[key] for key in keys[number::num_shards]}
        if fmt == "safetensors":
            save_file(part, str(directory / name))
        else:
            torch.save(part, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    write_index(directory, weight_map, fmt)
    return weight_map


def write_index(directory: Path, weight_map: dict, fmt: str = "safetensors") -> None:
    name = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (directory / name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def convert(tiny, source_dir: Path, output_dir: Path, mapping=lambda key: key, **kwargs):
    config, processor, _ = tiny
    return run_conversion(
        family="mmfuser",
        config=copy.deepcopy(config),
        sources=[(CheckpointReader(source_dir), mapping)],
        output_dir=output_dir,
        processor=processor,
        generation_config=GenerationConfig(),
        source_dir=source_dir,
        progress=False,
        **kwargs,
    )


def known_keys(state: dict) -> Callable[[str], str | None]:
    """The identity key mapping for the keys of `state`; any other key has no target."""
    return lambda key: key if key in state else None


def leftovers(parent: Path) -> list[str]:
    """Staging / backup directories a conversion may have left in `parent`."""
    return sorted(path.name for path in parent.iterdir() if path.name.startswith("."))


def assert_failed_cleanly(tiny, source_dir: Path, output_dir: Path, match: str, **kwargs) -> ConversionError:
    with pytest.raises(ConversionError, match=match) as error:
        convert(tiny, source_dir, output_dir, **kwargs)
    assert not output_dir.exists()
    assert leftovers(output_dir.parent) == []
    return error.value


def stored(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in directory.glob("*.safetensors"):
        tensors.update(load_file(path))
    return tensors


# --------------------------------------------------------------------------------------------------------------
# Every source tensor consumed or deliberately dropped; every target filled with the right shape and dtype
# --------------------------------------------------------------------------------------------------------------


def test_round_trip_is_exact_and_verified(tiny, tmp_path):
    _, _, state = tiny
    source = write_single(tmp_path / "source", state)
    report = convert(tiny, source, tmp_path / "out", verify=True)
    assert report.verified and report.num_source_tensors == report.num_target_tensors == len(state)
    written = stored(tmp_path / "out")
    assert written.keys() == state.keys()
    assert all(torch.equal(written[key], state[key]) and written[key].dtype == state[key].dtype for key in state)
    assert leftovers(tmp_path) == []


def test_unknown_source_key_is_an_error(tiny, tmp_path):
    _, _, state = tiny
    source = write_single(tmp_path / "source", {**state, "model.surprise.weight": torch.zeros(2)})
    match = r"1 source tensor\(s\) have no known target: model\.surprise"
    assert_failed_cleanly(tiny, source, tmp_path / "out", match, mapping=known_keys(state))


def test_dropped_keys_are_listed_in_the_report_and_card(tiny, tmp_path):
    _, _, state = tiny
    source = write_single(tmp_path / "source", {**state, "model.rotary.inv_freq": torch.zeros(2)})

    def mapping(key):
        return Drop("recomputed rotary buffer") if key == "model.rotary.inv_freq" else key

    report = convert(tiny, source, tmp_path / "out", mapping=mapping)
    assert report.dropped == {"model.rotary.inv_freq": "recomputed rotary buffer"}
    card = (tmp_path / "out" / "README.md").read_text()
    assert "model.rotary.inv_freq" in card and "recomputed rotary buffer" in card
    assert "model.rotary.inv_freq" not in stored(tmp_path / "out")


def test_missing_target_is_an_error(tiny, tmp_path):
    _, _, state = tiny
    source = write_single(tmp_path / "source", {k: v for k, v in state.items() if k != PROJECTOR_WEIGHT})
    assert_failed_cleanly(tiny, source, tmp_path / "out", rf"1 parameter\(s\).*uninitialised.*{PROJECTOR_WEIGHT}")


def test_renamed_key_is_an_error(tiny, tmp_path):
    _, _, state = tiny
    renamed = {("model.mm_projector.0.weight" if k == PROJECTOR_WEIGHT else k): v for k, v in state.items()}
    source = write_single(tmp_path / "source", renamed)
    match = r"no known target: model\.mm_projector\.0\.weight"
    assert_failed_cleanly(tiny, source, tmp_path / "out", match, mapping=known_keys(state))


def test_target_the_model_lacks_is_an_error(tiny, tmp_path):
    _, _, state = tiny
    source = write_single(tmp_path / "source", {**state, "model.extra.weight": torch.zeros(2)})
    assert_failed_cleanly(tiny, source, tmp_path / "out", r"names the model does not have: model\.extra\.weight")


def test_two_sources_for_one_target_is_an_error(tiny, tmp_path):
    _, _, state = tiny
    source = write_single(tmp_path / "source", {**state, "copy": state[PROJECTOR_WEIGHT].clone()})
    mapping = lambda key: PROJECTOR_WEIGHT if key == "copy" else key  # noqa: E731
    assert_failed_cleanly(tiny, source, tmp_path / "out", r"both map to", mapping=mapping)


def test_wrong_shape_is_an_error(tiny, tmp_path):
    _, _, state = tiny
    source = write_single(tmp_path / "source", {**state, PROJECTOR_WEIGHT: state[PROJECTOR_WEIGHT].t().contiguous()})
    assert_failed_cleanly(tiny, source, tmp_path / "out", rf"{PROJECTOR_WEIGHT}.*has shape .* needs")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_non_float_tensor_for_a_float_parameter_is_an_error(tiny, tmp_path, dtype):
    _, _, state = tiny
    source = write_single(tmp_path / "source", {**state, PROJECTOR_WEIGHT: state[PROJECTOR_WEIGHT].to(dtype)})
    assert_failed_cleanly(tiny, source, tmp_path / "out", rf"{PROJECTOR_WEIGHT}.* dtype {dtype}.*float32 parameter")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_dtype_flag_casts_every_float_tensor(tiny, tmp_path, dtype):
    _, _, state = tiny
    source = write_single(tmp_path / "source", state)
    report = convert(tiny, source, tmp_path / "out", dtype=dtype, verify=True)
    target = getattr(torch, dtype)
    written = stored(tmp_path / "out")
    assert {tensor.dtype for tensor in written.values()} == {target}
    assert all(torch.equal(written[key], state[key].to(target)) for key in state)
    assert report.dtype == dtype
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == dtype


def test_without_dtype_flag_each_tensor_keeps_its_dtype_and_the_default_dtype_is_lossless(tiny, tmp_path):
    _, _, state = tiny
    mixed = {key: (tensor.half() if "language_model" in key else tensor) for key, tensor in state.items()}
    mixed["model.language_model.norm.weight"] = state["model.language_model.norm.weight"].bfloat16()
    source = write_single(tmp_path / "source", mixed)
    convert(tiny, source, tmp_path / "out", verify=True)
    written = stored(tmp_path / "out")
    assert {key: t.dtype for key, t in written.items()} == {key: t.dtype for key, t in mixed.items()}
    # float16 + bfloat16 + float32: only float32 holds all three exactly, so `dtype="auto"` loads without loss.
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    reloaded = LlavaMultiLayerForConditionalGeneration.from_pretrained(tmp_path / "out", dtype="auto").state_dict()
    assert all(torch.equal(reloaded[key], mixed[key].float()) for key in mixed)


def test_single_source_dtype_is_kept_as_the_default_dtype(tiny, tmp_path):
    _, _, state = tiny
    source = write_single(tmp_path / "source", {key: tensor.bfloat16() for key, tensor in state.items()})
    report = convert(tiny, source, tmp_path / "out")
    assert report.dtype == "bfloat16"


def test_cast_that_overflows_is_an_error(tiny, tmp_path):
    _, _, state = tiny
    big = state[PROJECTOR_WEIGHT].clone()
    big[0, 0] = 1e6  # finite in float32 and bfloat16, infinite in float16
    source = write_single(tmp_path / "source", {**state, PROJECTOR_WEIGHT: big})
    assert_failed_cleanly(
        tiny, source, tmp_path / "out", rf"{PROJECTOR_WEIGHT}.*overflow to infinity", dtype="float16"
    )
    convert(tiny, source, tmp_path / "bf16", dtype="bfloat16")
    assert torch.isfinite(stored(tmp_path / "bf16")[PROJECTOR_WEIGHT]).all()


def test_unknown_dtype_is_an_error(tiny, tmp_path):
    _, _, state = tiny
    source = write_single(tmp_path / "source", state)
    assert_failed_cleanly(tiny, source, tmp_path / "out", r"--dtype must be one of", dtype="int8")


def test_tied_tensors_of_a_torch_checkpoint_are_written_separately(tiny, tmp_path):
    _, _, state = tiny
    shared = dict(state)
    shared["lm_head.weight"] = shared["model.language_model.embed_tokens.weight"]  # same storage, as tied weights
    source = write_single(tmp_path / "source", shared, fmt="bin")
    convert(tiny, source, tmp_path / "out", verify=True)
    written = stored(tmp_path / "out")
    assert torch.equal(written["lm_head.weight"], state["model.language_model.embed_tokens.weight"])


def test_sharded_output_index_is_consistent(tiny, tmp_path):
    _, _, state = tiny
    source = write_single(tmp_path / "source", state)
    convert(tiny, source, tmp_path / "out", max_shard_size=20_000, verify=True)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(path.name for path in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    for name in shards:
        with safe_open(tmp_path / "out" / name, framework="pt") as handle:
            assert all(index["weight_map"][key] == name for key in handle.keys())
    assert sorted(index["weight_map"]) == sorted(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())


# --------------------------------------------------------------------------------------------------------------
# --verify re-reads what was written
# --------------------------------------------------------------------------------------------------------------


def test_verify_catches_a_tensor_corrupted_on_the_way_to_disk(tiny, tmp_path, monkeypatch):
    _, _, state = tiny
    source = write_single(tmp_path / "source", state)
    add = ShardedSafetensorsWriter.add

    def corrupting_add(self, key, tensor):
        add(self, key, tensor + 1e-3 if key == PROJECTOR_WEIGHT else tensor)

    monkeypatch.setattr(ShardedSafetensorsWriter, "add", corrupting_add)
    assert_failed_cleanly(
        tiny, source, tmp_path / "out", rf"--verify: reloaded tensors differ.*{PROJECTOR_WEIGHT}", verify=True
    )


def test_verify_catches_a_stored_dtype_change(tiny, tmp_path, monkeypatch):
    _, _, state = tiny
    source = write_single(tmp_path / "source", state)
    add = ShardedSafetensorsWriter.add
    # bfloat16 -> float32 round trips exactly for these values, so only the stored dtype tells.
    monkeypatch.setattr(
        ShardedSafetensorsWriter,
        "add",
        lambda self, key, tensor: add(self, key, tensor.double() if key == PROJECTOR_WEIGHT else tensor),
    )
    assert_failed_cleanly(tiny, source, tmp_path / "out", rf"--verify.*{PROJECTOR_WEIGHT}", verify=True)


# --------------------------------------------------------------------------------------------------------------
# Shard indexes of the source
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_source_converts(tiny, tmp_path, fmt):
    _, _, state = tiny
    write_sharded(tmp_path / "source", state, num_shards=3, fmt=fmt)
    report = convert(tiny, tmp_path / "source", tmp_path / "out", verify=True)
    assert report.num_source_tensors == len(state) and len(report.source_files) == 3


def _corrupt_index(kind: str, directory: Path, weight_map: dict) -> str:
    """Breaks the sharded checkpoint in `directory`; returns the pattern the error must match."""
    first, second = sorted(set(weight_map.values()))
    key = sorted(weight_map)[0]
    index_path = directory / "model.safetensors.index.json"
    if kind == "missing shard":
        (directory / second).unlink()
        return rf"names shard\(s\) that do not exist: \['{second}'\]"
    if kind == "extra shard":
        save_file({"stray": torch.zeros(1)}, str(directory / "model-00003-of-00003.safetensors"))
        return r"model-00003-of-00003\.safetensors.*not named by"
    if kind == "tensor listed twice":
        text = json.dumps({"weight_map": weight_map})[:-2] + f', "{key}": "{second}"' + "}}"
        index_path.write_text(text)
        return rf"lists \['{key}'\] more than once"
    if kind == "tensor in the wrong shard":
        write_index(directory, {**weight_map, key: second if weight_map[key] == first else first})
        return rf"lists '{key}' in .* but it is in"
    if kind == "tensor stored in two shards":
        other = second if weight_map[key] == first else first
        shard = load_file(directory / other)
        save_file({**shard, key: torch.zeros(1)}, str(directory / other))
        return rf"'{key}' is stored twice"
    if kind == "tensor missing from the index":
        write_index(directory, {k: v for k, v in weight_map.items() if k != key})
        return rf"missing from the shard index: \['{key}'\]"
    if kind == "index names a tensor no shard holds":
        write_index(directory, {**weight_map, "ghost.weight": first})
        return r"lists 'ghost\.weight' .* no shard contains it"
    if kind == "index points outside the directory":
        os.replace(directory / first, directory.parent / first)
        write_index(directory, {k: (f"../{first}" if v == first else v) for k, v in weight_map.items()})
        return r"shard file names in the same directory"
    if kind == "index value not a string":
        write_index(directory, {**weight_map, key: 3})
        return r"shard file names in the same directory"
    if kind == "index without weight_map":
        index_path.write_text(json.dumps({"metadata": {}}))
        return r"has no `weight_map`"
    if kind == "index not a JSON object":
        index_path.write_text("[]")
        return r"has no `weight_map`"
    if kind == "index not JSON":
        index_path.write_text('{"weight_map": {')
        return r"model\.safetensors\.index\.json is not valid JSON"
    if kind == "shards without index":
        index_path.unlink()
        return r"Found shards .* but no model\.safetensors\.index\.json"
    if kind == "index next to a single file":
        save_file({"stale": torch.zeros(1)}, str(directory / "model.safetensors"))
        return r"both model\.safetensors and model\.safetensors\.index\.json"
    raise AssertionError(kind)


INDEX_CORRUPTIONS = [
    "missing shard",
    "extra shard",
    "tensor listed twice",
    "tensor in the wrong shard",
    "tensor stored in two shards",
    "tensor missing from the index",
    "index names a tensor no shard holds",
    "index points outside the directory",
    "index value not a string",
    "index without weight_map",
    "index not a JSON object",
    "index not JSON",
    "shards without index",
    "index next to a single file",
]


@pytest.mark.parametrize("kind", INDEX_CORRUPTIONS)
def test_inconsistent_shard_index_is_an_error(tiny, tmp_path, kind):
    _, _, state = tiny
    source = tmp_path / "source"
    weight_map = write_sharded(source, state)
    pattern = _corrupt_index(kind, source, weight_map)
    with pytest.raises(ConversionError, match=pattern):
        CheckpointReader(source)


def test_single_file_next_to_unindexed_shards_is_an_error(tiny, tmp_path):
    _, _, state = tiny
    source = write_single(tmp_path / "source", state)
    save_file({"stale": torch.zeros(1)}, str(source / "model-00001-of-00002.safetensors"))
    with pytest.raises(ConversionError, match=r"both model\.safetensors and the shards"):
        CheckpointReader(source)


def test_no_weights_is_an_error(tmp_path):
    (tmp_path / "source").mkdir()
    with pytest.raises(ConversionError, match=r"No weights found in .*source"):
        CheckpointReader(tmp_path / "source")
    with pytest.raises(ConversionError, match=r"is not a directory"):
        CheckpointReader(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------------------------
# Truncated and corrupt files
# --------------------------------------------------------------------------------------------------------------


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "damage",
    [
        "truncated to 50%",
        "last byte cut",
        "header only",
        "zero bytes",
        "random bytes",
        "index garbled",
        "data byte flipped",
    ],
)
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_corrupt_weight_file_names_the_file(tiny, tmp_path, damage, fmt):
    _, _, state = tiny
    source = write_single(tmp_path / "source", state, fmt=fmt)
    path = source / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    data = path.read_bytes()
    if damage == "truncated to 50%":
        _truncate(path, 0.5)
    elif damage == "last byte cut":
        path.write_bytes(data[:-1])
    elif damage == "header only":
        path.write_bytes(data[:64])
    elif damage == "zero bytes":
        path.write_bytes(b"")
    elif damage == "random bytes":
        noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
        path.write_bytes(noise.byte().numpy().tobytes())
    elif damage == "index garbled":  # safetensors: the JSON header; zip: the central directory at the end
        garbled = data[:8] + b"{{{{" + data[12:] if fmt == "safetensors" else data[:-40] + b"{" * 20 + data[-20:]
        path.write_bytes(garbled)
    else:
        if fmt == "safetensors":
            pytest.skip("safetensors stores no checksum: a flipped data byte cannot be detected by any reader")
        flipped = bytearray(data)
        flipped[data.find(state[PROJECTOR_WEIGHT].numpy().tobytes()[:64]) + 10] ^= 0xFF
        path.write_bytes(bytes(flipped))
    with pytest.raises(ConversionError, match=rf"{path.name}"):
        convert(tiny, source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_corrupt_shard_names_the_shard(tiny, tmp_path):
    _, _, state = tiny
    weight_map = write_sharded(tmp_path / "source", state)
    second = sorted(set(weight_map.values()))[1]
    _truncate(tmp_path / "source" / second, 0.7)
    with pytest.raises(ConversionError, match=second):
        CheckpointReader(tmp_path / "source")


# --------------------------------------------------------------------------------------------------------------
# Loading safety: nothing pickled runs
# --------------------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this object would create the file `marker` (it must never happen)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("container", ["torch.save", "raw pickle", "inside a tensor dict"])
def test_malicious_bin_is_refused_and_its_payload_does_not_run(tiny, tmp_path, container):
    _, _, state = tiny
    marker = tmp_path / "payload-ran"
    source = tmp_path / "source"
    source.mkdir()
    path = source / "pytorch_model.bin"
    if container == "torch.save":
        torch.save({"weight": _Payload(marker)}, path)
    elif container == "raw pickle":
        path.write_bytes(pickle.dumps({"weight": _Payload(marker)}))
    else:
        torch.save({**state, "evil": _Payload(marker)}, path)
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin.*(refusing to load|truncated or corrupt)"):
        convert(tiny, source, tmp_path / "out")
    assert not marker.exists(), "unpickling ran the payload"
    assert not (tmp_path / "out").exists()


def test_load_torch_file_refuses_arbitrary_objects(tmp_path):
    import argparse

    marker = tmp_path / "payload-ran"
    path = tmp_path / "mm_projector.bin"
    torch.save({"a": argparse.Namespace(x=1)}, path)
    with pytest.raises(ConversionError, match=r"mm_projector\.bin contains pickled objects other than tensors"):
        load_torch_file(path)
    torch.save({"a": _Payload(marker)}, path)
    with pytest.raises(ConversionError, match="refusing to load it"):
        load_torch_file(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content",
    [{"state_dict": {"w": torch.zeros(1)}}, [torch.zeros(1)], {"w": 1.5}, {"w": "text"}],
    ids=["nested dict", "list", "float value", "string value"],
)
def test_bin_that_is_not_a_flat_tensor_dict_is_refused(tmp_path, content):
    path = tmp_path / "mm_projector.bin"
    torch.save(content, path)
    with pytest.raises(ConversionError, match=r"mm_projector\.bin does not hold a flat dict of tensors"):
        load_torch_file(path)


def test_pickle_bomb_is_refused_quickly(tmp_path):
    # "Billion laughs": 2**64 list references through the memo; weights_only unpickling allows lists, so the
    # structure loads as a small DAG and must then be refused as not a tensor dict (without expanding it).
    nested = []
    for _ in range(64):
        nested = [nested, nested]
    path = tmp_path / "pytorch_model.bin"
    torch.save({"bomb": nested}, path)
    with pytest.raises(ConversionError, match=r"does not hold a flat dict of tensors"):
        load_torch_file(path)


# --------------------------------------------------------------------------------------------------------------
# Atomic output directory
# --------------------------------------------------------------------------------------------------------------


def test_existing_non_empty_output_is_refused_and_untouched(tiny, tmp_path):
    _, _, state = tiny
    source = write_single(tmp_path / "source", state)
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    with pytest.raises(ConversionError, match=r"exists and is not empty; pass --overwrite"):
        convert(tiny, source, output)
    assert (output / "keep.txt").read_text() == "precious" and sorted(p.name for p in output.iterdir()) == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConversionError, match=r"exists and is not empty"):
        convert(tiny, source, tmp_path / "file")


def test_overwrite_replaces_the_output(tiny, tmp_path):
    _, _, state = tiny
    source = write_single(tmp_path / "source", state)
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    convert(tiny, source, output, overwrite=True)
    assert not (output / "old.txt").exists() and (output / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_empty_output_dir_is_used_without_overwrite(tiny, tmp_path):
    _, _, state = tiny
    source = write_single(tmp_path / "source", state)
    (tmp_path / "out").mkdir()
    convert(tiny, source, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_failed_overwrite_keeps_the_previous_output(tiny, tmp_path):
    _, _, state = tiny
    source = write_single(tmp_path / "source", {k: v for k, v in state.items() if k != PROJECTOR_WEIGHT})
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    with pytest.raises(ConversionError, match="uninitialised"):
        convert(tiny, source, output, overwrite=True)
    assert (output / "old.txt").read_text() == "old" and leftovers(tmp_path) == []


def test_failure_late_in_the_conversion_leaves_nothing(tiny, tmp_path):
    _, _, state = tiny
    source = write_single(tmp_path / "source", state)
    output = tmp_path / "new" / "nested" / "out"

    def failing_parity_check(directory):
        assert (directory / "model.safetensors").is_file()  # everything was written to the staging directory
        raise ConversionError("parity failed")

    with pytest.raises(ConversionError, match="parity failed"):
        convert(tiny, source, output, parity_check=failing_parity_check)
    assert not (tmp_path / "new").exists(), "parent directories created for the output must be removed"
    assert leftovers(tmp_path) == []


def test_interrupted_conversion_leaves_nothing(tiny, tmp_path, monkeypatch):
    _, _, state = tiny
    source = write_single(tmp_path / "source", state)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_model_card", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny, source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["the input directory", "a parent of the input directory"])
def test_output_over_the_source_is_refused_even_with_overwrite(tiny, tmp_path, where):
    _, _, state = tiny
    source = write_single(tmp_path / "ckpt" / "source", state)
    output = source if where == "the input directory" else tmp_path / "ckpt"
    with pytest.raises(ConversionError, match=r"contains the source .*Choose another --output-dir"):
        convert(tiny, source, output, overwrite=True)
    assert torch.equal(load_file(source / "model.safetensors")[PROJECTOR_WEIGHT], state[PROJECTOR_WEIGHT])


def test_output_over_an_in_memory_source_file_is_refused(tiny, tmp_path):
    config, processor, state = tiny
    source = write_single(tmp_path / "ckpt", state)
    extra = TensorDictReader({}, "pretrain projector")
    extra.files = [tmp_path / "pretrain" / "mm_projector.bin"]
    with pytest.raises(ConversionError, match=r"contains the source .*mm_projector\.bin"):
        run_conversion(
            family="mmfuser",
            config=copy.deepcopy(config),
            sources=[(CheckpointReader(source), lambda key: key), (extra, lambda key: key)],
            output_dir=tmp_path / "pretrain",
            processor=processor,
            generation_config=GenerationConfig(),
            overwrite=True,
            progress=False,
        )
