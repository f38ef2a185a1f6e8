"""Shared tiny builders for the llava-multilayer tests (CPU, float32, a few hundred thousand parameters each).

What is here, for reuse by any test module:

- `tiny_vision_config`, `tiny_siglip_vision_config`, `tiny_text_config`, `tiny_instruction_encoder_config`:
  sub-configs small enough to build a model in milliseconds. The vision towers see 28x28 images in 7x7 patches
  (a 4x4 grid), so a prompt's `<image>` expands into 16 visual tokens (CLIP: 17 tokens minus the CLS).
- `load_tokenizer` / `load_instruction_tokenizer`: the SentencePiece LLaMA tokenizer of `fixtures/tokenizer` (the
  one every golden fixture uses) plus the `<image>` token, which gets id 512 = the language model's vocabulary size,
  i.e. it lies outside the vocabulary, as converted checkpoints have it; and the tiny mpnet WordPiece tokenizer of
  the IGVA fixture.
- `make_image_processor`, `make_processor`, `processor_for`: the LLaVA-1.5 pad-to-square preprocessing and the
  matching `LlavaMultiLayerProcessor` (or `LlavaMultiLayerInstructionProcessor` for instruction-guided models).
- `make_config`, `make_model`, `VARIANTS`: every fusion set-up (`single`, `concat`, `mmfuser`, `igva` with and
  without the instruction encoder, internal `add`, internal `cross_attention` in its three placements), built with
  random weights large enough that each part of the model visibly changes the logits (zero-initialised gates and
  scales are opened).
- `random_image`, `make_inputs`: deterministic images and processed model inputs.
"""

from __future__ import annotations

import json
import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub read it

from pathlib import Path  # noqa: E402

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaImageProcessorPil,
    MPNetConfig,
    SiglipVisionConfig,
)

from llava_multilayer import (
    LlavaMultiLayerConfig,
    LlavaMultiLayerForConditionalGeneration,
    LlavaMultiLayerInstructionProcessor,
    LlavaMultiLayerProcessor,
    add_image_token,
)


# Tiny models run fastest single-threaded; several threads oversubscribe a busy CI machine (20x slower observed).
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

FIXTURES_DIR = Path(__file__).parent / "fixtures"
TOKENIZER_DIR = FIXTURES_DIR / "tokenizer"
INSTRUCTION_TOKENIZER_DIR = FIXTURES_DIR / "igva-clip" / "sentence_embedder"

IMAGE_TOKEN = "<image>"
TEXT_VOCAB_SIZE = 512  # the fixture tokenizer's vocabulary; `<image>` is added after it, as id 512
IMAGE_TOKEN_ID = TEXT_VOCAB_SIZE
IMAGE_SIZE = 28
PATCH_SIZE = 7
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 16 (a square grid, as the mmfuser fuser needs)
VISION_LAYERS = 4  # hidden_states has 5 entries: embeddings + 4 layers
TEXT_LAYERS = 2

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# The vicuna_v1 prompt all three original codebases use.
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def vicuna_prompt(question: str, num_images: int = 1) -> str:
    """A one-turn vicuna_v1 prompt with `num_images` `<image>` placeholders before the question."""
    return f"{SYSTEM} USER: {(IMAGE_TOKEN + chr(10)) * num_images}{question} ASSISTANT:"


# --------------------------------------------------------------------------------------------------------------
# Sub-configs
# --------------------------------------------------------------------------------------------------------------


#: The widths of every tiny sub-model: hidden 32, MLP 64, 4 heads.
TINY_WIDTHS = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4)
#: The geometry of both tiny vision towers: 4 layers, 28x28 images in 7x7 patches (a 4x4 grid).
TINY_TOWER = dict(TINY_WIDTHS, num_hidden_layers=VISION_LAYERS, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)


def tiny_vision_config(**overrides) -> CLIPVisionConfig:
    """A 4-layer CLIP vision tower: hidden 32, 4 heads, 28x28 images, 7x7 patches (4x4 grid + CLS)."""
    return CLIPVisionConfig(**{**TINY_TOWER, "projection_dim": 32, **overrides})


def tiny_siglip_vision_config(**overrides) -> SiglipVisionConfig:
    """A 4-layer SigLIP vision tower with the same geometry as `tiny_vision_config` (no CLS token)."""
    return SiglipVisionConfig(**{**TINY_TOWER, **overrides})


def tiny_text_config(**overrides) -> LlamaConfig:
    """A 2-layer LLaMA: hidden 32, 4 heads, the fixture tokenizer's 512-token vocabulary."""
    settings = dict(
        TINY_WIDTHS,
        vocab_size=TEXT_VOCAB_SIZE,
        num_hidden_layers=TEXT_LAYERS,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaConfig(**{**settings, **overrides})


def tiny_instruction_encoder_config(**overrides) -> MPNetConfig:
    """A 2-layer mpnet sentence encoder matching the IGVA fixture's WordPiece tokenizer (101 tokens), no dropout."""
    settings = dict(
        TINY_WIDTHS,
        vocab_size=101,
        num_hidden_layers=2,
        max_position_embeddings=130,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return MPNetConfig(**{**settings, **overrides})


# --------------------------------------------------------------------------------------------------------------
# Fusion set-ups
# --------------------------------------------------------------------------------------------------------------

#: Config settings of every fusion set-up, by test id. Values are merged over `make_config`'s tiny defaults.
VARIANTS: dict[str, dict] = {
    "single": dict(fusion_type="single", vision_feature_layer=-2),
    "concat": dict(fusion_type="concat", vision_feature_layer=[1, [2, 3], -1]),
    "mmfuser": dict(fusion_type="mmfuser", vision_feature_layer=[1, 2, 3, -1]),
    "igva": dict(fusion_type="igva"),
    "igva_average": dict(fusion_type="igva", igva_aggregate_by_average=True),
    "internal_add": dict(internal_fusion_type="add"),
    "internal_cross_pre": dict(internal_fusion_type="cross_attention", internal_fusion_placement="pre_cross"),
    "internal_cross_post": dict(internal_fusion_type="cross_attention", internal_fusion_placement="post_cross"),
    "internal_cross_parallel": dict(internal_fusion_type="cross_attention", internal_fusion_placement="parallel"),
}


def make_config(
    fusion_type: str = "single",
    *,
    vision_config=None,
    text_config=None,
    **overrides,
) -> LlavaMultiLayerConfig:
    """A tiny `LlavaMultiLayerConfig` for `fusion_type`, with the settings the fuser needs filled in.

    `fusion_type="igva"` gets two layer groups and an mpnet instruction encoder (unless
    `igva_aggregate_by_average=True`); an `internal_fusion_type` gets two internal features mapped to the two decoder
    layers. Any field can be overridden by keyword.
    """
    settings = dict(
        vision_config=vision_config if vision_config is not None else tiny_vision_config(),
        text_config=text_config if text_config is not None else tiny_text_config(),
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=NUM_PATCHES,
        fusion_type=fusion_type,
        vision_feature_layer={"concat": [-3, -1], "mmfuser": [1, 2, -1]}.get(fusion_type, -2),
    )
    if fusion_type == "mmfuser":
        settings.update(mmfuser_num_heads=4, mmfuser_num_points=2)
    if fusion_type == "igva":
        settings.update(igva_layer_groups=[[1, 2], [3, 4]], igva_num_blocks=2, igva_num_heads=4, igva_hidden_size=16)
        if not overrides.get("igva_aggregate_by_average", False):
            settings["instruction_encoder_config"] = tiny_instruction_encoder_config()
    if overrides.get("internal_fusion_type") is not None:
        settings.update(internal_feature_layers=[1, 3], internal_layer_map=[[0, 0], [1, 1]])
    settings.update(overrides)
    return LlavaMultiLayerConfig(**settings)


def randomize_weights_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Redraws every parameter so that each part of the model matters: weights of normalisation layers
    `1 + N(0, 0.1)` and their biases `N(0, 0.02)`, zero-initialised gates/scales (internal cross-attention, MMFuser)
    opened to about 0.5, everything else `N(0, std)`. Deterministic in `seed`."""
    generator = torch.Generator().manual_seed(seed)
    norm_parameters = {
        f"{module_name}.{name}".lstrip("."): name
        for module_name, module in model.named_modules()
        if "Norm" in type(module).__name__
        for name, _ in module.named_parameters(recurse=False)
    }
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            leaf = name.rsplit(".", 1)[-1]
            if name in norm_parameters:
                parameter.copy_(1.0 + 0.1 * noise if leaf == "weight" else 0.02 * noise)
            elif "gate" in leaf or "scale" in leaf:
                parameter.copy_(0.5 + 0.1 * noise)
            else:
                parameter.copy_(std * noise)
    return model


def make_model(
    fusion_type: str = "single",
    *,
    model_class=LlavaMultiLayerForConditionalGeneration,
    seed: int = 0,
    randomize: bool = True,
    **config_overrides,
):
    """A tiny model in eval mode; `fusion_type` is a config `fusion_type` or a key of `VARIANTS`.

    With `randomize=True` (default) the weights are redrawn by `randomize_weights_` (deterministic in `seed`);
    otherwise they keep the model's own initialisation.
    """
    if fusion_type in VARIANTS:
        config_overrides = {**VARIANTS[fusion_type], **config_overrides}
        fusion_type = config_overrides.pop("fusion_type", "single")
    config = make_config(fusion_type, **config_overrides)
    torch.manual_seed(seed)
    model = model_class(config)
    if randomize:
        randomize_weights_(model, seed=seed)
    return model.eval()


def needs_instructions(config: LlavaMultiLayerConfig) -> bool:
    """Whether the model embeds an instruction (`igva` with the weight allocator)."""
    return config.fusion_type == "igva" and not config.igva_aggregate_by_average


# --------------------------------------------------------------------------------------------------------------
# Tokenizers, processors, inputs
# --------------------------------------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike = TOKENIZER_DIR):
    """The SentencePiece LLaMA tokenizer in `path` plus `<image>` as the next free id, with its tokenization rule."""
    return add_image_token(AutoTokenizer.from_pretrained(path), IMAGE_TOKEN)


def load_instruction_tokenizer(path: str | os.PathLike = INSTRUCTION_TOKENIZER_DIR):
    """The instruction encoder's tokenizer (the IGVA fixture's tiny all-mpnet-style WordPiece tokenizer)."""
    return AutoTokenizer.from_pretrained(path)


def make_image_processor(image_size: int = IMAGE_SIZE, siglip: bool = False) -> LlavaImageProcessorPil:
    """LLaVA-1.5 preprocessing: pad to a square with the mean colour, then CLIP's resize + centre crop (or, with
    `siglip=True`, SigLIP's plain resize to `image_size` x `image_size` with mean/std 0.5)."""
    if siglip:
        return LlavaImageProcessorPil(
            size={"height": image_size, "width": image_size},
            do_center_crop=False,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            resample=3,
            do_pad=True,
        )
    return LlavaImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,
        do_pad=True,
    )


def make_processor(
    tokenizer=None,
    *,
    siglip: bool = False,
    instruction_tokenizer=None,
    vision_feature_select_strategy: str = "default",
    image_size: int = IMAGE_SIZE,
    patch_size: int = PATCH_SIZE,
) -> LlavaMultiLayerProcessor:
    """The processor of a tiny model: CLIP (CLS counted as one additional token) or SigLIP (none).

    Passing `instruction_tokenizer` gives a `LlavaMultiLayerInstructionProcessor` (for `igva` models).
    """
    kwargs = dict(
        image_processor=make_image_processor(image_size, siglip=siglip),
        tokenizer=tokenizer if tokenizer is not None else load_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=0 if siglip else 1,
        image_token=IMAGE_TOKEN,
    )
    if instruction_tokenizer is not None:
        return LlavaMultiLayerInstructionProcessor(instruction_tokenizer=instruction_tokenizer, **kwargs)
    return LlavaMultiLayerProcessor(**kwargs)


def processor_for(config: LlavaMultiLayerConfig, tokenizer=None, instruction_tokenizer=None):
    """The processor matching a tiny `config` (instruction processor for `igva` with the allocator)."""
    siglip = config.vision_config.model_type == "siglip_vision_model"
    if needs_instructions(config):
        instruction_tokenizer = instruction_tokenizer or load_instruction_tokenizer()
    else:
        instruction_tokenizer = None
    return make_processor(
        tokenizer,
        siglip=siglip,
        instruction_tokenizer=instruction_tokenizer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_size=config.vision_config.image_size,
        patch_size=config.vision_config.patch_size,
    )


#: Golden fixture directories (output of the original codebases) that hold a prompt and processed inputs.
FIXTURE_DIRS = sorted(path.name for path in FIXTURES_DIR.iterdir() if (path / "prompt.json").is_file())


def fixture_processor(fixture_dir: str | os.PathLike, instruction_tokenizer=None) -> LlavaMultiLayerProcessor:
    """The processor a converter builds for a golden fixture: the tokenizer of `original/` plus `<image>`, and the
    tower's `vision_tower/preprocessor_config.json` with LLaVA-1.5's pad-to-square (CLIP: resize the shortest
    edge + centre crop; SigLIP: resize to height x width, no crop). CLIP counts its CLS as an additional token."""
    fixture_dir = Path(fixture_dir)
    if not fixture_dir.is_absolute():
        fixture_dir = FIXTURES_DIR / fixture_dir
    settings = json.loads((fixture_dir / "vision_tower" / "preprocessor_config.json").read_text())
    vision = json.loads((fixture_dir / "vision_tower" / "config.json").read_text())
    do_center_crop = settings.get("do_center_crop", False)
    image_processor = LlavaImageProcessorPil(
        size=settings["size"],
        do_center_crop=do_center_crop,
        **({"crop_size": settings["crop_size"]} if do_center_crop else {}),
        image_mean=settings["image_mean"],
        image_std=settings["image_std"],
        resample=settings.get("resample", 3),
        rescale_factor=settings.get("rescale_factor", 1 / 255),
        do_pad=True,
    )
    is_clip = vision["model_type"].startswith("clip")
    kwargs = dict(
        image_processor=image_processor,
        tokenizer=load_tokenizer(fixture_dir / "original"),
        patch_size=vision["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1 if is_clip else 0,
        image_token=IMAGE_TOKEN,
    )
    if instruction_tokenizer is not None:
        return LlavaMultiLayerInstructionProcessor(instruction_tokenizer=instruction_tokenizer, **kwargs)
    return LlavaMultiLayerProcessor(**kwargs)


def random_image(seed: int = 0, size: tuple[int, int] = (40, 30)) -> Image.Image:
    """A deterministic random RGB image of `size` = (width, height) (not square, so padding matters)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def make_inputs(processor, prompts: str | list[str], images=None, **kwargs):
    """`processor(images, prompts, return_tensors="pt")` with left padding (for generation)."""
    kwargs.setdefault("padding_side", "left")
    return processor(images=images, text=prompts, return_tensors="pt", **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer():
    """The fixture tokenizer with `<image>` (id 512). Do not mutate."""
    return load_tokenizer()


@pytest.fixture(scope="session")
def instruction_tokenizer():
    """The tiny mpnet tokenizer of the instruction encoder. Do not mutate."""
    return load_instruction_tokenizer()


@pytest.fixture(scope="session")
def processor(tokenizer):
    """The CLIP processor of the tiny models (16 visual tokens per image)."""
    return make_processor(tokenizer)


@pytest.fixture(scope="session")
def instruction_processor(tokenizer, instruction_tokenizer):
    """The instruction processor of the tiny `igva` models."""
    return make_processor(tokenizer, instruction_tokenizer=instruction_tokenizer)



def pytest_runtest_setup(item):
    """`@pytest.mark.gpu` tests skip without CUDA; `@pytest.mark.slow` tests skip unless `RUN_SLOW=1`."""
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    run_slow = os.environ.get("RUN_SLOW", "0").lower() in ("1", "true", "yes")
    if item.get_closest_marker("slow") is not None and not run_slow:
        pytest.skip("slow test: set RUN_SLOW=1 to run it")
