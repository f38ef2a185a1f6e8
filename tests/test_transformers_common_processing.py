"""transformers' own processor test suite (`ProcessorTesterMixin`) run on both processors (plain and IGVA).

The mixin comes from the installed release's source distribution (it is not in the wheel): point
`LLAVA_MULTILAYER_TRANSFORMERS_SOURCE` at the root of the unpacked sdist (the folder holding `tests/`), which
`.ci/transformers-tests PYTHON` downloads and prints, or by hand: `pip download --no-deps --no-binary :all:
transformers==VERSION` (the installed version) and unpack it.
"""

import importlib.util
import os
import sys
import types
import unittest
from pathlib import Path

import pytest
from conftest import FIXTURES_DIR, INSTRUCTION_TOKENIZER_DIR, load_tokenizer, make_image_processor
from transformers import AutoTokenizer, ProcessorMixin

from llava_multilayer import LlavaMultiLayerInstructionProcessor, LlavaMultiLayerProcessor


SOURCE = os.environ.get("LLAVA_MULTILAYER_TRANSFORMERS_SOURCE")
COMMON_TESTS = Path(SOURCE or ".") / "tests" / "test_processing_common.py"
if not SOURCE:
    pytest.skip(
        "LLAVA_MULTILAYER_TRANSFORMERS_SOURCE is not set: it names the unpacked transformers sdist whose "
        "tests/test_processing_common.py holds ProcessorTesterMixin (.ci/transformers-tests fetches it).",
        allow_module_level=True,
    )
if not COMMON_TESTS.is_file():
    pytest.skip(
        f"{COMMON_TESTS} does not exist (LLAVA_MULTILAYER_TRANSFORMERS_SOURCE={SOURCE}).", allow_module_level=True
    )
pytest.importorskip("parameterized", reason="transformers' common tests need `parameterized` (in the [test] extra)")

# The sdist lacks the repository's utils/fetch_hub_objects_for_ci.py, which maps the test media URLs to files the CI
# downloaded; here every image URL maps to a bundled fixture image (nothing is downloaded, the tests run offline).
FIXTURE_IMAGE = FIXTURES_DIR / "mmfuser-clip" / "image.png"
_fetch = types.ModuleType("fetch_hub_objects_for_ci")
_fetch.url_to_local_path = lambda url: str(FIXTURE_IMAGE) if url.endswith((".png", ".jpg")) else url
sys.modules.setdefault("fetch_hub_objects_for_ci", _fetch)

_spec = importlib.util.spec_from_file_location("transformers_test_processing_common", COMMON_TESTS)
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)
ProcessorTesterMixin = _common.ProcessorTesterMixin

class _CommonProcessorTests(ProcessorTesterMixin):
    @classmethod
    def _setup_image_processor(cls):
        return make_image_processor()

    @classmethod
    def _setup_tokenizer(cls):
        return load_tokenizer()

    @staticmethod
    def prepare_processor_dict():
        return {"patch_size": 7, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}


class LlavaMultiLayerProcessorCommonTest(_CommonProcessorTests, unittest.TestCase):
    processor_class = LlavaMultiLayerProcessor


class LlavaMultiLayerInstructionProcessorCommonTest(_CommonProcessorTests, unittest.TestCase):
    processor_class = LlavaMultiLayerInstructionProcessor

    @staticmethod
    def does_processor_return_mm_offsets(processor_class, method_name):
        # The mixin compares with the direct parent only; this class inherits `replace_image_token` from it.
        return getattr(processor_class, method_name) is not getattr(ProcessorMixin, method_name)

    @classmethod
    def _setup_instruction_tokenizer(cls):
        return AutoTokenizer.from_pretrained(INSTRUCTION_TOKENIZER_DIR)
