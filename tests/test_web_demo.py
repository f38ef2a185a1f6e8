"""The web chat demo (`llava-multilayer serve MODEL --ui`): its handlers, and a real headless Chromium session.

The browser test starts the demo on loopback with a converted IGVA fixture, uploads the fixture image, asks the
fixture's question and reads the answer from the page; it must equal transformers' `generate` (which equals the
original implementation's greedy tokens). It saves a screenshot (`docs/images/demo.png` comes from it, see
`LLAVA_MULTILAYER_SCREENSHOT`). Debian's `chromium` and `chromium-driver` drive it through Selenium; nothing is
downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from converted_fixtures import FIXTURES_DIR, converted_dir
from PIL import Image


#: Set by .ci/serve, which installs the browser: a missing browser or driver then fails the test (no silent skip).
REQUIRE_BROWSER = os.environ.get("LLAVA_MULTILAYER_REQUIRE_BROWSER") == "1"

gradio = pytest.importorskip("gradio", reason="the web demo needs gradio: pip install 'llava-multilayer[serve]'")

from llava_multilayer.commands.chat_engine import ChatEngine  # noqa: E402
from llava_multilayer.commands.web_demo import WebDemo, launch_web_demo  # noqa: E402


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
]
MAX_TOKENS = 8
#: Seconds the page may take to answer.
ANSWER_TIMEOUT = 120

NAME = "igva-clip"


def question() -> str:
    # The fixture's second prompt: its instruction is the question itself, as the demo takes it.
    return json.loads((FIXTURES_DIR / NAME / "prompt.json").read_text())["question_2"]


@pytest.fixture(scope="module")
def engine():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import llava_multilayer  # noqa: F401

    directory = converted_dir(NAME)
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    return ChatEngine(model, AutoProcessor.from_pretrained(directory), NAME, default_max_tokens=MAX_TOKENS)


def reference_answer(engine: ChatEngine) -> str:
    """HF `generate` on the README's prompt for the fixture image and question."""
    processor = engine.processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question()}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.open(FIXTURES_DIR / NAME / "image.png").convert("RGB")
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.inference_mode():
        output = engine.model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_respond_streams_the_answer_and_the_weights(engine):
    demo = WebDemo(engine)
    image = Image.open(FIXTURES_DIR / NAME / "image.png")
    updates = list(demo.respond(question(), image, [], MAX_TOKENS, 0))
    assert len(updates) > 2  # partial answers before the last one
    chat, conversation, weights, box = updates[-1]
    assert chat[-1] == {"role": "assistant", "content": reference_answer(engine)}
    assert conversation[0]["content"][0]["type"] == "image_url" and len(conversation) == 2
    first_weights = updates[0][2]
    assert list(first_weights["layer group"]) == engine.layer_group_labels
    assert abs(sum(first_weights["weight"]) - 1) < 1e-5
    assert box == ""
    # The next turn keeps the image in the first message and adds none.
    follow_up = list(demo.respond("And on the right?", image, conversation, MAX_TOKENS, 0))[-1]
    assert [part["type"] for part in follow_up[1][2]["content"]] == ["text"]
    assert len(follow_up[0]) == 4


def test_respond_refuses_an_empty_question(engine):
    with pytest.raises(gradio.Error, match="Type a question"):
        list(WebDemo(engine).respond("  ", None, [], MAX_TOKENS, 0))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _bot_texts(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [element.text for element in driver.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid='bot']")]


def test_browser_chat_answers_like_generate(engine, tmp_path):
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).is_file()]
    if missing:
        reason = f"needs Debian's chromium and chromium-driver (missing: {', '.join(missing)}): "
        reason += "apt-get install chromium chromium-driver"
        (pytest.fail if REQUIRE_BROWSER else pytest.skip)(reason)
    try:
        import selenium  # noqa: F401
    except ImportError:
        reason = "the browser test drives Chromium with selenium (pip install selenium)"
        (pytest.fail if REQUIRE_BROWSER else pytest.skip)(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    expected = reference_answer(engine)
    port = _free_port()
    demo = launch_web_demo(engine, "127.0.0.1", port, block=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, ANSWER_TIMEOUT)
        upload = wait.until(
            expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]"))
        )
        upload.send_keys(str(FIXTURES_DIR / NAME / "image.png"))
        wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#image img")))
        box = driver.find_element(By.CSS_SELECTOR, "#question textarea")
        box.send_keys(question())
        driver.find_element(By.CSS_SELECTOR, "#send").click()
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while time.monotonic() < deadline and _bot_texts(driver)[-1:] != [expected]:
            time.sleep(0.2)
        assert _bot_texts(driver)[-1:] == [expected]
        page = driver.find_element(By.TAG_NAME, "body").text
        assert "IGVA: base layer" in page  # which layers the model fuses
        plot = driver.find_element(By.CSS_SELECTOR, "#fusion-weights")
        wait.until(lambda _: plot.find_elements(By.CSS_SELECTOR, "canvas, svg"))
        time.sleep(1)  # let the bar chart finish drawing before the screenshot
        screenshot = tmp_path / "demo.png"
        driver.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000
        if os.environ.get("LLAVA_MULTILAYER_SCREENSHOT"):
            shutil.copyfile(screenshot, os.environ["LLAVA_MULTILAYER_SCREENSHOT"])
    finally:
        driver.quit()
        demo.close()
