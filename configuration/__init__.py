"""Configuration of the llava-multilayer family: the config class and named presets of the published methods.

The config class itself lives in the flat `llava_multilayer` package (it travels as Hub remote code); this
sub-package re-exports it next to the presets.
"""

from llava_multilayer.configuration_llava_multilayer import LlavaMultiLayerConfig

from .presets import PRESETS, get_preset


__all__ = ["PRESETS", "LlavaMultiLayerConfig", "get_preset"]
