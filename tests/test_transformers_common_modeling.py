"""transformers' own common model and config tests (`ModelTesterMixin`, `ConfigTester`) for every fusion variant.

Set up as transformers' `tests/models/llava/test_modeling_llava.py` sets up LLaVA (same tiny LLaMA and 2-layer CLIP,
image tokens first in every row); the fusers take hidden states 0 (embeddings), 1 and 2. The mixins
come from the source distribution of the installed transformers (`tests/transformers_source.py`); the module skips
when `LLAVA_MULTILAYER_TRANSFORMERS_SOURCE` is unset. The sdist holds no `GenerationTesterMixin`: greedy decoding and
sampling are tested in `tests/test_modeling_llava_multilayer.py`, beam search, assisted decoding, static caches and
compiled decode steps in `tests/test_generation_llava_multilayer.py`.
"""

import copy
import unittest
from unittest import mock

import torch
from transformers import is_torch_available
from transformers.models.auto import modeling_auto
from transformers_source import import_tests_module

from llava_multilayer import LlavaMultiLayerConfig, LlavaMultiLayerForConditionalGeneration, LlavaMultiLayerModel


modeling_common = import_tests_module("test_modeling_common")
configuration_common = import_tests_module("test_configuration_common")
ModelTesterMixin = modeling_common.ModelTesterMixin
ConfigTester = configuration_common.ConfigTester
floats_tensor = modeling_common.floats_tensor
ids_tensor = modeling_common.ids_tensor

#: Fusion settings of each tested variant, over the tester's tiny sub-configs (hidden states 0-2 of the vision tower).
VARIANTS = {
    "single": dict(fusion_type="single", vision_feature_layer=-1),
    "concat": dict(fusion_type="concat", vision_feature_layer=[0, [1, 2], -1]),
    "mmfuser": dict(fusion_type="mmfuser", vision_feature_layer=[0, 1, -1], mmfuser_num_heads=4, mmfuser_num_points=2),
    "igva": dict(
        fusion_type="igva",
        vision_feature_layer=-2,
        igva_layer_groups=[[0, 1], [2]],
        igva_num_blocks=2,
        igva_num_heads=4,
        igva_hidden_size=16,
        instruction_encoder_config={
            "model_type": "mpnet",
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
    ),
    "internal_add": dict(
        internal_fusion_type="add", internal_feature_layers=[1, 2], internal_layer_map=[[0, 0], [1, 1]]
    ),
    "internal_cross_attention": dict(
        internal_fusion_type="cross_attention", internal_feature_layers=[1, 2], internal_layer_map=[[0, 0], [1, 1]]
    ),
}

NO_IMAGES_FOR_IMAGE_TOKENS = "runs random token rows (image token included) without images, which this model refuses"


class LlavaMultiLayerModelTester:
    """LLaVA's model tester (`LlavaVisionText2TextModelTester`) for one fusion variant."""

    def __init__(self, parent, variant: str, batch_size: int = 3, seq_length: int = 7, instruction_length: int = 5):
        self.parent = parent
        self.variant = variant
        self.image_token_index = 0
        self.text_config = {
            "model_type": "llama",
            "vocab_size": 99,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "hidden_act": "gelu",
            "max_position_embeddings": 512,
            "initializer_range": 0.02,
            "pad_token_id": 1,
        }
        self.vision_config = {
            "model_type": "clip_vision_model",
            "image_size": 8,
            "patch_size": 2,
            "num_channels": 3,
            "hidden_size": 32,
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "dropout": 0.1,
            "attention_dropout": 0.1,
            "initializer_range": 0.02,
        }
        self.pad_token_id = self.text_config["pad_token_id"]
        self.num_hidden_layers = self.text_config["num_hidden_layers"]
        self.vocab_size = self.text_config["vocab_size"]
        self.hidden_size = self.text_config["hidden_size"]
        self.num_attention_heads = self.text_config["num_attention_heads"]
        self.is_training = True
        self.batch_size = batch_size
        self.instruction_length = instruction_length
        self.num_image_tokens = (self.vision_config["image_size"] // self.vision_config["patch_size"]) ** 2
        self.seq_length = seq_length + self.num_image_tokens
        self.encoder_seq_length = self.seq_length

    def get_config(self) -> LlavaMultiLayerConfig:
        return LlavaMultiLayerConfig(
            text_config=self.text_config,
            vision_config=self.vision_config,
            image_token_id=self.image_token_index,
            image_seq_length=self.num_image_tokens,
            vision_feature_select_strategy="default",
            **copy.deepcopy(VARIANTS[self.variant]),
        )

    def prepare_config_and_inputs(self):
        vision = self.vision_config
        size = vision["image_size"]
        pixel_values = floats_tensor([self.batch_size, vision["num_channels"], size, size])
        return self.get_config(), pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        input_ids = ids_tensor([self.batch_size, self.seq_length], config.text_config.vocab_size - 2) + 2
        attention_mask = torch.ones(input_ids.shape, dtype=torch.long)
        input_ids[input_ids == config.image_token_id] = self.pad_token_id
        input_ids[:, : self.num_image_tokens] = config.image_token_id
        inputs_dict = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
        if config.fusion_type == "igva":
            vocab = config.instruction_encoder_config.vocab_size
            shape = (self.batch_size, self.instruction_length)
            inputs_dict["instruction_input_ids"] = ids_tensor(list(shape), vocab)
            inputs_dict["instruction_attention_mask"] = torch.ones(shape, dtype=torch.long)
        return config, inputs_dict


class LlavaMultiLayerCommonTests(ModelTesterMixin):
    """The common model tests of one variant (`variant`), with LLaVA's test class settings."""

    variant: str
    all_model_classes = (LlavaMultiLayerModel, LlavaMultiLayerForConditionalGeneration) if is_torch_available() else ()
    _is_composite = True
    # Feature selection reads hidden states, never the vision tower's `post_layernorm` (as in LLaVA).
    test_all_params_have_gradient = False

    def setUp(self):
        # The mixins find base and image-text-to-text classes in transformers' name tables, which `AutoModel.register`
        # does not extend (LLaVA is listed there).
        for table, class_name in (
            (modeling_auto.MODEL_MAPPING_NAMES, "LlavaMultiLayerModel"),
            (modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, "LlavaMultiLayerForConditionalGeneration"),
        ):
            patcher = mock.patch.dict(table, {LlavaMultiLayerConfig.model_type: class_name})
            patcher.start()
            self.addCleanup(patcher.stop)
        self.model_tester = LlavaMultiLayerModelTester(self, self.variant)
        common_properties = ["image_token_index", "vision_feature_layer", "image_seq_length"]
        self.config_tester = ConfigTester(
            self, config_class=LlavaMultiLayerConfig, has_text_modality=False, common_properties=common_properties
        )

    def _image_features_prepare_config_and_inputs(self):
        # The mixin keeps the inputs named after pixels or images; instruction-guided fusion needs the instruction too.
        config, inputs_dict = super()._image_features_prepare_config_and_inputs()
        _, all_inputs = self.model_tester.prepare_config_and_inputs_for_common()
        inputs_dict.update({key: value for key, value in all_inputs.items() if key.startswith("instruction_")})
        return config, inputs_dict

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_mismatching_num_image_tokens(self):
        """LLaVA's check: an explicit error when the images do not match the image tokens (here a `ValueError`)."""
        config, input_dict = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config).eval()
            model(**input_dict)
            inputs = copy.deepcopy(input_dict)
            inputs["pixel_values"] = inputs["pixel_values"][-1:]
            for key in ("instruction_input_ids", "instruction_attention_mask"):
                if key in inputs:
                    inputs[key] = inputs[key][-1:]
            with self.assertRaisesRegex(ValueError, "image tokens"):
                model(**inputs)

    @unittest.skip("GenerationTesterMixin is not in the sdist: see tests/test_generation_llava_multilayer.py")
    def test_generation_tester_mixin_inheritance(self):
        pass

    @unittest.skip("VLMs need image/mask preparation for padding-free inputs (as LLaVA's test; tested for the LLM)")
    def test_flash_attention_2_padding_matches_padding_free_with_position_ids(self):
        pass


def _skip(reason: str):
    @unittest.skip(reason)
    def skipped(self):
        pass

    return skipped


# Tests that run the model on random token rows (which contain the image token) without the matching images: this
# package refuses image tokens without images on purpose (LLaVA embeds them as text). Attention backends are tested
# with images in tests/test_modeling_llava_multilayer.py.
for _name in dir(ModelTesterMixin):  # parameterized tests: one method per case
    if _name.startswith(("test_eager_matches_sdpa_inference_", "test_model_rope_scaling_from_config_")):
        setattr(LlavaMultiLayerCommonTests, _name, _skip(NO_IMAGES_FOR_IMAGE_TOKENS))


def _test_class(variant: str) -> type:
    name = "LlavaMultiLayer" + "".join(part.title() for part in variant.split("_")) + "ModelTest"
    return type(name, (LlavaMultiLayerCommonTests, unittest.TestCase), {"variant": variant, "__module__": __name__})


for _variant in VARIANTS:
    _cls = _test_class(_variant)
    globals()[_cls.__name__] = _cls
del _name, _variant, _cls
