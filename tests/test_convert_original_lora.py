"""`conversion_scripts/convert_original_lora.py`: a LoRA run of the original code (adapter + non_lora_trainables.bin
on a base LLM) converts into the model the original builder would merge. The LoRA fixture is generated here: random
LoRA weights, with the original PEFT naming, on top of the MMFuser golden fixture."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from llava_multilayer import LlavaMultiLayerForConditionalGeneration, LlavaMultiLayerProcessor
from llava_multilayer.conversion.convert_mmfuser_to_hf import convert_mmfuser
from llava_multilayer.conversion.convert_original_lora import convert_original_lora, main
from llava_multilayer.conversion.reading import ConversionError


FIXTURE = Path(__file__).parent / "fixtures" / "mmfuser-clip"
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
RANK, ALPHA = 4, 8


def make_lora_run(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A base LLM directory and a LoRA output directory as the original training code writes them.

    Returns `(base_dir, lora_dir, deltas)`, `deltas` = `alpha / r * B @ A` by original weight name.
    """
    original = load_file(FIXTURE / "original" / "model.safetensors")
    base_dir, lora_dir = tmp_path / "vicuna", tmp_path / "lora"
    base_dir.mkdir()
    lora_dir.mkdir()
    llm_prefixes = ("model.embed_tokens", "model.layers", "model.norm", "lm_head")
    llm = {key: value for key, value in original.items() if key.startswith(llm_prefixes)}
    save_file(llm, base_dir / "model.safetensors")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copyfile(FIXTURE / "original" / name, base_dir / name)

    generator = torch.Generator().manual_seed(0)
    adapter, deltas = {}, {}
    for layer in range(2):
        for target in TARGETS:
            weight = original[f"model.layers.{layer}.{target}.weight"]
            lora_a = torch.randn(RANK, weight.shape[1], generator=generator) * 0.1
            lora_b = torch.randn(weight.shape[0], RANK, generator=generator) * 0.1
            prefix = f"base_model.model.model.layers.{layer}.{target}"
            adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"] = lora_a, lora_b
            deltas[f"model.layers.{layer}.{target}.weight"] = ALPHA / RANK * lora_b @ lora_a
    save_file(adapter, lora_dir / "adapter_model.safetensors")
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.05,
        "bias": "none",
        "target_modules": sorted({target.split(".")[1] for target in TARGETS}),
        "base_model_name_or_path": str(base_dir),
    }
    (lora_dir / "adapter_config.json").write_text(json.dumps(adapter_config))
    projector = {
        f"base_model.model.{key}": value for key, value in original.items() if key.startswith("model.mm_projector.")
    }
    torch.save(projector, lora_dir / "non_lora_trainables.bin")
    shutil.copyfile(FIXTURE / "original" / "config.json", lora_dir / "config.json")
    return base_dir, lora_dir, deltas


def test_lora_run_converts_to_the_merged_model(tmp_path):
    _, lora_dir, deltas = make_lora_run(tmp_path)
    main(["--lora-dir", str(lora_dir), "--output-dir", str(tmp_path / "converted"),
          "--vision-tower", str(FIXTURE / "vision_tower"), "--verify"])
    assert not list(tmp_path.glob(".lora-merged-*"))  # the temporary merged checkpoint is gone

    # Reference: the full (non-LoRA) fixture checkpoint converted, plus the LoRA deltas under the converted names.
    convert_mmfuser(FIXTURE / "original", tmp_path / "reference", vision_tower=str(FIXTURE / "vision_tower"),
                    progress=False)
    converted = LlavaMultiLayerForConditionalGeneration.from_pretrained(tmp_path / "converted").eval()
    reference = LlavaMultiLayerForConditionalGeneration.from_pretrained(tmp_path / "reference").eval()
    reference_state = reference.state_dict()
    with torch.no_grad():
        for name, delta in deltas.items():
            reference_state["model.language_model." + name[len("model."):]] += delta
    for key, value in converted.state_dict().items():
        torch.testing.assert_close(value, reference_state[key], atol=1e-6, rtol=0, msg=key)

    processor = LlavaMultiLayerProcessor.from_pretrained(tmp_path / "converted")
    prompt = json.loads((FIXTURE / "prompt.json").read_text())["prompt"]
    inputs = processor(images=Image.open(FIXTURE / "image.png").convert("RGB"), text=prompt, return_tensors="pt")
    with torch.no_grad():
        difference = (converted(**inputs).logits - reference(**inputs).logits).abs().max().item()
        lora_effect = (converted(**inputs).logits - load_file(FIXTURE / "expected.safetensors")["logits"]).abs().max()
    print(f"\nLoRA-converted vs merged reference: max |logits diff| {difference:.2e}; the LoRA moved the logits by "
          f"up to {lora_effect:.2f}")
    assert difference < 1e-5
    assert lora_effect > 1e-2


def test_lora_problems_are_named(tmp_path):
    base_dir, lora_dir, _ = make_lora_run(tmp_path)
    adapter_config = json.loads((lora_dir / "adapter_config.json").read_text())
    (lora_dir / "adapter_config.json").write_text(json.dumps({**adapter_config, "use_dora": True}))
    with pytest.raises(ConversionError, match="DoRA"):
        convert_original_lora(lora_dir, tmp_path / "out", vision_tower=str(FIXTURE / "vision_tower"))

    (lora_dir / "adapter_config.json").write_text(json.dumps(adapter_config))
    adapter = load_file(lora_dir / "adapter_model.safetensors")
    adapter["base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight"] = torch.zeros(RANK, 64)
    adapter["base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, RANK)
    save_file(adapter, lora_dir / "adapter_model.safetensors")
    with pytest.raises(ConversionError, match=r"model\.layers\.5\.self_attn\.q_proj\.weight.*--base-model"):
        convert_original_lora(
            lora_dir, tmp_path / "out", base_model=base_dir, vision_tower=str(FIXTURE / "vision_tower")
        )
    assert not (tmp_path / "out").exists()


def test_non_lora_files_lose_peft_names(tmp_path):
    """Modules that carry LoRA and are also trained (Layer_Select_Fuse's `ucross_*`) appear in `ucross.bin` as
    `...base_layer.weight` next to their LoRA tensors: the base weight keeps its plain name, the LoRA copies go."""
    from llava_multilayer.conversion.convert_original_lora import read_non_lora_trainables

    prefix = "base_model.model.model.layers.1.ucross_attn.q_proj"
    torch.save(
        {
            f"{prefix}.base_layer.weight": torch.ones(2, 2),
            f"{prefix}.lora_A.default.weight": torch.zeros(1, 2),
            "base_model.model.model.layers.1.ucross_attn_gate": torch.zeros(1),
        },
        tmp_path / "ucross.bin",
    )
    gate = {"base_model.model.model.layers.1.ucross_attn_gate": torch.zeros(1)}
    torch.save(gate, tmp_path / "non_lora_trainables.bin")
    state = read_non_lora_trainables(tmp_path)
    assert sorted(state) == ["model.layers.1.ucross_attn.q_proj.weight", "model.layers.1.ucross_attn_gate"]
