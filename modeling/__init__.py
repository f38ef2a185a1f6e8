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
"""LLaVA with multi-layer visual feature fusion (MMFuser, Layer_Select_Fuse, IGVA) for transformers.

Importing the package registers the model family with transformers' Auto classes. The modules of this directory
are also the remote code of saved checkpoints, so they import each other with single-dot relative imports only.

The package is imported lazily, so that the command line starts in a fraction of a second (`import
llava_multilayer.commands.cli` loads neither torch nor transformers): the classes load on first access, and the
Auto classes are registered as soon as transformers is imported (at once if it already is).
"""

import importlib
import importlib.abc
import sys


__version__ = "0.1.0"

#: Public name -> module (of this package) that defines it.
_EXPORTS = {
    "LlavaMultiLayerConfig": "configuration_llava_multilayer",
    "LlavaMultiLayerCausalLMOutputWithPast": "modeling_llava_multilayer",
    "LlavaMultiLayerForConditionalGeneration": "modeling_llava_multilayer",
    "LlavaMultiLayerImageFeaturesOutput": "modeling_llava_multilayer",
    "LlavaMultiLayerModel": "modeling_llava_multilayer",
    "LlavaMultiLayerModelOutputWithPast": "modeling_llava_multilayer",
    "LlavaMultiLayerPreTrainedModel": "modeling_llava_multilayer",
    "LlavaMultiLayerInstructionProcessor": "processing_llava_multilayer",
    "LlavaMultiLayerProcessor": "processing_llava_multilayer",
    "add_image_token": "tokenization_llava_multilayer",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


def _register() -> None:
    """Registers the family with the Auto classes, and its classes for `save_pretrained`'s remote code."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    from .configuration_llava_multilayer import LlavaMultiLayerConfig
    from .modeling_llava_multilayer import LlavaMultiLayerForConditionalGeneration, LlavaMultiLayerModel
    from .processing_llava_multilayer import LlavaMultiLayerInstructionProcessor, LlavaMultiLayerProcessor

    AutoConfig.register(LlavaMultiLayerConfig.model_type, LlavaMultiLayerConfig, exist_ok=True)
    AutoModel.register(LlavaMultiLayerConfig, LlavaMultiLayerModel, exist_ok=True)
    AutoModelForImageTextToText.register(LlavaMultiLayerConfig, LlavaMultiLayerForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(LlavaMultiLayerConfig, LlavaMultiLayerProcessor, exist_ok=True)

    # `save_pretrained` writes an `auto_map` and copies this directory's modules, so that saved checkpoints also load
    # with `trust_remote_code=True` where this package is not installed.
    LlavaMultiLayerConfig.register_for_auto_class()
    LlavaMultiLayerModel.register_for_auto_class("AutoModel")
    LlavaMultiLayerForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    LlavaMultiLayerProcessor.register_for_auto_class("AutoProcessor")
    LlavaMultiLayerInstructionProcessor.register_for_auto_class("AutoProcessor")


class _Registration:
    """Registers the family once transformers is loaded and none of this package's modules is half-imported (the
    registration imports them; a module that imports transformers is still running when transformers is loaded)."""

    done = False
    transformers_loaded = "transformers" in sys.modules
    modules_importing = 0

    @classmethod
    def attempt(cls) -> None:
        if cls.done or not cls.transformers_loaded or cls.modules_importing:
            return
        cls.done = True
        sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegistrationFinder)]
        _register()


class _RegisteringLoader(importlib.abc.Loader):
    """Runs a module's own loader, then [`_Registration.attempt`]."""

    def __init__(self, loader: importlib.abc.Loader, is_transformers: bool):
        self.loader = loader
        self.is_transformers = is_transformers

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        if self.is_transformers:
            self.loader.exec_module(module)
            _Registration.transformers_loaded = True
        else:
            _Registration.modules_importing += 1
            try:
                self.loader.exec_module(module)
            finally:
                _Registration.modules_importing -= 1
        _Registration.attempt()


class _RegistrationFinder(importlib.abc.MetaPathFinder):
    """Finds `transformers` and this package's modules as the other finders do, with a [`_RegisteringLoader`]."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers" and not name.startswith(f"{__name__}."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisteringLoader(spec.loader, is_transformers=name == "transformers")
                return spec
        return None


sys.meta_path.insert(0, _RegistrationFinder())
_Registration.attempt()

__all__ = [
    "LlavaMultiLayerCausalLMOutputWithPast",
    "LlavaMultiLayerConfig",
    "LlavaMultiLayerForConditionalGeneration",
    "LlavaMultiLayerImageFeaturesOutput",
    "LlavaMultiLayerInstructionProcessor",
    "LlavaMultiLayerModel",
    "LlavaMultiLayerModelOutputWithPast",
    "LlavaMultiLayerPreTrainedModel",
    "LlavaMultiLayerProcessor",
    "__version__",
]
