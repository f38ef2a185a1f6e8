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
"""`llava-multilayer generate` (one image + prompt -> answer) and `llava-multilayer chat` (a conversation on stdin).

    llava-multilayer generate MODEL --image photo.jpg --prompt "What is shown in this image?"
    llava-multilayer chat MODEL --image photo.jpg            # one question per line; "exit" or EOF ends

`MODEL` is a converted directory or a Hub repo id. Prompts are wrapped in the `vicuna_v1` conversation format of the
original codebases (the processor's chat template); the answer is streamed token by token. Decoding is greedy unless
`--do-sample`. On a GPU, `--dtype bfloat16` and `--load-in-4bit` / `--load-in-8bit` (bitsandbytes) cut memory; the
vision tower, the fusion modules, the instruction encoder and `lm_head` always stay in full precision.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from .errors import CommandError, check_model_dir


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
EXIT_COMMANDS = ("exit", "quit")


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say which model to load, where and how."""
    parser.add_argument("model", help="Converted checkpoint directory or Hub repo id.")
    parser.add_argument(
        "--device",
        default="auto",
        help="'auto' (default: all visible GPUs via device_map='auto', else the CPU), 'cpu', 'cuda', 'cuda:1', 'mps'.",
    )
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto", help="Weights dtype (default: the checkpoint's own)."
    )
    quantization = parser.add_mutually_exclusive_group()
    quantization.add_argument(
        "--load-in-4bit", action="store_true", help="Quantize the language model to 4-bit NF4 (bitsandbytes)."
    )
    quantization.add_argument(
        "--load-in-8bit", action="store_true", help="Quantize the language model to 8-bit (bitsandbytes)."
    )


def add_decoding_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    """The flags of the answer: instruction (IGVA), system message, decoding and streaming."""
    parser.add_argument("--image", help="Path or URL of the image.")
    parser.add_argument(
        "--instruction",
        help="IGVA only: the instruction that weights the vision layers (default: the question itself).",
    )
    parser.add_argument("--system", help="Replaces the default vicuna_v1 system message.")
    parser.add_argument(
        "--max-new-tokens", type=int, default=max_new_tokens, help=f"Answer length limit (default: {max_new_tokens})."
    )
    parser.add_argument("--do-sample", action="store_true", help="Sample instead of greedy decoding.")
    parser.add_argument("--temperature", type=float, default=0.2, help="With --do-sample (default: 0.2).")
    parser.add_argument("--top-p", type=float, help="With --do-sample: nucleus sampling threshold.")
    parser.add_argument("--seed", type=int, help="Random seed, for reproducible sampling.")
    parser.add_argument(
        "--stream", action=argparse.BooleanOptionalAction, default=True, help="Print tokens as they come (default)."
    )


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="The question (wrapped in the chat template).")
    parser.add_argument(
        "--raw-prompt",
        action="store_true",
        help="Use --prompt as the complete model input, without the chat template (it must contain <image> when "
        "--image is given).",
    )
    add_decoding_arguments(parser)


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_decoding_arguments(parser, max_new_tokens=512)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def check_image(image: str | None) -> None:
    """Checks that `--image` is an http(s) URL or a local file PIL can read."""
    if image is None or image.startswith(("http://", "https://")):
        return
    path = Path(image)
    if not path.is_file():
        found = f"{image}, which " + ("is a directory" if path.is_dir() else "does not exist")
        raise CommandError.of(
            "--image", "an image file or an http(s) URL", found, "pass the path of an existing image."
        )
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as handle:
            handle.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise CommandError.of(
            "--image", "an image file PIL can read (PNG, JPEG, ...)", f"{image}, which is not one ({error})"
        ) from error


def check_device(device: str) -> None:
    """Checks that `--device` names a device this machine has (before any weights are loaded)."""
    if device in ("auto", "cpu"):
        return
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise CommandError.of(
            "--device", "auto, cpu, cuda, cuda:N or mps", repr(device), "pass one of those.", exit_code=2
        ) from error
    fix = "pass --device cpu, or --device auto (a GPU when there is one, else the CPU)."
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CommandError.of("--device", "a CUDA GPU", f"{device}, but torch sees no CUDA GPU here", fix)
        if parsed.index is not None and parsed.index >= count:
            raise CommandError.of("--device", f"cuda:0 to cuda:{count - 1}", f"{device}", fix)
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise CommandError.of("--device", "an Apple GPU (MPS)", f"{device}, but MPS is not available here", fix)


def check_arguments(args: argparse.Namespace, command: str) -> None:
    """The cheap checks of `generate` / `chat`, run before the model is loaded."""
    check_model_dir("MODEL", args.model, command)
    check_image(args.image)
    check_device(args.device)


def quantization_config(args: argparse.Namespace, config):
    """The `BitsAndBytesConfig` asked for by `--load-in-4bit` / `--load-in-8bit` for a model of `config` (everything
    but the language model's own linear layers stays unquantized, as in QLoRA finetuning), or `None`."""
    if not (args.load_in_4bit or args.load_in_8bit):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    from llava_multilayer.module_roles_llava_multilayer import quantization_skip_modules

    skip_modules = quantization_skip_modules(config)
    if args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    if args.dtype not in ("auto", "float32"):
        compute_dtype = getattr(torch, args.dtype)
    else:
        compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip_modules,
    )


def _device_map(device: str):
    import torch

    if device == "auto":
        return "auto" if torch.cuda.is_available() else None
    return device


def load_model_and_processor(args: argparse.Namespace):
    """Loads `args.model` (model in eval mode, processor) as the model flags ask."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    import llava_multilayer  # noqa: F401  (registers the model family with the Auto classes)

    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    config = AutoConfig.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(
        args.model,
        dtype=dtype,
        device_map=_device_map(args.device),
        config=config,
        quantization_config=quantization_config(args, config),
    )
    processor = AutoProcessor.from_pretrained(args.model)
    # The command bounds answers with --max-new-tokens; a `max_length` kept from the original training (the 4096 of
    # the converted IGVA checkpoints) would only make transformers warn, mid-answer, that both are set.
    model.generation_config.max_length = None
    return model.eval(), processor


def uses_instructions(processor) -> bool:
    """Whether the processor tokenizes an instruction (instruction-guided `igva` models)."""
    return getattr(processor, "instruction_tokenizer", None) is not None


def check_instruction(args: argparse.Namespace, processor) -> None:
    if args.instruction is not None and not uses_instructions(processor):
        raise CommandError.of(
            "--instruction",
            "an instruction-guided (IGVA) model, the only kind that uses an instruction",
            f"{args.model}, whose processor has no instruction tokenizer",
            "drop --instruction.",
            exit_code=2,
        )


def load_image(path_or_url: str | None):
    """The RGB image at a path or URL (`None` stays `None`)."""
    if path_or_url is None:
        return None
    from transformers.image_utils import load_image as _load_image

    return _load_image(path_or_url).convert("RGB")


# --------------------------------------------------------------------------------------------------------------
# Answering
# --------------------------------------------------------------------------------------------------------------


def user_message(text: str, with_image: bool) -> dict:
    """A chat message of the user; `with_image` puts the image placeholder before the text."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def prepare_inputs(processor, prompt: str, image=None, instruction: str | None = None):
    """`processor(...)` on one prompt (already in the chat format) and at most one image; returns a `BatchFeature`."""
    kwargs = {"instructions": [instruction]} if instruction is not None else {}
    return processor(images=[image] if image is not None else None, text=prompt, return_tensors="pt", **kwargs)


def generate_new_tokens(model, processor, inputs, args: argparse.Namespace, stream: bool | None = None):
    """Generates the answer to `inputs` with the decoding flags of `args`, streaming it to stdout if asked.

    Returns the `(1, num_new_tokens)` ids generated after the prompt.
    """
    import torch
    from transformers import TextStreamer, set_seed

    if args.seed is not None:
        set_seed(args.seed)
    stream = args.stream if stream is None else stream
    decoding = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.do_sample:
        decoding["temperature"] = args.temperature
        if args.top_p is not None:
            decoding["top_p"] = args.top_p
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    inputs = inputs.to(model.device)
    with torch.inference_mode():
        output = model.generate(**inputs, streamer=streamer, **decoding)
    return output[:, inputs["input_ids"].shape[1] :]


def generate_answer(model, processor, inputs, args: argparse.Namespace, stream: bool | None = None) -> str:
    """[`generate_new_tokens`], decoded (special tokens removed)."""
    new_tokens = generate_new_tokens(model, processor, inputs, args, stream)
    return processor.decode(new_tokens[0], skip_special_tokens=True).strip()


def run_generate(args: argparse.Namespace) -> int:
    """`llava-multilayer generate`: prints the answer to `--prompt` about `--image`."""
    check_arguments(args, "generate")
    model, processor = load_model_and_processor(args)
    check_instruction(args, processor)
    image = load_image(args.image)
    if args.raw_prompt:
        prompt = args.prompt
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append(user_message(args.prompt, with_image=image is not None))
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = prepare_inputs(processor, prompt, image, args.instruction)
    answer = generate_answer(model, processor, inputs, args)
    if not args.stream:
        print(answer, flush=True)
    return 0


def _read_turn(stdin: TextIO, interactive: bool) -> str | None:
    """The next user line, or `None` at the end of input."""
    if interactive:
        try:
            return input("USER: ")
        except EOFError:
            print(file=sys.stdout)
            return None
    line = stdin.readline()
    return line.rstrip("\n") if line else None


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    """`llava-multilayer chat`: answers one question per input line, keeping the conversation (and the image of the
    first turn) in the prompt; ends at end of input or on a line `exit` / `quit`."""
    stdin = sys.stdin if stdin is None else stdin
    interactive = stdin.isatty()
    check_arguments(args, "chat")
    model, processor = load_model_and_processor(args)
    check_instruction(args, processor)
    image = load_image(args.image)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if interactive:
        print(f"Chatting with {args.model}. Type 'exit' or press Ctrl-D to end.", flush=True)
    while True:
        text = _read_turn(stdin, interactive)
        if text is None or text.strip().lower() in EXIT_COMMANDS:
            return 0
        if not text.strip():
            continue
        first_turn = not any(message["role"] == "user" for message in messages)
        messages.append(user_message(text.strip(), with_image=first_turn and image is not None))
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = prepare_inputs(processor, prompt, image, args.instruction)
        if interactive:
            print("ASSISTANT: ", end="", flush=True)
        answer = generate_answer(model, processor, inputs, args)
        if not args.stream:
            print(answer, flush=True)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})


__all__ = [
    "add_chat_arguments",
    "add_generate_arguments",
    "check_arguments",
    "check_device",
    "check_image",
    "generate_answer",
    "generate_new_tokens",
    "load_model_and_processor",
    "prepare_inputs",
    "quantization_config",
    "run_chat",
    "run_generate",
]
