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
"""The lmms-eval adapter of llava-multilayer models: `lmms-eval --model llava_multilayer --model_args pretrained=DIR`.

`--model_args` (comma-separated `key=value`): `pretrained` (converted directory or Hub id), `revision`, `dtype`
(`auto`, `float32`, `bfloat16`, `float16`), `device_map`, `attn_implementation`, `load_in_4bit` / `load_in_8bit`,
`instruction_field` (IGVA: the document field whose text is the instruction; default: the prompt's question text)
and `loglikelihood` (`logprob`: the summed log-probability of the continuation, lmms-eval's documented contract;
`loss`: its negation, for lmms-eval's `multiple_choice` scoring, which takes the choice of *lowest* value).

Every prompt is wrapped in the checkpoint's chat template (`processor.apply_chat_template`, the `vicuna_v1` format of
the originals), with one `<image>` per visual of the document before the text unless the text places them itself.
Batches are padded on the left, with positions counted from each row's first token (as `generate` counts them), so a
document scores the same alone or in a batch. Under `accelerate launch` every process loads the model on its own GPU
and lmms-eval gives each process its share of the documents, as with lmms-eval's `llava_hf`.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from lmms_eval import utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm
from transformers import AutoConfig

import llava_multilayer  # noqa: F401  (registers the model family with the Auto classes)

from ..commands.generate import quantization_config


#: What `generate_until` does when a task does not say.
DEFAULT_MAX_NEW_TOKENS = 1024
#: Decoding keys of lmms-eval's `generation_kwargs` passed on to `generate`.
DECODING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample", "repetition_penalty")
#: Keys that lmms-eval tasks set for other adapters' preprocessing; these checkpoints always preprocess as they were
#: trained (LLaVA-1.5's padding to a square), so the key changes nothing.
IGNORED_KEYS = ("image_aspect_ratio",)
LOGLIKELIHOOD_MODES = ("logprob", "loss")
#: Between the context and a `loglikelihood` task's target (lmms-eval's default `target_delimiter`).
TARGET_DELIMITER = " "
DTYPES = ("auto", "float32", "bfloat16", "float16")


class LlavaMultiLayerLmms(lmms):
    """lmms-eval model `llava_multilayer`: `generate_until` and `loglikelihood` for MMFuser, Layer_Select_Fuse and
    IGVA checkpoints (converted or trained with this package)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        revision: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        device_map: str | None = None,
        attn_implementation: str | None = None,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        instruction_field: str | None = None,
        loglikelihood: str = "logprob",
        **unknown,
    ) -> None:
        super().__init__()
        _check_arguments(unknown, dtype, batch_size, max_batch_size, loglikelihood, load_in_4bit, load_in_8bit)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.accelerator = Accelerator()
        data_parallel = self.accelerator.num_processes > 1
        if data_parallel and device_map is not None:
            raise ValueError(
                f"device_map: expected none under `accelerate launch` with {self.accelerator.num_processes} "
                f"processes (each process holds the whole model on its own GPU), found {device_map!r}. Drop "
                "device_map, or run one process to shard the model over the GPUs."
            )
        if data_parallel:
            self._device = self.accelerator.device
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        quantization = quantization_config(
            argparse.Namespace(load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit, dtype=dtype),
            AutoConfig.from_pretrained(pretrained, revision=revision),
        )
        self._model = AutoModelForImageTextToText.from_pretrained(
            pretrained,
            revision=revision,
            dtype=dtype if dtype == "auto" else getattr(torch, dtype),
            device_map=device_map if device_map is not None else str(self._device),
            attn_implementation=attn_implementation,
            quantization_config=quantization,
        ).eval()
        self._model.generation_config.max_length = None  # answers are bounded by max_new_tokens
        self.processor = AutoProcessor.from_pretrained(pretrained, revision=revision)
        self.uses_instructions = getattr(self.processor, "instruction_tokenizer", None) is not None
        if instruction_field is not None and not self.uses_instructions:
            raise ValueError(
                f"instruction_field: expected only with an instruction-guided (IGVA) model, found "
                f"{instruction_field!r} for {pretrained}, whose processor has no instruction tokenizer. Drop it."
            )
        self.instruction_field = instruction_field
        self.loglikelihood_mode = loglikelihood
        self.batch_size_per_gpu = int(batch_size)
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes

    @property
    def model(self):
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    # ----------------------------------------------------------------------------------------------------------
    # Prompts
    # ----------------------------------------------------------------------------------------------------------

    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual, doc: dict) -> list[Image.Image]:
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        visuals = [visual for visual in (visuals or []) if visual is not None]
        for visual in visuals:
            if not isinstance(visual, Image.Image):
                raise ValueError(
                    f"doc_to_visual: expected PIL images (llava-multilayer models read images only), found "
                    f"{type(visual).__name__}. Evaluate this model on image tasks."
                )
        return [visual.convert("RGB") for visual in visuals]

    def prompt(self, context: str, num_images: int) -> str:
        """`context` as one user turn of the chat template, with `num_images` placeholders before it unless it
        places them itself; ends with the assistant's prefix."""
        image_token = self.processor.image_token
        placed = context.count(image_token)
        if placed not in (0, num_images):
            raise ValueError(
                f"doc_to_text: expected no {image_token!r} placeholder or one per image ({num_images}), found "
                f"{placed} in {context!r}."
            )
        content = [] if placed else [{"type": "image"}] * num_images
        content.append({"type": "text", "text": context})
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def instruction(self, context: str, doc: dict) -> str:
        """IGVA: the text that weights the vision layers: `doc[instruction_field]`, else the question text."""
        if self.instruction_field is None:
            return context.replace(self.processor.image_token, "").strip()
        if self.instruction_field not in doc:
            raise ValueError(
                f"instruction_field: expected a field of the task's documents ({', '.join(sorted(doc))}), found "
                f"{self.instruction_field!r}."
            )
        return str(doc[self.instruction_field])

    def inputs(self, texts: list[str], images: list[list[Image.Image]], instructions: list[str] | None):
        """The processor's left-padded batch of `texts` with their images (and IGVA instructions), on the device."""
        flat_images = [image for row in images for image in row]
        kwargs = {"instructions": instructions} if instructions is not None else {}
        batch = self.processor(
            images=flat_images or None, text=texts, padding=True, padding_side="left", return_tensors="pt", **kwargs
        )
        return batch.to(self.model.device)

    # ----------------------------------------------------------------------------------------------------------
    # Requests
    # ----------------------------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers, batched by identical generation arguments; each is cut at its first stop string (`until`)."""
        collator = utils.Collator(
            [request.args for request in requests], lambda args: (-len(args[0]), args[0]), grouping=True
        )
        answers = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="llava_multilayer generate_until")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_gen_kwargs, doc_to_visuals, doc_ids, tasks, splits = zip(*chunk)
            docs = [self._doc(task, split, doc_id) for task, split, doc_id in zip(tasks, splits, doc_ids)]
            images = [self._visuals(fn, doc) for fn, doc in zip(doc_to_visuals, docs)]
            until, decoding = self.decoding(all_gen_kwargs[0])
            texts = [self.prompt(context, len(row)) for context, row in zip(contexts, images)]
            instructions = (
                [self.instruction(context, doc) for context, doc in zip(contexts, docs)]
                if self.uses_instructions
                else None
            )
            batch = self.inputs(texts, images, instructions)
            if until:
                decoding.update(stop_strings=until, tokenizer=self.tokenizer)
            with torch.inference_mode():
                output = self.model.generate(**batch, **decoding)
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            for context, text in zip(contexts, self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                for stop in until:
                    text = text.split(stop)[0]
                answers.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_gen_kwargs[0]), text)
            progress.update(len(chunk))
        progress.close()
        return collator.get_original(answers)

    def decoding(self, gen_kwargs: dict) -> tuple[list[str], dict]:
        """lmms-eval's `generation_kwargs` as (stop strings, `generate` keyword arguments)."""
        unknown = sorted(set(gen_kwargs) - {"until", *DECODING_KEYS, *IGNORED_KEYS})
        if unknown:
            raise ValueError(
                f"generation_kwargs: expected keys among until, {', '.join(DECODING_KEYS)}, found {unknown}."
            )
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        decoding = {key: gen_kwargs[key] for key in DECODING_KEYS if gen_kwargs.get(key) is not None}
        decoding.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        decoding["do_sample"] = bool(decoding.get("do_sample")) or decoding.get("temperature", 0) > 0
        if not decoding["do_sample"]:
            for key in ("temperature", "top_p", "top_k"):
                decoding.pop(key, None)
        elif decoding.get("temperature") == 0:
            decoding.pop("temperature")
        return until, decoding

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(summed log-probability of the continuation's tokens given the context, whether greedy decoding would
        produce exactly those tokens) per request; the value is negated with `loglikelihood=loss`."""
        results = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="llava_multilayer loglikelihood")
        for start in range(0, len(requests), self.batch_size):
            chunk = [request.args for request in requests[start : start + self.batch_size]]
            results.extend(self._loglikelihood_batch(chunk))
            progress.update(len(chunk))
        progress.close()
        return results

    def _loglikelihood_batch(self, chunk: list[tuple]) -> list[tuple[float, bool]]:
        contexts, prompts, fulls, images, instructions = [], [], [], [], []
        for context, continuation, doc_to_visual, doc_id, task, split in chunk:
            doc = self._doc(task, split, doc_id)
            if not isinstance(continuation, str):
                # `loglikelihood` tasks pass their doc_to_target; lmms-eval's default target_delimiter joins it
                # (`multiple_choice` requests carry the delimiter already).
                continuation = TARGET_DELIMITER + str(continuation(doc))
            row = self._visuals(doc_to_visual, doc)
            prompt = self.prompt(context, len(row))
            contexts.append(context)
            prompts.append(prompt)
            fulls.append(prompt + continuation)
            images.append(row)
            instructions.append(self.instruction(context, doc))
        instructions = instructions if self.uses_instructions else None
        full = self.inputs(fulls, images, instructions)
        prompt = self.inputs(prompts, images, instructions)
        prompt_lengths = prompt["attention_mask"].sum(dim=1)
        continuation_lengths = full["attention_mask"].sum(dim=1) - prompt_lengths
        # Positions count from each row's first real token, as `generate` counts them: left padding must not move
        # them (I_M's cross-attention lets a text position see only the visual tokens up to it).
        position_ids = (full["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = self.model(**full, position_ids=position_ids).logits
        results = []
        for row, length in enumerate(continuation_lengths.tolist()):
            if length <= 0:
                raise ValueError(
                    f"continuation: expected at least one token after the context, found none for {contexts[row]!r}."
                )
            end, start = full["input_ids"].shape[1] - length, prompt["input_ids"].shape[1] - prompt_lengths[row]
            if not torch.equal(
                full["input_ids"][row, end - prompt_lengths[row] : end], prompt["input_ids"][row, start:]
            ):
                raise ValueError(
                    f"continuation: expected text whose tokens follow the context's unchanged, found {fulls[row]!r}, "
                    "whose tokens merge across the boundary; start the continuation with a space (target_delimiter)."
                )
            targets = full["input_ids"][row, end:]
            log_probs = torch.log_softmax(logits[row, -length - 1 : -1].float(), dim=-1)
            total = log_probs.gather(-1, targets[:, None]).sum().item()
            is_greedy = bool((log_probs.argmax(dim=-1) == targets).all())
            results.append((-total if self.loglikelihood_mode == "loss" else total, is_greedy))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "generate_until_multi_round: llava_multilayer evaluates single-round tasks (generate_until, "
            "loglikelihood, multiple_choice); this task asks for multi-round generation."
        )


def _check_arguments(
    unknown: dict,
    dtype: str,
    batch_size: int | str,
    max_batch_size: int | None,
    loglikelihood: str,
    load_in_4bit: bool,
    load_in_8bit: bool,
) -> None:
    """Refuses model arguments the adapter does not support, naming each one (before anything is loaded)."""
    if unknown:
        raise TypeError(
            f"model_args: expected keys among pretrained, revision, device, dtype, batch_size, device_map, "
            f"attn_implementation, load_in_4bit, load_in_8bit, instruction_field, loglikelihood; found "
            f"{sorted(unknown)}."
        )
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, found {dtype!r}.")
    if not str(batch_size).isdigit() or int(batch_size) < 1:
        raise ValueError(f"batch_size: expected a positive integer (no 'auto'), found {batch_size!r}.")
    if max_batch_size is not None:
        raise ValueError(f"max_batch_size: expected none (it bounds batch_size=auto), found {max_batch_size!r}.")
    if loglikelihood not in LOGLIKELIHOOD_MODES:
        raise ValueError(f"loglikelihood: expected one of {', '.join(LOGLIKELIHOOD_MODES)}, found {loglikelihood!r}.")
    if load_in_4bit and load_in_8bit:
        raise ValueError("load_in_4bit, load_in_8bit: expected at most one of them, found both set.")


__all__ = ["LlavaMultiLayerLmms"]
