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
"""PyTorch LLaVA with multi-layer visual feature fusion (MMFuser, Layer_Select_Fuse, IGVA)."""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, Cache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast

from .compatibility_llava_multilayer import (
    cache_keyword,
    can_return_tuple,
    output_fields,
    resolve_cache_argument,
    returned_cache,
)
from .configuration_llava_multilayer import LlavaMultiLayerConfig
from .fusion_llava_multilayer import LlavaMultiLayerMLPProjector, select_vision_feature
from .fusion_registry_llava_multilayer import fusion_projector_class, no_split_module_names
from .instruction_encoder_llava_multilayer import InstructionEncoder
from .internal_fusion_llava_multilayer import (
    CrossAttentionKeyValueStore,
    InternalFusionDecoderLayer,
    internal_fusion_layer_class,
    no_split_internal_fusion_layers,
)
from .upcycling_llava_multilayer import upcycle_llava


@dataclass
class LlavaMultiLayerImageFeaturesOutput(BaseModelOutputWithPooling):
    r"""
    last_hidden_state (`torch.Tensor` of shape `(num_images, num_patches, vision_hidden_size)`):
        Last hidden state of the vision tower.
    pooler_output (`torch.Tensor` of shape `(num_images, num_image_tokens, text_hidden_size)`):
        Visual tokens spliced at the image-token positions (the external fuser's output; also `image_features`).
    hidden_states (`tuple(torch.Tensor)`):
        All hidden states of the vision tower (embeddings first), which the fusers consume.
    internal_image_features (`tuple(torch.Tensor)`, *optional*):
        One `(num_images, num_image_tokens, text_hidden_size)` tensor per internal feature layer.
    fusion_weights (`torch.Tensor` of shape `(num_images, num_groups)`, *optional*):
        Weights of the fused layer groups, for fusers that weight them (`igva`: chosen by the instruction).
    """

    internal_image_features: tuple[torch.Tensor, ...] | None = None
    fusion_weights: torch.Tensor | None = None

    @property
    def image_features(self) -> torch.Tensor | None:
        """The visual tokens spliced at the image-token positions (`pooler_output`)."""
        return self.pooler_output


@dataclass
class LlavaMultiLayerModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    image_hidden_states (`torch.Tensor`, *optional*):
        `(num_images, num_image_tokens, text_hidden_size)` visual tokens spliced into the sequence.
    fusion_weights (`torch.Tensor` of shape `(num_images, num_groups)`, *optional*):
        Weights of the fused layer groups, for fusers that weight them (`igva`: chosen by the instruction).
    image_outputs (`LlavaMultiLayerImageFeaturesOutput`, *optional*):
        What `get_image_features` returned for the images of this forward (`None` without images).
    """

    image_hidden_states: torch.Tensor | None = None
    fusion_weights: torch.Tensor | None = None
    image_outputs: LlavaMultiLayerImageFeaturesOutput | None = None


@dataclass
class LlavaMultiLayerCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    image_hidden_states (`torch.Tensor`, *optional*):
        `(num_images, num_image_tokens, text_hidden_size)` visual tokens spliced into the sequence.
    fusion_weights (`torch.Tensor` of shape `(num_images, num_groups)`, *optional*):
        Weights of the fused layer groups, for fusers that weight them (`igva`: chosen by the instruction).
    image_outputs (`LlavaMultiLayerImageFeaturesOutput`, *optional*):
        What `get_image_features` returned for the images of this forward (`None` without images).
    """

    image_hidden_states: torch.Tensor | None = None
    fusion_weights: torch.Tensor | None = None
    image_outputs: LlavaMultiLayerImageFeaturesOutput | None = None


def _check_image_token_runs(image_token_mask: torch.Tensor, num_tokens: int) -> None:
    """Raises unless the image tokens of each row of the `(batch_size, sequence_length)` mask form runs of whole
    images (`num_tokens` consecutive tokens each), so that no image is split across rows or around text."""
    edges = nn.functional.pad(image_token_mask.int(), (1, 1)).diff(dim=-1)
    lengths = (edges == -1).nonzero()[:, 1] - (edges == 1).nonzero()[:, 1]
    if (lengths % num_tokens).any():
        raise ValueError(
            f"Each image fills {num_tokens} consecutive image tokens, but the prompts hold runs of "
            f"{sorted(set(lengths.tolist()))} image tokens: a sequence was cut or split inside an image. Prepare "
            "inputs with the model's processor (which expands every `<image>` in place and never truncates)."
        )


class LlavaMultiLayerPreTrainedModel(PreTrainedModel):
    config: LlavaMultiLayerConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _no_split_modules = [
        *no_split_module_names(),
        "LlavaMultiLayerMLPProjector",
        "InstructionEncoder",
        *no_split_internal_fusion_layers(),
    ]

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Only the saved class's Auto class is written to `auto_map`; name the base model too, so that the
        # checkpoint also loads with `AutoModel` as remote code.
        if self._auto_class is not None:
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModel": "modeling_llava_multilayer.LlavaMultiLayerModel",
            }
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def initialize_weights(self):
        # For a custom-code model transformers skips every module that owns no parameters directly, in the model and
        # in its sub-models; but transformers' own models initialise the linears of such modules from them (CLIP's
        # attention and MLP). So the sub-models built from transformers classes (vision tower, language model,
        # instruction encoder) are first initialised as the models they are, each by its own `_init_weights`;
        # loaded weights stay (transformers' init functions skip them).
        for module in self.modules():
            if module is not self and isinstance(module, PreTrainedModel) and not module.is_custom_code():
                module.initialize_weights()
        super().initialize_weights()
        # The internal-fusion layers sit inside the language model, whose `_init_weights` does not know their own
        # parameters (the I_M gates).
        for module in self.modules():
            if isinstance(module, InternalFusionDecoderLayer):
                module.init_fusion_weights()

    def _init_weights(self, module):
        super()._init_weights(module)
        fusion_projector_class(self.config.fusion_type).init_module_weights(module)


def refuse_internal_fusion_under_vllm(config: LlavaMultiLayerConfig) -> None:
    """Raises when an internal-fusion model is built by vLLM (its Transformers backend sets the language model's
    attention implementation to `"vllm"`): the backend passes the language model input embeddings only, so the
    decoder layers would never receive their visual features and the model would answer as if they were absent."""
    if config.internal_fusion_type is not None and config.text_config._attn_implementation == "vllm":
        raise NotImplementedError(
            f"internal_fusion_type={config.internal_fusion_type!r} cannot be served by vLLM: its Transformers backend "
            "hands the language model input embeddings only, so the visual features that internal fusion feeds into "
            "the decoder layers would be dropped and the answers silently wrong. Serve this model with transformers "
            "(`model.generate`) instead."
        )


class LlavaMultiLayerModel(LlavaMultiLayerPreTrainedModel):
    """Vision tower, fuser(s) and language model, without a language modeling head."""

    def __init__(self, config: LlavaMultiLayerConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        fuser = fusion_projector_class(config.fusion_type)
        self.multi_modal_projector = fuser(config)
        self.instruction_encoder = None
        if fuser.needs_instruction_encoder(config):
            self.instruction_encoder = InstructionEncoder(config.instruction_encoder_config)
        self.internal_projectors = None
        if config.internal_fusion_type is not None:
            self.internal_projectors = nn.ModuleList(
                LlavaMultiLayerMLPProjector(config, config.vision_config.hidden_size)
                for _ in config.internal_feature_layers
            )
        self.language_model = AutoModel.from_config(config.text_config)
        self.cross_attention_store = CrossAttentionKeyValueStore()
        if config.internal_fusion_type is not None:
            self._wrap_internal_fusion_layers()
        self.post_init()

    def _wrap_internal_fusion_layers(self) -> None:
        refuse_internal_fusion_under_vllm(self.config)
        layers = getattr(self.language_model, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(
                f"Internal fusion needs a language model with a `layers` ModuleList of decoder layers; "
                f"{type(self.language_model).__name__} has none."
            )
        for layer_idx in self.config.internal_layer_to_feature:
            layers[layer_idx] = self.internal_fusion_wrapper.wrap(layers[layer_idx], layer_idx, self.config)

    @property
    def internal_fusion_wrapper(self) -> type[InternalFusionDecoderLayer] | None:
        """The decoder-layer wrapper class of the model's internal fusion (`None` without internal fusion)."""
        kind = self.config.internal_fusion_type
        return None if kind is None else internal_fusion_layer_class(kind)

    @property
    def internal_fusion_layers(self) -> list[InternalFusionDecoderLayer]:
        """The decoder layers that receive internal visual features."""
        if self.config.internal_fusion_type is None:
            return []
        return [layer for layer in self.language_model.layers if isinstance(layer, InternalFusionDecoderLayer)]

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_instruction_embeds(
        self, instruction_input_ids: torch.LongTensor, instruction_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embeds tokenized instructions with the frozen instruction encoder: `(num_images, encoder_hidden)`."""
        if self.instruction_encoder is None:
            raise ValueError(
                f"This model has no instruction encoder: its fuser (fusion_type={self.config.fusion_type!r}) does not "
                "weight its layers by an instruction."
            )
        if instruction_attention_mask is None:
            instruction_attention_mask = torch.ones_like(instruction_input_ids)
        return self.instruction_encoder(instruction_input_ids, instruction_attention_mask)

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        vision_config = self.config.vision_config
        expected = (vision_config.num_channels, vision_config.image_size, vision_config.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"`pixel_values` must have shape (num_images, {expected[0]}, {expected[1]}, {expected[2]}) for this "
                f"vision tower, got {tuple(pixel_values.shape)}. Prepare images with the model's processor."
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"`pixel_values` must be normalised floating-point values, got dtype {pixel_values.dtype} (raw "
                "pixels?). Prepare images with the model's processor."
            )

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        instruction_embeds: torch.Tensor | None = None,
        instruction_input_ids: torch.LongTensor | None = None,
        instruction_attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> LlavaMultiLayerImageFeaturesOutput:
        """Runs the vision tower and the fuser(s) on `(num_images, channels, height, width)` pixel values.

        `instruction_*` (one row per image) are only used by instruction-guided (`igva`) fusion; pass either the
        tokenized instruction or precomputed `instruction_embeds`. The vision tower's `hidden_states` are returned
        with `output_hidden_states=True` (or the config's), its `attentions` with `output_attentions=True`.
        """
        self._check_pixel_values(pixel_values)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        # `output_attentions=None` would override the tower config's choice, so it is only passed when given.
        attention_kwargs = {} if output_attentions is None else {"output_attentions": output_attentions}
        vision_outputs = self.vision_tower(
            pixel_values.to(self.vision_tower.dtype), output_hidden_states=True, return_dict=True, **attention_kwargs
        )
        hidden_states = vision_outputs.hidden_states
        if instruction_embeds is not None and instruction_input_ids is not None:
            raise ValueError("Pass either `instruction_input_ids` or `instruction_embeds`, not both.")
        if instruction_input_ids is not None:
            instruction_embeds = self.get_instruction_embeds(instruction_input_ids, instruction_attention_mask)
        if instruction_embeds is not None and instruction_embeds.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"Got {instruction_embeds.shape[0]} instructions for {pixel_values.shape[0]} images: "
                "instruction-guided fusion needs exactly one instruction per image."
            )
        fusion = self.multi_modal_projector(hidden_states, instruction_embeds=instruction_embeds)
        internal_features = None
        if self.internal_projectors is not None:
            strategy = self.config.vision_feature_select_strategy
            internal_features = tuple(
                projector(select_vision_feature(hidden_states, layer, strategy))
                for projector, layer in zip(self.internal_projectors, self.config.internal_feature_layers)
            )
        return LlavaMultiLayerImageFeaturesOutput(
            last_hidden_state=vision_outputs.last_hidden_state,
            pooler_output=fusion.image_features,
            hidden_states=hidden_states if output_hidden_states else None,
            attentions=vision_outputs.attentions,
            internal_image_features=internal_features,
            fusion_weights=fusion.fusion_weights,
        )

    def _image_token_mask(self, input_ids, inputs_embeds):
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        if self.config.image_token_id >= self.config.text_config.vocab_size:
            raise ValueError(
                "The image token lies outside the language model's vocabulary, so image positions cannot be found "
                "from `inputs_embeds`: pass `input_ids` together with `pixel_values`."
            )
        image_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embedding).all(-1)

    def _internal_fusion_inputs(
        self,
        image_features: LlavaMultiLayerImageFeaturesOutput | None,
        image_token_mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> dict | None:
        """The `internal_fusion_inputs` the fusing decoder layers read: `{decoder_layer_index: inputs}`, or `None`.

        I_D layers get their features at prefill only. I_M layers get keys/values computed from this prompt's images,
        or, at a decode step, those computed at the prefill of the same cache."""
        layers = self.internal_fusion_layers
        if not layers:
            return None
        wrapper = self.internal_fusion_wrapper
        if image_features is None:
            return self.cross_attention_store.get(cache) if wrapper.reuses_prompt_inputs else None
        internal_features = image_features.internal_image_features
        layer_to_feature = self.config.internal_layer_to_feature
        features = {layer.layer_idx: internal_features[layer_to_feature[layer.layer_idx]] for layer in layers}
        return wrapper.fusion_inputs(layers, features, image_token_mask, image_features.image_features.shape[1])

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        instruction_input_ids: torch.LongTensor | None = None,
        instruction_attention_mask: torch.Tensor | None = None,
        instruction_embeds: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> LlavaMultiLayerModelOutputWithPast:
        r"""
        cache (`Cache`, *optional*):
            The key/value cache; `past_key_values`, its name before transformers 5.24, is accepted too.
        instruction_input_ids (`torch.LongTensor` of shape `(num_images, instruction_length)`, *optional*):
            The instruction tokenized by the instruction encoder's tokenizer (`igva`; the processor makes them).
        instruction_attention_mask (`torch.Tensor` of shape `(num_images, instruction_length)`, *optional*):
            Mask of `instruction_input_ids`.
        instruction_embeds (`torch.Tensor` of shape `(num_images, encoder_hidden)`, *optional*):
            Precomputed instruction embeddings, instead of `instruction_input_ids`.
        """
        cache = resolve_cache_argument(cache, past_key_values)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        image_token_mask = None
        if input_ids is not None:
            image_token_mask = input_ids == self.config.image_token_id
            if self.config.image_token_id >= self.get_input_embeddings().num_embeddings:
                # The image token lies outside the vocabulary: its positions are overwritten below.
                input_ids = input_ids.masked_fill(image_token_mask, 0)
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_features = None
        if pixel_values is not None:
            if image_token_mask is None:
                image_token_mask = self._image_token_mask(input_ids, inputs_embeds)
            image_features = self.get_image_features(
                pixel_values,
                instruction_embeds=instruction_embeds,
                instruction_input_ids=instruction_input_ids,
                instruction_attention_mask=instruction_attention_mask,
                output_hidden_states=kwargs.get("output_hidden_states"),
                output_attentions=kwargs.get("output_attentions"),
            )
            features = image_features.image_features
            num_images, num_tokens = features.shape[:2]
            if image_token_mask.sum() != num_images * num_tokens:
                raise ValueError(
                    f"Image features and image tokens do not match: the prompts hold {int(image_token_mask.sum())} "
                    f"image tokens, but {num_images} image(s) x {num_tokens} tokens were computed. Each image needs "
                    "exactly one `<image>` in the text; prepare inputs with the model's processor."
                )
            _check_image_token_runs(image_token_mask, num_tokens)
            mask = image_token_mask.unsqueeze(-1).to(inputs_embeds.device)
            inputs_embeds = inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.device, inputs_embeds.dtype))
        elif image_token_mask is not None and not torch.compiler.is_compiling():
            # Only a prompt needs its images: at a decode step they are in the cache already. The check depends on
            # the data (a static cache's length is a tensor), so compiled forwards (decode steps) leave it out.
            if (cache is None or cache.get_seq_length() == 0) and image_token_mask.any():
                raise ValueError(
                    "The prompts contain image tokens but no `pixel_values` were given: pass the images too."
                )

        internal_fusion_inputs = self._internal_fusion_inputs(image_features, image_token_mask, cache)
        if internal_fusion_inputs is not None:
            kwargs["internal_fusion_inputs"] = internal_fusion_inputs
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **cache_keyword(cache),
            **kwargs,
        )
        wrapper = self.internal_fusion_wrapper
        if image_features is not None and wrapper is not None and wrapper.reuses_prompt_inputs:
            if (returned := returned_cache(outputs)) is not None:
                self.cross_attention_store.put(returned, internal_fusion_inputs)

        return LlavaMultiLayerModelOutputWithPast(
            **output_fields(LlavaMultiLayerModelOutputWithPast, outputs),
            image_hidden_states=image_features.image_features if image_features is not None else None,
            fusion_weights=image_features.fusion_weights if image_features is not None else None,
            image_outputs=image_features,
        )


class LlavaMultiLayerForConditionalGeneration(LlavaMultiLayerPreTrainedModel, GenerationMixin):
    """The multi-layer fusion LLaVA model with a language modeling head."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: LlavaMultiLayerConfig):
        super().__init__(config)
        self.model = LlavaMultiLayerModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_llava(
        cls, llava_model_or_path, fusion_type: str = "single", strict: bool = True, **fusion_kwargs
    ) -> "LlavaMultiLayerForConditionalGeneration":
        r"""
        Builds a multi-layer fusion model from a trained [`LlavaForConditionalGeneration`] (or the directory / Hub id
        it loads from): vision tower, language model, `lm_head` and projector are copied, and the new parts are
        initialised so that the outputs equal the LLaVA model's until finetuning. Settings for which that is
        impossible (e.g. internal cross-attention with `internal_fusion_placement="pre_cross"`) raise, unless
        `strict=False`. See `upcycling_llava_multilayer.upcycle_llava` for the details and `fusion_kwargs`
        (any [`LlavaMultiLayerConfig`] field, plus `instruction_encoder` for `igva`).

        Example:

        ```python
        >>> model = LlavaMultiLayerForConditionalGeneration.from_llava(
        ...     "llava-hf/llava-1.5-7b-hf", fusion_type="mmfuser", vision_feature_layer=[3, 8, 13, 18, -2]
        ... )
        ```"""
        return upcycle_llava(cls, llava_model_or_path, fusion_type=fusion_type, strict=strict, **fusion_kwargs)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> LlavaMultiLayerImageFeaturesOutput:
        """See [`LlavaMultiLayerModel.get_image_features`]."""
        return self.model.get_image_features(pixel_values, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        instruction_input_ids: torch.LongTensor | None = None,
        instruction_attention_mask: torch.Tensor | None = None,
        instruction_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> LlavaMultiLayerCausalLMOutputWithPast:
        r"""
        cache (`Cache`, *optional*):
            The key/value cache; `past_key_values`, its name before transformers 5.24, is accepted too.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Labels for the language modeling loss; `-100` positions (image tokens, prompts) are ignored.

        Example:

        ```python
        >>> from PIL import Image
        >>> from transformers import AutoModelForImageTextToText, AutoProcessor
        >>> import llava_multilayer  # registers the model family

        >>> model = AutoModelForImageTextToText.from_pretrained("path/to/converted")
        >>> processor = AutoProcessor.from_pretrained("path/to/converted")
        >>> messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
        >>> prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        >>> inputs = processor(images=Image.open("image.png"), text=prompt, return_tensors="pt")
        >>> output = model.generate(**inputs, max_new_tokens=32)
        ```"""
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=resolve_cache_argument(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            instruction_input_ids=instruction_input_ids,
            instruction_attention_mask=instruction_attention_mask,
            instruction_embeds=instruction_embeds,
            **kwargs,
        )
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return LlavaMultiLayerCausalLMOutputWithPast(
            loss=loss, logits=logits, **output_fields(LlavaMultiLayerCausalLMOutputWithPast, outputs)
        )

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs):
        # The first forward of an empty cache is a prefill, which needs the images, whoever runs it: an assistant
        # model (`generate(assistant_model=...)`) runs its prefill with `is_first_iteration=False`.
        cache = resolve_cache_argument(kwargs.get("cache"), kwargs.get("past_key_values"))
        is_first_iteration = is_first_iteration or (cache is not None and cache.get_seq_length() == 0)
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in ("instruction_input_ids", "instruction_attention_mask", "instruction_embeds"):
                model_inputs.pop(key, None)
        return model_inputs


__all__ = [
    "LlavaMultiLayerForConditionalGeneration",
    "LlavaMultiLayerModel",
    "LlavaMultiLayerPreTrainedModel",
]
