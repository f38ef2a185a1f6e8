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
"""An OpenAI-compatible chat-completions server on top of transformers' `generate` (Python's standard library only).

Endpoints: `POST /v1/chat/completions` (JSON, or server-sent events with `"stream": true`), `GET /v1/models`,
`GET /health`. Errors are OpenAI error objects (`{"error": {"message", "type", "param", "code"}}`) with the HTTP
status of the mistake. Requests are answered one at a time (the model generates one answer at a time); the others
wait their turn.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .chat_engine import ChatEngine, Completion, RequestError


logger = logging.getLogger(__name__)

#: Largest request body accepted (base64 images included).
MAX_REQUEST_BYTES = 32 * 1024 * 1024

#: OpenAI request fields that change the answer and that this server cannot honour: refused rather than ignored.
UNSUPPORTED_FIELDS = {
    "tools": "tool calls",
    "functions": "function calls",
    "logprobs": "log-probabilities",
    "response_format": "structured output",
    "stop": "stop strings",
    "logit_bias": "logit biases",
    "audio": "audio output",
}


def _error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == HTTPStatus.NOT_FOUND:
        kind = "not_found_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _number(body: dict, name: str, kind: type, minimum: float, maximum: float | None = None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise RequestError(f"`{name}` must be {'a number' if kind is float else 'an integer'}, got {value!r}.", name)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise RequestError(f"`{name}` must be {bound}, got {value}.", name)
    return value


class ChatCompletionsRequest:
    """A validated `POST /v1/chat/completions` body (the fields this server reads)."""

    def __init__(self, body, served_name: str):
        if not isinstance(body, dict):
            raise RequestError("The request body must be a JSON object.")
        model = body.get("model")
        if model is not None and model != served_name:
            raise RequestError(
                f"The model {model!r} does not exist here: this server serves {served_name!r}.",
                "model",
                status=HTTPStatus.NOT_FOUND,
                code="model_not_found",
            )
        for name, what in UNSUPPORTED_FIELDS.items():
            if body.get(name) not in (None, False, [], {"type": "text"}):
                raise RequestError(f"`{name}` ({what}) is not supported by this server.", name)
        if body.get("n", 1) != 1:
            raise RequestError(f"`n` must be 1 (one answer per request), got {body.get('n')!r}.", "n")
        self.messages = body.get("messages")
        max_completion_tokens = _number(body, "max_completion_tokens", int, 1)
        self.max_tokens = max_completion_tokens or _number(body, "max_tokens", int, 1)
        self.temperature = _number(body, "temperature", float, 0, 2)
        self.top_p = _number(body, "top_p", float, 0, 1)
        self.seed = _number(body, "seed", int, 0)
        self.stream = body.get("stream", False)
        if not isinstance(self.stream, bool):
            raise RequestError(f"`stream` must be true or false, got {self.stream!r}.", "stream")
        options = body.get("stream_options") or {}
        self.include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False


class OpenAIChatServer(ThreadingHTTPServer):
    """`ThreadingHTTPServer` answering OpenAI chat-completions requests with a [`ChatEngine`].

    `port=0` picks a free port; the bound one is `server.server_address[1]`.
    """

    daemon_threads = True

    def __init__(self, engine: ChatEngine, host: str = "127.0.0.1", port: int = 8000):
        self.engine = engine
        super().__init__((host, port), _ChatCompletionsHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _ChatCompletionsHandler(BaseHTTPRequestHandler):
    server: OpenAIChatServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002  (the signature of BaseHTTPRequestHandler)
        logger.info("%s - %s", self.address_string(), format % args)

    # ----- replies -----

    def _send_json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        self._send_json(status, _error_body(message, status, param, code))

    def _send_event(self, payload: dict | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        chunk = f"data: {data}\n\n".encode()
        self.wfile.write(f"{len(chunk):X}\r\n".encode() + chunk + b"\r\n")
        self.wfile.flush()

    # ----- routes -----

    def do_GET(self):
        if self.path in ("/health", "/v1/health"):
            return self._send_json(HTTPStatus.OK, {"status": "ok"})
        if self.path == "/v1/models":
            model = {"id": self.server.engine.name, "object": "model", "created": 0, "owned_by": "llava-multilayer"}
            return self._send_json(HTTPStatus.OK, {"object": "list", "data": [model]})
        self._send_error(HTTPStatus.NOT_FOUND, f"No route GET {self.path}: try POST /v1/chat/completions.")

    def do_POST(self):
        if self.path != "/v1/chat/completions":
            self._discard_body()
            return self._send_error(HTTPStatus.NOT_FOUND, f"No route POST {self.path}: try /v1/chat/completions.")
        try:
            request = ChatCompletionsRequest(self._read_json(), self.server.engine.name)
            prepared = self.server.engine.prepare(request.messages)
            decoding = self.server.engine.decoding_arguments(request.max_tokens, request.temperature, request.top_p)
        except RequestError as error:
            return self._send_error(error.status, error.message, error.param, error.code)
        except Exception as error:  # a bug, reported to the client as a server error and logged with its traceback
            logger.exception("could not prepare a request")
            return self._send_error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(error).__name__}: {error}")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        if request.stream:
            return self._stream(request, prepared, decoding, request_id)
        try:
            completion = self.server.engine.complete(prepared, seed=request.seed, **decoding)
        except Exception as error:
            logger.exception("generation failed")
            return self._send_error(HTTPStatus.INTERNAL_SERVER_ERROR, f"generation failed: {error}")
        message = {"role": "assistant", "content": completion.text}
        self._send_json(
            HTTPStatus.OK,
            {
                **self._envelope(request_id, "chat.completion"),
                "choices": [{"index": 0, "message": message, "finish_reason": completion.finish_reason}],
                "usage": self._usage(completion),
            },
        )

    # ----- helpers -----

    def _discard_body(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if 0 < length <= MAX_REQUEST_BYTES:
            self.rfile.read(length)
        else:
            self.close_connection = True

    def _read_json(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length <= 0:
            self.close_connection = True
            raise RequestError("The request needs a JSON body with a Content-Length header.", status=411)
        if length > MAX_REQUEST_BYTES:
            self.close_connection = True
            raise RequestError(
                f"The request body has {length} bytes; the limit is {MAX_REQUEST_BYTES}.",
                status=HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestError(f"The request body is not valid JSON ({error}).") from error

    def _envelope(self, request_id: str, kind: str) -> dict:
        return {"id": request_id, "object": kind, "created": int(time.time()), "model": self.server.engine.name}

    @staticmethod
    def _usage(completion: Completion) -> dict:
        completion_tokens = len(completion.token_ids)
        return {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": completion.prompt_tokens + completion_tokens,
        }

    def _stream(self, request: ChatCompletionsRequest, prepared, decoding: dict, request_id: str) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        envelope = self._envelope(request_id, "chat.completion.chunk")

        def chunk(delta: dict, finish_reason: str | None = None) -> dict:
            return {**envelope, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

        completion = Completion()
        pieces = self.server.engine.stream(prepared, completion, seed=request.seed, **decoding)
        try:
            self._send_event(chunk({"role": "assistant", "content": ""}))
            for piece in pieces:
                if piece:
                    self._send_event(chunk({"content": piece}))
            self._send_event(chunk({}, completion.finish_reason))
            if request.include_usage:
                self._send_event({**envelope, "choices": [], "usage": self._usage(completion)})
        except (BrokenPipeError, ConnectionResetError):
            logger.info("the client of %s hung up; generation stopped", request_id)
            self.close_connection = True
            return
        except Exception as error:  # headers are sent: the error travels as an event (as vLLM's server does)
            logger.exception("generation failed")
            self._send_event(_error_body(f"generation failed: {error}", HTTPStatus.INTERNAL_SERVER_ERROR))
        finally:
            pieces.close()
        self._send_event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


__all__ = ["MAX_REQUEST_BYTES", "ChatCompletionsRequest", "OpenAIChatServer"]
