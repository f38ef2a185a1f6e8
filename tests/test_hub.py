"""Hub readiness of converted checkpoints: model card, `--push-to-hub` (against a local stand-in of the Hub API),
the `image-text-to-text` pipeline, and loading as remote code where `llava_multilayer` is not installed.

The converted directories come from tests/converted_fixtures.py (one `llava-multilayer convert` per golden fixture
and session); they need the three family converters.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from converted_fixtures import (
    FIXTURE_FAMILIES,
    FIXTURES_DIR,
    HIDE_PACKAGE_SOURCE,
    LOGITS_ATOL,
    LocalHub,
    child_job,
    convert_argv,
    converted_dir,
    fixture_inputs,
)
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers.dynamic_module_utils import get_relative_import_files

import llava_multilayer
from llava_multilayer.commands.cli import main
from llava_multilayer.conversion.hub import push_to_hub
from llava_multilayer.conversion.model_card import MODEL_ID_PLACEHOLDER


PAPERS = {"mmfuser": "2410.11829", "layer_select_fuse": "2503.06063", "igva": "2501.08443"}
MODELING_DIR = Path(llava_multilayer.__file__).parent

#: Files every converted directory holds besides the remote code (`*.py`) and the weights.
CHECKPOINT_FILES = {
    "README.md",
    "config.json",
    "generation_config.json",
    "conversion_report.json",
    "processor_config.json",
    "chat_template.jinja",
    "tokenizer.json",
    "tokenizer_config.json",
}
INSTRUCTION_TOKENIZER_FILES = {"instruction_tokenizer/tokenizer.json", "instruction_tokenizer/tokenizer_config.json"}


def remote_code_files() -> set[str]:
    """The package modules a converted checkpoint carries as remote code: the model's module and what it imports,
    as transformers' `save_pretrained` collects them (package-only modules, such as `module_roles`, stay behind)."""
    modeling = MODELING_DIR / "modeling_llava_multilayer.py"
    return {modeling.name} | {Path(path).name for path in get_relative_import_files(str(modeling))}


# --------------------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FIXTURE_FAMILIES))
def test_model_card(name):
    directory = converted_dir(name)
    family = FIXTURE_FAMILIES[name]
    report = json.loads((directory / "conversion_report.json").read_text())
    text = (directory / "README.md").read_text()

    header = yaml.safe_load(text.split("---\n")[1])
    card = ModelCard.load(directory / "README.md")
    assert card.data.to_dict() == header
    assert header["library_name"] == "transformers"
    assert header["pipeline_tag"] == "image-text-to-text"
    assert "custom_code" in header["tags"] and "llava-multilayer" in header["tags"]
    assert header.get("base_model") == (report["base_model"] or None)
    assert header.get("license") == report["license"]

    body = card.text
    assert f"arxiv.org/abs/{PAPERS[family]}" in body and "```bibtex" in body
    for setting in report["settings"]:
        assert f"`{setting}`" in body
    assert f"llava-multilayer {report['converter_version']}, {report['date']}" in body
    assert report["source_format"] in body and report["source_dir"] in body
    assert "trust_remote_code=True" in body and "import llava_multilayer" in body
    assert "apply_chat_template" in body and 'pipeline("image-text-to-text"' in body
    assert MODEL_ID_PLACEHOLDER in body  # replaced by the repo id on push
    parity = body.split("## Parity with the original implementation")[1].split("## Citation")[0]
    for prompt, numbers in report["parity"].items():
        assert f"**{prompt}**" in parity
        for metric, value in numbers.items():
            shown = ("yes" if value else "**no**") if isinstance(value, bool) else f"{value:.3g}"
            assert f"| `{metric}` | {shown} |" in parity
    assert "FAIL" not in parity


def test_model_card_without_parity_says_so(tmp_path):
    from llava_multilayer.conversion.model_card import write_model_card
    from llava_multilayer.conversion.pipeline import ConversionReport

    report = json.loads((converted_dir("mmfuser-clip") / "conversion_report.json").read_text())
    report.update(parity=None, verified=True)
    write_model_card(tmp_path, ConversionReport(**report))
    body = ModelCard.load(tmp_path / "README.md").text
    assert "No parity check was run" in body and "--parity-fixture" in body
    assert "every written tensor re-read" in body


# --------------------------------------------------------------------------------------------------------------
# push_to_hub
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def local_hub(monkeypatch):
    """Points huggingface_hub at a LocalHub (online mode, plain HTTP uploads without hf_xet, a dummy token)."""
    from huggingface_hub import constants

    hub = LocalHub()
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
    yield hub
    hub.close()


def test_convert_push_to_hub_uploads_the_checkpoint(local_hub, tmp_path, capsys):
    output_dir = tmp_path / "mmfuser-hf"
    argv = convert_argv("mmfuser-clip", output_dir, parity=False) + ["--push-to-hub", "me/mmfuser-tiny", "--private"]
    assert main(argv) == 0, capsys.readouterr().err

    assert local_hub.created == [
        {"name": "mmfuser-tiny", "organization": "me", "visibility": "private", "type": "model"}
    ]
    assert len(local_hub.commits) == 1
    commit = local_hub.commits[0]
    assert (
        commit["message"] == f"Upload mmfuser checkpoint converted by llava-multilayer {llava_multilayer.__version__}"
    )
    files = local_hub.files("me/mmfuser-tiny")
    assert set(files) == CHECKPOINT_FILES | {"model.safetensors"} | remote_code_files()
    for path, content in files.items():
        assert content == (output_dir / path).read_bytes(), path
    card = files["README.md"].decode()
    assert MODEL_ID_PLACEHOLDER not in card and 'from_pretrained("me/mmfuser-tiny"' in card
    assert local_hub.validated_yaml and set(local_hub.validated_yaml) == {card}


def test_push_to_hub_sharded_instruction_guided_checkpoint(local_hub, tmp_path):
    """An IGVA checkpoint also carries the instruction tokenizer; sharded weights go with their index; Python
    caches and hidden files stay home."""
    directory = tmp_path / "igva-hf"
    shutil.copytree(converted_dir("igva-clip"), directory)
    (directory / "__pycache__").mkdir()
    (directory / "__pycache__" / "modeling_llava_multilayer.cpython-311.pyc").write_bytes(b"\0")
    (directory / ".DS_Store").write_bytes(b"\0")
    model = llava_multilayer.LlavaMultiLayerForConditionalGeneration.from_pretrained(directory)
    (directory / "model.safetensors").unlink()
    model.save_pretrained(directory, max_shard_size="500KB")
    shards = {path.name for path in directory.glob("model-*.safetensors")}
    assert len(shards) > 1

    url = push_to_hub(directory, "me/igva-tiny")
    assert url == f"{local_hub.url}/me/igva-tiny"
    assert local_hub.created[0]["visibility"] == "public"
    expected = CHECKPOINT_FILES | INSTRUCTION_TOKENIZER_FILES | shards | {"model.safetensors.index.json"}
    assert set(local_hub.files("me/igva-tiny")) == expected | remote_code_files()


def test_push_to_hub_refuses_a_directory_without_config(tmp_path):
    from llava_multilayer.conversion.reading import ConversionError

    with pytest.raises(ConversionError, match="no config.json"):
        push_to_hub(tmp_path, "me/nothing")


# --------------------------------------------------------------------------------------------------------------
# pipeline
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, suffix, image_item",
    [("mmfuser-clip", "", "pil"), ("lsf-I_M-clip-3-18-23", "", "url"), ("igva-clip", "_2", "pil")],
)
def test_pipeline_with_chat_messages(name, suffix, image_item):
    """The pipeline's chat path (chat template + processor + generate) gives the original greedy tokens. For IGVA
    prompt 2 the default instruction (the question) is the original one."""
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(converted_dir(name)))
    image, _, _ = fixture_inputs(name, suffix)
    question = json.loads((FIXTURES_DIR / name / "prompt.json").read_text())["question" + suffix]
    image_content = (
        {"type": "image", "image": image}
        if image_item == "pil"
        else {"type": "image", "url": str(FIXTURES_DIR / name / "image.png")}
    )
    messages = [{"role": "user", "content": [image_content, {"type": "text", "text": question}]}]
    expected = load_file(FIXTURES_DIR / name / "expected.safetensors")["generated_ids" + suffix][0, 1:]

    output = pipe(
        text=messages, max_new_tokens=len(expected), generate_kwargs={"do_sample": False}, return_tensors=True
    )
    assert output[0]["generated_token_ids"][-len(expected) :].tolist() == expected.tolist()

    output = pipe(text=messages, max_new_tokens=len(expected), generate_kwargs={"do_sample": False})
    answer = output[0]["generated_text"][-1]
    assert answer["role"] == "assistant"
    # The pipeline decodes the whole sequence and cuts the prompt off, which may leave SentencePiece's leading space.
    assert answer["content"].strip() == pipe.processor.decode(expected, skip_special_tokens=True).strip()


def test_pipeline_passes_the_igva_instruction():
    from transformers import pipeline

    name = "igva-clip"
    pipe = pipeline("image-text-to-text", model=str(converted_dir(name)))
    image, _, instruction = fixture_inputs(name)
    question = json.loads((FIXTURES_DIR / name / "prompt.json").read_text())["question"]
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    expected = load_file(FIXTURES_DIR / name / "expected.safetensors")["generated_ids"][0, 1:]
    output = pipe(
        text=messages,
        max_new_tokens=len(expected),
        generate_kwargs={"do_sample": False},
        return_tensors=True,
        processor_kwargs={"instructions": [instruction]},
    )
    assert output[0]["generated_token_ids"][-len(expected) :].tolist() == expected.tolist()


# --------------------------------------------------------------------------------------------------------------
# Remote code, without the package
# --------------------------------------------------------------------------------------------------------------

CHILD_SCRIPT = HIDE_PACKAGE_SOURCE + textwrap.dedent(
    '''
    """Loads converted directories with trust_remote_code=True; `llava_multilayer` is hidden."""
    import json
    try:
        import llava_multilayer  # noqa: F401
        sys.exit("llava_multilayer is importable in the clean environment")
    except ImportError:
        pass

    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    jobs = json.loads(sys.argv[1])
    torch.set_num_threads(int(sys.argv[2]))  # the parent's count: `atol=0` holds only for the same reduction order
    report = {}
    for job in jobs:
        model = AutoModelForImageTextToText.from_pretrained(job["dir"], trust_remote_code=True, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(job["dir"], trust_remote_code=True)
        image = Image.open(job["image"]).convert("RGB")
        extra = {"instructions": [job["instruction"]]} if job["instruction"] else {}
        inputs = processor(images=image, text=job["prompt"], return_tensors="pt", **extra)
        with torch.no_grad():
            logits = model(**inputs).logits
        save_file({"logits": logits.contiguous()}, job["output"])
        report[job["name"]] = {
            "model_module": type(model).__module__,
            "processor_class": type(processor).__name__,
            "processor_module": type(processor).__module__,
        }
    pipe = pipeline("image-text-to-text", model=jobs[0]["dir"], trust_remote_code=True)
    content = [{"type": "image", "url": jobs[0]["image"]}, {"type": "text", "text": "Hi"}]
    messages = [{"role": "user", "content": content}]
    report["pipeline_answer"] = pipe(text=messages, max_new_tokens=2)[0]["generated_text"][-1]["content"]
    report["package_modules"] = sorted(m for m in sys.modules if m.startswith("llava_multilayer"))
    print(json.dumps(report))
    '''
)


def test_remote_code_reproduces_in_package_logits(tmp_path):
    """Every converted family loads with trust_remote_code=True in a clean subprocess (package hidden, offline,
    fresh HF_HOME) and gives exactly the logits of the in-package load (which match the original implementation)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    jobs = [child_job(name, tmp_path / f"{name}.safetensors") for name in sorted(FIXTURE_FAMILIES)]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "PYTHON"))}
    threads = str(torch.get_num_threads())
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS=threads)
    result = subprocess.run(
        [sys.executable, "-I", "-c", CHILD_SCRIPT, json.dumps(jobs), threads],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["package_modules"] == []
    assert isinstance(report["pipeline_answer"], str)

    for job in jobs:
        name = job["name"]
        entry = report[name]
        assert entry["model_module"].startswith("transformers_modules."), entry
        assert entry["processor_module"].startswith("transformers_modules."), entry
        expected_class = (
            "LlavaMultiLayerInstructionProcessor" if FIXTURE_FAMILIES[name] == "igva" else "LlavaMultiLayerProcessor"
        )
        assert entry["processor_class"] == expected_class

        model = AutoModelForImageTextToText.from_pretrained(job["dir"], dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(job["dir"])
        image, prompt, instruction = fixture_inputs(name)
        extra = {"instructions": [instruction]} if instruction else {}
        with torch.no_grad():
            logits = model(**processor(images=image, text=prompt, return_tensors="pt", **extra)).logits
        remote = load_file(job["output"])["logits"]
        torch.testing.assert_close(remote, logits, rtol=0, atol=0, msg=f"{name}: remote code differs from the package")
        original = load_file(FIXTURES_DIR / name / "expected.safetensors")["logits"]
        assert (remote[..., : original.shape[-1]] - original).abs().max() <= LOGITS_ATOL, name
