"""The `llava-multilayer` command line: convert (family auto-detection), inspect, generate, chat, demo.

Every golden fixture is converted once per session with `llava-multilayer convert` (tests/converted_fixtures.py);
the conversions need the three family converters
(conversion_scripts/convert_{mmfuser,layer_select_fuse,igva}_to_hf.py).
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_config
from converted_fixtures import (
    FIXTURE_FAMILIES,
    FIXTURES_DIR,
    IMAGE_FEATURES_ATOL,
    LOGITS_ATOL,
    conversion_log,
    converted_dir,
)
from safetensors import safe_open
from safetensors.torch import load_file

from llava_multilayer.commands import convert as convert_command
from llava_multilayer.commands import generate as generate_command
from llava_multilayer.commands.cli import main
from llava_multilayer.module_roles_llava_multilayer import quantization_skip_modules


REPO_ROOT = Path(__file__).resolve().parent.parent


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Runs `llava-multilayer ARGV` in-process; returns (exit code, stdout, stderr) of that run alone."""
    capsys.readouterr()  # what came before, e.g. the conversion that `converted_dir` ran while building ARGV
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def expected_answer(name: str, suffix: str = "") -> str:
    """The decoded greedy answer the original implementation produced for a fixture's prompt."""
    from transformers import AutoTokenizer

    ids = load_file(FIXTURES_DIR / name / "expected.safetensors")["generated_ids" + suffix][0, 1:]
    tokenizer = AutoTokenizer.from_pretrained(converted_dir(name))
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


# --------------------------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FIXTURE_FAMILIES))
def test_detects_family_of_every_fixture(name):
    family = FIXTURE_FAMILIES[name]
    assert convert_command.family_of_directory(FIXTURES_DIR / name / "original") == family
    assert convert_command.family_of_directory(FIXTURES_DIR / name / "original_pretrain") == family


@pytest.mark.parametrize("name", sorted(FIXTURE_FAMILIES))
def test_convert_end_to_end(name):
    output = converted_dir(name)
    assert f"Family: {FIXTURE_FAMILIES[name]} (detected)" in conversion_log(name)
    for filename in (
        "config.json",
        "generation_config.json",
        "processor_config.json",
        "chat_template.jinja",
        "tokenizer.json",
        "README.md",
        "conversion_report.json",
        "modeling_llava_multilayer.py",
    ):
        assert (output / filename).is_file(), filename
    assert json.loads((output / "config.json").read_text())["model_type"] == "llava_multilayer"
    report = json.loads((output / "conversion_report.json").read_text())
    assert report["family"] == FIXTURE_FAMILIES[name]
    assert report["parity"], "--parity-fixture was forwarded to the family converter"
    for prompt, numbers in report["parity"].items():
        if not prompt.startswith("prompt"):
            continue
        assert numbers["logits_max_abs_diff"] <= LOGITS_ATOL, (prompt, numbers)
        assert numbers["image_features_max_abs_diff"] <= IMAGE_FEATURES_ATOL, (prompt, numbers)
        assert numbers["greedy_tokens_equal"] and numbers["input_ids_equal"], (prompt, numbers)


def test_console_script_is_installed_and_forwards_help():
    script = Path(sys.executable).parent / "llava-multilayer"
    script = str(script) if script.exists() else shutil.which("llava-multilayer")
    assert script, "the `llava-multilayer` console script is not installed (pip install -e .)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    igva = FIXTURES_DIR / "igva-clip" / "original"
    result = subprocess.run(
        [script, "convert", "--input-dir", str(igva), "--help"], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: llava-multilayer convert ")
    for flag in ("--input-dir", "--output-dir", "--pretrain-dir", "--vision-tower", "--dtype", "--verify",
                 "--push-to-hub", "--private", "--overwrite", "--parity-fixture", "--max-shard-size", "--family"):
        assert flag in result.stdout, flag
    family_flags = result.stdout.split("igva only (llava_multilayer.conversion.convert_igva_to_hf):")[1]
    assert "--sentence-encoder" in family_flags  # the IGVA converter's own flag, in its group
    assert " \\\n        [--dtype bfloat16]" in result.stdout  # the usage example keeps its line continuation


def test_convert_unknown_family_names_what_was_looked_at(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "my_fusion": 3}))
    with pytest.raises(convert_command.UnknownFamilyError) as error:
        convert_command.family_of_directory(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "config.json") in message
    for family, module in convert_command.FAMILY_MODULES.items():
        assert family in message and module in message
    assert "my_fusion" in message and "'llama'" in message

    status, _, err = run_cli(["convert", "--input-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")], capsys)
    assert status == 1
    assert "not a checkpoint of a known family" in err
    assert not (tmp_path / "out").exists()


def test_convert_ambiguous_detection_is_an_error(monkeypatch):
    original = json.loads((FIXTURES_DIR / "mmfuser-clip" / "original" / "config.json").read_text())
    igva = convert_command.load_family_module("igva")
    monkeypatch.setattr(igva, "detect", lambda config: True)
    with pytest.raises(convert_command.UnknownFamilyError, match="several families.*mmfuser.*igva.*--family"):
        convert_command.detect_family(original)


def test_convert_family_flag_skips_detection(tmp_path, capsys):
    status, _, err = run_cli(
        [
            "convert",
            "--family",
            "igva",
            "--input-dir",
            str(FIXTURES_DIR / "mmfuser-clip" / "original"),
            "--output-dir",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert "Family: igva (given by --family)" in err
    assert status != 0  # the IGVA converter refuses an MMFuser config
    assert not (tmp_path / "out").exists()


def test_convert_without_input_dir_is_a_usage_error(capsys):
    status, _, err = run_cli(["convert", "--output-dir", "x"], capsys)
    assert status == 2 and "--input-dir is required" in err


# --------------------------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------------------------

#: Components each converted fixture must have (others must be empty).
EXPECTED_COMPONENTS = {
    "mmfuser-clip": {"vision tower", "fuser / projector", "language model", "lm_head"},
    "lsf-E_D-clip-3-18-23": {"vision tower", "fuser / projector", "language model", "lm_head"},
    "lsf-E_D-siglip-3-18-23": {"vision tower", "fuser / projector", "language model", "lm_head"},
    "lsf-E_M-clip-3-18-23": {"vision tower", "fuser / projector", "language model", "lm_head"},
    "lsf-I_D-clip-3-18-23": {"vision tower", "fuser / projector", "internal projectors", "language model", "lm_head"},
    "lsf-I_M-clip-3-18-23": {
        "vision tower",
        "fuser / projector",
        "internal projectors",
        "internal cross-attention",
        "language model",
        "lm_head",
    },
    "igva-clip": {"vision tower", "fuser / projector", "instruction encoder", "language model", "lm_head"},
}


@pytest.mark.parametrize("name", sorted(FIXTURE_FAMILIES))
def test_inspect_converted(name, capsys):
    directory = converted_dir(name)
    status, out, _ = run_cli(["inspect", str(directory), "--json"], capsys)
    assert status == 0
    info = json.loads(out)
    config = json.loads((directory / "config.json").read_text())
    assert info["kind"] == "converted" and info["family"] == FIXTURE_FAMILIES[name]
    assert info["strategy"]["fusion_type"] == config["fusion_type"]
    assert info["strategy"]["internal_fusion_type"] == config.get("internal_fusion_type")
    assert info["layers"]["vision_feature_layer"] == config["vision_feature_layer"]
    assert {c for c, count in info["parameters"].items() if count} == EXPECTED_COMPONENTS[name]

    stored = 0
    with safe_open(directory / "model.safetensors", framework="pt") as handle:
        for key in handle.keys():
            stored += _numel(handle.get_slice(key).get_shape())
    assert info["total_parameters"] == sum(info["parameters"].values()) == stored
    assert info["dtype"] == "float32" and set(info["stored_dtypes"]) == {"float32"}
    assert [file["name"] for file in info["files"]] == ["model.safetensors"]

    status, text, _ = run_cli(["inspect", str(directory)], capsys)
    assert status == 0
    assert "family" in text and FIXTURE_FAMILIES[name] in text and "Parameters:" in text
    assert f"{info['total_parameters']:,}" in text


def _numel(shape) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel


@pytest.mark.parametrize("name", sorted(FIXTURE_FAMILIES))
def test_inspect_original(name, capsys):
    original = FIXTURES_DIR / name / "original"
    status, out, _ = run_cli(["inspect", str(original), "--json"], capsys)
    assert status == 0
    info = json.loads(out)
    assert info["kind"] == "original" and info["family"] == FIXTURE_FAMILIES[name]
    assert info["converter"] == convert_command.FAMILY_MODULES[FIXTURE_FAMILIES[name]]
    with safe_open(original / "model.safetensors", framework="pt") as handle:
        keys = list(handle.keys())
    groups = info["tensor_groups"]
    assert sum(group["tensors"] for group in groups.values()) == info["num_tensors"] == len(keys)
    assert "other" not in groups, info["other_key_prefixes"]
    assert groups["vision tower"]["tensors"] == sum(k.startswith("model.vision_tower.") for k in keys)
    assert groups["fuser / projector"]["tensors"] > 0 and groups["language model"]["tensors"] > 0
    if "I_M" in name:
        assert groups["internal cross-attention"]["tensors"] == sum(".ucross_" in k for k in keys)
    assert info["format"] == "safetensors" and info["stage"] == "finetune"
    assert info["stored_dtypes"] == {"float32": len(keys)}
    assert any(need.startswith("--vision-tower") for need in info["needs"])
    marker = {
        "mmfuser": "mm_vision_select_layer",
        "layer_select_fuse": "layer_fusing_strategy",
        "igva": "vit_aggregate_groups",
    }[FIXTURE_FAMILIES[name]]
    assert marker in info["settings"]
    if FIXTURE_FAMILIES[name] == "igva":
        assert any(need.startswith("--sentence-encoder") for need in info["needs"])

    status, text, _ = run_cli(["inspect", str(original)], capsys)
    assert status == 0 and "detected family" in text and f"--input-dir {original}" in text


def test_inspect_pretrain_stage_directory(capsys):
    status, out, _ = run_cli(["inspect", str(FIXTURES_DIR / "igva-clip" / "original_pretrain"), "--json"], capsys)
    assert status == 0
    info = json.loads(out)
    assert info["family"] == "igva" and info["stage"] == "pretrain"
    assert [file["name"] for file in info["files"]] == ["mm_projector.bin"]
    assert info["tensor_groups"]["fuser / projector"]["tensors"] == info["num_tensors"] == 4
    status, text, _ = run_cli(["inspect", str(FIXTURES_DIR / "igva-clip" / "original_pretrain")], capsys)
    assert "--pretrain-dir" in text


# --------------------------------------------------------------------------------------------------------------
# generate / chat
# --------------------------------------------------------------------------------------------------------------


def generate_argv(name: str, prompt: str, *options: str) -> list[str]:
    """`llava-multilayer generate` on fixture `name`'s converted model and image, with `prompt` and `options`."""
    image = FIXTURES_DIR / name / "image.png"
    return ["generate", str(converted_dir(name)), "--image", str(image), "--prompt", prompt, *options]


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_generate_reproduces_original_greedy_answer(stream, capsys):
    name = "mmfuser-clip"
    question = json.loads((FIXTURES_DIR / name / "prompt.json").read_text())["question"]
    status, out, _ = run_cli(
        generate_argv(name, question, "--max-new-tokens", "8", "--device", "cpu", stream), capsys
    )
    assert status == 0
    assert out.strip() == expected_answer(name)


def test_generate_igva_with_instruction(capsys):
    name = "igva-clip"
    prompts = json.loads((FIXTURES_DIR / name / "prompt.json").read_text())
    status, out, _ = run_cli(
        generate_argv(name, prompts["question"], "--instruction", prompts["instruction"], "--max-new-tokens", "8"),
        capsys,
    )
    assert status == 0
    assert out.strip() == expected_answer(name)


def test_generate_instruction_needs_an_igva_model(capsys):
    status, _, err = run_cli(
        ["generate", str(converted_dir("mmfuser-clip")), "--prompt", "Hi", "--instruction", "x"], capsys
    )
    assert status == 2 and "--instruction: expected an instruction-guided (IGVA) model" in err


def test_generate_sampling_is_reproducible_with_a_seed(capsys):
    argv = generate_argv(
        "mmfuser-clip", "Describe it.",
        "--max-new-tokens", "12", "--do-sample", "--temperature", "1.5", "--top-p", "0.95", "--no-stream",
    )  # fmt: skip
    answers = [run_cli(argv + ["--seed", str(seed)], capsys)[1] for seed in (0, 0, 1)]
    assert answers[0] == answers[1]
    assert answers[0] != answers[2] or answers[0] != expected_answer("mmfuser-clip")


def test_chat_keeps_the_conversation(monkeypatch, capsys):
    name = "mmfuser-clip"
    question = json.loads((FIXTURES_DIR / name / "prompt.json").read_text())["question"]
    prompts = []
    prepare_inputs = generate_command.prepare_inputs

    def recording_prepare_inputs(processor, prompt, image=None, instruction=None):
        prompts.append(prompt)
        return prepare_inputs(processor, prompt, image, instruction)

    monkeypatch.setattr(generate_command, "prepare_inputs", recording_prepare_inputs)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{question}\n\nAnd the colours?\nexit\nnever read\n"))
    status, out, _ = run_cli(
        ["chat", str(converted_dir(name)), "--image", str(FIXTURES_DIR / name / "image.png"), "--max-new-tokens", "8"],
        capsys,
    )
    assert status == 0
    answers = out.splitlines()
    assert len(answers) == 2 and len(prompts) == 2
    assert answers[0].strip() == expected_answer(name)  # the first turn is the single-turn prompt
    fixture_prompt = json.loads((FIXTURES_DIR / name / "prompt.json").read_text())["prompt"]
    assert prompts[0] == fixture_prompt
    assert prompts[1].startswith(fixture_prompt + " " + answers[0].strip())
    assert prompts[1].endswith("</s>USER: And the colours? ASSISTANT:")
    assert prompts[1].count("<image>") == 1


# --------------------------------------------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------------------------------------------


def test_quantization_config_keeps_fusion_modules_in_full_precision():
    args = argparse.Namespace(load_in_4bit=True, load_in_8bit=False, dtype="bfloat16")
    config = generate_command.quantization_config(args, make_config("mmfuser"))
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert config.llm_int8_skip_modules == [
        "model.vision_tower",
        "model.multi_modal_projector",
        "model.internal_projectors",
        "model.instruction_encoder",
        "lm_head",
    ]
    # The I_M cross-fusion modules stay unquantized too, as in QLoRA finetuning (one list for both).
    args = argparse.Namespace(load_in_4bit=False, load_in_8bit=True, dtype="auto")
    model_config = make_config(internal_fusion_type="cross_attention")
    config = generate_command.quantization_config(args, model_config)
    assert config.load_in_8bit and config.llm_int8_skip_modules == quantization_skip_modules(model_config)
    assert "model.language_model.layers.1.cross_attn" in config.llm_int8_skip_modules
    unquantized = argparse.Namespace(load_in_4bit=False, load_in_8bit=False)
    assert generate_command.quantization_config(unquantized, model_config) is None


def test_load_in_4bit_quantizes_only_the_language_model():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the optional `quantization` extra")
    args = argparse.Namespace(
        model=str(converted_dir("igva-clip")), device="auto", dtype="auto", load_in_4bit=True, load_in_8bit=False
    )
    model, processor = generate_command.load_model_and_processor(args)
    quantized = {name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    assert quantized and all(name.startswith("model.language_model.layers.") for name in quantized)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.startswith("model.language_model."):
            assert not isinstance(module, bnb.nn.Linear4bit) and module.weight.dtype == torch.float32, name
    prompts = json.loads((FIXTURES_DIR / "igva-clip" / "prompt.json").read_text())
    inputs = generate_command.prepare_inputs(
        processor, prompts["prompt"], generate_command.load_image(str(FIXTURES_DIR / "igva-clip" / "image.png"))
    )
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


# --------------------------------------------------------------------------------------------------------------
# demo, help, deferred commands
# --------------------------------------------------------------------------------------------------------------


def _setup_package_dirs() -> list[str]:
    """The source directories of setup.py's `package_dir` (read as a literal, without running setup.py)."""
    tree = ast.parse((REPO_ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "package_dir":
            return sorted(set(ast.literal_eval(node.value).values()))
    raise AssertionError("setup.py has no package_dir")


@pytest.mark.slow  # 10-20 s of CPU (subprocesses): CI runs it with RUN_SLOW=1
def test_demo_runs_offline_from_a_fresh_non_editable_install(tmp_path):
    """`pip install .` (not editable) ships demo_data/ and the card templates, and `llava-multilayer demo` works
    from that install with no network and an empty HF_HOME."""
    source = tmp_path / "source"
    source.mkdir()
    for path in ("setup.py", "README.md"):
        shutil.copy(REPO_ROOT / path, source / path)
    for directory in _setup_package_dirs():
        shutil.copytree(REPO_ROOT / directory, source / directory, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    package = target / "llava_multilayer"
    shipped = {str(path.relative_to(package)) for path in package.rglob("*") if path.is_file()}
    for data in (
        "commands/demo_data/original/model.safetensors",
        "commands/demo_data/original/tokenizer.model",
        "commands/demo_data/vision_tower/model.safetensors",
        "commands/demo_data/image.png",
        "commands/demo_data/prompt.json",
        "commands/demo_data/original_output.json",
        "model_cards/mmfuser.md",
        "model_cards/layer_select_fuse.md",
        "model_cards/igva.md",
    ):
        assert data in shipped, data
    script = target / "bin" / "llava-multilayer"
    assert script.is_file()

    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("HF_", "TRANSFORMERS_", "PYTHON")) and key.lower() not in ("http_proxy", "https_proxy")
    }
    env.update(
        PYTHONPATH=str(target),
        HF_HOME=str(tmp_path / "hf_home"),
        HTTP_PROXY="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",  # any network access fails at once
        http_proxy="http://127.0.0.1:9",
        https_proxy="http://127.0.0.1:9",
    )
    result = subprocess.run(
        [sys.executable, str(script), "demo"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert str(package / "commands" / "demo_data") in result.stdout  # ran from the fresh install
    assert "IDENTICAL to" in result.stdout
    assert not list((tmp_path / "hf_home").rglob("*.safetensors"))  # nothing fetched from the Hub


def test_help_lists_every_command(capsys):
    status, out, _ = run_cli(["--help"], capsys)
    assert status == 0
    for command in ("demo", "convert", "inspect", "generate", "chat", "finetune", "merge-lora"):
        assert re.search(rf"^\s+{re.escape(command)}\b", out, re.MULTILINE), command


def test_finetune_commands_are_wired(capsys):
    for command, flag in (("finetune", "--lora-r"), ("merge-lora", "--adapter-dir")):
        status, out, _ = run_cli([command, "--help"], capsys)
        assert status == 0 and flag in out


def test_deferred_command_reports_what_to_install(monkeypatch, capsys):
    import importlib

    real_import = importlib.import_module

    def failing_import(name, *args):
        if name == "llava_multilayer.commands.finetune":
            raise ModuleNotFoundError("No module named 'peft'", name="peft")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", failing_import)
    status, _, err = run_cli(["finetune", "--help"], capsys)
    assert status == 1
    assert "peft" in err and "pip install 'llava-multilayer[peft]'" in err


def test_evaluate_without_lmms_eval_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "lmms_eval" else real_find_spec(name, *args)
    )
    status, _, err = run_cli(["evaluate", str(converted_dir("lsf-E_D-clip-3-18-23")), "--tasks", "pope"], capsys)
    assert status == 1
    assert "lmms-eval" in err and 'pip install "llava-multilayer[eval]"' in err
