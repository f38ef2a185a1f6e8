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
"""The one place that knows how the supported transformers releases differ.

The model code is also the remote code of every saved checkpoint, so it meets whatever transformers release its user
has. Everything that depends on the release lives here, with the release that changed it:

- transformers 5.24 renamed the cache argument of every forward and the cache field of every output from
  `past_key_values` to `cache` (the old keyword still works there, with a deprecation warning). The model accepts
  both names and hands the cache on under the name the installed release uses.
- `GradientCheckpointingLayer` checkpoints its `__call__` in 5.16.1 and, in 5.24, a wrapper of `forward` that
  `__init_subclass__` installs; `unwrap_layer_checkpointing` undoes the latter for layers that checkpoint inside
  their own `forward`.
- transformers 5.23 renamed gradient checkpointing to activation checkpointing (`activation_checkpointing_enable`,
  `is_activation_checkpointing`, the `activation_checkpointing*` training arguments); the old names still work
  there, with a deprecation warning.

It also holds the package's only imports of transformers internals, for which no public API exists (each was
checked to be present, with the same behaviour, in every supported release, 5.16.1 to 5.24.0).
"""

import dataclasses
import warnings

from transformers import Cache

# The activation table every transformers model uses for `hidden_act`-style config strings.
from transformers.activations import ACT2FN

# Writes a custom class's module (and the modules it imports) next to a checkpoint, as `save_pretrained` does.
from transformers.dynamic_module_utils import custom_object_save

# Flattens the nested image inputs processors accept (one image, a list, a list of lists).
from transformers.image_utils import make_flat_list_of_images

# Public (documented) output classes.
from transformers.modeling_outputs import BaseModelOutputWithPast

# Deformable DETR's multi-scale deformable attention: the MMFuser block builds on it so that the hub kernel
# (`use_kernels=True`) replaces its forward.
from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

# Lets `return_dict=False` work on forwards that build a `ModelOutput`, as transformers' own models do.
from transformers.utils import can_return_tuple

# Renders a chat template with the tokenizer's Jinja environment (used to mark assistant turns in training data).
from transformers.utils.chat_template_utils import render_jinja_template


# The name under which the installed transformers passes the cache to forwards and returns it in outputs.
_OUTPUT_FIELDS = {field.name for field in dataclasses.fields(BaseModelOutputWithPast)}
CACHE_ARGUMENT = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"


def resolve_cache_argument(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """Returns the cache given under either name (`cache` since transformers 5.24, `past_key_values` before).

    Where the installed release names it `cache`, the old name warns as transformers' own models do there."""
    if cache is not None and past_key_values is not None:
        raise ValueError(
            "Pass the cache once, as `cache` or as `past_key_values` (its name before transformers 5.24), not both."
        )
    if past_key_values is not None and CACHE_ARGUMENT == "cache":
        warnings.warn(
            "`past_key_values` is deprecated since transformers 5.24 and will be removed with it: pass the cache as "
            "`cache`.",
            FutureWarning,
            stacklevel=3,
        )
    return cache if cache is not None else past_key_values


def cache_keyword(cache: Cache | None) -> dict[str, Cache | None]:
    """`{name: cache}` with the cache argument's name of the installed transformers, to splat into a forward call."""
    return {CACHE_ARGUMENT: cache}


def output_fields(output_class: type, outputs) -> dict:
    """The entries of the `ModelOutput` `outputs` that are fields of the dataclass `output_class`, whatever the
    installed transformers names them (the cache included)."""
    names = output_class.__dataclass_fields__  # what `dataclasses.fields` reads; torch.compile can trace this
    return {key: value for key, value in outputs.items() if key in names}


def returned_cache(outputs) -> Cache | None:
    """The cache a language model returned, under whichever name the installed transformers uses."""
    return next((value for value in outputs.values() if isinstance(value, Cache)), None)


def unwrap_layer_checkpointing(layer_class: type) -> None:
    """Undoes the checkpointing wrapper that transformers 5.24 puts around the `forward` of a new
    `GradientCheckpointingLayer` subclass (made with `functools.wraps`, so the wrapped function is `__wrapped__`).
    5.16.1 checkpoints in `__call__` instead, which such a layer replaces by `nn.Module.__call__`."""
    wrapped = getattr(layer_class.__dict__.get("forward"), "__wrapped__", None)
    if wrapped is not None:
        layer_class.forward = wrapped


def enable_activation_checkpointing(model, checkpointing_kwargs: dict | None = None) -> None:
    """Turns on activation (gradient) checkpointing of a transformers model under either release's name."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(checkpointing_kwargs)


def is_activation_checkpointing(model) -> bool:
    """Whether activation (gradient) checkpointing is on, under either release's name."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def checkpointing_training_arguments(enabled: bool, checkpointing_kwargs: dict | None = None) -> dict:
    """The `TrainingArguments` keywords that turn activation checkpointing on or off in the installed release."""
    from transformers import TrainingArguments  # the trainer is not needed to run a model

    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {prefix: enabled, f"{prefix}_kwargs": checkpointing_kwargs}


__all__ = [
    "ACT2FN",
    "CACHE_ARGUMENT",
    "MultiScaleDeformableAttention",
    "can_return_tuple",
    "custom_object_save",
    "make_flat_list_of_images",
    "render_jinja_template",
    "cache_keyword",
    "checkpointing_training_arguments",
    "enable_activation_checkpointing",
    "is_activation_checkpointing",
    "output_fields",
    "resolve_cache_argument",
    "returned_cache",
    "unwrap_layer_checkpointing",
]
