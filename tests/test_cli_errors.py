"""A newcomer's first hour with the command line, each step in a subprocess as a user runs it: every mistake gets
one paragraph (the argument, what was expected, what was found, the fix) and the right exit status, no traceback
and no partial output; outputs have ordinary permissions and carry no local path; the CLI starts fast."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from converted_fixtures import FIXTURES_DIR, LocalHub, convert_argv, converted_dir
from test_finetune import make_records, tiny_model


REPO_ROOT = Path(__file__).resolve().parent.parent
MMFUSER = FIXTURES_DIR / "mmfuser-clip"


def cli(*args: str, cwd: Path | None = None, env: dict | None = None, umask: int | None = None):
    """Runs `llava-multilayer ARGS` in a fresh interpreter (offline); returns the CompletedProcess."""
    environment = {key: value for key, value in os.environ.items() if key != "LLAVA_MULTILAYER_DEBUG"}
    environment.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "llava_multilayer.commands.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=environment,
        cwd=cwd,
        timeout=600,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
    )


def assert_error(result, status: int, *fragments: str) -> str:
    """Checks the exit status, that stderr holds one `llava-multilayer CMD: error:` paragraph with `fragments`, and
    that no traceback was printed."""
    assert result.returncode == status, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith("llava-multilayer "), result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def entries(directory: Path) -> set[str]:
    return {path.name for path in directory.iterdir()}


# --------------------------------------------------------------------------------------------------------------
# Errors: one paragraph, exit 2 (usage) or 1 (failure), checked before anything heavy runs
# --------------------------------------------------------------------------------------------------------------


def test_generate_with_a_missing_image(tmp_path):
    result = cli("generate", converted_dir("mmfuser-clip"), "--image", tmp_path / "nope.png", "--prompt", "Hi")
    assert_error(result, 1, "--image: expected an image file", f"{tmp_path / 'nope.png'}, which does not exist")
    assert result.stdout == ""  # nothing generated, the model was never loaded


def test_generate_with_an_unreadable_image(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    result = cli("generate", converted_dir("mmfuser-clip"), "--image", tmp_path / "notes.png", "--prompt", "Hi")
    assert_error(result, 1, "--image: expected an image file PIL can read")


def test_generate_on_an_original_checkpoint_says_convert(tmp_path):
    result = cli("generate", MMFUSER / "original", "--prompt", "Hi")
    fix = f"llava-multilayer convert --input-dir {MMFUSER / 'original'}"
    assert_error(result, 1, "found an original mmfuser checkpoint", fix)


def test_generate_on_a_directory_that_is_no_model(tmp_path):
    assert_error(cli("chat", tmp_path), 1, "MODEL: expected a converted llava-multilayer directory", "no config.json")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_device_cuda_without_a_gpu():
    result = cli("generate", converted_dir("mmfuser-clip"), "--device", "cuda", "--prompt", "Hi")
    assert_error(result, 1, "--device: expected a CUDA GPU", "--device cpu")


def test_inspect_a_path_that_does_not_exist(tmp_path):
    assert_error(cli("inspect", tmp_path / "nonexistent"), 1, "PATH:", "which does not exist")
    assert_error(cli("inspect", "/nonexistent"), 1, "found /nonexistent, which does not exist")


def test_debug_shows_the_traceback():
    result = cli("inspect", "/nonexistent", env={"LLAVA_MULTILAYER_DEBUG": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr
    result = cli("--debug", "inspect", "/nonexistent")
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_convert_an_input_dir_that_does_not_exist(tmp_path):
    result = cli("convert", "--input-dir", "/does-not-exist", "--output-dir", tmp_path / "out")
    assert_error(result, 1, "--input-dir:", "/does-not-exist, which does not exist")
    assert entries(tmp_path) == set()


@pytest.mark.slow  # 10-20 s of CPU (subprocesses): CI runs it with RUN_SLOW=1
def test_convert_usage_errors_exit_2(tmp_path):
    assert_error(cli("convert", "--output-dir", tmp_path / "out"), 2, "--input-dir is required")
    result = cli("convert", "--input-dir", MMFUSER / "original", "--output-dir", tmp_path / "o", "--no-such-flag")
    assert result.returncode == 2 and "unrecognized arguments: --no-such-flag" in result.stderr
    assert entries(tmp_path) == set()


def test_convert_refuses_an_existing_output_dir_before_reading_anything(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    result = cli(*convert_argv("mmfuser-clip", tmp_path / "out", parity=False))
    assert_error(result, 1, "--output-dir: expected a new or empty directory", "--overwrite")
    assert entries(tmp_path) == {"out"} and entries(tmp_path / "out") == {"mine.txt"}


@pytest.mark.slow  # 10-20 s of CPU (subprocesses): CI runs it with RUN_SLOW=1
def test_merge_lora_on_a_directory_that_is_no_adapter(tmp_path):
    result = cli("merge-lora", "--adapter-dir", converted_dir("mmfuser-clip"), "--output-dir", tmp_path / "merged")
    assert_error(result, 1, "--adapter-dir: expected a LoRA adapter directory", "is a full model directory")
    assert entries(tmp_path) == set()


@pytest.mark.slow  # 10-20 s of CPU (subprocesses): CI runs it with RUN_SLOW=1
def test_finetune_with_a_wrong_image_folder_fails_before_training(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "data.json").write_text(json.dumps(make_records(images, count=2)))
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    argv = ["finetune", "--model", converted_dir("mmfuser-clip"), "--data", tmp_path / "data.json"]
    result = cli(*argv, "--image-folder", empty, "--output-dir", tmp_path / "runs" / "lora")
    assert_error(result, 1, "--image-folder: expected a folder holding every image", "2 missing")
    result = cli(*argv, "--image-folder", tmp_path / "nope", "--output-dir", tmp_path / "runs" / "lora")
    assert_error(result, 1, "--image-folder:", "which does not exist")
    assert entries(tmp_path) == {"images", "data.json", "elsewhere"}  # no output directory, no parent of it


@pytest.mark.slow  # 10-20 s of CPU (subprocesses): CI runs it with RUN_SLOW=1
def test_push_to_hub_offline_says_how_to_retry(tmp_path):
    output_dir = tmp_path / "mmfuser-hf"
    argv = convert_argv("mmfuser-clip", output_dir, parity=False) + ["--verify", "--push-to-hub", "me/tiny"]
    result = cli(*argv)
    assert_error(result, 1, "offline mode (HF_HUB_OFFLINE=1)", f"llava-multilayer push {output_dir} me/tiny")
    assert "Verified 440 tensors" in result.stdout
    assert (output_dir / "config.json").is_file() and (output_dir / "model.safetensors").is_file()
    assert entries(tmp_path) == {"mmfuser-hf"}  # the conversion is complete, no staging directory is left


def test_push_uploads_an_existing_directory(tmp_path):
    hub = LocalHub()
    try:
        env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_local"}
        directory = tmp_path / "igva-hf"
        shutil.copytree(converted_dir("igva-clip"), directory)  # the push fills in the card's repo id
        result = cli("push", directory, "me/igva", env=env)
        assert result.returncode == 0, result.stderr
        files = hub.files("me/igva")
        assert "model.safetensors" in files and "config.json" in files
        assert f"Uploaded {directory} to {hub.url}/me/igva" in result.stdout
        assert_error(cli("push", tmp_path / "x", "me/none", env=env), 1, "DIR: expected a converted or merged")
    finally:
        hub.close()


# --------------------------------------------------------------------------------------------------------------
# Outputs safe to share: ordinary permissions, no local path
# --------------------------------------------------------------------------------------------------------------


def assert_shareable(directory: Path, *local_paths: Path) -> None:
    """Modes follow the umask 022, and no file holds one of `local_paths` (nor the repository's path)."""
    assert directory.stat().st_mode & 0o777 == 0o755
    for path in directory.rglob("*"):
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path
        if path.is_file():
            content = path.read_bytes()
            for local in (REPO_ROOT, *local_paths):
                assert str(local).encode() not in content, (path, local)


def test_converted_directory_is_shareable(tmp_path):
    output_dir = tmp_path / "igva-hf"
    result = cli(*convert_argv("igva-clip", output_dir, parity=False), umask=0o022)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"Wrote {output_dir}"
    assert "You are using a model of type" not in result.stderr and "FutureWarning" not in result.stderr
    assert_shareable(output_dir, tmp_path)
    settings = json.loads((output_dir / "conversion_report.json").read_text())["settings"]
    assert settings["vision_tower"] == "given with --vision-tower, a local copy of openai/clip-vit-large-patch14-336"


@pytest.mark.slow  # 10-20 s of CPU (subprocesses): CI runs it with RUN_SLOW=1
def test_merged_directory_is_shareable_has_a_card_and_a_family(tmp_path, processor):
    from llava_multilayer.commands.finetune import finetune

    base_dir, images = tmp_path / "base", tmp_path / "images"
    images.mkdir()
    tiny_model().save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    (tmp_path / "train.json").write_text(json.dumps(make_records(images, count=2)))
    finetune(base_dir, tmp_path / "train.json", tmp_path / "lora", image_folder=images, lora_r=2, max_steps=1)

    merged = tmp_path / "merged"
    result = cli("merge-lora", "--adapter-dir", tmp_path / "lora", "--output-dir", merged, umask=0o022)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"Wrote {merged}"
    assert_shareable(merged, tmp_path)
    card = (merged / "README.md").read_text()
    assert "training data: train.json" in card and "LoRA r=2" in card
    assert "adapter: given with --adapter-dir, a local directory named 'lora'" in card
    info = json.loads(cli("inspect", merged, "--json").stdout)
    assert info["family"] == "layer_select_fuse"  # the tiny model fuses inside the decoder layers

    assert_error(cli("merge-lora", "--adapter-dir", tmp_path / "lora", "--output-dir", merged), 1, "--overwrite")


# --------------------------------------------------------------------------------------------------------------
# Start-up
# --------------------------------------------------------------------------------------------------------------


def test_the_cli_module_imports_neither_torch_nor_transformers():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import llava_multilayer.commands.cli"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "llava_multilayer.commands.cli" in imported
    assert not {name for name in imported if name.split(".")[0] in ("torch", "transformers")}


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_take_well_under_a_second_of_cpu(flag):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([sys.executable, "-m", "llava_multilayer.commands.cli", flag], capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert result.returncode == 0
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 0.5, f"{flag} took {cpu:.2f} s of CPU"
