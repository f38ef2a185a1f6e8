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
"""The `llava-multilayer` command line.

    llava-multilayer demo                                   # convert a bundled tiny checkpoint and answer, offline
    llava-multilayer convert --input-dir ORIGINAL --output-dir OUT [--push-to-hub USER/REPO]
    llava-multilayer inspect OUT_OR_ORIGINAL_OR_REPO_ID
    llava-multilayer generate OUT --image photo.jpg --prompt "What is shown?"
    llava-multilayer chat OUT --image photo.jpg
    llava-multilayer finetune --model OUT --data train.json --output-dir LORA      # needs `pip install peft`
    llava-multilayer train --recipe pretrain|finetune|lora|qlora --model OUT --data train.json --output-dir RUN
    llava-multilayer merge-lora --adapter-dir LORA --output-dir MERGED
    llava-multilayer push OUT USER/REPO                      # upload a converted or merged directory
    llava-multilayer evaluate OUT --tasks pope,mme           # lmms-eval scores (needs the [eval] extra)
    llava-multilayer serve OUT [--ui]                        # OpenAI-compatible endpoint, or a web chat demo

`llava-multilayer COMMAND --help` describes each command. Heavy modules (torch, transformers, peft) are imported
only by the command that needs them. Mistakes are reported in one paragraph (exit status 2 for a usage error, 1
for a failure); `llava-multilayer --debug COMMAND ...` or LLAVA_MULTILAYER_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

from .. import __version__
from .errors import CommandError


#: Environment variable that makes errors show their traceback (as `--debug` does).
DEBUG_ENV = "LLAVA_MULTILAYER_DEBUG"

#: Commands whose flags belong to a module imported only when the command runs: name -> (module, argument adder,
#: runner, help, what to install when the module cannot be imported).
DEFERRED_COMMANDS: dict[str, tuple[str, str, str, str, str]] = {
    "finetune": (
        "llava_multilayer.commands.finetune",
        "add_finetune_arguments",
        "run_finetune",
        "LoRA / QLoRA finetuning with peft on your own data: LoRA on the LLM's self-attention and MLP, every "
        "fusion module (I_M cross-fusion included) trained in full. To reproduce a paper's LoRA run (the original "
        "targets, optimizer groups and data pipeline) use `train --recipe lora` (docs/training.md).",
        "pip install 'llava-multilayer[peft]'",
    ),
    "train": (
        "llava_multilayer.commands.train",
        "add_train_arguments",
        "run_train",
        "Train one stage of a paper's recipe (stage 1 alignment, stage 2 finetuning, LoRA, QLoRA) as the original "
        "code did. `--recipe lora` is the original's LoRA: adapters on every LLM linear layer, I_M cross-fusion "
        "projections included, its gates frozen, so it needs a stage-1 model; to adapt a converted or upcycled "
        "model to your own data with every fusion module trained in full, use `finetune` (docs/training.md).",
        "pip install 'llava-multilayer[peft]'",
    ),
    "merge-lora": (
        "llava_multilayer.commands.finetune",
        "add_merge_arguments",
        "run_merge",
        "Merge a finetuned LoRA adapter into a full checkpoint.",
        "pip install 'llava-multilayer[peft]'",
    ),
    "evaluate": (
        "llava_multilayer.commands.evaluate",
        "add_evaluate_arguments",
        "run_evaluate",
        "Score a converted checkpoint on lmms-eval benchmarks (docs/evaluation.md).",
        "pip install 'llava-multilayer[eval]'",
    ),
}


def _run_deferred(name: str, argv: list[str]) -> int:
    module_name, add_name, run_name, help_text, install = DEFERRED_COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise CommandError.of(
            name, f"the modules {module_name} needs", f"that they cannot be imported ({error})", install
        ) from error
    parser = argparse.ArgumentParser(prog=f"llava-multilayer {name}", description=help_text)
    getattr(module, add_name)(parser)
    return getattr(module, run_name)(parser.parse_args(argv))


def build_parser() -> argparse.ArgumentParser:
    from . import demo, generate, inspect_checkpoint, push, serve

    parser = argparse.ArgumentParser(
        prog="llava-multilayer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help=f"Show the traceback of an error ({DEBUG_ENV}=1 too).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_text: str, add_arguments: Callable, run: Callable, description: str | None = None):
        sub = commands.add_parser(
            name,
            help=help_text,
            description=description or help_text,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_arguments(sub)
        sub.set_defaults(run=run)

    add(
        "demo",
        "Convert a bundled tiny original checkpoint and answer a question about an image (offline).",
        demo.add_demo_arguments,
        demo.run_demo,
        demo.__doc__,
    )
    # `convert` and the deferred commands parse their own flags: they get everything after the command name.
    commands.add_parser(
        "convert",
        help="Convert an original MMFuser / Layer_Select_Fuse / IGVA checkpoint (family auto-detected).",
        add_help=False,
    )
    add(
        "inspect",
        "Describe a converted or original checkpoint without loading its weights.",
        inspect_checkpoint.add_inspect_arguments,
        inspect_checkpoint.run_inspect,
        inspect_checkpoint.__doc__,
    )
    add(
        "generate",
        "Answer one prompt about an image, streaming the tokens.",
        generate.add_generate_arguments,
        generate.run_generate,
        generate.__doc__,
    )
    add(
        "chat",
        "Chat about an image: one question per line on stdin, history kept; 'exit' or EOF ends.",
        generate.add_chat_arguments,
        generate.run_chat,
        generate.__doc__,
    )
    for name, (_, _, _, help_text, _) in DEFERRED_COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    add("push", "Upload a converted or merged directory to the Hub.", push.add_push_arguments, push.run_push)
    add(
        "serve",
        "Serve an OpenAI-compatible chat-completions endpoint (vLLM or transformers), or a web chat demo (--ui).",
        serve.add_serve_arguments,
        serve.run_serve,
        serve.__doc__,
    )
    return parser


def _split_debug(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether a traceback is asked for (`--debug` before the command, or the environment), and the other args."""
    debug = os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")
    while argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
    return debug, argv


def _dispatch(argv: list[str]) -> int:
    command = argv[0] if argv else None
    if command == "convert":
        from .convert import run_convert

        return run_convert(argv[1:])
    if command in DEFERRED_COMMANDS:
        return _run_deferred(command, argv[1:])
    args = build_parser().parse_args(argv)
    return args.run(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `llava-multilayer` console script; returns the exit code."""
    debug, argv = _split_debug(list(sys.argv[1:] if argv is None else argv))
    prog = f"llava-multilayer {argv[0]}" if argv else "llava-multilayer"
    try:
        return _dispatch(argv)
    except CommandError as error:
        if debug:
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # reported in one paragraph; --debug shows the traceback
        if debug:
            raise
        print(
            f"{prog}: error: {error} ({type(error).__name__}; run `llava-multilayer --debug {' '.join(argv[:1])} ...` "
            f"or set {DEBUG_ENV}=1 to see the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
