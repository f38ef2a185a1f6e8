"""Saved checkpoints load as Hub remote code (`trust_remote_code=True`) where `llava_multilayer` is not installed.

One clean subprocess (`python -I`, the package's import finder removed and a blocker installed, offline, a fresh
`HF_HOME`) loads every fusion set-up through AutoConfig, AutoModelForImageTextToText, AutoModel and AutoProcessor;
the tests compare what it computed with the in-process model.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import (
    IMAGE_TOKEN_ID,
    VARIANTS,
    make_inputs,
    make_model,
    processor_for,
    random_image,
    vicuna_prompt,
)
from converted_fixtures import HIDE_PACKAGE_SOURCE, offline_child_env
from safetensors.torch import load_file, save_file


PROMPTS = [vicuna_prompt("What is shown in this image?"), vicuna_prompt("Describe the two colours, please.")]
NEW_TOKENS = 4

CHILD_SCRIPT = HIDE_PACKAGE_SOURCE + textwrap.dedent(
    '''
    """Loads each saved directory as remote code; `llava_multilayer` must not be importable here."""
    import json
    from pathlib import Path

    report = {"sys_path": sys.path}
    try:
        import llava_multilayer  # noqa: F401
        report["package_importable"] = True
    except ImportError:
        report["package_importable"] = False

    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(1)
    root = Path(sys.argv[1])
    for variant in sys.argv[2:]:
        directory = root / variant
        entry = {}
        try:
            AutoConfig.from_pretrained(directory)
            entry["refused_without_trust"] = None
        except ValueError as error:
            entry["refused_without_trust"] = str(error)
        config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained(directory, trust_remote_code=True).eval()
        base = AutoModel.from_pretrained(directory, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
        entry["classes"] = {
            name: f"{type(obj).__module__}.{type(obj).__name__}"
            for name, obj in (("config", config), ("model", model), ("base", base), ("processor", processor))
        }
        entry["config"] = config.to_dict()
        inputs = load_file(directory / "inputs.safetensors")
        images = [Image.open(directory / f"image_{index}.png") for index in range(2)]
        prompts = json.loads((directory / "prompts.json").read_text())
        processed = processor(images=images, text=prompts, return_tensors="pt", padding_side="left")
        with torch.no_grad():
            logits = model(**inputs).logits
            hidden = base(**inputs).last_hidden_state
            generated = model.generate(**inputs, max_new_tokens=__NEW_TOKENS__, do_sample=False, pad_token_id=0)
        save_file(
            {
                "logits": logits.contiguous(),
                "last_hidden_state": hidden.contiguous(),
                "generated": generated.contiguous(),
                **{f"processed.{key}": value.contiguous() for key, value in processed.items()},
            },
            root / f"{variant}.out.safetensors",
        )
        report[variant] = entry
    report["package_loaded_at_end"] = any(name.split(".")[0] == "llava_multilayer" for name in sys.modules)
    (root / "report.json").write_text(json.dumps(report))
    '''
).replace("__NEW_TOKENS__", str(NEW_TOKENS))


@pytest.fixture(scope="module")
def remote(tmp_path_factory, tokenizer, instruction_tokenizer):
    """Saves every fusion set-up, runs the clean subprocess once; returns (root, report, in-process results)."""
    root = tmp_path_factory.mktemp("remote_code")
    expected = {}
    for variant in VARIANTS:
        model = make_model(variant, seed=7)
        processor = processor_for(model.config, tokenizer, instruction_tokenizer)
        directory = root / variant
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
        images = [random_image(10), random_image(11, (24, 48))]
        for index, image in enumerate(images):
            image.save(directory / f"image_{index}.png")
        (directory / "prompts.json").write_text(json.dumps(PROMPTS))
        inputs = make_inputs(processor, PROMPTS, images)
        save_file({key: value.contiguous() for key, value in inputs.items()}, directory / "inputs.safetensors")
        with torch.no_grad():
            expected[variant] = {
                "config": model.config.to_dict(),
                "inputs": dict(inputs),
                "logits": model(**inputs).logits,
                "last_hidden_state": model.model(**inputs).last_hidden_state,
                "generated": model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0),
            }
    script = root / "load_remote.py"
    script.write_text(CHILD_SCRIPT)
    env = offline_child_env(root)
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(root), *VARIANTS],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"remote-code subprocess failed:\n{result.stderr[-6000:]}"
    report = json.loads((root / "report.json").read_text())
    return root, report, expected


def test_package_is_hidden_in_the_subprocess(remote):
    _, report, _ = remote
    assert report["package_importable"] is False
    assert report["package_loaded_at_end"] is False
    repository = str(Path(__file__).resolve().parents[1])
    assert not any(entry.startswith(repository) for entry in report["sys_path"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_remote_code_matches_in_process(remote, variant):
    root, report, expected = remote
    entry, expected = report[variant], expected[variant]
    assert entry["refused_without_trust"] is not None and "trust_remote_code" in entry["refused_without_trust"]
    config = expected["config"]
    instruction_guided = config["fusion_type"] == "igva" and not config["igva_aggregate_by_average"]
    expected_processor = "LlavaMultiLayerInstructionProcessor" if instruction_guided else "LlavaMultiLayerProcessor"
    for name, class_name in (
        ("config", "LlavaMultiLayerConfig"),
        ("model", "LlavaMultiLayerForConditionalGeneration"),
        ("base", "LlavaMultiLayerModel"),
        ("processor", expected_processor),
    ):
        module, _, loaded_class = entry["classes"][name].rpartition(".")
        assert module.startswith("transformers_modules."), f"{name} was not loaded as remote code: {module}"
        assert loaded_class == class_name

    volatile = {"_name_or_path", "transformers_version", "architectures", "auto_map", "dtype"}
    in_process = json.loads(json.dumps(expected["config"]))  # as it went through the report (str dict keys)
    assert {k: v for k, v in entry["config"].items() if k not in volatile} == {
        k: v for k, v in in_process.items() if k not in volatile
    }

    outputs = load_file(root / f"{variant}.out.safetensors")
    torch.testing.assert_close(outputs["logits"], expected["logits"], atol=0, rtol=0)
    torch.testing.assert_close(outputs["last_hidden_state"], expected["last_hidden_state"], atol=0, rtol=0)
    assert torch.equal(outputs["generated"], expected["generated"])
    processed = {key.split(".", 1)[1]: value for key, value in outputs.items() if key.startswith("processed.")}
    assert processed.keys() == expected["inputs"].keys()
    for key, value in expected["inputs"].items():
        assert torch.equal(processed[key], value), key
    assert int((processed["input_ids"] == IMAGE_TOKEN_ID).sum()) > 0
