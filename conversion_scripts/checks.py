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
"""Checks of a written checkpoint: `--verify` (every reloaded tensor equals its source) and `--parity-fixture` (the
converted model against golden outputs of the original code)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from llava_multilayer import LlavaMultiLayerForConditionalGeneration

from .key_rules import KeyMapping, describe_keys
from .reading import ConversionError, load_json
from .writing import CAST_DTYPES, stored_dtypes


def verify_checkpoint(directory: Path, sources: list[tuple[object, KeyMapping]], dtype: str | None) -> int:
    """Reloads the written checkpoint with `from_pretrained` and checks every tensor against its source; returns
    the number of tensors compared.

    The reload must report no missing, unexpected or mismatched keys; each reloaded tensor must equal its source
    (cast to `dtype` when given), and each stored tensor must have the source dtype (or `dtype`).
    """
    from transformers.utils import logging as transformers_logging

    progress = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # the reload is a step of the conversion, not a load to watch
    try:
        model, loading_info = LlavaMultiLayerForConditionalGeneration.from_pretrained(
            directory, dtype="auto", output_loading_info=True
        )
    finally:
        if progress:
            transformers_logging.enable_progress_bar()
    problems = {
        name: sorted(loading_info.get(name) or []) for name in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    problems = {name: keys for name, keys in problems.items() if keys}
    if problems:
        raise ConversionError(f"--verify: reloading {directory} reports {problems}.")
    written_dtypes = stored_dtypes(directory)
    state = model.state_dict()
    target_dtype = CAST_DTYPES.get(dtype) if dtype else None
    mismatched, compared = [], 0
    for reader, mapping in sources:
        for key in reader.keys():
            target = mapping(key)
            if not isinstance(target, str):
                continue
            compared += 1
            source = reader.get_tensor(key)
            if target_dtype is not None and source.is_floating_point():
                source = source.to(target_dtype)
            if (
                target not in state
                or written_dtypes.get(target) != source.dtype
                or state[target].shape != source.shape
                or not torch.equal(state[target], source.to(state[target].dtype))
            ):
                mismatched.append(target)
    if mismatched:
        raise ConversionError(f"--verify: reloaded tensors differ from the source: {describe_keys(mismatched)}.")
    return compared


def fixture_parity_check(fixture_dir: str | os.PathLike) -> Callable[[Path], dict]:
    """A `parity_check` for [`run_conversion`] against golden data produced by the original code.

    The fixture holds `image.png`, `prompt.json` (`prompt`, and `instruction` for instruction-guided models; `_2`
    suffixed keys for a second prompt), `inputs.safetensors` and `expected.safetensors` (`logits`,
    `image_features`, `generated_ids` = `[bos] + new tokens`, optionally `fusion_weights`). Returns the measured
    maximum absolute differences (float32 forward) and whether the greedy tokens are identical.
    """
    from PIL import Image
    from safetensors.torch import load_file

    fixture_dir = Path(fixture_dir)

    def check(model_dir: Path) -> dict:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model_dir)
        model = LlavaMultiLayerForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        prompts = load_json(fixture_dir / "prompt.json")
        inputs = load_file(fixture_dir / "inputs.safetensors")
        expected = load_file(fixture_dir / "expected.safetensors")
        image = Image.open(fixture_dir / "image.png").convert("RGB")
        results = {}
        for suffix in ("", "_2"):
            if "prompt" + suffix not in prompts:
                continue
            extra = {"instructions": [prompts["instruction" + suffix]]} if "instruction" + suffix in prompts else {}
            batch = processor(images=image, text=prompts["prompt" + suffix], return_tensors="pt", **extra)
            original_ids = inputs["input_ids" + suffix][0]
            expanded = []
            for token in original_ids.tolist():
                expanded += [model.config.image_token_id] * model.config.image_seq_length if token == -200 else [token]
            with torch.no_grad():
                output = model(**batch)
                new_tokens = expected["generated_ids" + suffix].shape[1] - 1
                generated = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
            vocab = expected["logits" + suffix].shape[-1]
            name = f"prompt{suffix or '_1'}"
            results[name] = {
                "pixel_values_max_abs_diff": float((batch["pixel_values"] - inputs["pixel_values"]).abs().max()),
                "input_ids_equal": batch["input_ids"][0].tolist() == expanded,
                "image_features_max_abs_diff": float(
                    (output.image_hidden_states - expected["image_features" + suffix]).abs().max()
                ),
                "logits_max_abs_diff": float((output.logits[..., :vocab] - expected["logits" + suffix]).abs().max()),
                "greedy_tokens_equal": generated[0, batch["input_ids"].shape[1] :].tolist()
                == expected["generated_ids" + suffix][0, 1:].tolist(),
            }
            if "fusion_weights" + suffix in expected:
                results[name]["fusion_weights_max_abs_diff"] = float(
                    (output.fusion_weights - expected["fusion_weights" + suffix]).abs().max()
                )
        return results

    return check
