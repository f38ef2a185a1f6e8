"""The named presets build at their real sizes and reproduce the parameter counts the specs state."""

import pytest
import torch

from llava_multilayer import LlavaMultiLayerConfig, LlavaMultiLayerForConditionalGeneration
from llava_multilayer.configuration import PRESETS, get_preset


def _meta_model(name: str) -> LlavaMultiLayerForConditionalGeneration:
    with torch.device("meta"):
        return LlavaMultiLayerForConditionalGeneration(get_preset(name))


def _count(module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds(name):
    config = get_preset(name)
    assert isinstance(config, LlavaMultiLayerConfig)
    assert _count(_meta_model(name)) > 1e9


def test_mmfuser_7b_parameter_counts_match_the_original():
    # The original MMFuser-7B: 26,170,304 projector parameters, of which 5,190,592 in the fuser block.
    projector = _meta_model("mmfuser-7b").model.multi_modal_projector
    assert _count(projector) == 26_170_304
    assert _count(projector.fuser) == 5_190_592


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="Unknown preset 'nope'"):
        get_preset("nope")
