"""transformers' own common test mixins, imported from the source distribution of the installed release.

The mixins (`tests/test_modeling_common.py`, `tests/test_configuration_common.py`, ...) ship only in transformers'
source distribution. `.ci/transformers-tests PYTHON` downloads and unpacks the one of PYTHON's release and prints its
root; tests find it through the environment variable `LLAVA_MULTILAYER_TRANSFORMERS_SOURCE` and skip, saying so,
when it is unset.

The source distributions of 5.16.1 to 5.24.0 leave out three modules that the mixin files import. Each is replaced
by a placeholder (only where the file is absent), and what that leaves untested is covered here or said:

- `tests/generation/test_utils.py` (`GenerationTesterMixin`): no generation mixin; `ModelTesterMixin` only checks
  inheritance from it. This package's own generation tests run instead.
- `tests/exporters/test_export.py` (`ExportTesterMixin`, a base of `ModelTesterMixin`): no `torch.export` tests.
- `tests/utils/test_configuration_utils.py` (`config_common_kwargs`): read only by
  `ConfigTester.check_config_arguments_init`, which returns before reading it for composite configs like ours.
"""

import importlib
import os
import sys
import types
from pathlib import Path

import pytest


SOURCE_VARIABLE = "LLAVA_MULTILAYER_TRANSFORMERS_SOURCE"
PACKAGE = "transformers_source_tests"

#: Modules the mixin files import that the source distribution does not hold: module -> placeholder attributes.
_PLACEHOLDERS = {
    "generation.test_utils": {"GenerationTesterMixin": type("GenerationTesterMixin", (), {})},
    "exporters.test_export": {"ExportTesterMixin": type("ExportTesterMixin", (), {})},
    "utils.test_configuration_utils": {"config_common_kwargs": {}},
}


def source_root() -> Path:
    """The unpacked transformers source distribution named by the environment, or a module-level skip."""
    root = os.environ.get(SOURCE_VARIABLE)
    if not root:
        pytest.skip(
            f"{SOURCE_VARIABLE} is unset: transformers' common test mixins ship only in its source distribution; "
            f'run `export {SOURCE_VARIABLE}="$(.ci/transformers-tests python)"` to fetch it',
            allow_module_level=True,
        )
    root = Path(root)
    for required in ("test_modeling_common.py", "__init__.py"):
        if not (root / "tests" / required).is_file():
            raise RuntimeError(
                f"{SOURCE_VARIABLE}={root} holds no tests/{required}: prepare it with .ci/transformers-tests"
            )
    return root


def import_tests_module(name: str) -> types.ModuleType:
    """Imports `tests/<name>.py` of the source distribution (e.g. `"test_modeling_common"`)."""
    pytest.importorskip("parameterized", reason="transformers' common test mixins import `parameterized`")
    tests_dir = source_root() / "tests"
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(tests_dir)]
        sys.modules[PACKAGE] = package
        for module_name, attributes in _PLACEHOLDERS.items():
            if (tests_dir / f"{module_name.replace('.', '/')}.py").is_file():
                continue
            parent = PACKAGE
            for part in module_name.split(".")[:-1]:
                parent = f"{parent}.{part}"
                sys.modules.setdefault(parent, types.ModuleType(parent)).__path__ = []
            placeholder = types.ModuleType(f"{PACKAGE}.{module_name}")
            placeholder.__dict__.update(attributes)
            sys.modules[placeholder.__name__] = placeholder
    return importlib.import_module(f"{PACKAGE}.{name}")
