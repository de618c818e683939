"""tools/min-pins: the declared lower bounds become exact pins, and nothing else passes."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("min_pins", str(ROOT / "tools" / "min-pins"))
    spec = importlib.util.spec_from_loader("min_pins", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def pyproject(tmp_path: Path, *dependencies: str) -> Path:
    path = tmp_path / "pyproject.toml"
    listed = ", ".join(f'"{d}"' for d in dependencies)
    path.write_text(f'[project]\nname = "x"\ndependencies = [{listed}]\n')
    return path


def test_lower_bounds_become_pins(tmp_path: Path) -> None:
    path = pyproject(tmp_path, "trio>=0.25", "pyOpenSSL >= 26.4", "prometheus-client>=0.20")
    assert load().pins(path) == ["trio==0.25", "pyOpenSSL==26.4", "prometheus-client==0.20"]


@pytest.mark.parametrize("requirement", ["trio", "trio<1", "trio>=0.25,<1", "trio==0.25"])
def test_a_dependency_without_a_plain_lower_bound_is_refused(
    tmp_path: Path, requirement: str
) -> None:
    with pytest.raises(SystemExit, match="no plain '>=' lower bound"):
        load().pins(pyproject(tmp_path, requirement))


def test_the_real_pyproject_pins_every_runtime_dependency() -> None:
    pins = load().pins(ROOT / "pyproject.toml")
    assert {p.split("==")[0].lower() for p in pins} >= {"trio", "cryptography", "pyopenssl"}


def test_the_constraints_carry_no_extras(capsys: pytest.CaptureFixture[str]) -> None:
    """pip refuses `name[extra]==v` in a constraints file: `--constraints` drops the extra."""
    assert load().main(["--constraints"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all("[" not in line and "==" in line for line in lines)
    assert load().main([]) == 0
    pinned = capsys.readouterr().out.splitlines()
    assert [re.sub(r"\[[^]]*\]", "", line) for line in pinned] == lines
