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
"""One loaded model answering OpenAI-style chat conversations: what the HTTP server and the web demo share.

A conversation is a list of OpenAI chat messages (`{"role": "user", "content": [{"type": "text", ...},
{"type": "image_url", "image_url": {"url": ...}}]}`); [`ChatEngine.prepare`] turns it into the model inputs with the
processor's chat template (`vicuna_v1`), [`ChatEngine.stream`] generates the answer piece by piece. Bad requests
raise [`RequestError`], which names the offending field.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


#: Roles a conversation may contain.
ROLES = ("system", "user", "assistant")

#: Environment variables that make the server refuse to fetch images from the network.
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

#: Seconds allowed to download an http(s) image.
IMAGE_DOWNLOAD_TIMEOUT = 10


class RequestError(ValueError):
    """A request the model cannot answer; `param` names the field, `status` is the HTTP status to reply with."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


@dataclass
class PreparedRequest:
    """The model inputs of one conversation, with the prompt and (IGVA) instruction they were built from."""

    prompt: str
    inputs: object  # transformers.BatchFeature
    num_images: int
    instruction: str | None = None


@dataclass
class Completion:
    """What [`ChatEngine.stream`] leaves once its iterator is exhausted."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "stop"
    prompt_tokens: int = 0


def is_offline() -> bool:
    """Whether the Hugging Face offline switches are set (then images are never downloaded)."""
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on") for name in OFFLINE_ENV)


def load_image_url(url: str, param: str):
    """The RGB image of an OpenAI `image_url`: a `data:image/...;base64,` URL or, when online, an http(s) URL."""
    from PIL import Image, UnidentifiedImageError

    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64") or not payload:
            raise RequestError(
                f"{param} must be a base64 data URL (data:image/png;base64,...), got one starting {url[:40]!r}.", param
            )
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise RequestError(f"{param} is not valid base64 ({error}).", param) from error
    elif url.startswith(("http://", "https://")):
        if is_offline():
            raise RequestError(
                f"{param} is an http(s) URL, but this server runs offline (HF_HUB_OFFLINE=1) and cannot download it: "
                "send the image inline as a data URL (data:image/png;base64,...).",
                param,
            )
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=IMAGE_DOWNLOAD_TIMEOUT) as response:  # noqa: S310 (http(s) only)
                data = response.read()
        except OSError as error:
            raise RequestError(f"{param}: could not download {url} ({error}).", param) from error
    else:
        raise RequestError(
            f"{param} must be a data URL (data:image/png;base64,...) or an http(s) URL, got {url[:40]!r}.", param
        )
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise RequestError(f"{param} does not hold an image PIL can read ({error}).", param) from error


def _content_parts(content, param: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RequestError(
            f"{param} must be a string or a list of content parts, got {type(content).__name__}.", param
        )
    return content


def to_chat_template_messages(messages) -> tuple[list[dict], list]:
    """OpenAI chat messages -> (messages for `processor.apply_chat_template`, images in placeholder order).

    Images are loaded here (see [`load_image_url`]); the chat template puts each message's images before its text.
    """
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` must be a non-empty list of chat messages.", "messages")
    converted, images = [], []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(f"{param} must be an object with `role` and `content`.", param)
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"{param}.role must be one of {', '.join(ROLES)}, got {role!r}.", f"{param}.role")
        parts = []
        for part_index, part in enumerate(_content_parts(message.get("content"), f"{param}.content")):
            part_param = f"{param}.content[{part_index}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise RequestError(f"{part_param}.text must be a string.", f"{part_param}.text")
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                if role != "user":
                    raise RequestError(f"{part_param}: only user messages may contain images, not {role}.", part_param)
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                if not isinstance(url, str):
                    raise RequestError(
                        f"{part_param}.image_url must be {{'url': 'data:image/...;base64,...'}}.",
                        f"{part_param}.image_url",
                    )
                images.append(load_image_url(url, f"{part_param}.image_url.url"))
                parts.append({"type": "image"})
            else:
                raise RequestError(
                    f"{part_param}.type must be 'text' or 'image_url', got {kind!r}.", f"{part_param}.type"
                )
        if role == "system" and index != 0:
            raise RequestError(f"{param}: a system message may only come first.", f"{param}.role")
        converted.append({"role": role, "content": parts})
    if converted[-1]["role"] != "user":
        raise RequestError("The last message must come from the user (the model answers it).", "messages")
    return converted, images


def _fused_layers_description(config) -> list[str]:
    """Human-readable lines saying which vision layers the model fuses, and how (from its config)."""
    from llava_multilayer.fusion_registry_llava_multilayer import fusion_projector_class
    from llava_multilayer.internal_fusion_llava_multilayer import internal_fusion_layer_class

    lines = [fusion_projector_class(config.fusion_type).describe(config)]
    if config.internal_fusion_type is not None:
        verb = internal_fusion_layer_class(config.internal_fusion_type).verb
        pairs = ", ".join(
            f"layer {config.internal_feature_layers[feature]} -> decoder layer {decoder}"
            for decoder, feature in config.internal_layer_map
        )
        lines.append(f"internal fusion: vision features {verb} decoder layers ({pairs})")
    return lines


class ChatEngine:
    """A model and its processor answering chat conversations, one generation at a time (thread-safe).

    Args:
        model: a loaded `LlavaMultiLayerForConditionalGeneration` (in eval mode).
        processor: its `LlavaMultiLayerProcessor` (or the instruction processor of IGVA models).
        name: the model name the server announces.
        default_max_tokens: answer length when a request sets none.
    """

    def __init__(self, model, processor, name: str, default_max_tokens: int = 256):
        self.model = model
        self.processor = processor
        self.name = name
        self.default_max_tokens = default_max_tokens
        self._lock = threading.Lock()

    @property
    def uses_instructions(self) -> bool:
        """Whether the model weights its vision layers by the instruction (IGVA with an aggregator)."""
        return getattr(self.processor, "instruction_tokenizer", None) is not None

    @property
    def fused_layers(self) -> list[str]:
        """Which vision layers the model fuses, one line per fusion stage."""
        return _fused_layers_description(self.model.config)

    @property
    def layer_group_labels(self) -> list[str]:
        """One label per fused layer group of fusers that weight them (IGVA); empty for the others."""
        from llava_multilayer.fusion_registry_llava_multilayer import fusion_projector_class

        config = self.model.config
        return fusion_projector_class(config.fusion_type).fusion_weight_labels(config)

    def prepare(self, messages) -> PreparedRequest:
        """Validates OpenAI chat `messages` and builds the model inputs (prompt from the chat template; for IGVA
        the instruction is the last user turn, by the processor's `instruction_from_prompt`)."""
        template_messages, images = to_chat_template_messages(messages)
        prompt = self.processor.apply_chat_template(template_messages, add_generation_prompt=True)
        kwargs = {}
        instruction = None
        if self.uses_instructions and images:
            try:
                instruction = self.processor.instruction_from_prompt(prompt)
            except ValueError as error:
                raise RequestError(
                    f"This instruction-guided (IGVA) model weights its vision layers by the last user message's text, "
                    f"which is empty ({error}).",
                    "messages",
                ) from error
            kwargs["instructions"] = [instruction]
        try:
            inputs = self.processor(images=images or None, text=prompt, return_tensors="pt", **kwargs)
        except ValueError as error:
            raise RequestError(f"The processor refused the conversation: {error}", "messages") from error
        return PreparedRequest(prompt=prompt, inputs=inputs, num_images=len(images), instruction=instruction)

    def fusion_weights(self, prepared: PreparedRequest) -> list[list[float]] | None:
        """The layer-group weights of each image of `prepared`, `(num_images, num_groups)`, for fusers that weight
        their layer groups (IGVA); else `None`."""
        import torch

        inputs = prepared.inputs
        if not self.layer_group_labels or "pixel_values" not in inputs:
            return None
        kwargs = {key: inputs[key].to(self.model.device) for key in inputs if key.startswith("instruction_")}
        with self._lock, torch.inference_mode():
            features = self.model.get_image_features(inputs["pixel_values"].to(self.model.device), **kwargs)
        return features.fusion_weights.float().cpu().tolist()

    def decoding_arguments(self, max_tokens: int | None, temperature: float | None, top_p: float | None) -> dict:
        """`generate` arguments for OpenAI's `max_tokens`, `temperature` (0: greedy) and `top_p`; what is not given
        comes from the checkpoint's generation config."""
        arguments = {"max_new_tokens": max_tokens if max_tokens is not None else self.default_max_tokens}
        if temperature is not None:
            arguments["do_sample"] = temperature > 0
            if temperature > 0:
                arguments["temperature"] = temperature
        if top_p is not None and arguments.get("do_sample", self.model.generation_config.do_sample):
            arguments["top_p"] = top_p
        return arguments

    def stream(
        self, prepared: PreparedRequest, completion: Completion, seed: int | None = None, **decoding
    ) -> Iterator[str]:
        """Generates the answer to `prepared`, yielding the decoded text as it grows; `completion` receives the
        generated token ids, the whole text and the finish reason ("stop" or "length") once the iterator ends.
        Closing the iterator early stops the generation at the next token."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer, set_seed

        cancelled = threading.Event()

        class StopWhenCancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool)

        streamer = TextIteratorStreamer(
            self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600
        )
        inputs = prepared.inputs.to(self.model.device)
        prompt_length = inputs["input_ids"].shape[1]
        completion.prompt_tokens = prompt_length
        failure: list[BaseException] = []

        def run():
            try:
                with torch.inference_mode():
                    output = self.model.generate(
                        **inputs,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([StopWhenCancelled()]),
                        **decoding,
                    )
                completion.token_ids = output[0, prompt_length:].tolist()
            except BaseException as error:  # re-raised in the consuming thread
                failure.append(error)
                streamer.end()

        with self._lock:
            if seed is not None:
                set_seed(seed)
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            try:
                yield from streamer
            finally:  # also when the consumer stops early (a client that hung up): end the generation
                cancelled.set()
                worker.join()
        if failure:
            raise failure[0]
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        ended = bool(completion.token_ids) and completion.token_ids[-1] in eos_ids
        reached_limit = len(completion.token_ids) >= decoding.get("max_new_tokens", float("inf"))
        completion.finish_reason = "length" if reached_limit and not ended else "stop"
        completion.text = self.processor.decode(completion.token_ids, skip_special_tokens=True)

    def complete(self, prepared: PreparedRequest, seed: int | None = None, **decoding) -> Completion:
        """[`stream`] to the end: the whole answer."""
        completion = Completion()
        for _ in self.stream(prepared, completion, seed=seed, **decoding):
            pass
        return completion


__all__ = [
    "ChatEngine",
    "Completion",
    "PreparedRequest",
    "RequestError",
    "load_image_url",
    "to_chat_template_messages",
]
