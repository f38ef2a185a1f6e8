"""Shared by tests/test_cli.py, tests/test_hub.py and tests/test_cross_version.py: the golden fixtures converted once
per test session with `llava-multilayer convert`, their inputs, and a local stand-in of the Hugging Face Hub HTTP API.

Conversions are cached in this module (not in a pytest fixture) so that both test modules share them; they run
in-process through `llava_multilayer.commands.cli.main`, with the overrides each fixture needs (`--vision-tower`,
`--sentence-encoder`) and `--parity-fixture` (so that every model card carries parity numbers).
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image


FIXTURES_DIR = Path(__file__).parent / "fixtures"

#: Golden fixture -> family its converter must detect.
FIXTURE_FAMILIES = {
    "mmfuser-clip": "mmfuser",
    "lsf-E_D-clip-3-18-23": "layer_select_fuse",
    "lsf-E_D-siglip-3-18-23": "layer_select_fuse",
    "lsf-E_M-clip-3-18-23": "layer_select_fuse",
    "lsf-I_D-clip-3-18-23": "layer_select_fuse",
    "lsf-I_M-clip-3-18-23": "layer_select_fuse",
    "igva-clip": "igva",
}

#: The project's parity standards (float32): logits over the original vocabulary, spliced image features.
LOGITS_ATOL = 1e-4
IMAGE_FEATURES_ATOL = 1e-5


#: Python source that child processes of the remote-code tests run first: it makes `llava_multilayer` unimportable
#: however it is installed (editable finder, .pth file, site-packages), so that only remote code can serve the model.
HIDE_PACKAGE_SOURCE = """
import importlib.abc
import sys


class HidePackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "llava_multilayer" or name.startswith("llava_multilayer."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)
        return None


sys.meta_path[:] = [HidePackage()] + [
    finder for finder in sys.meta_path if "llava_multilayer" not in getattr(finder, "__module__", "")
]
"""

_converted: dict[str, Path] = {}
_conversion_logs: dict[str, str] = {}
_root: Path | None = None


def offline_child_env(root: Path, **extra: str) -> dict[str, str]:
    """A bare environment for a child Python: offline, one thread, its own HOME and HF_HOME under `root`."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(root / "home"),
        "HF_HOME": str(root / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def convert_argv(name: str, output_dir: Path, parity: bool = True) -> list[str]:
    """`llava-multilayer convert` arguments for a golden fixture (with the overrides its config needs)."""
    fixture = FIXTURES_DIR / name
    argv = [
        "convert",
        "--input-dir",
        str(fixture / "original"),
        "--vision-tower",
        str(fixture / "vision_tower"),
        "--output-dir",
        str(output_dir),
    ]
    if (fixture / "sentence_embedder").is_dir():
        argv += ["--sentence-encoder", str(fixture / "sentence_embedder")]
    if parity:
        argv += ["--parity-fixture", str(fixture)]
    return argv


def converted_dir(name: str) -> Path:
    """The fixture `name` converted by `llava-multilayer convert` (once per session). Do not modify it."""
    global _root
    if name not in _converted:
        import contextlib
        import io

        from llava_multilayer.commands.cli import main

        if _root is None:
            _root = Path(tempfile.mkdtemp(prefix="llava-multilayer-cli-tests-"))
            atexit.register(shutil.rmtree, _root, True)
        output_dir = _root / name
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            status = main(convert_argv(name, output_dir))
        _conversion_logs[name] = stderr.getvalue()
        assert status == 0, f"conversion of {name} failed ({status}):\n{stderr.getvalue()}"
        _converted[name] = output_dir
    return _converted[name]


def fixture_inputs(name: str, suffix: str = "") -> tuple[Image.Image, str, str | None]:
    """Image, prompt and (IGVA) instruction of a golden fixture's prompt `suffix` ("" or "_2")."""
    prompts = json.loads((FIXTURES_DIR / name / "prompt.json").read_text())
    image = Image.open(FIXTURES_DIR / name / "image.png").convert("RGB")
    return image, prompts["prompt" + suffix], prompts.get("instruction" + suffix)


def child_job(name: str, output: Path, **settings) -> dict:
    """What a child process needs to run fixture `name`'s converted model on its inputs and write to `output`."""
    _, prompt, instruction = fixture_inputs(name)
    return {
        "name": name,
        "dir": str(converted_dir(name)),
        "image": str(FIXTURES_DIR / name / "image.png"),
        "prompt": prompt,
        "instruction": instruction,
        **settings,
        "output": str(output),
    }


def conversion_log(name: str) -> str:
    """What `llava-multilayer convert` wrote to stderr while converting `name` (see [`converted_dir`])."""
    converted_dir(name)
    return _conversion_logs[name]


# --------------------------------------------------------------------------------------------------------------
# A local stand-in of the Hub API
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LocalHub:
    """The Hub endpoints `HfApi.create_repo` + `HfApi.upload_folder` use (without hf_xet), on 127.0.0.1.

    It records the created repos (with the request bodies), the validated model cards, the commits (message and
    files) and every request; the pre-upload answer sends every file inline ("regular" mode), so the commit payload
    carries the files' bytes.
    """

    created: list[dict] = field(default_factory=list)
    validated_yaml: list[str] = field(default_factory=list)
    commits: list[dict] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str) -> dict[str, bytes]:
        """Every file committed to `repo_id` (later commits win)."""
        files = {}
        for commit in self.commits:
            if commit["repo_id"] == repo_id:
                files.update(commit["files"])
        return files

    def _handler(hub):  # noqa: N805  (the handler class closes over the hub)
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                self._reply(404, {"error": f"not implemented by the local hub: GET {self.path}"})

            def do_POST(self):
                hub.requests.append(("POST", self.path))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/api/repos/create":
                    request = json.loads(body)
                    hub.created.append(request)
                    repo_id = (
                        f"{request['organization']}/{request['name']}"
                        if request.get("organization")
                        else request["name"]
                    )
                    return self._reply(200, {"url": f"{hub.url}/{repo_id}"})
                if self.path == "/api/validate-yaml":
                    hub.validated_yaml.append(json.loads(body)["content"])
                    return self._reply(200, {})
                if self.path.startswith("/api/models/") and "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    preupload = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self._reply(200, {"files": preupload})
                if self.path.startswith("/api/models/") and "/commit/" in self.path:
                    repo_id = self.path[len("/api/models/") :].split("/commit/")[0]
                    commit = {"repo_id": repo_id, "message": None, "files": {}}
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            commit["message"] = item["value"]["summary"]
                        elif item["key"] == "file":
                            commit["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    hub.commits.append(commit)
                    oid = "0" * 40
                    return self._reply(
                        200,
                        {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None},
                    )
                self._reply(404, {"error": f"not implemented by the local hub: POST {self.path}"})

        return Handler
