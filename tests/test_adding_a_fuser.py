"""README's "Adding a fusion method", followed to the letter: the example fuser of
`examples/adding_a_fuser/` goes into a copy of the package directory with one registry entry, and the resulting
package saves, loads as remote code, generates, upcycles from a LLaVA model and finetunes with LoRA.

The package copy is built in a temporary directory (its sub-packages are links to the repository's directories, as
`setup.py` maps them) and used by a subprocess, so the installed package and this process's Auto-class registrations
stay untouched. A second, clean subprocess loads the saved checkpoint as Hub remote code.
"""

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from converted_fixtures import HIDE_PACKAGE_SOURCE, offline_child_env
from safetensors.torch import load_file


REPOSITORY = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
EXAMPLE_FUSER = REPOSITORY / "examples" / "adding_a_fuser" / "layer_mix_fusion_llava_multilayer.py"
REGISTRY = "fusion_registry_llava_multilayer.py"
NEW_TOKENS = 4

BUILD_SCRIPT = textwrap.dedent(
    '''
    """With the package copy that holds the `layer_mix` fuser: builds, saves, generates, upcycles, finetunes."""
    import json
    import sys
    from pathlib import Path

    root, tests_dir = Path(sys.argv[1]), sys.argv[2]
    sys.path.insert(1, tests_dir)

    import llava_multilayer

    import torch
    from conftest import load_tokenizer, make_inputs, make_model, processor_for, random_image, vicuna_prompt
    from safetensors.torch import save_file
    from test_finetune import make_records
    from test_upcycling import IMAGE_TOKEN_ID as LLAVA_IMAGE_TOKEN_ID
    from test_upcycling import make_llava

    from llava_multilayer import LlavaMultiLayerForConditionalGeneration
    from llava_multilayer.commands.chat_engine import _fused_layers_description
    from llava_multilayer.commands.finetune import finetune, fully_trained_modules
    from llava_multilayer.upcycling_llava_multilayer import UpcyclingError

    torch.set_num_threads(1)
    report = {"package": llava_multilayer.__file__}
    layers = [1, 2, -2]

    # Build, save (model + processor) and generate.
    model = make_model("layer_mix", vision_feature_layer=layers, seed=3)
    report["projector"] = type(model.model.multi_modal_projector).__name__
    report["mix"] = model.model.multi_modal_projector.mix.item()
    report["no_split_modules"] = sorted(model._no_split_modules)
    report["description"] = _fused_layers_description(model.config)
    report["fully_trained_modules"] = fully_trained_modules(model.config)
    processor = processor_for(model.config, load_tokenizer())
    saved = root / "saved"
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    report["saved_files"] = sorted(path.name for path in saved.iterdir())
    prompts = [vicuna_prompt("What is shown in this image?"), vicuna_prompt("Describe the colours.")]
    inputs = make_inputs(processor, prompts, [random_image(1), random_image(2, (24, 48))])
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=__NEW_TOKENS__, do_sample=False, pad_token_id=0)
    save_file({key: value.contiguous() for key, value in inputs.items()}, saved / "inputs.safetensors")
    save_file({"logits": logits, "generated": generated}, root / "expected.safetensors")

    # Upcycle from a LLaVA model: the new model starts with LLaVA's outputs, the fuser moves them once it mixes.
    llava = make_llava()
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(3, 500, (2, 12), generator=generator)
    image = torch.full((2, llava.config.image_seq_length), LLAVA_IMAGE_TOKEN_ID)
    input_ids = torch.cat([text[:, :4], image, text[:, 4:]], dim=1)
    size = llava.config.vision_config.image_size
    llava_inputs = {"input_ids": input_ids, "pixel_values": torch.randn(2, 3, size, size, generator=generator)}
    from_llava = LlavaMultiLayerForConditionalGeneration.from_llava
    upcycled = from_llava(llava, fusion_type="layer_mix", vision_feature_layer=layers)
    with torch.no_grad():
        llava_logits = llava(**llava_inputs).logits
        report["upcycled_difference"] = (upcycled(**llava_inputs).logits - llava_logits).abs().max().item()
        upcycled.model.multi_modal_projector.mix.fill_(0.5)
        report["mixed_difference"] = (upcycled(**llava_inputs).logits - llava_logits).abs().max().item()
    try:
        from_llava(llava, fusion_type="layer_mix", vision_feature_layer=[1, -1])
        report["upcycling_refusal"] = None
    except UpcyclingError as error:
        report["upcycling_refusal"] = str(error)

    # Finetune with LoRA: the fuser is trained in full (its `mix` too) and the merged checkpoint keeps what it learnt.
    image_folder = root / "images"
    image_folder.mkdir()
    (root / "data.json").write_text(json.dumps(make_records(image_folder, count=4)))
    trainer = finetune(
        saved, root / "data.json", root / "adapter", image_folder=image_folder, lora_r=4, lora_alpha=8,
        lora_dropout=0.0, max_steps=3, learning_rate=1e-2, per_device_batch_size=2, warmup_steps=0,
        lr_scheduler_type="constant", logging_steps=1, save_steps=10, gradient_checkpointing=False,
    )
    trained = {
        name: value.item()
        for name, value in trainer.model.named_parameters()
        if name.endswith(".mix") and value.requires_grad
    }
    report["trained_mix"] = trained
    report["trained_losses"] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    (root / "report.json").write_text(json.dumps(report))
    '''
).replace("__NEW_TOKENS__", str(NEW_TOKENS))

REMOTE_SCRIPT = HIDE_PACKAGE_SOURCE + textwrap.dedent(
    '''
    """Loads the saved `layer_mix` checkpoint as remote code; `llava_multilayer` must not be importable here."""
    import json
    from pathlib import Path

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText

    torch.set_num_threads(1)
    root = Path(sys.argv[1])
    model = AutoModelForImageTextToText.from_pretrained(root / "saved", trust_remote_code=True).eval()
    projector = model.model.multi_modal_projector
    inputs = load_file(root / "saved" / "inputs.safetensors")
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=__NEW_TOKENS__, do_sample=False, pad_token_id=0)
    save_file({"logits": logits, "generated": generated}, root / "remote.safetensors")
    report = {"projector": f"{type(projector).__module__}.{type(projector).__name__}", "mix": projector.mix.item()}
    report["package_loaded"] = any(name.split(".")[0] == "llava_multilayer" for name in sys.modules)
    (root / "remote.json").write_text(json.dumps(report))
    '''
).replace("__NEW_TOKENS__", str(NEW_TOKENS))


def package_dirs() -> dict[str, str]:
    """`setup.py`'s `package_dir`: import package -> repository directory."""
    tree = ast.parse((REPOSITORY / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "package_dir":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no package_dir")


def register_fuser(registry: str, module: str, class_name: str) -> str:
    """The registry source with the fuser's import and its entry in `FUSION_PROJECTORS` (the walkthrough's step 2)."""
    anchor = "\n\n\nFUSION_PROJECTORS"
    assert anchor in registry and "    )\n}" in registry
    registry = registry.replace(anchor, f"\nfrom .{module} import {class_name}{anchor}", 1)
    return registry.replace("    )\n}", f"        {class_name},\n    )\n}}", 1)


def run_python(script: Path, *args: str, env: dict, cwd: Path, isolated: bool = False) -> None:
    command = [sys.executable, *(["-I"] if isolated else []), str(script), *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{script.name} failed:\n{result.stderr[-6000:]}"


@pytest.fixture(scope="module")
def added_fuser(tmp_path_factory):
    """Builds the package copy with the example fuser, runs both subprocesses; returns (root, report, remote)."""
    root = tmp_path_factory.mktemp("adding_a_fuser")
    dirs = package_dirs()
    package = root / "src" / "llava_multilayer"
    package.mkdir(parents=True)
    for source in (REPOSITORY / dirs["llava_multilayer"]).glob("*.py"):
        (package / source.name).write_text(source.read_text())
    for name, directory in dirs.items():
        if name != "llava_multilayer":
            (package / name.split(".", 1)[1]).symlink_to(REPOSITORY / directory, target_is_directory=True)
    # Step 1: the fuser module. Step 2: its registry entry.
    (package / EXAMPLE_FUSER.name).write_text(EXAMPLE_FUSER.read_text())
    registry = (package / REGISTRY).read_text()
    (package / REGISTRY).write_text(register_fuser(registry, EXAMPLE_FUSER.stem, "LayerMixProjector"))

    env = offline_child_env(root, PYTHONPATH=str(root / "src"))
    (root / "build.py").write_text(BUILD_SCRIPT)
    run_python(root / "build.py", str(root), str(TESTS_DIR), env=env, cwd=root)
    env.pop("PYTHONPATH")
    (root / "remote.py").write_text(REMOTE_SCRIPT)
    run_python(root / "remote.py", str(root), env=env, cwd=root, isolated=True)
    report = json.loads((root / "report.json").read_text())
    remote = json.loads((root / "remote.json").read_text())
    return root, report, remote


def test_registry_entry_adds_the_fuser(added_fuser):
    root, report, _ = added_fuser
    assert Path(report["package"]).parent == root / "src" / "llava_multilayer"
    assert report["projector"] == "LayerMixProjector"
    assert report["mix"] != 0.0  # randomised: the fuser's own parameter matters in the checks below
    assert "LayerMixProjector" in report["no_split_modules"]
    assert report["description"] == ["layer mix: vision layer -2 mixed with the mean of layers [1, 2]"]
    assert report["fully_trained_modules"] == ["model.multi_modal_projector"]
    # save_pretrained copies the fuser's module with the remote code (the registry imports it).
    assert EXAMPLE_FUSER.name in report["saved_files"] and REGISTRY in report["saved_files"]


def test_loads_as_remote_code_and_generates_the_same(added_fuser):
    root, report, remote = added_fuser
    module, _, name = remote["projector"].rpartition(".")
    assert module.startswith("transformers_modules.") and name == "LayerMixProjector"
    assert remote["package_loaded"] is False
    assert remote["mix"] == report["mix"]
    expected, loaded = load_file(root / "expected.safetensors"), load_file(root / "remote.safetensors")
    torch.testing.assert_close(loaded["logits"], expected["logits"], atol=0, rtol=0)
    assert torch.equal(loaded["generated"], expected["generated"])
    assert expected["generated"].shape[1] > load_file(root / "saved" / "inputs.safetensors")["input_ids"].shape[1]


def test_upcycles_from_llava(added_fuser):
    _, report, _ = added_fuser
    assert report["upcycled_difference"] < 1e-5
    assert report["mixed_difference"] > 1e-3  # the equality above is not vacuous
    assert report["upcycling_refusal"] is not None and "is not LLaVA's layer" in report["upcycling_refusal"]


def test_finetunes_the_fuser_in_full(added_fuser):
    _, report, _ = added_fuser
    (name, trained_mix), = report["trained_mix"].items()
    assert "modules_to_save" in name  # peft trains the whole fuser, its bare parameter included
    assert trained_mix != report["mix"]
    assert len(report["trained_losses"]) == 3 and all(loss > 0 for loss in report["trained_losses"])
