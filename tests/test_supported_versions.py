"""The declared dependency ranges are the tested ones: setup.py's lower bounds are the releases .ci/run installs in
its lower-bound environment, the README's table says the same, and the tests run inside the declared ranges."""

import ast
import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version


ROOT = Path(__file__).parent.parent
TESTED_RANGE = ("torch", "transformers", "peft")


def _setup_literal(name: str):
    """The literal value assigned to `name` at the top of setup.py (read, not run)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == name for target in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py assigns no literal `{name}`")


def _declared() -> dict[str, Requirement]:
    extras = [text for texts in _setup_literal("extras").values() for text in texts]
    texts = _setup_literal("install_requires") + extras
    requirements = [Requirement(text) for text in texts]
    return {requirement.name: requirement for requirement in requirements if requirement.name in TESTED_RANGE}


def _lower_bound_pins() -> dict[str, str]:
    lines = (ROOT / ".ci" / "lower-bounds.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def _minimum(requirement: Requirement) -> str:
    (lower,) = [spec.version for spec in requirement.specifier if spec.operator == ">="]
    return lower


def test_every_tested_dependency_has_a_lower_and_an_upper_bound():
    declared = _declared()
    assert set(declared) == set(TESTED_RANGE)
    for name, requirement in declared.items():
        operators = {spec.operator for spec in requirement.specifier}
        assert operators == {">=", "<"}, f"{name}: declare exactly a tested lower bound and an upper bound"


def test_lower_bounds_are_what_ci_installs():
    declared = {name: Version(_minimum(requirement)) for name, requirement in _declared().items()}
    assert declared == {name: Version(pin) for name, pin in _lower_bound_pins().items()}


@pytest.mark.parametrize("name", ["transformers", "peft"])
def test_upper_bound_excludes_the_next_major_release(name):
    (upper,) = [Version(spec.version) for spec in _declared()[name].specifier if spec.operator == "<"]
    lower = Version(_minimum(_declared()[name]))
    assert upper.release == (lower.major + 1,) or (lower.major == 0 and upper.release == (1,)), upper


def test_readme_table_states_the_declared_ranges():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Supported versions", 1)[1].split("\n## ", 1)[0]
    for name, requirement in _declared().items():
        row = re.search(rf"^\| {name} \|(.*)$", table, flags=re.MULTILINE)
        assert row is not None, f"the README's 'Supported versions' table has no row for {name}"
        declared = row.group(1).split("|")[0]
        stated = {spec.strip() for spec in declared.split(",")}
        assert stated == {str(spec) for spec in requirement.specifier}, (
            f"{name}: the README declares {declared.strip()!r}, setup.py {requirement.specifier}"
        )


def test_tests_run_inside_the_declared_ranges():
    for name, requirement in _declared().items():
        installed = Version(metadata.version(name)).base_version  # "2.13.0+cpu" -> "2.13.0"
        assert requirement.specifier.contains(installed, prereleases=True), f"{name} {installed} outside {requirement}"
