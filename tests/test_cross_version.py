"""Checkpoints cross transformers releases: converted under this environment's transformers, loaded as remote code
(package hidden, offline) under another release, they give the same logits and greedy tokens.

The other release is a second Python environment named by `LLAVA_MULTILAYER_OTHER_PYTHON` (its interpreter); CI
sets it to the lower-bound environment while testing the newest releases, and the other way round.
"""

import json
import os
import subprocess
import textwrap

import pytest
import torch
import transformers
from converted_fixtures import FIXTURES_DIR, HIDE_PACKAGE_SOURCE, LOGITS_ATOL, child_job, fixture_inputs
from safetensors.torch import load_file


OTHER_PYTHON = os.environ.get("LLAVA_MULTILAYER_OTHER_PYTHON")
#: One fixture per family and fusion kind: deformable fuser, internal cross-attention, instruction-guided, SigLIP.
FIXTURES = ["mmfuser-clip", "lsf-I_M-clip-3-18-23", "lsf-I_D-clip-3-18-23", "lsf-E_D-siglip-3-18-23", "igva-clip"]
NEW_TOKENS = 8

pytestmark = pytest.mark.skipif(
    not OTHER_PYTHON,
    reason="needs a second environment with another transformers release: set LLAVA_MULTILAYER_OTHER_PYTHON to its "
    "python (.ci/run does)",
)

CHILD_SCRIPT = HIDE_PACKAGE_SOURCE + textwrap.dedent(
    '''
    import json

    import torch
    import transformers
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(1)
    report = {"transformers": transformers.__version__}
    for job in json.loads(sys.argv[1]):
        model = AutoModelForImageTextToText.from_pretrained(job["dir"], trust_remote_code=True, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(job["dir"], trust_remote_code=True)
        extra = {"instructions": [job["instruction"]]} if job["instruction"] else {}
        image = Image.open(job["image"]).convert("RGB")
        inputs = processor(images=image, text=job["prompt"], return_tensors="pt", **extra)
        with torch.no_grad():
            logits = model(**inputs).logits
            generated = model.generate(**inputs, max_new_tokens=job["new_tokens"], do_sample=False, pad_token_id=0)
        save_file({"logits": logits.contiguous(), "generated": generated.contiguous()}, job["output"])
        report[job["name"]] = type(model).__module__
    report["package_modules"] = sorted(m for m in sys.modules if m.startswith("llava_multilayer"))
    print(json.dumps(report))
    '''
)


@pytest.fixture(scope="module")
def other_release(tmp_path_factory):
    """Runs the other environment once on every converted fixture; returns (report, jobs)."""
    root = tmp_path_factory.mktemp("cross_version")
    jobs = [child_job(name, root / f"{name}.safetensors", new_tokens=NEW_TOKENS) for name in FIXTURES]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "PYTHON"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(root / "hf_home"), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [OTHER_PYTHON, "-I", "-c", CHILD_SCRIPT, json.dumps(jobs)],
        capture_output=True, text=True, env=env, cwd=root, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), {job["name"]: job for job in jobs}


def test_other_environment_runs_another_release_without_the_package(other_release):
    report, _ = other_release
    assert report["transformers"] != transformers.__version__, "both environments have the same transformers"
    assert report["package_modules"] == []
    for name in FIXTURES:
        assert report[name].startswith("transformers_modules."), report[name]


@pytest.mark.parametrize("name", FIXTURES)
def test_checkpoint_reproduces_logits_and_tokens_under_the_other_release(other_release, name):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, jobs = other_release
    model = AutoModelForImageTextToText.from_pretrained(jobs[name]["dir"], dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(jobs[name]["dir"])
    image, prompt, instruction = fixture_inputs(name)
    extra = {"instructions": [instruction]} if instruction else {}
    inputs = processor(images=image, text=prompt, return_tensors="pt", **extra)
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    other = load_file(jobs[name]["output"])
    assert (other["logits"] - logits).abs().max() <= LOGITS_ATOL, name
    assert torch.equal(other["generated"], generated), name
    original = load_file(FIXTURES_DIR / name / "expected.safetensors")["logits"]
    assert (other["logits"][..., : original.shape[-1]] - original).abs().max() <= LOGITS_ATOL, name
