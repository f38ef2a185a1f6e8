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
"""Which parameters train in each stage, and the optimizer groups of the original `LLaVATrainer.create_optimizer`,
in this package's parameter names.

Roles of the parameters (original names in brackets):

- `projector`: the external fuser + projector `model.multi_modal_projector.*` [`mm_projector*`] and the internal
  projectors `model.internal_projectors.*` [`mm_projectors.*`]; for IGVA the aggregator
  `model.multi_modal_projector.aggregator.*` [`vision_aggregator.*`] is not part of it (its original name does not
  contain `mm_projector`, the substring the original selects learning-rate groups by);
- `fuser`: the MMFuser block `model.multi_modal_projector.fuser.*` [`mm_projector.0.*`];
- `cross_fusion`: the I_M cross-fusion modules and gates of the fusion decoder layers [`ucross_*`];
- `language_model`: every other parameter of `model.language_model` and `lm_head`;
- never trained: the vision tower and the instruction encoder.
"""

from __future__ import annotations

import re

from torch import nn


#: LoRA targets of the original (`find_all_linear_names`, run before the projectors exist): every linear layer of the
#: language model by leaf name, which includes the I_M cross-fusion projections.
LORA_TARGET_MODULES = (
    r".*model\.language_model\.layers\.\d+\."
    r"(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj|cross_attn\.(?:q|k|v|o)_proj|cross_mlp\.(?:gate|up|down)_proj)"
)
_CROSS_FUSION = re.compile(r"model\.language_model\.layers\.\d+\.(?:cross_attn|cross_mlp)(?:_gate|_norm)?(?:\.|$)")
_FROZEN_PREFIXES = ("model.vision_tower.", "model.instruction_encoder.")
PEFT_PREFIX = "base_model.model."


def base_name(name: str) -> str:
    """A parameter name without the peft wrapper prefix (`base_model.model.`)."""
    return name.removeprefix(PEFT_PREFIX)


def parameter_role(name: str) -> str:
    """The role (see the module notes) of a parameter, by its name in the (optionally peft-wrapped) model:
    `"frozen"`, `"fuser"`, `"aggregator"`, `"projector"`, `"cross_fusion"` or `"language_model"`."""
    name = base_name(name)
    if name.startswith(_FROZEN_PREFIXES):
        return "frozen"
    if name.startswith("model.multi_modal_projector.fuser."):
        return "fuser"
    if name.startswith("model.multi_modal_projector.aggregator."):
        return "aggregator"
    if name.startswith(("model.multi_modal_projector.", "model.internal_projectors.")):
        return "projector"
    if _CROSS_FUSION.match(name):
        return "cross_fusion"
    return "language_model"


#: The roles trained in full by each stage (`lora`/`qlora`: besides the LoRA weights).
STAGE_ROLES = {
    "pretrain": ("fuser", "projector", "cross_fusion"),
    "finetune": ("fuser", "aggregator", "projector", "cross_fusion", "language_model"),
    "lora": ("fuser", "aggregator", "projector"),
}
STAGE_ROLES["qlora"] = STAGE_ROLES["lora"]

#: Learning-rate options -> the roles whose parameters they apply to (original: names containing a substring).
LR_OPTION_ROLES = {
    "mm_projector_lr": ("fuser", "projector"),  # 'mm_projector' (LLaVA-1.5, Layer_Select_Fuse, IGVA)
    "ms_cross_attn_lr": ("fuser",),  # 'mm_projector.0' (MMFuser)
    "cross_attn_lr": ("cross_fusion",),  # 'ucross' (Layer_Select_Fuse)
}


def set_trainable(model: nn.Module, stage: str) -> None:
    """Sets `requires_grad` for `stage` (`pretrain`, `finetune`; for `lora`/`qlora` the non-LoRA part, on the
    peft-wrapped model, after peft froze the rest)."""
    roles = STAGE_ROLES[stage]
    for name, parameter in model.named_parameters():
        if stage in ("lora", "qlora") and "lora_" in name:
            continue
        parameter.requires_grad_(parameter_role(name) in roles)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Sorted names of the parameters with `requires_grad`."""
    return sorted(name for name, parameter in model.named_parameters() if parameter.requires_grad)


def decay_parameter_names(model: nn.Module) -> set[str]:
    """The original's weight-decay set: parameters outside LayerNorm / RMSNorm modules whose name lacks `bias`."""
    no_decay = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
            prefix = f"{module_name}." if module_name else ""
            no_decay.update(prefix + name for name, _ in module.named_parameters(recurse=False))
    return {name for name, _ in model.named_parameters() if name not in no_decay and "bias" not in name}


def optimizer_groups(
    model: nn.Module, learning_rate: float, weight_decay: float, special_lrs: dict[str, float | None]
) -> list[dict]:
    """The original `create_optimizer` groups: `[{"lr", "weight_decay", "params": [names]}]`, members in the model's
    parameter order, only parameters with `requires_grad`.

    Without a special learning rate: a decay group and a no-decay group (weight decay 0), both at `learning_rate`.
    Each special option of `special_lrs` that is set (`mm_projector_lr`, `ms_cross_attn_lr`, `cross_attn_lr`, see
    [`LR_OPTION_ROLES`]) takes its parameters out of those two and adds its own decay / no-decay pair at its
    learning rate, after them; empty groups are kept, as the original keeps them.
    """
    decay = decay_parameter_names(model)
    trainable = [(name, parameter_role(name)) for name, p in model.named_parameters() if p.requires_grad]
    specials = [(option, lr) for option, lr in special_lrs.items() if lr is not None]
    special_roles = {role for option, _ in specials for role in LR_OPTION_ROLES[option]}
    groups = []
    selections = [(lambda role: role not in special_roles, learning_rate)]
    selections += [(lambda role, option=option: role in LR_OPTION_ROLES[option], lr) for option, lr in specials]
    for selects, lr in selections:
        members = [name for name, role in trainable if selects(role)]
        groups.append({"lr": lr, "weight_decay": weight_decay, "params": [n for n in members if n in decay]})
        groups.append({"lr": lr, "weight_decay": 0.0, "params": [n for n in members if n not in decay]})
    return groups


__all__ = [
    "LORA_TARGET_MODULES",
    "LR_OPTION_ROLES",
    "STAGE_ROLES",
    "base_name",
    "decay_parameter_names",
    "optimizer_groups",
    "parameter_role",
    "set_trainable",
    "trainable_parameter_names",
]
