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
"""The benchmark scripts run end to end with CI-sized settings (`--quick`) and write valid results, so they cannot
rot. The numbers themselves are not checked here (tiny models on a shared CI machine say nothing); see
docs/benchmarks.md for measured ones."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"

# Each script with the smallest settings that still exercise every code path (one timed round, no warm-up).
QUICK_RUNS = {
    "fusion_overhead": ["--repeats", "1", "--warmup", "0", "--direct", "--threads", "1"],
    "end_to_end": ["--repeats", "1", "--warmup", "0", "--new-tokens", "3", "--prompt-tokens", "4", "--threads", "1"],
    "conversion": ["--repeats", "1", "--llm-width", "256", "--llm-layers", "1", "--shard-size-mb", "8"],
}


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """Runs the three CPU benchmarks concurrently (each in its own interpreter, as a user would) and collects their
    exit status, output and JSON results."""
    directory = tmp_path_factory.mktemp("benchmarks")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    processes = {}
    for name, flags in QUICK_RUNS.items():
        output = directory / f"{name}.json"
        command = [sys.executable, str(BENCHMARKS / f"{name}.py"), "--quick", "--output", str(output), *flags]
        if name == "conversion":
            command += ["--workdir", str(directory)]
        processes[name] = (
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO),
            output,
        )
    results = {}
    for name, (process, output) in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        results[name] = {
            "returncode": process.returncode,
            "stdout": stdout,
            "stderr": stderr,
            "json": json.loads(output.read_text()) if output.is_file() else None,
        }
    return results


def check_run(results: dict, name: str) -> dict:
    run = results[name]
    assert run["returncode"] == 0, f"{name}.py failed:\n{run['stderr'][-3000:]}"
    payload = run["json"]
    assert payload is not None, f"{name}.py wrote no JSON"
    assert payload["benchmark"] == name
    assert payload["settings"]["quick"] is True
    assert payload["machine"]["torch"] == torch.__version__
    assert payload["results"], f"{name}.py reported no results"
    assert "Targets" in run["stdout"] and "|" in run["stdout"]  # the printed table and target lines
    for target in payload["targets"]:
        assert set(target) == {"name", "value", "limit", "higher_is_better", "met"}
    return payload


def positive(value) -> bool:
    return isinstance(value, float) and value > 0


@pytest.mark.slow  # the three quick benchmark runs share ~26 s of CPU; the layout and refusal tests stay
def test_fusion_overhead_quick(quick_results):
    payload = check_run(quick_results, "fusion_overhead")
    rows = payload["results"]
    fusers = {(row["tower"], row["fuser"]) for row in rows}
    for expected in ("concat E_D 3-18-23", "concat E_D all", "mmfuser (MMFuser, 5 layers)", "mmfuser E_M 3-18-23",
                     "mmfuser E_M all", "igva (4x6 groups, encoder excluded)", "internal I_D/I_M projectors 3-18-23"):
        assert ("clip", expected) in fusers
    assert ("siglip", "concat E_D 3-18-23") in fusers
    for row in rows:
        assert positive(row["ratio"]) and positive(row["direct_ratio"]) and positive(row["flops_ratio"])
        assert row["parameters"] > 0 and row["gflops"] > row["llava_gflops"] * 0.9
    single = next(row for row in rows if row["fuser"].startswith("single") and row["tower"] == "clip")
    assert single["flops_ratio"] == pytest.approx(1.0) and single["parameters"] == single["llava_parameters"]
    igva = next(row for row in rows if row["fusion_type"] == "igva")
    assert positive(igva["ratio_with_encoder"]) and igva["instruction_encoder_parameters"] > 0
    assert {target["name"] for target in payload["targets"]} >= {"clip mmfuser (MMFuser, 5 layers)"}


@pytest.mark.slow  # the three quick benchmark runs share ~26 s of CPU; the layout and refusal tests stay
def test_end_to_end_quick(quick_results):
    payload = check_run(quick_results, "end_to_end")
    rows = {row["fusion"]: row for row in payload["results"]}
    assert set(rows) == {"single", "concat", "mmfuser", "igva", "I_D", "I_M"}
    for row in rows.values():
        assert positive(row["prefill_ratio"]) and positive(row["decode_ratio"])
        assert positive(row["decode_tokens_per_s"]) and positive(row["llava_decode_tokens_per_s"])
    checks = payload["checks"]
    assert checks["single_logits_max_abs_diff_vs_llava"] <= 1e-4
    assert checks["I_M_cross_kv_projections_per_generate"] == checks["I_M_fused_layers"] >= 1
    assert rows["single"]["extra_parameters"] == 0


@pytest.mark.slow  # the three quick benchmark runs share ~26 s of CPU; the layout and refusal tests stay
def test_conversion_quick(quick_results):
    payload = check_run(quick_results, "conversion")
    (result,) = payload["results"]
    assert result["num_shards"] > 1
    for key in ("time_ratio", "peak_rss_over_largest_shard", "peak_rss_over_checkpoint", "copy_seconds",
                "convert_seconds"):
        assert positive(result[key]), key
    assert result["peak_rss_bytes"] >= result["rss_after_import_bytes"] > 0


def test_original_checkpoint_layout_of_the_conversion_benchmark():
    conversion = load_benchmark("conversion")
    llm = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "vocab_size": 32000}
    tower = REPO / "tests" / "fixtures" / "mmfuser-clip" / "vision_tower"
    shapes = conversion.original_tensor_shapes(llm, tower)
    keys = [key for key, _ in shapes]
    assert len(keys) == len(set(keys))
    projector = [key for key in keys if key.startswith("model.mm_projector.")]
    assert len(projector) == 28 and "model.mm_projector.0.gamma1" in projector  # the spec's 28 projector tensors
    assert keys[0] == "model.embed_tokens.weight" and keys[-1] == "lm_head.weight"
    llm_params = sum(torch.Size(shape).numel() for key, shape in shapes if not key.startswith("model.vision_tower"))
    assert 6.7e9 < llm_params < 6.8e9  # LLaMA-7B (6.74B) + the projector
    shards = conversion.plan_shards(shapes, int(5e9))
    assert len(shards) == 3  # the original loader's hard-coded model-00003-of-00003 for 7B
    assert all(sum(2 * torch.Size(s).numel() for _, s in shard) <= 5e9 for shard in shards)


def test_gpu_inference_device_map_never_splits_a_fuser():
    gpu_inference = load_benchmark("gpu_inference")
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes

    from llava_multilayer import LlavaMultiLayerForConditionalGeneration

    end_to_end = load_benchmark("end_to_end")
    _, configs = end_to_end.build_configs(["mmfuser", "igva", "I_M"], llm_layers=4, quick=True)
    for name, config in configs.items():
        with init_empty_weights():
            total = compute_module_sizes(LlavaMultiLayerForConditionalGeneration(config), dtype=torch.bfloat16)[""]
        # Two small "GPUs" and the CPU: the model must be spread over several devices ...
        report = gpu_inference.device_map_report(config, {0: total // 4, 1: total // 4, "cpu": total * 4})
        assert len(report["devices"]) >= 2, (name, report["device_map"])
        # ... without ever cutting a fuser, the instruction encoder or an internal-fusion decoder layer.
        assert report["split_no_split_modules"] == [], name


def test_gpu_inference_split_check_detects_a_split_fuser():
    gpu_inference = load_benchmark("gpu_inference")
    from accelerate import init_empty_weights

    from llava_multilayer import LlavaMultiLayerForConditionalGeneration

    _, configs = load_benchmark("end_to_end").build_configs(["mmfuser"], llm_layers=2, quick=True)
    with init_empty_weights():
        model = LlavaMultiLayerForConditionalGeneration(configs["mmfuser"])
    device_map = {"model.multi_modal_projector.fuser": 0, "model.multi_modal_projector.linear_1": 1, "": "cpu"}
    assert any("MMFuserProjector" in entry for entry in gpu_inference.split_no_split_modules(model, device_map))
    assert gpu_inference.split_no_split_modules(model, {"model.multi_modal_projector": 0, "": "cpu"}) == []


def test_gpu_inference_refuses_to_run_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_inference.py"), "--device", "cpu"], capture_output=True, text=True,
        cwd=REPO,
    )
    assert result.returncode != 0 and "needs --device cuda" in result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_inference_quick_on_cuda(tmp_path):
    modes = ["bf16"] + (["8bit", "4bit"] if importlib.util.find_spec("bitsandbytes") else [])
    output = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_inference.py"), "--device", "cuda", "--quick", "--llm-layers", "4",
         "--repeats", "1", "--warmup", "0", "--new-tokens", "3", "--modes", *modes, "--fusion-types", "single",
         "mmfuser", "igva", "I_M", "--workdir", str(tmp_path), "--output", str(output)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(output.read_text())
    assert {row["mode"] for row in payload["results"]} == set(modes)
    assert all(positive(row["decode_ratio"]) for row in payload["results"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fusion_overhead_quick_on_cuda(tmp_path):
    output = tmp_path / "fusion.json"
    command = [sys.executable, str(BENCHMARKS / "fusion_overhead.py"), "--device", "cuda", "--dtype", "bfloat16",
               "--quick", "--repeats", "1", "--warmup", "0", "--output", str(output)]
    if importlib.util.find_spec("kernels"):
        command.append("--use-kernels")
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(positive(row["ratio"]) for row in json.loads(output.read_text())["results"])


# --------------------------------------------------------------------------------------------------------------
# The streaming shard writer behind the conversion benchmark's memory target (conversion_scripts/writing.py)
# --------------------------------------------------------------------------------------------------------------


def written_tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    tensors = {}
    for path in files:
        tensors.update(load_file(path))
    if len(files) > 1:
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        assert sorted(index["weight_map"]) == sorted(tensors)
        assert set(index["weight_map"].values()) == {path.name for path in files}
    return tensors


@pytest.mark.parametrize("max_shard_size", [10**9, 300])
def test_streaming_shard_writer_round_trips_every_dtype(tmp_path, max_shard_size):
    from llava_multilayer.conversion.writing import ShardedSafetensorsWriter

    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=generator)
    tensors = {
        "float32": base,
        "bfloat16": base.bfloat16(),
        "float16": base.half(),
        "float64": base.double(),
        "int64": torch.arange(7),
        "int8": torch.arange(-3, 3, dtype=torch.int8),
        "bool": base > 0,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "transposed": base.t(),  # not contiguous
        "tied": base,  # shares storage with "float32"
    }
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_size=max_shard_size)
    for key, tensor in tensors.items():
        writer.add(key, tensor)
    writer.finish()
    assert (len(list(tmp_path.glob("*.safetensors"))) > 1) == (max_shard_size == 300)
    assert not list(tmp_path.glob("*.tmp"))
    loaded = written_tensors(tmp_path)
    assert loaded.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key
    assert writer.total_size == sum(t.numel() * t.element_size() for t in tensors.values())


def test_streaming_shard_writer_header_larger_than_its_reserved_room(tmp_path):
    from llava_multilayer.conversion.writing import ShardedSafetensorsWriter

    writer = ShardedSafetensorsWriter(tmp_path)
    writer.header_room = 256  # far less than 40 entries need: the shard is rewritten with a larger header
    tensors = {f"layer.{index}.weight": torch.full((3, index + 1), float(index)) for index in range(40)}
    for key, tensor in tensors.items():
        writer.add(key, tensor)
    writer.finish()
    loaded = written_tensors(tmp_path)
    assert all(torch.equal(loaded[key], tensor) for key, tensor in tensors.items())
    header_length = int.from_bytes((tmp_path / "model.safetensors").read_bytes()[:8], "little")
    assert header_length > 256 and header_length % 8 == 0
