"""`llava-multilayer train` end to end on the tiny Layer_Select_Fuse golden fixture: the CPU example of
docs/training.md (convert, stage 1, stage 2, generate), what each stage changed, resuming, the LoRA output, broken
data reported with its id and index, and a 2-process DDP run (gloo) whose losses equal a single-process run."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from converted_fixtures import LocalHub
from huggingface_hub import constants
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file

from llava_multilayer import LlavaMultiLayerForConditionalGeneration, LlavaMultiLayerProcessor
from llava_multilayer.commands.cli import main
from llava_multilayer.conversion.hub import push_to_hub


ROOT = Path(__file__).parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "training-lsf-E_D-clip-3-18-23"
DATA = ["--image-folder", str(FIXTURE / "data" / "images"), "--model-max-length", "320", "--bf16", "False"]
CPU = ["--use-cpu", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "1"]


def run_cli(argv: list[str]) -> tuple[int, str]:
    with contextlib.redirect_stderr(io.StringIO()) as stderr, contextlib.redirect_stdout(io.StringIO()) as stdout:
        status = main(argv)
    return status, stdout.getvalue() + stderr.getvalue()


def doc_example_commands() -> list[list[str]]:
    """The `llava-multilayer` lines of the CPU example of docs/training.md, with `$F` expanded."""
    text = (ROOT / "docs" / "training.md").read_text()
    block = re.search(r"<!-- cpu-example -->\n```bash\n(.*?)```", text, re.DOTALL)[1]
    commands = []
    for line in block.splitlines():
        line = line.replace("$F", str(FIXTURE))
        if line.startswith("llava-multilayer "):
            commands.append(shlex.split(line)[1:])
    return commands


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory) -> Path:
    """The CPU example of docs/training.md, run in a temporary directory; returns that directory."""
    root = tmp_path_factory.mktemp("two-stage")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        outputs = []
        for argv in doc_example_commands():
            status, output = run_cli(argv)
            assert status == 0, output
            outputs.append(output)
    finally:
        os.chdir(cwd)
    (root / "generate.txt").write_text(outputs[-1])
    return root


def test_doc_example_runs_both_stages_and_generates(two_stage):
    assert len(doc_example_commands()) == 4
    assert (two_stage / "generate.txt").read_text().strip()
    for stage in ("tiny-stage1", "tiny-stage2"):
        recipe = json.loads((two_stage / stage / "training_recipe.json").read_text())
        assert recipe["family"] == "layer_select_fuse"
        assert (two_stage / stage / "processor_config.json").is_file()


def test_stage_1_trains_only_the_projector_and_stage_2_the_llm_too(two_stage):
    start, stage1, stage2 = (weights(two_stage / name) for name in ("tiny-lsf", "tiny-stage1", "tiny-stage2"))
    assert start.keys() == stage1.keys() == stage2.keys()

    def changed(before, after):
        return {name for name in before if not torch.equal(before[name], after[name])}

    projector = {name for name in start if name.startswith("model.multi_modal_projector.")}
    assert changed(start, stage1) == projector
    stage2_changed = changed(stage1, stage2)
    assert projector <= stage2_changed
    assert any(name.startswith("model.language_model.layers.") for name in stage2_changed)
    assert not any(name.startswith("model.vision_tower.") for name in stage2_changed)


def test_final_checkpoint_reloads_with_nothing_lost(two_stage):
    directory = two_stage / "tiny-stage2"
    model = LlavaMultiLayerForConditionalGeneration.from_pretrained(directory, dtype=torch.float32)
    saved = weights(directory)
    state = model.state_dict()
    assert saved.keys() == state.keys()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    # Remote code travels with the checkpoint, so the directory can be pushed to the Hub as it is.
    assert (directory / "modeling_llava_multilayer.py").is_file()
    assert json.loads((directory / "config.json").read_text())["auto_map"]


def test_resume_from_checkpoint(two_stage):
    output = two_stage / "tiny-stage2"
    status, log = run_cli(
        ["train", "--recipe", "finetune", "--model", str(two_stage / "tiny-stage1"), "--data"]
        + [str(FIXTURE / "data" / "records.json"), "--output-dir", str(output), *DATA, *CPU]
        + ["--max-steps", "3", "--resume-from-checkpoint"]
    )
    assert status == 0, log
    state = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3]


def test_lora_writes_adapter_and_merged_model(two_stage, tmp_path):
    status, log = run_cli(
        ["train", "--recipe", "lora", "--model", str(two_stage / "tiny-stage1"), "--data"]
        + [str(FIXTURE / "data" / "records.json"), "--output-dir", str(tmp_path / "lora"), *DATA, *CPU]
        + ["--max-steps", "1", "--warmup-ratio", "0", "--lora-r", "4", "--lora-alpha", "8"]
    )
    assert status == 0, log
    adapter = tmp_path / "lora" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    non_lora = load_file(adapter / "non_lora_trainables.safetensors")
    assert non_lora and all(name.startswith("model.multi_modal_projector.") for name in non_lora)
    merged = weights(tmp_path / "lora")
    for name, tensor in non_lora.items():
        assert torch.equal(merged[name], tensor)
    before = weights(two_stage / "tiny-stage1")
    assert not torch.equal(
        merged["model.language_model.layers.0.self_attn.q_proj.weight"],
        before["model.language_model.layers.0.self_attn.q_proj.weight"],
    )


def test_missing_image_is_reported_with_id_and_index(two_stage, tmp_path):
    records = json.loads((FIXTURE / "data" / "records.json").read_text())
    records[2]["image"] = "not-there.png"
    data = tmp_path / "broken.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    status, log = run_cli(
        ["train", "--recipe", "finetune", "--model", str(two_stage / "tiny-stage1"), "--data", str(data)]
        + [
            "--output-dir",
            str(tmp_path / "out"),
            *DATA,
            *CPU,
            "--max-steps",
            "3",
            "--group-by-modality-length",
            "False",
        ]
    )
    assert status == 1
    assert "record 'ft-2-three-turns' (index 2): cannot read image" in log and "not-there.png" in log


def first_losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.slow  # 10-20 s of CPU (subprocesses): CI runs it with RUN_SLOW=1
def test_two_process_ddp_losses_equal_a_single_process_with_the_same_global_batch(two_stage, tmp_path):
    common = ["train", "--recipe", "finetune", "--model", str(two_stage / "tiny-stage1"), "--data"]
    common += [str(FIXTURE / "data" / "records.json"), *DATA, "--use-cpu", "--max-steps", "2", "--save-steps", "2"]
    common += ["--gradient-accumulation-steps", "1"]
    status, log = run_cli([*common, "--output-dir", str(tmp_path / "single"), "--per-device-train-batch-size", "2"])
    assert status == 0, log
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [*launch, "-m", "llava_multilayer.commands.cli", *common]
        + ["--output-dir", str(tmp_path / "ddp"), "--per-device-train-batch-size", "1"],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ddp_state = json.loads((tmp_path / "ddp" / "checkpoint-2" / "trainer_state.json").read_text())
    # One record per process and step, two processes: step 1 consumed 2 of the 6 records.
    assert ddp_state["train_batch_size"] == 1
    assert ddp_state["log_history"][0]["epoch"] == pytest.approx(2 / 6), ddp_state["log_history"]
    single, ddp = first_losses(tmp_path / "single"), first_losses(tmp_path / "ddp")
    assert len(single) == len(ddp) == 2
    # Step 1: the same weights and the same global batch; step 2 after one update (gradients reduced across ranks).
    assert abs(single[0] - ddp[0]) <= 1e-6
    assert abs(single[1] - ddp[1]) <= 1e-5


def test_final_checkpoint_pushes_to_the_hub_with_nothing_lost(two_stage, monkeypatch, tmp_path):
    hub = LocalHub()
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
    try:
        directory = two_stage / "tiny-stage2"
        # What `push_to_hub` of the model and processor upload: their `save_pretrained` files.
        LlavaMultiLayerForConditionalGeneration.from_pretrained(directory).save_pretrained(tmp_path / "hub")
        LlavaMultiLayerProcessor.from_pretrained(directory).save_pretrained(tmp_path / "hub")
        push_to_hub(tmp_path / "hub", "me/tiny-lsf")
        files = hub.files("me/tiny-lsf")
    finally:
        hub.close()
    pushed = load_bytes(files["model.safetensors"])
    saved = weights(directory)
    assert pushed.keys() == saved.keys()
    assert all(torch.equal(pushed[name], saved[name]) for name in saved)
    assert {"config.json", "modeling_llava_multilayer.py", "processor_config.json", "tokenizer.json"} <= set(files)


def test_qlora_trains_in_4bit_and_merges_into_the_full_precision_base(two_stage, tmp_path):
    pytest.importorskip("bitsandbytes")
    status, log = run_cli(
        ["train", "--recipe", "qlora", "--model", str(two_stage / "tiny-stage1"), "--data"]
        + [str(FIXTURE / "data" / "records.json"), "--output-dir", str(tmp_path / "qlora"), *DATA, *CPU]
        + ["--max-steps", "1", "--warmup-ratio", "0", "--lora-r", "4", "--lora-alpha", "8"]
    )
    assert status == 0, log
    merged = weights(tmp_path / "qlora")
    base = weights(two_stage / "tiny-stage1")
    assert merged.keys() == base.keys()
    assert all(tensor.dtype == torch.float32 for tensor in merged.values())
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[name], base[name])
    # The merge went into the full-precision base: the change is one LoRA update, far below the NF4 error (~9e-3).
    assert (merged[name] - base[name]).abs().max() < 1e-3, (merged[name] - base[name]).abs().max()
