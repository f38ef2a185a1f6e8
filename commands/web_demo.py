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
"""The web chat demo of `llava-multilayer serve MODEL --ui` (Gradio).

Upload an image, ask questions, read the answer as it streams. The page shows which vision layers the model fuses
(from its config) and, for instruction-guided (IGVA) models, the weights the instruction gives each layer group, as a
bar chart. Changing the image starts a new conversation. Requests go through the same [`ChatEngine`] as the HTTP
server: the image travels as a PNG data URL, the prompt is the processor's chat template.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator


# Before gradio is imported: no usage statistics are sent from a local demo.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402  (a dependency of gradio, for its plots)

from .chat_engine import ChatEngine, Completion, RequestError  # noqa: E402


def image_to_data_url(image) -> str:
    """A PIL image as a lossless PNG `data:` URL (the form the chat engine reads)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _weights_frame(labels: list[str], weights: list[float] | None) -> pd.DataFrame:
    return pd.DataFrame({"layer group": labels, "weight": weights if weights is not None else [0.0] * len(labels)})


class WebDemo:
    """The demo's event handlers around one [`ChatEngine`]; [`build`] lays out the page."""

    def __init__(self, engine: ChatEngine):
        self.engine = engine
        self.shows_weights = bool(engine.layer_group_labels)

    def respond(
        self, question: str, image, conversation: list[dict], max_tokens: int, temperature: float
    ) -> Iterator[tuple]:
        """Answers `question` (about `image` on the first turn), yielding (chat, conversation, weights, question box)
        updates as the answer streams. `conversation` holds the OpenAI messages so far."""
        question = (question or "").strip()
        if not question:
            raise gr.Error("Type a question first.")
        has_image_turn = any(
            part["type"] == "image_url"
            for m in conversation
            if isinstance(m["content"], list)
            for part in m["content"]
        )
        content = [{"type": "text", "text": question}]
        if image is not None and not has_image_turn:
            content.insert(0, {"type": "image_url", "image_url": {"url": image_to_data_url(image)}})
        messages = conversation + [{"role": "user", "content": content}]
        try:
            prepared = self.engine.prepare(messages)
        except RequestError as error:
            raise gr.Error(error.message) from error
        weights = gr.skip()
        if self.shows_weights and prepared.num_images:
            weights = _weights_frame(self.engine.layer_group_labels, self.engine.fusion_weights(prepared)[-1])
        chat = self._chat(messages)
        decoding = self.engine.decoding_arguments(int(max_tokens), float(temperature), None)
        completion = Completion()
        answer = ""
        for piece in self.engine.stream(prepared, completion, **decoding):
            answer += piece
            yield chat + [{"role": "assistant", "content": answer}], conversation, weights, ""
            weights = gr.skip()
        messages.append({"role": "assistant", "content": completion.text})
        yield self._chat(messages), messages, weights, ""

    @staticmethod
    def _chat(messages: list[dict]) -> list[dict]:
        """The chatbot's view of OpenAI messages: the text of each turn."""
        shown = []
        for message in messages:
            content = message["content"]
            if isinstance(content, list):
                content = " ".join(part["text"] for part in content if part["type"] == "text")
            shown.append({"role": message["role"], "content": content})
        return shown

    def build(self) -> gr.Blocks:
        engine = self.engine
        with gr.Blocks(title=f"llava-multilayer: {engine.name}") as demo:
            gr.Markdown(f"## {engine.name}\n" + "\n".join(f"* {line}" for line in engine.fused_layers))
            conversation = gr.State([])
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(type="pil", image_mode="RGB", label="Image", elem_id="image", height=280)
                    weights = gr.BarPlot(
                        _weights_frame(engine.layer_group_labels, None),
                        x="layer group",
                        y="weight",
                        y_lim=[0, 1],
                        sort=engine.layer_group_labels or None,
                        title="Layer-group weights of the instruction (IGVA)",
                        visible=self.shows_weights,
                        elem_id="fusion-weights",
                    )
                    max_tokens = gr.Slider(1, 1024, value=engine.default_max_tokens, step=1, label="Max new tokens")
                    temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0: greedy)")
                with gr.Column(scale=2):
                    chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=420, render_markdown=False)
                    question = gr.Textbox(
                        label="Question", placeholder="Ask about the image, then press Enter", elem_id="question"
                    )
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="send")
                        clear = gr.Button("New conversation", elem_id="clear")
            inputs = [question, image, conversation, max_tokens, temperature]
            outputs = [chatbot, conversation, weights, question]
            send.click(self.respond, inputs, outputs)
            question.submit(self.respond, inputs, outputs)
            reset = [chatbot, conversation]
            clear.click(lambda: ([], []), None, reset)
            image.change(lambda: ([], []), None, reset)
        return demo


def launch_web_demo(engine: ChatEngine, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> gr.Blocks:
    """Starts the demo on `host:port`; with `block`, serves until interrupted. Returns the running `gr.Blocks`."""
    demo = WebDemo(engine).build()
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, ssr_mode=False, quiet=not block)
    return demo


__all__ = ["WebDemo", "image_to_data_url", "launch_web_demo"]
