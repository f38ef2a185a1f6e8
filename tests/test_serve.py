"""`llava-multilayer serve`: the OpenAI-compatible chat-completions server, tested over loopback.

A converted golden fixture is served in process (`OpenAIChatServer` on 127.0.0.1, a free port); every answer is
compared with transformers' `generate` on the same prompt (and, where the prompt is the fixture's, with the greedy
tokens of the original implementation).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
import torch
from converted_fixtures import FIXTURES_DIR, converted_dir
from safetensors.torch import load_file

from llava_multilayer.commands import serve
from llava_multilayer.commands.chat_engine import ChatEngine
from llava_multilayer.commands.cli import main
from llava_multilayer.commands.errors import CommandError
from llava_multilayer.commands.openai_server import OpenAIChatServer


#: Seconds any single HTTP exchange with the test server may take.
HTTP_TIMEOUT = 120
MAX_TOKENS = 8


def image_data_url(name: str) -> str:
    payload = base64.b64encode((FIXTURES_DIR / name / "image.png").read_bytes()).decode()
    return f"data:image/png;base64,{payload}"


def fixture_question(name: str) -> str:
    prompts = json.loads((FIXTURES_DIR / name / "prompt.json").read_text())
    # IGVA's second prompt has no answer-format suffix: its instruction is the question itself, as the server's.
    return prompts["question_2"] if "question_2" in prompts else prompts["question"]


def original_answer_ids(name: str) -> list[int]:
    """The greedy tokens the original implementation generated for the fixture's prompt (first id = prompt end)."""
    key = "generated_ids_2" if name == "igva-clip" else "generated_ids"
    return load_file(FIXTURES_DIR / name / "expected.safetensors")[key][0, 1:].tolist()


class Served(SimpleNamespace):
    """A fixture served on loopback: `url`, `name`, `model`, `processor`, `engine`."""

    def post(self, body, path: str = "/v1/chat/completions", raw: bytes | None = None):
        """(status, parsed JSON body) of a POST."""
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def post_stream(self, body) -> list:
        """The parsed server-sent events of a streamed POST (`"[DONE]"` stays a string)."""
        request = urllib.request.Request(
            self.url + "/v1/chat/completions",
            data=json.dumps({**body, "stream": True}).encode(),
            headers={"Content-Type": "application/json"},
        )
        events = []
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            assert response.headers["Content-Type"] == "text/event-stream"
            for line in response:
                line = line.decode().strip()
                if line.startswith("data: "):
                    data = line[len("data: ") :]
                    events.append(data if data == "[DONE]" else json.loads(data))
                if len(events) > 1000:
                    raise AssertionError("the stream does not end")
        return events

    def generate(self, messages: list[dict], images: list, max_new_tokens: int = MAX_TOKENS) -> tuple[list[int], str]:
        """HF `generate` on the chat-template prompt of `messages` (README usage): (new token ids, decoded text)."""
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(images=images or None, text=prompt, return_tensors="pt")
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        ids = output[0, inputs["input_ids"].shape[1] :].tolist()
        return ids, self.processor.decode(ids, skip_special_tokens=True)


def _serve(name: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import llava_multilayer  # noqa: F401

    directory = converted_dir(name)
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    engine = ChatEngine(model, processor, name, default_max_tokens=MAX_TOKENS)
    server = OpenAIChatServer(engine, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread, Served(url=server.url, name=name, model=model, processor=processor, engine=engine)


@pytest.fixture(scope="module", params=["mmfuser-clip", "igva-clip"])
def served(request):
    server, thread, handle = _serve(request.param)
    yield handle
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def served_mmfuser():
    server, thread, handle = _serve("mmfuser-clip")
    yield handle
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def image_request(served: Served, **extra) -> dict:
    content = [
        {"type": "image_url", "image_url": {"url": image_data_url(served.name)}},
        {"type": "text", "text": fixture_question(served.name)},
    ]
    return {"model": served.name, "messages": [{"role": "user", "content": content}], "temperature": 0, **extra}


def reference_for_image_request(served: Served, max_new_tokens: int = MAX_TOKENS) -> tuple[list[int], str]:
    from PIL import Image

    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": fixture_question(served.name)}]}
    ]
    image = Image.open(FIXTURES_DIR / served.name / "image.png").convert("RGB")
    return served.generate(messages, [image], max_new_tokens)


# --------------------------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------------------------


def test_image_request_answers_like_generate_and_the_original(served):
    status, body = served.post(image_request(served, max_tokens=MAX_TOKENS))
    assert status == 200, body
    ids, text = reference_for_image_request(served)
    assert ids == original_answer_ids(served.name)  # the reference itself is the original's greedy answer
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": text}
    assert body["usage"]["completion_tokens"] == len(ids) == MAX_TOKENS
    assert choice["finish_reason"] == "length"
    assert body["object"] == "chat.completion" and body["model"] == served.name


def test_streamed_answer_equals_the_whole_answer(served):
    # Long enough to hold spaces: the streamer holds text back until a word (or a whole character) is complete.
    max_tokens = 32
    events = served.post_stream(image_request(served, max_tokens=max_tokens, stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"])
    pieces = [chunk for chunk in chunks if chunk["choices"] and chunk["choices"][0]["delta"].get("content")]
    assert len(pieces) > 1  # streamed piece by piece, not in one event
    assert text == reference_for_image_request(served, max_tokens)[1]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == max_tokens


def test_multi_turn_and_text_only_requests_answer_like_generate(served):
    from PIL import Image

    image = Image.open(FIXTURES_DIR / served.name / "image.png").convert("RGB")
    first = fixture_question(served.name)
    openai_messages = [
        {"role": "system", "content": "You answer briefly."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(served.name)}},
                {"type": "text", "text": first},
            ],
        },
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": "Which colour is it?"},
    ]
    status, body = served.post({"messages": openai_messages, "temperature": 0})
    assert status == 200, body
    template_messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": first}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
        {"role": "user", "content": [{"type": "text", "text": "Which colour is it?"}]},
    ]
    assert body["choices"][0]["message"]["content"] == served.generate(template_messages, [image])[1]

    status, body = served.post({"messages": [{"role": "user", "content": "Hello!"}], "temperature": 0})
    assert status == 200, body
    text_only = [{"role": "user", "content": [{"type": "text", "text": "Hello!"}]}]
    assert body["choices"][0]["message"]["content"] == served.generate(text_only, [])[1]


@pytest.mark.parametrize("served", ["igva-clip"], indirect=True)
def test_igva_instruction_is_the_last_user_message(served):
    prepared = served.engine.prepare(image_request(served)["messages"])
    assert prepared.instruction == fixture_question(served.name)
    image_part = image_request(served)["messages"][0]["content"][0]
    other = served.engine.prepare(
        [{"role": "user", "content": [image_part, {"type": "text", "text": "What is on the right?"}]}]
    )
    assert other.instruction == "What is on the right?"
    weights, other_weights = served.engine.fusion_weights(prepared), served.engine.fusion_weights(other)
    assert len(weights[0]) == len(served.model.config.igva_layer_groups)
    assert weights != other_weights  # the instruction changes the weights


def test_sampling_with_a_seed_is_reproducible(served_mmfuser):
    body = {**image_request(served_mmfuser), "temperature": 1.5, "top_p": 0.9, "seed": 7}
    first, second = served_mmfuser.post(body), served_mmfuser.post(body)
    assert first[0] == second[0] == 200
    assert first[1]["choices"][0]["message"] == second[1]["choices"][0]["message"]


def test_models_and_health(served_mmfuser):
    with urllib.request.urlopen(served_mmfuser.url + "/v1/models", timeout=HTTP_TIMEOUT) as response:
        assert [model["id"] for model in json.loads(response.read())["data"]] == ["mmfuser-clip"]
    with urllib.request.urlopen(served_mmfuser.url + "/health", timeout=HTTP_TIMEOUT) as response:
        assert json.loads(response.read()) == {"status": "ok"}


# --------------------------------------------------------------------------------------------------------------
# Bad requests: OpenAI error objects naming the field
# --------------------------------------------------------------------------------------------------------------


def _user(content) -> dict:
    return {"messages": [{"role": "user", "content": content}]}


BAD_REQUESTS = {
    "unknown model": ({"model": "gpt-4o", **_user("Hi")}, 404, "model", "does not exist"),
    "no messages": ({"model": "mmfuser-clip"}, 400, "messages", "non-empty list"),
    "http image offline": (
        _user(
            [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, {"type": "text", "text": "?"}]
        ),
        400,
        "messages[0].content[0].image_url.url",
        "offline",
    ),
    "bad base64": (
        _user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]),
        400,
        "messages[0].content[0].image_url.url",
        "base64",
    ),
    "not an image": (
        _user(
            [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"x").decode()}}]
        ),
        400,
        "messages[0].content[0].image_url.url",
        "PIL",
    ),
    "file url": (
        _user([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]),
        400,
        "messages[0].content[0].image_url.url",
        "data URL",
    ),
    "unknown part": (_user([{"type": "input_audio"}]), 400, "messages[0].content[0].type", "'text' or 'image_url'"),
    "bad role": ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", "system, user, assistant"),
    "assistant last": (
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        400,
        "messages",
        "last message",
    ),
    "temperature": ({**_user("Hi"), "temperature": 3}, 400, "temperature", "between 0 and 2"),
    "max_tokens": ({**_user("Hi"), "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    "n": ({**_user("Hi"), "n": 2}, 400, "n", "must be 1"),
    "tools": ({**_user("Hi"), "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    "stream type": ({**_user("Hi"), "stream": "yes"}, 400, "stream", "true or false"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_requests_get_openai_errors(served_mmfuser, case, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    body, status, param, words = BAD_REQUESTS[case]
    got_status, got = served_mmfuser.post(body)
    assert got_status == status, got
    assert got["error"]["param"] == param
    assert words in got["error"]["message"]
    assert got["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_malformed_bodies_and_routes(served_mmfuser):
    status, body = served_mmfuser.post(None, raw=b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = served_mmfuser.post(None, raw=b"[1, 2]")
    assert status == 400 and "JSON object" in body["error"]["message"]
    status, body = served_mmfuser.post({}, path="/v1/completions")
    assert status == 404 and "/v1/chat/completions" in body["error"]["message"]


# --------------------------------------------------------------------------------------------------------------
# The openai client
# --------------------------------------------------------------------------------------------------------------


def test_openai_client_round_trip(served_mmfuser):
    openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install openai)")
    client = openai.OpenAI(base_url=served_mmfuser.url + "/v1", api_key="unused", timeout=HTTP_TIMEOUT, max_retries=0)
    request = image_request(served_mmfuser)
    expected = reference_for_image_request(served_mmfuser)[1]
    answer = client.chat.completions.create(model="mmfuser-clip", messages=request["messages"], temperature=0)
    assert answer.choices[0].message.content == expected
    stream = client.chat.completions.create(
        model="mmfuser-clip", messages=request["messages"], temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="other", messages=request["messages"])


# --------------------------------------------------------------------------------------------------------------
# The command: engine choice, vLLM refusal
# --------------------------------------------------------------------------------------------------------------


def serve_args(model: str, **overrides) -> SimpleNamespace:
    defaults = dict(
        model=model, device="cpu", dtype="auto", load_in_4bit=False, load_in_8bit=False, host="127.0.0.1",
        port=None, engine="auto", ui=False, served_model_name=None, max_tokens=256,
    )  # fmt: skip
    return SimpleNamespace(**{**defaults, **overrides})


@pytest.mark.parametrize("name", ["lsf-I_D-clip-3-18-23", "lsf-I_M-clip-3-18-23"])
def test_vllm_engine_refuses_internal_fusion(name):
    directory = str(converted_dir(name))
    with pytest.raises(CommandError, match="only carries image information in the input embeddings"):
        serve.check_vllm_supports(directory, serve.checkpoint_config(directory))


def test_vllm_command_uses_the_transformers_backend(monkeypatch):
    directory = str(converted_dir("mmfuser-clip"))
    monkeypatch.setattr(serve.shutil, "which", lambda name: None)
    with pytest.raises(CommandError, match="`vllm` command on PATH"):
        serve.vllm_command(serve_args(directory), "tiny")
    monkeypatch.setattr(serve.shutil, "which", lambda name: f"/opt/bin/{name}")
    serve.check_vllm_supports(directory, serve.checkpoint_config(directory))  # external fusion: accepted
    command = serve.vllm_command(serve_args(directory, port=9000, dtype="bfloat16"), "tiny")
    assert command[:4] == ["/opt/bin/vllm", "serve", directory, "--trust-remote-code"]
    text = " ".join(command)
    assert "--model-impl" not in text and "--port 9000" in text and "--dtype bfloat16" in text
    assert "--served-model-name tiny" in text


def test_engine_choice(monkeypatch, capsys):
    directory = str(converted_dir("mmfuser-clip"))
    internal = str(converted_dir("lsf-I_D-clip-3-18-23"))
    installed = {"vllm": False}
    real_find_spec = serve.importlib.util.find_spec
    monkeypatch.setattr(
        serve.importlib.util,
        "find_spec",
        lambda name: object() if name == "vllm" and installed["vllm"] else real_find_spec(name),
    )
    assert serve.choose_engine(serve_args(directory)) == "transformers"
    with pytest.raises(CommandError, match="no importable `vllm`"):
        serve.choose_engine(serve_args(directory, engine="vllm"))
    installed["vllm"] = True
    assert serve.choose_engine(serve_args(directory)) == "vllm"
    assert serve.choose_engine(serve_args(directory, engine="transformers")) == "transformers"
    assert serve.choose_engine(serve_args(directory, ui=True)) == "transformers"
    with pytest.raises(CommandError, match="in process"):
        serve.choose_engine(serve_args(directory, ui=True, engine="vllm"))
    # What vLLM cannot serve: refused with --engine vllm, served with transformers (and said so) under auto.
    with pytest.raises(CommandError, match="input embeddings"):
        serve.choose_engine(serve_args(internal, engine="vllm"))
    with pytest.raises(CommandError, match="--load-in-4bit"):
        serve.choose_engine(serve_args(directory, engine="vllm", load_in_4bit=True))
    capsys.readouterr()
    assert serve.choose_engine(serve_args(internal)) == "transformers"
    assert "Serving with transformers, not vLLM" in capsys.readouterr().err
    # IGVA: vLLM's server cannot derive the instruction from the user message, so auto keeps it in process.
    igva = str(converted_dir("igva-clip"))
    assert serve.choose_engine(serve_args(igva)) == "transformers"
    assert "instruction encoder" in capsys.readouterr().err
    assert serve.choose_engine(serve_args(igva, engine="vllm")) == "vllm"


def test_serve_command_errors(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", str(converted_dir("mmfuser-clip")), "--port", "70000"]) == 2
    assert "--port: expected a port number" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", str(converted_dir("mmfuser-clip")), "--engine", "transformers", "--port", port]) == 1
    assert f"--host/--port: expected an address this machine can listen on, found 127.0.0.1:{port}" in (
        capsys.readouterr().err
    )


@pytest.mark.slow
def test_serve_command_answers_over_loopback():
    """`llava-multilayer serve DIR --port 0` in a child process answers a chat-completions request."""
    directory = converted_dir("mmfuser-clip")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "llava_multilayer.commands.cli", "serve", str(directory), "--port", "0"]
    command += ["--engine", "transformers", "--max-tokens", str(MAX_TOKENS)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = child.stdout.readline()
        assert "Serving mmfuser-clip on http://127.0.0.1:" in line, line + child.stderr.read()
        url = line.split(" on ", 1)[1].split("/v1", 1)[0]
        served = Served(url=url, name="mmfuser-clip")
        status, body = served.post(image_request(served))
        assert status == 200, body
        answer_ids = original_answer_ids("mmfuser-clip")
        from transformers import AutoTokenizer

        expected = AutoTokenizer.from_pretrained(directory).decode(answer_ids, skip_special_tokens=True)
        assert body["choices"][0]["message"]["content"] == expected
    finally:
        child.terminate()
        child.wait(timeout=30)


def test_serve_is_listed_and_documented(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "serve" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    assert "--engine {auto,vllm,transformers}" in text and "--ui" in text
