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
"""Overhead of every fuser: image-feature time (vision tower + fuser + projector) relative to LLaVA-1.5.

The baseline is transformers' `LlavaModel.get_image_features` (vision tower + `LlavaMultiModalProjector` on layer -2)
with the same tower; each candidate is `LlavaMultiLayerModel.get_image_features` of one fusion setting at the real
geometry (CLIP ViT-L/14-336: 24 layers x 1024, 577 tokens; SigLIP so400m/14-384: 27 layers x 1152, 729 tokens;
language-model width 4096). Weights are random, nothing is downloaded; the language model is never built.

Reported per fuser, with the baseline run in the same process:

- `ratio`: `(T + H) / (T + H_llava)`, the median over rounds, where `T` is the vision tower's time and `H` the time
  of everything after it (selection, fuser, projector(s)) in the same round. Timing the tower once per round and the
  heads on its cached outputs gives the same quantity as timing whole paths, with far less noise (the tower is 90%+
  of the time and identical in both).
- `direct_ratio` (`--direct`): whole paths timed against each other, tower included, as a cross-check.
- parameters of the fuser and projector(s), and FLOPs per image (`FlopCounterMode`: matmuls and attention).
- IGVA: the instruction encoder (a sentence encoder run once per instruction) is timed separately.

    python benchmarks/fusion_overhead.py                       # CLIP and SigLIP, float32 on CPU (minutes)
    python benchmarks/fusion_overhead.py --quick               # tiny widths, same depths (seconds)
    python benchmarks/fusion_overhead.py --device cuda --dtype bfloat16 --use-kernels
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import MethodType

import torch
from torch import nn
from transformers import AutoModel, LlavaModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector


sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

from llava_multilayer import LlavaMultiLayerConfig, LlavaMultiLayerModel  # noqa: E402
from llava_multilayer.deformable_fusion_llava_multilayer import MMFuserDeformableSampling  # noqa: E402
from llava_multilayer.fusion_llava_multilayer import LlavaMultiLayerMLPProjector  # noqa: E402
from llava_multilayer.fusion_registry_llava_multilayer import fusion_projector_class  # noqa: E402
from llava_multilayer.instruction_encoder_llava_multilayer import InstructionEncoder  # noqa: E402


INSTRUCTION_LENGTH = 32


@dataclass
class FuserSpec:
    """One row of the benchmark: a fusion setting of `LlavaMultiLayerConfig` and its target ratio (if any)."""

    name: str
    tower: str
    settings: dict
    target: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def fuser_specs(quick: bool) -> list[FuserSpec]:
    """The fusers of the three methods at the layer selections of the papers."""
    clip_all_groups = [list(range(1, 13)), list(range(13, 25)), 23]
    igva_width = {"igva_hidden_size": 64} if quick else {}
    return [
        FuserSpec("single (LLaVA-1.5, layer -2)", "clip", {"fusion_type": "single", "vision_feature_layer": -2}),
        FuserSpec("concat E_D 3-18-23", "clip", {"fusion_type": "concat", "vision_feature_layer": [3, 18, 23]}, 1.02),
        FuserSpec("concat E_D all", "clip", {"fusion_type": "concat", "vision_feature_layer": clip_all_groups}, 1.02),
        FuserSpec(
            "mmfuser (MMFuser, 5 layers)", "clip",
            {"fusion_type": "mmfuser", "vision_feature_layer": [3, 8, 13, 18, 23]}, 1.03,
        ),
        FuserSpec(
            "mmfuser (MMFuser, 5 layers), transformers' sampling core", "clip",
            {"fusion_type": "mmfuser", "vision_feature_layer": [3, 8, 13, 18, 23]},
            note="reference: the same block sampling with transformers' pure-PyTorch MultiScaleDeformableAttention",
            extra={"transformers_core": True},
        ),
        FuserSpec(
            "mmfuser E_M 3-18-23", "clip", {"fusion_type": "mmfuser", "vision_feature_layer": [3, 18, 23]}, 1.03
        ),
        FuserSpec(
            "mmfuser E_M all", "clip",
            {"fusion_type": "mmfuser", "vision_feature_layer": [*range(1, 25), 23]},
            note="24 value levels: the value projection alone adds 24x the query's tokens",
        ),
        FuserSpec(
            "igva (4x6 groups, encoder excluded)", "clip",
            {
                "fusion_type": "igva",
                "vision_feature_layer": -2,
                "igva_layer_groups": [list(range(start, start + 6)) for start in (1, 7, 13, 19)],
                **igva_width,
            },
            1.02,
        ),
        FuserSpec(
            "internal I_D/I_M projectors 3-18-23", "clip",
            {
                "fusion_type": "single",
                "vision_feature_layer": 23,
                "internal_fusion_type": "add",
                "internal_feature_layers": [3, 18, 23],
                "internal_layer_map": [[0, 0], [1, 1], [2, 2]],
            },
            note="four MLP projectors instead of one (the fusion itself runs in the language model)",
        ),
        FuserSpec("single (LLaVA-1.5, layer -2)", "siglip", {"fusion_type": "single", "vision_feature_layer": -2}),
        FuserSpec(
            "concat E_D 3-18-23", "siglip", {"fusion_type": "concat", "vision_feature_layer": [3, 20, 25]}, 1.02
        ),
        FuserSpec(
            "concat E_D latter", "siglip",
            {"fusion_type": "concat", "vision_feature_layer": [list(range(15, 27)), 25]}, 1.02,
        ),
        FuserSpec(
            "internal I_D/I_M projectors 3-18-23", "siglip",
            {
                "fusion_type": "single",
                "vision_feature_layer": 25,
                "internal_fusion_type": "add",
                "internal_feature_layers": [3, 20, 25],
                "internal_layer_map": [[0, 0], [1, 1], [2, 2]],
            },
            note="four MLP projectors instead of one",
        ),
    ]


class CachedVisionTower(nn.Module):
    """Stands in for a vision tower and returns outputs computed once, so that a timing covers what follows it."""

    def __init__(self, outputs: BaseModelOutputWithPooling, dtype: torch.dtype):
        super().__init__()
        self.outputs = outputs
        self._dtype = dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def forward(self, *args, **kwargs) -> BaseModelOutputWithPooling:
        return BaseModelOutputWithPooling(
            last_hidden_state=self.outputs.last_hidden_state, hidden_states=self.outputs.hidden_states
        )


def llava_image_model(vision_config: dict, text_config: dict, tower: nn.Module, device, dtype) -> LlavaModel:
    """transformers' LlavaModel with `tower` and a real projector; its language model stays on the meta device."""
    config = _common.llava_config(vision_config, text_config)
    with torch.device("meta"):
        model = LlavaModel(config)
    model.vision_tower = tower
    model.multi_modal_projector = LlavaMultiModalProjector(config).to(device, dtype)
    return model.eval()


def multilayer_image_model(config: LlavaMultiLayerConfig, tower: nn.Module, device, dtype) -> LlavaMultiLayerModel:
    """LlavaMultiLayerModel with `tower` and real fusion modules; its language model stays on the meta device."""
    with torch.device("meta"):
        model = LlavaMultiLayerModel(config)
    model.vision_tower = tower
    model.multi_modal_projector = fusion_projector_class(config.fusion_type)(config).to(device, dtype)
    if model.instruction_encoder is not None:
        model.instruction_encoder = InstructionEncoder(config.instruction_encoder_config).to(device, dtype)
    if model.internal_projectors is not None:
        model.internal_projectors = nn.ModuleList(
            LlavaMultiLayerMLPProjector(config, config.vision_config.hidden_size)
            for _ in config.internal_feature_layers
        ).to(device, dtype)
    return model.eval()


def use_transformers_sampling(model: nn.Module) -> None:
    """Makes the `mmfuser` blocks of `model` sample with transformers' own pure-PyTorch forward (for reference)."""
    for module in model.modules():
        if isinstance(module, MMFuserDeformableSampling):
            module.forward = MethodType(MultiScaleDeformableAttention.forward, module)


def hub_kernel_active(model: nn.Module) -> bool:
    """Whether a compiled hub kernel replaced the deformable sampling of some `mmfuser` block of `model`."""
    for module in model.modules():
        if isinstance(module, MMFuserDeformableSampling):
            forward = vars(module).get("forward")
            if forward is not None and getattr(forward, "__func__", None) is not MMFuserDeformableSampling.forward:
                return True
    return False


def run_tower(args, tower_name: str, specs: list[FuserSpec], device, dtype) -> tuple[list[dict], dict]:
    """Benchmarks the fusers of one vision tower; returns the rows and the tower's own measurements."""
    base = _common.CLIP_L_336 if tower_name == "clip" else _common.SIGLIP_SO400M_384
    vision_config = _common.vision_config(base, args.quick)
    text_config = _common.text_config(3, args.quick)
    text_width = text_config["hidden_size"]
    tower = AutoModel.from_config(LlavaMultiLayerConfig(vision_config=vision_config).vision_config)
    tower = tower.to(device, dtype).eval()
    size = vision_config["image_size"]
    pixel_values = torch.randn(args.batch, 3, size, size, device=device, dtype=dtype)

    with torch.inference_mode():
        tower_outputs = tower(pixel_values, output_hidden_states=True)
    cached = CachedVisionTower(tower_outputs, dtype)

    baseline = llava_image_model(vision_config, text_config, tower, device, dtype)

    def baseline_call():
        return baseline.get_image_features(pixel_values)

    candidates = {}
    for spec in specs:
        settings = dict(spec.settings)
        if settings["fusion_type"] == "igva":
            encoder = _common.MPNET_BASE if not args.quick else {**_common.MPNET_BASE, **_common.QUICK_MPNET}
            settings["instruction_encoder_config"] = dict(encoder)
        config = LlavaMultiLayerConfig(
            vision_config=vision_config, text_config=text_config, image_token_id=_common.IMAGE_TOKEN_ID, **settings
        )
        model = multilayer_image_model(config, tower, device, dtype)
        if spec.extra.get("transformers_core"):
            use_transformers_sampling(model)
        if args.use_kernels:
            model.set_use_kernels(True)
        kwargs = {}
        if model.instruction_encoder is not None:
            ids = torch.randint(0, config.instruction_encoder_config.vocab_size, (args.batch, INSTRUCTION_LENGTH))
            mask = torch.ones_like(ids)
            ids, mask = ids.to(device), mask.to(device)
            with torch.inference_mode():
                kwargs["instruction_embeds"] = model.get_instruction_embeds(ids, mask)
            spec.extra["encoder_call"] = (lambda m=model, i=ids, a=mask: m.get_instruction_embeds(i, a))
            spec.extra["encoder_parameters"] = _common.count_parameters(model.instruction_encoder)
        candidates[spec.name] = (spec, model, kwargs)

    def use_tower(module: nn.Module) -> None:
        baseline.vision_tower = module
        for _, model, _ in candidates.values():
            model.vision_tower = module

    def call(model, kwargs):
        return lambda: model.get_image_features(pixel_values, **kwargs)

    # FLOPs and parameters
    tower_flops = _common.count_flops(lambda: tower(pixel_values, output_hidden_states=True))
    use_tower(cached)
    baseline_flops = _common.count_flops(baseline_call)
    head_flops = {name: _common.count_flops(call(model, kwargs)) for name, (_, model, kwargs) in candidates.items()}

    # Heads on the cached tower outputs, interleaved with the tower itself and the baseline head.
    fns = {"tower": lambda: tower(pixel_values, output_hidden_states=True), "llava": baseline_call}
    fns.update({name: call(model, kwargs) for name, (_, model, kwargs) in candidates.items()})
    for spec, _, _ in candidates.values():
        if "encoder_call" in spec.extra:
            fns[f"{spec.name} [encoder]"] = spec.extra["encoder_call"]
    times = _common.interleaved_timings(fns, args.repeats, args.warmup, device)

    direct = {}
    if args.direct:
        use_tower(tower)
        direct_fns = {"llava": baseline_call}
        direct_fns.update({name: call(model, kwargs) for name, (_, model, kwargs) in candidates.items()})
        direct = _common.interleaved_timings(direct_fns, args.repeats, args.warmup, device)
    use_tower(tower)

    tower_times, llava_times = times["tower"], times["llava"]
    rows = []
    for name, (spec, model, _) in candidates.items():
        head_times = times[name]
        ratio = _common.median(
            [(t + h) / (t + b) for t, h, b in zip(tower_times, head_times, llava_times)]
        )
        row = {
            "tower": tower_name,
            "fuser": name,
            "fusion_type": spec.settings["fusion_type"],
            "vision_feature_layer": spec.settings["vision_feature_layer"],
            "parameters": _common.count_parameters(model.multi_modal_projector)
            + _common.count_parameters(model.internal_projectors),
            "llava_parameters": _common.count_parameters(baseline.multi_modal_projector),
            "gflops": (tower_flops + head_flops[name]) / 1e9,
            "llava_gflops": (tower_flops + baseline_flops) / 1e9,
            "flops_ratio": (tower_flops + head_flops[name]) / (tower_flops + baseline_flops),
            "tower_ms": _common.median(tower_times) * 1e3,
            "head_ms": _common.median(head_times) * 1e3,
            "llava_head_ms": _common.median(llava_times) * 1e3,
            "head_spread": _common.spread(head_times),
            "ratio": ratio,
            "direct_ratio": _common.ratio_of_rounds(direct[name], direct["llava"]) if direct else None,
            "target": spec.target,
            "met": None if spec.target is None else ratio <= spec.target,
            "note": spec.note,
        }
        if "encoder_call" in spec.extra:
            encoder_times = times[f"{spec.name} [encoder]"]
            row["instruction_encoder_parameters"] = spec.extra["encoder_parameters"]
            row["instruction_encoder_ms"] = _common.median(encoder_times) * 1e3
            row["ratio_with_encoder"] = _common.median(
                [(t + h + e) / (t + b) for t, h, e, b in zip(tower_times, head_times, encoder_times, llava_times)]
            )
        if args.use_kernels:
            row["hub_kernel"] = hub_kernel_active(model)
        rows.append(row)
    tower_info = {
        "tower": tower_name,
        "vision_config": vision_config,
        "text_width": text_width,
        "tokens_per_image": tower_outputs.hidden_states[0].shape[1],
        "tower_gflops": tower_flops / 1e9,
        "tower_parameters": _common.count_parameters(tower),
        "tower_ms": _common.median(tower_times) * 1e3,
        "tower_spread": _common.spread(tower_times),
        "llava_head_ms": _common.median(llava_times) * 1e3,
    }
    return rows, tower_info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_arguments(parser, "fusion_overhead")
    parser.add_argument("--towers", nargs="+", choices=["clip", "siglip"], default=["clip", "siglip"])
    parser.add_argument("--only", nargs="+", metavar="SUBSTRING", help="Keep only fusers whose name contains one.")
    parser.add_argument("--batch", type=int, default=1, help="Images per forward (default: 1).")
    parser.add_argument("--direct", action="store_true", help="Also time whole paths (tower included) head to head.")
    parser.add_argument(
        "--use-kernels", action="store_true",
        help=(
            "Let transformers replace the deformable sampling by the hub's compiled kernel (`kernels` package, CUDA)."
        ),
    )
    args = parser.parse_args(argv)
    device, dtype = _common.setup(args)
    machine = _common.machine_info(device)
    if args.use_kernels and device.type != "cuda":
        parser.error("--use-kernels needs --device cuda (the hub's deformable-attention kernel is CUDA-only).")

    specs = fuser_specs(args.quick)
    if args.only:
        specs = [s for s in specs if any(part in s.name for part in args.only)]
    rows, towers = [], []
    for tower_name in args.towers:
        tower_specs = [spec for spec in specs if spec.tower == tower_name]
        if tower_specs:
            tower_rows, tower_info = run_tower(args, tower_name, tower_specs, device, dtype)
            rows += tower_rows
            towers.append(tower_info)

    columns = [
        ("tower", "tower", ""), ("fuser", "fuser", ""), ("parameters", "params", ","),
        ("flops_ratio", "FLOPs ratio", ".4f"), ("head_ms", "fuser+proj ms", ".1f"),
        ("llava_head_ms", "LLaVA proj ms", ".1f"), ("tower_ms", "tower ms", ".0f"), ("ratio", "ratio", ".4f"),
        ("direct_ratio", "direct ratio", ".4f"), ("target", "target", ""),
    ]
    _common.print_table(
        f"Image-feature time / LLaVA-1.5 (vision tower + projector on layer -2), {dtype}, {device}", rows, columns
    )
    for row in rows:
        if "instruction_encoder_ms" in row:
            print(
                f"\n{row['fuser']}: instruction encoder {row['instruction_encoder_parameters']:,} params, "
                f"{row['instruction_encoder_ms']:.1f} ms per instruction; ratio including it "
                f"{row['ratio_with_encoder']:.4f}"
            )
    targets = [
        _common.check_target(f"{row['tower']} {row['fuser']}", row["ratio"], row["target"])
        for row in rows
        if row["target"] is not None
    ]
    _common.print_targets(targets)
    payload = {
        "benchmark": "fusion_overhead",
        "machine": machine,
        "settings": _common.run_settings(
            args, dtype, batch=args.batch, direct=args.direct, use_kernels=args.use_kernels
        ),
        "towers": towers,
        "results": rows,
        "targets": targets,
    }
    _common.write_results(args.output, payload)
    return payload


if __name__ == "__main__":
    main()
