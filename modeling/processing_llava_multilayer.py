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
"""Processor of LLaVA models with multi-layer visual feature fusion."""

from typing import Unpack

import numpy as np
from PIL import Image
from transformers import BatchFeature, ProcessorMixin
from transformers.image_utils import ImageInput
from transformers.processing_utils import MultiModalData, ProcessingKwargs
from transformers.tokenization_utils_base import TextInput
from transformers.utils import logging

from .compatibility_llava_multilayer import make_flat_list_of_images
from .tokenization_llava_multilayer import add_image_token, follows_image_token_rule


logger = logging.get_logger(__name__)


VICUNA_V1_SYSTEM_MESSAGE = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# LLaVA-1.5's `vicuna_v1` conversation (separator style TWO, sep " ", sep2 "</s>"), used by MMFuser,
# Layer_Select_Fuse and IGVA: "{system} USER: <image>\n{question} ASSISTANT: {answer}</s>USER: ..."
VICUNA_V1_CHAT_TEMPLATE = (
    "{%- set system_message = '" + VICUNA_V1_SYSTEM_MESSAGE.replace("'", "\\'") + "' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set system_message = messages[0]['content'] -%}"
    "{%- else -%}{%- set system_message = messages[0]['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- endif -%}"
    "{{- system_message + ' ' -}}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
    "{%- endif -%}{{- ' ' -}}"
    "{%- else -%}{{- 'ASSISTANT: ' -}}{% generation %}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
    "{%- endif -%}{{- '</s>' -}}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# PIL modes holding 16-bit samples ("I" is what 16-bit PNGs open as in older Pillow versions).
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(image):
    """Converts one image to 8-bit RGB the way the original codebases read images (`Image.open(path).convert("RGB")`).

    PIL images of any mode go through `convert("RGB")`: grayscale is replicated, palette images are expanded,
    CMYK is converted with PIL's formula, and transparency is dropped (not composited onto a background). 16-bit
    images (PIL modes `I;16*` and `I`, numpy arrays and tensors of dtype uint16) are first scaled to 8 bits,
    `round(value / 257)`, so that 65535 becomes 255 instead of every value above 255 saturating to white. 32-bit
    float (`F`) images are taken as 0-255 values, as PIL does. Other arrays and tensors are returned unchanged.
    """
    if isinstance(image, Image.Image):
        if image.mode in _SIXTEEN_BIT_MODES:
            scaled = np.rint(np.asarray(image, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8)
            image = Image.fromarray(scaled)
        return image if image.mode == "RGB" else image.convert("RGB")
    if str(getattr(image, "dtype", "")).removeprefix("torch.") == "uint16":
        return np.rint(np.asarray(image, dtype=np.float64) / 257).astype(np.uint8)
    return image


class LlavaMultiLayerProcessorKwargs(ProcessingKwargs, total=False):
    _defaults = {"text_kwargs": {"padding": True}}


class LlavaMultiLayerProcessor(ProcessorMixin):
    r"""
    Image processor + tokenizer of a multi-layer fusion LLaVA model.

    It converts images to 8-bit RGB as the original codebases read them (see [`to_rgb`]: transparency dropped, 16-bit
    images scaled to 8 bits), pads them to a square with the mean colour (LLaVA-1.5's `image_aspect_ratio="pad"`, via
    the image processor's `do_pad`) and expands each `<image>` into the number of visual tokens the model splices in;
    everything else is transformers' `ProcessorMixin.__call__` (call-time kwargs, `text_replacement_offsets`, saved
    tokenizer defaults). The tokenizer carries the original codebases' tokenization rule (each chunk after an
    `<image>` is tokenized as the start of a new text, see [`add_image_token`]), so tokenizing the expanded prompt in
    one call gives the ids of their `tokenizer_image_token`. The default chat template reproduces the `vicuna_v1`
    conversation format the original models were trained with. `from_pretrained` (and `AutoProcessor`) load the class
    the checkpoint's `processor_config.json` names: an instruction-guided checkpoint loads as
    [`LlavaMultiLayerInstructionProcessor`].

    Args:
        image_processor ([`LlavaImageProcessorPil`] or any image processor):
            Prepares images; set `do_pad=True` for LLaVA-1.5's pad-to-square.
        tokenizer ([`PreTrainedTokenizerBase`]):
            The language model's tokenizer with the image token and its rule ([`add_image_token`]).
        patch_size (`int`):
            Patch size of the vision tower.
        vision_feature_select_strategy (`str`, *optional*, defaults to `"default"`):
            `"default"` drops the first vision token (must match the model config).
        chat_template (`str`, *optional*):
            Jinja chat template; defaults to `vicuna_v1`.
        image_token (`str`, *optional*, defaults to `"<image>"`):
            The image placeholder in prompts.
        num_additional_image_tokens (`int`, *optional*, defaults to 0):
            Extra tokens the vision tower emits besides patches (1 for CLIP's CLS).
    """

    valid_processor_kwargs = LlavaMultiLayerProcessorKwargs

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy="default",
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=0,
        **kwargs,
    ):
        if tokenizer is not None:
            tokenizer = _with_image_token_rule(tokenizer, image_token)
        self.patch_size = patch_size
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.num_additional_image_tokens = num_additional_image_tokens
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token) if tokenizer is not None else None
        if chat_template is None:
            chat_template = VICUNA_V1_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # `from_pretrained` loads the sub-processors (the instruction tokenizer of IGVA checkpoints) of the class the
        # checkpoint's `processor_config.json` names, when that class specializes `cls`.
        processor_class = _saved_subclass(cls, processor_dict)
        if processor_class is not cls:
            return processor_class._get_arguments_from_pretrained(
                pretrained_model_name_or_path, processor_dict, **kwargs
            )
        return super()._get_arguments_from_pretrained(pretrained_model_name_or_path, processor_dict, **kwargs)

    @classmethod
    def from_args_and_dict(cls, args, processor_dict: dict, **kwargs):
        processor_class = _saved_subclass(cls, processor_dict)
        if processor_class is not cls:
            return processor_class.from_args_and_dict(args, processor_dict, **kwargs)
        return super().from_args_and_dict(args, processor_dict, **kwargs)

    def num_image_tokens(self, height: int, width: int) -> int:
        """Number of visual tokens for a preprocessed image of `height x width` pixels."""
        if not self.patch_size:
            raise ValueError("The processor needs `patch_size` to count image tokens.")
        count = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        return count - 1 if self.vision_feature_select_strategy == "default" else count

    def _processed_image_size(self, height: int, width: int, **images_kwargs) -> tuple[int, int]:
        """`(height, width)` of an image of `height x width` pixels after the image processor."""
        settings = {
            key: images_kwargs.get(key) if images_kwargs.get(key) is not None else getattr(self.image_processor, key)
            for key in ("do_pad", "size", "do_center_crop", "crop_size")
        }
        if settings["do_pad"]:
            height = width = max(height, width)
        if settings["do_center_crop"] and settings["crop_size"] is not None:
            return settings["crop_size"]["height"], settings["crop_size"]["width"]
        size = settings["size"]
        if "height" in size and "width" in size:
            return size["height"], size["width"]
        shortest_edge = size["shortest_edge"]
        scale = shortest_edge / min(height, width)
        return (shortest_edge, int(width * scale)) if height <= width else (int(height * scale), shortest_edge)

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Visual tokens per image of the given `(height, width)` sizes (what vLLM asks to plan its memory)."""
        vision_data = {}
        if image_sizes is not None:
            images_kwargs = {**LlavaMultiLayerProcessorKwargs._defaults.get("images_kwargs", {}), **kwargs}
            num_image_tokens = [
                self.num_image_tokens(*self._processed_image_size(height, width, **images_kwargs))
                for height, width in image_sizes
            ]
            vision_data = {"num_image_tokens": num_image_tokens, "num_image_patches": [1] * len(image_sizes)}
        return MultiModalData(**vision_data)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Clear errors for what this processor cannot process: no text, empty prompts or images, a number of images
        that differs from the number of placeholders. (Truncation that cuts through image tokens is refused by
        `ProcessorMixin` after tokenizing.)"""
        for key, value in (("videos", videos), ("audio", audio)):
            if value is not None:
                raise ValueError(f"{type(self).__name__} does not process {key}.")
        if text is None:
            raise ValueError("`text` is required: pass the prompt(s), with one `<image>` per image.")
        prompts = [text] if isinstance(text, str) else text
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"`text` must be a string or a non-empty list of strings, got {type(text).__name__}.")
        for index, prompt in enumerate(prompts):
            if not prompt.strip():
                raise ValueError(f"Prompt {index} is empty.")
        counts = [prompt.count(self.image_token) for prompt in prompts]
        flat_images = make_flat_list_of_images(images) if images is not None else []
        if sum(counts) != len(flat_images):
            raise ValueError(
                f"The total number of {self.image_token} tokens in the prompts should be the same as the number of "
                f"images: the prompts contain {sum(counts)} {self.image_token!r} placeholder(s) (per prompt: "
                f"{counts}) but {len(flat_images)} image(s) were given; pass exactly one image per placeholder."
            )
        for index, image in enumerate(flat_images):
            size = image.shape if hasattr(image, "shape") else getattr(image, "size", None)
            if size is not None and 0 in tuple(size):
                raise ValueError(f"Image {index} is empty (size {tuple(size)}).")

    def _merge_kwargs(self, ModelProcessorKwargs=None, tokenizer_init_kwargs=None, **kwargs):  # noqa: N803
        # transformers only warns about an argument no sub-processor takes; a misspelt option would be ignored.
        unknown = sorted(set(kwargs) - self._valid_call_kwargs(ModelProcessorKwargs or self.valid_processor_kwargs))
        if unknown:
            raise TypeError(f"{type(self).__name__}.__call__ got unexpected arguments: {unknown}.")
        return super()._merge_kwargs(ModelProcessorKwargs, tokenizer_init_kwargs=tokenizer_init_kwargs, **kwargs)

    def _valid_call_kwargs(self, processor_kwargs) -> set[str]:
        """The names `__call__` accepts: the kwargs TypedDicts' and the sub-processors' own options."""
        names = {*processor_kwargs.__annotations__, "common_kwargs", "text", "images", "videos", "audio"}
        for modality in ("text_kwargs", "images_kwargs", "videos_kwargs", "audio_kwargs"):
            names |= set(processor_kwargs.__annotations__[modality].__annotations__)
        valid_kwargs = getattr(self.image_processor, "valid_kwargs", None)
        names |= set(getattr(valid_kwargs, "__annotations__", {}))
        return names

    def _process_images(self, images, **kwargs):
        return super()._process_images([to_rgb(image) for image in make_flat_list_of_images(images)], **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """The text an `<image>` expands into: one image token per visual token."""
        height, width = np.asarray(image_inputs["pixel_values"][image_idx]).shape[-2:]
        return self.image_token * self.num_image_tokens(height, width)

    def __call__(
        self,
        images: ImageInput | None = None,
        text: TextInput | list[TextInput] | None = None,
        **kwargs: Unpack[LlavaMultiLayerProcessorKwargs],
    ) -> BatchFeature:
        """
        Prepares `pixel_values`, `input_ids` and `attention_mask`.

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, path or URL, or a (nested) list, *optional*):
                The images, in the order of the `<image>` placeholders across all prompts. Any PIL mode is accepted
                and converted to RGB by [`to_rgb`] (16-bit images are scaled to 8 bits).
            text (`str` or `list[str]`):
                The prompt(s); each `<image>` is expanded into the image's visual tokens.
            kwargs: transformers' processor kwargs (`return_tensors`, `padding` (defaults to `True`),
                `padding_side`, `return_offsets_mapping`, `return_text_replacement_offsets`, image processor
                options, or nested `text_kwargs` / `images_kwargs` / `common_kwargs`).
        """
        return super().__call__(images=images, text=text, **kwargs)

    def to_dict(self) -> dict:
        output = super().to_dict()
        if self._auto_class is not None:
            # What `save_pretrained` writes (it sets `auto_map` on the saving instance only), so that a loaded
            # processor serializes as the one it was saved from.
            module = type(self).__module__.rsplit(".", 1)[-1]
            output.setdefault("auto_map", {self._auto_class: f"{module}.{type(self).__name__}"})
        return output

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]


class LlavaMultiLayerInstructionProcessorKwargs(LlavaMultiLayerProcessorKwargs, total=False):
    _defaults = LlavaMultiLayerProcessorKwargs._defaults


class LlavaMultiLayerInstructionProcessor(LlavaMultiLayerProcessor):
    r"""
    Processor of instruction-guided (IGVA) models: also tokenizes the instruction with the instruction encoder's own
    tokenizer (saved in the `instruction_tokenizer/` sub-folder).

    Rule for the instruction: `instructions=[...]` gives one per prompt (used for every image of that prompt). When it
    is omitted, the instruction is the text of the last user turn of each prompt (`vicuna_v1`: the text between the
    last `USER:` and the following `ASSISTANT:`) without the image placeholders.

    Args:
        instruction_tokenizer ([`PreTrainedTokenizerBase`]):
            Tokenizer of the instruction encoder (e.g. all-mpnet-base-v2's).
        instruction_max_length (`int`, *optional*, defaults to 384):
            Instructions are truncated to this many tokens (the encoder's `max_seq_length`).
    """

    valid_processor_kwargs = LlavaMultiLayerInstructionProcessorKwargs

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        instruction_tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy="default",
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=0,
        instruction_max_length=384,
        **kwargs,
    ):
        self.instruction_max_length = instruction_max_length
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            instruction_tokenizer=instruction_tokenizer,
            **kwargs,
        )

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        saved_class = _saved_processor_class(processor_dict)
        if saved_class is None or not issubclass(saved_class, LlavaMultiLayerInstructionProcessor):
            saved_as = saved_class.__name__ if saved_class is not None else "no processor class of this package"
            raise OSError(
                f"{pretrained_model_name_or_path} is not the processor of an instruction-guided (igva) model: its "
                f"processor_config.json names {saved_as}. Load it with `LlavaMultiLayerProcessor` or `AutoProcessor`."
            )
        return super()._get_arguments_from_pretrained(pretrained_model_name_or_path, processor_dict, **kwargs)

    def to_dict(self) -> dict:
        output = super().to_dict()
        if "auto_map" in output:
            # `AutoProcessor` resolves `processor_class` among the registered processors, one per config class: the
            # registered `LlavaMultiLayerProcessor` loads this class, which `auto_map` names.
            output["processor_class"] = LlavaMultiLayerProcessor.__name__
        return output

    def __call__(
        self,
        images: ImageInput | None = None,
        text: TextInput | list[TextInput] | None = None,
        instructions: str | list[str] | None = None,
        **kwargs: Unpack[LlavaMultiLayerInstructionProcessorKwargs],
    ) -> BatchFeature:
        """As [`LlavaMultiLayerProcessor.__call__`], plus `instructions` (`str` or `list[str]`, one per prompt),
        tokenized into `instruction_input_ids` / `instruction_attention_mask` with one row per image."""
        outputs = super().__call__(images=images, text=text, **kwargs)
        prompts = [text] if isinstance(text, str) else list(text)
        counts = [prompt.count(self.image_token) for prompt in prompts]
        return_tensors = kwargs.get("return_tensors", kwargs.get("common_kwargs", {}).get("return_tensors"))
        outputs.update(self._instruction_inputs(prompts, counts, instructions, return_tensors))
        return outputs

    def _instruction_inputs(self, prompts, counts, instructions, return_tensors) -> dict:
        if instructions is None:
            instructions = [self.instruction_from_prompt(prompt) for prompt in prompts]
        elif isinstance(instructions, str):
            instructions = [instructions]
        if len(instructions) != len(prompts):
            raise ValueError(
                f"Got {len(instructions)} instruction(s) for {len(prompts)} prompt(s): pass one instruction per "
                "prompt."
            )
        per_image = [instruction for instruction, count in zip(instructions, counts) for _ in range(count)]
        if not per_image:
            return {}
        encoded = self.instruction_tokenizer(
            per_image,
            padding=True,
            truncation=True,
            max_length=self.instruction_max_length,
            return_tensors=return_tensors,
        )
        return {
            "instruction_input_ids": encoded["input_ids"],
            "instruction_attention_mask": encoded["attention_mask"],
        }

    def instruction_from_prompt(self, prompt: str) -> str:
        """The default instruction: the last user turn of a `vicuna_v1` prompt, without image placeholders."""
        turn = prompt.rsplit("USER:", 1)[-1].split("ASSISTANT:", 1)[0]
        instruction = turn.replace(self.image_token, "").strip()
        if not instruction:
            raise ValueError(
                f"Could not find an instruction in the prompt {prompt!r}: pass `instructions=[...]` explicitly."
            )
        return instruction

    @property
    def model_input_names(self):
        return super().model_input_names + ["instruction_input_ids", "instruction_attention_mask"]


def _with_image_token_rule(tokenizer, image_token: str):
    """`tokenizer`, or a copy with the original codebases' per-chunk rule built in ([`add_image_token`]) when it
    tokenizes the text after `image_token` otherwise (a tokenizer saved before the rule existed, or built by hand).
    Refuses a tokenizer without the image token: its id must be the model's `image_token_id`."""
    if tokenizer.convert_tokens_to_ids(image_token) in (None, tokenizer.unk_token_id):
        raise ValueError(
            f"The tokenizer has no {image_token!r} token. Add it first: `tokenizer = "
            f"llava_multilayer.add_image_token(tokenizer, {image_token!r})`."
        )
    if follows_image_token_rule(tokenizer, image_token):
        return tokenizer
    logger.warning_once(
        f"The tokenizer tokenizes the text after {image_token!r} otherwise than the original codebases, which "
        "tokenize each chunk between images on its own; the processor uses a copy with that rule built in "
        "(`llava_multilayer.add_image_token`). Save the processor again to store the rule in tokenizer.json."
    )
    return add_image_token(tokenizer, image_token)


def _saved_processor_class(processor_dict: dict | None) -> type[LlavaMultiLayerProcessor] | None:
    """The processor class of this module that a `processor_config.json` (as a dict) was saved from, or `None` when it
    names none: the class its `auto_map["AutoProcessor"]` names (what `save_pretrained` writes and remote code loads),
    else its `processor_class`."""
    processor_dict = processor_dict or {}
    reference = processor_dict.get("auto_map", {}).get("AutoProcessor") or processor_dict.get("processor_class")
    if not isinstance(reference, str):
        return None
    class_name = reference.rsplit(".", 1)[-1]
    return {
        processor_class.__name__: processor_class
        for processor_class in (LlavaMultiLayerProcessor, LlavaMultiLayerInstructionProcessor)
    }.get(class_name)


def _saved_subclass(cls: type, processor_dict: dict | None) -> type[LlavaMultiLayerProcessor]:
    """The class a processor saved as `processor_dict` loads as through `cls.from_pretrained`: the saved class when it
    specializes `cls` (`LlavaMultiLayerProcessor` loads IGVA checkpoints as `LlavaMultiLayerInstructionProcessor`),
    else `cls`."""
    saved_class = _saved_processor_class(processor_dict)
    return saved_class if saved_class is not None and issubclass(saved_class, cls) else cls


__all__ = ["LlavaMultiLayerInstructionProcessor", "LlavaMultiLayerProcessor", "VICUNA_V1_CHAT_TEMPLATE", "to_rgb"]
