"""Processor tests: image-token expansion, the vicuna_v1 chat template, parity with the inputs the original
codebases produced (golden fixtures), and clear errors."""

import json

import numpy as np
import pytest
import torch
from conftest import (
    FIXTURE_DIRS,
    FIXTURES_DIR,
    IMAGE_TOKEN,
    IMAGE_TOKEN_ID,
    NUM_PATCHES,
    SYSTEM,
    fixture_processor,
    load_instruction_tokenizer,
    make_model,
    make_processor,
    processor_for,
    random_image,
    tiny_siglip_vision_config,
    vicuna_prompt,
)
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, AutoTokenizer

from llava_multilayer import LlavaMultiLayerInstructionProcessor, LlavaMultiLayerProcessor


ORIGINAL_IMAGE_TOKEN_INDEX = -200  # the placeholder id of the original codebases' `tokenizer_image_token`


def _count_image_tokens(inputs, row: int = 0) -> int:
    return int((inputs["input_ids"][row] == IMAGE_TOKEN_ID).sum())


# --------------------------------------------------------------------------------------------------------------
# Expansion of `<image>`
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("siglip", "strategy", "expected"),
    [
        (False, "default", NUM_PATCHES),  # CLIP: 16 patches + CLS, CLS dropped
        (False, "full", NUM_PATCHES + 1),  # CLIP: CLS kept
        (True, "default", NUM_PATCHES - 1),  # SigLIP has no CLS: "default" drops the first patch
        (True, "full", NUM_PATCHES),
    ],
    ids=["clip-default", "clip-full", "siglip-default", "siglip-full"],
)
def test_image_token_count_matches_the_model(tokenizer, siglip, strategy, expected):
    processor = make_processor(tokenizer, siglip=siglip, vision_feature_select_strategy=strategy)
    assert processor.num_image_tokens(28, 28) == expected
    inputs = processor(images=random_image(0), text=vicuna_prompt("What is it?"), return_tensors="pt")
    assert _count_image_tokens(inputs) == expected
    assert inputs["pixel_values"].shape == (1, 3, 28, 28)

    # The model computes exactly that many visual tokens per image (else its forward raises).
    vision_config = tiny_siglip_vision_config() if siglip else None
    model = make_model("concat", vision_config=vision_config, vision_feature_select_strategy=strategy)
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.image_hidden_states.shape[1] == expected


def test_each_placeholder_expands_in_its_prompt(processor):
    prompts = [vicuna_prompt("Compare them.", 2), vicuna_prompt("One?"), vicuna_prompt("None.", 0)]
    inputs = processor(
        images=[random_image(0), random_image(1), random_image(2)], text=prompts, return_tensors="pt",
        padding_side="left",
    )
    assert inputs["pixel_values"].shape == (3, 3, 28, 28)
    assert [_count_image_tokens(inputs, row) for row in range(3)] == [2 * NUM_PATCHES, NUM_PATCHES, 0]
    assert (inputs["attention_mask"][:, -1] == 1).all(), "left padding keeps the prompt ends aligned"
    # The two images of the first prompt are separate runs of image tokens separated by text ("\n").
    row = inputs["input_ids"][0][inputs["attention_mask"][0].bool()].tolist()
    runs = "".join("I" if token == IMAGE_TOKEN_ID else "t" for token in row)
    assert runs.count("I" * NUM_PATCHES) == 2 and "I" * (NUM_PATCHES + 1) not in runs


def test_text_around_the_image_is_tokenized_separately(processor, tokenizer):
    """As the originals' `tokenizer_image_token`: each chunk is tokenized on its own (one BOS at the start), so
    the SentencePiece word-start marker after `<image>` is kept."""
    inputs = processor(images=random_image(0), text=f"Hello{IMAGE_TOKEN}\nworld")
    before = tokenizer("Hello")["input_ids"]
    after = tokenizer("\nworld", add_special_tokens=False)["input_ids"]
    assert inputs["input_ids"][0] == before + [IMAGE_TOKEN_ID] * NUM_PATCHES + after


def test_pad_to_square_uses_the_mean_colour(processor):
    """A wide image is padded top and bottom with the mean colour, which normalises to 0."""
    red = Image.new("RGB", (56, 14), (255, 0, 0))
    pixel_values = processor(images=red, text=f"{IMAGE_TOKEN}\nx", return_tensors="pt")["pixel_values"][0]
    assert pixel_values.abs()[:, :8].max() < 0.02 and pixel_values.abs()[:, -8:].max() < 0.02
    assert pixel_values[0, 14, 14] > 1.5  # the red band in the middle
    unpadded = make_processor(processor.tokenizer)
    unpadded.image_processor.do_pad = False
    squashed = unpadded(images=red, text=f"{IMAGE_TOKEN}\nx", return_tensors="pt")["pixel_values"][0]
    assert squashed[0, :8].min() > 1.5, "without padding the centre crop is all red"


# --------------------------------------------------------------------------------------------------------------
# Chat template
# --------------------------------------------------------------------------------------------------------------


def _fixture_prompts(name: str) -> list[tuple[str, str, str | None]]:
    """(prompt, question, instruction) of each prompt of a fixture (IGVA has two)."""
    data = json.loads((FIXTURES_DIR / name / "prompt.json").read_text())
    return [
        (data[f"prompt{suffix}"], data[f"question{suffix}"], data.get(f"instruction{suffix}"))
        for suffix in ("", "_2")
        if f"prompt{suffix}" in data
    ]


@pytest.mark.parametrize("name", FIXTURE_DIRS)
def test_chat_template_reproduces_the_fixture_prompt(processor, name):
    for prompt, question, _ in _fixture_prompts(name):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        assert processor.apply_chat_template(messages, add_generation_prompt=True) == prompt


def test_chat_template_multi_turn_and_system(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q1"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
        {"role": "user", "content": "Q2"},
    ]
    # vicuna_v1 (separator style TWO): "{system} USER: {q} ASSISTANT: {a}</s>USER: ..."
    expected = f"{SYSTEM} USER: {IMAGE_TOKEN}\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == expected
    assert processor.apply_chat_template(messages[:2]) == expected[: -len("USER: Q2 ASSISTANT:")]
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    assert processor.apply_chat_template(with_system, add_generation_prompt=True).startswith(
        f"Be brief. USER: {IMAGE_TOKEN}\nQ1"
    )


def test_tokenized_chat_template_equals_processor_call(processor):
    image = random_image(0)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    tokenized = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    expected = processor(images=image, text=vicuna_prompt("What?"), return_tensors="pt")
    assert tokenized.keys() == expected.keys()
    for key in expected:
        assert torch.equal(tokenized[key], expected[key]), key


# --------------------------------------------------------------------------------------------------------------
# Parity with the original codebases' inputs (golden fixtures)
# --------------------------------------------------------------------------------------------------------------


def _expand_original_ids(original_ids: torch.Tensor, num_image_tokens: int) -> list[int]:
    ids = original_ids.tolist()
    position = ids.index(ORIGINAL_IMAGE_TOKEN_INDEX)
    assert ids.count(ORIGINAL_IMAGE_TOKEN_INDEX) == 1
    return ids[:position] + [IMAGE_TOKEN_ID] * num_image_tokens + ids[position + 1 :]


@pytest.mark.parametrize("name", FIXTURE_DIRS)
def test_processor_matches_the_original_inputs(name):
    fixture_dir = FIXTURES_DIR / name
    instruction_tokenizer = None
    if (fixture_dir / "sentence_embedder").is_dir():
        instruction_tokenizer = AutoTokenizer.from_pretrained(fixture_dir / "sentence_embedder")
    processor = fixture_processor(fixture_dir, instruction_tokenizer=instruction_tokenizer)
    assert processor.image_token_id == 512  # the fixture tokenizer's vocabulary ends at 511
    expected = load_file(fixture_dir / "inputs.safetensors")
    meta = json.loads((fixture_dir / "meta.json").read_text())
    image = Image.open(fixture_dir / "image.png")

    for index, (prompt, _, instruction) in enumerate(_fixture_prompts(name)):
        suffix = "" if index == 0 else "_2"
        kwargs = {"instructions": [instruction]} if instruction_tokenizer is not None else {}
        inputs = processor(images=image, text=prompt, return_tensors="pt", **kwargs)
        torch.testing.assert_close(inputs["pixel_values"], expected["pixel_values"], atol=1e-6, rtol=0)
        num_image_tokens = _count_image_tokens(inputs)
        assert num_image_tokens == meta["num_image_tokens"]
        assert inputs["input_ids"][0].tolist() == _expand_original_ids(
            expected[f"input_ids{suffix}"][0], num_image_tokens
        )
        assert inputs["attention_mask"].all()
        if instruction_tokenizer is not None:
            assert torch.equal(inputs["instruction_input_ids"], expected[f"instruction_input_ids{suffix}"])
            assert torch.equal(
                inputs["instruction_attention_mask"], expected[f"instruction_attention_mask{suffix}"]
            )


# --------------------------------------------------------------------------------------------------------------
# Instruction processor (IGVA)
# --------------------------------------------------------------------------------------------------------------


def test_instruction_processor_gives_one_instruction_per_image(instruction_processor, instruction_tokenizer):
    prompts = [vicuna_prompt("Compare the two.", 2), vicuna_prompt("What color is it?")]
    images = [random_image(0), random_image(1), random_image(2)]
    inputs = instruction_processor(images=images, text=prompts, return_tensors="pt")
    assert inputs["instruction_input_ids"].shape[0] == 3
    default = instruction_tokenizer(["Compare the two.", "Compare the two.", "What color is it?"], padding=True)
    assert inputs["instruction_input_ids"].tolist() == default["input_ids"]

    explicit = instruction_processor(images=images, text=prompts, instructions=["a", "b"], return_tensors="pt")
    expected_ids = instruction_tokenizer(["a", "a", "b"], padding=True)["input_ids"]
    assert explicit["instruction_input_ids"].tolist() == expected_ids
    with pytest.raises(ValueError, match="1 instruction.*2 prompt"):
        instruction_processor(images=images, text=prompts, instructions=["only one"])
    text_only = instruction_processor(text=vicuna_prompt("Hi.", 0), return_tensors="pt")
    assert "instruction_input_ids" not in text_only


def test_instruction_processor_refuses_a_prompt_without_instruction(instruction_processor):
    """vLLM hands the processor a bare `<image>` instead of the prompt: IGVA's instruction must then come with the
    request (`mm_processor_kwargs={"instructions": [...]}`), never be guessed."""
    with pytest.raises(ValueError, match="Could not find an instruction in the prompt '<image>'"):
        instruction_processor(images=random_image(0), text=IMAGE_TOKEN)
    explicit = instruction_processor(
        images=random_image(0), text=IMAGE_TOKEN, instructions=["What is it?"], return_tensors="pt"
    )
    assert explicit["instruction_input_ids"].shape[0] == 1


def test_processor_for_picks_the_instruction_processor():
    igva = make_model("igva")
    processor = processor_for(igva.config, instruction_tokenizer=load_instruction_tokenizer())
    assert "instruction_input_ids" in processor.model_input_names
    assert type(processor_for(make_model("igva_average").config)) is LlavaMultiLayerProcessor


@pytest.mark.parametrize("instruction_guided", [False, True], ids=["plain", "instruction"])
def test_saved_processor_config_decides_the_loaded_class(
    processor, instruction_processor, tmp_path, instruction_guided
):
    """`processor_config.json` says which class was saved (`auto_map`); loading reads it instead of probing the repo
    for `instruction_tokenizer/`, through the generic class and through `AutoProcessor`."""
    saved = instruction_processor if instruction_guided else processor
    saved.save_pretrained(tmp_path)
    if not instruction_guided:
        # A stray folder does not turn a plain checkpoint into an instruction-guided one.
        instruction_processor.instruction_tokenizer.save_pretrained(tmp_path / "instruction_tokenizer")
    saved_config = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved_config["processor_class"] == "LlavaMultiLayerProcessor"  # the class `AutoProcessor` resolves
    assert saved_config["auto_map"]["AutoProcessor"].endswith(f".{type(saved).__name__}")

    for loaded in (LlavaMultiLayerProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is type(saved)
        assert loaded.to_dict() == saved.to_dict()
    if instruction_guided:
        assert LlavaMultiLayerInstructionProcessor.from_pretrained(tmp_path).instruction_max_length == 384
    else:
        with pytest.raises(OSError, match="not the processor of an instruction-guided .* LlavaMultiLayerProcessor"):
            LlavaMultiLayerInstructionProcessor.from_pretrained(tmp_path)


def test_processor_config_without_auto_map_names_its_class(instruction_processor, tmp_path):
    """Without `auto_map` (a processor saved with its class not registered for `AutoProcessor`), `processor_class`
    names the class itself and decides alone."""
    instruction_processor.save_pretrained(tmp_path)
    config_file = tmp_path / "processor_config.json"
    saved_config = json.loads(config_file.read_text())
    del saved_config["auto_map"], saved_config["image_processor"]["auto_map"]
    config_file.write_text(json.dumps({**saved_config, "processor_class": "LlavaMultiLayerInstructionProcessor"}))
    assert type(LlavaMultiLayerProcessor.from_pretrained(tmp_path)) is LlavaMultiLayerInstructionProcessor

    config_file.write_text(json.dumps({**saved_config, "processor_class": "LlavaMultiLayerProcessor"}))
    assert type(LlavaMultiLayerProcessor.from_pretrained(tmp_path)) is LlavaMultiLayerProcessor
    with pytest.raises(OSError, match="not the processor of an instruction-guided"):
        LlavaMultiLayerInstructionProcessor.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompts", "num_images", "pattern"),
    [
        (vicuna_prompt("x"), 2, r"1 '<image>' placeholder.*2 image"),
        (vicuna_prompt("x", 2), 1, r"2 '<image>' placeholder.*\[2\].*1 image"),
        (vicuna_prompt("x"), 0, r"1 '<image>' placeholder.*0 image"),
        (vicuna_prompt("x", 0), 1, r"0 '<image>' placeholder.*1 image"),
        ([vicuna_prompt("x"), vicuna_prompt("y", 2)], 2, r"3 '<image>' placeholder.*\[1, 2\].*2 image"),
    ],
)
def test_placeholder_image_count_mismatch_names_the_counts(processor, prompts, num_images, pattern):
    images = [random_image(index) for index in range(num_images)] or None
    with pytest.raises(ValueError, match=pattern):
        processor(images=images, text=prompts)


@pytest.mark.parametrize("text", ["", "   ", [vicuna_prompt("x", 0), ""], [], None])
def test_empty_prompt_raises(processor, text):
    with pytest.raises(ValueError, match="empty|required|non-empty"):
        processor(text=text)


def test_empty_image_raises(processor):
    with pytest.raises(ValueError, match="Image 0 is empty"):
        processor(images=np.zeros((0, 4, 3), dtype=np.uint8), text=vicuna_prompt("x"))


def test_tokenizer_without_image_token_raises():
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES_DIR / "tokenizer")
    with pytest.raises(ValueError, match="has no '<image>' token"):
        make_processor(tokenizer)


def test_truncation_through_the_image_tokens_is_refused(processor):
    prompt = vicuna_prompt("x")
    full = processor(images=random_image(0), text=prompt)["input_ids"][0]
    with pytest.raises(ValueError, match="Mismatch in `image` token count"):
        processor(images=random_image(0), text=prompt, truncation=True, max_length=full.index(IMAGE_TOKEN_ID) + 3)
    kept = processor(images=random_image(0), text=prompt, truncation=True, max_length=len(full) - 2)["input_ids"][0]
    assert kept == full[:-2], "truncation after the image tokens keeps them all"
