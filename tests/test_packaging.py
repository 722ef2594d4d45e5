"""pyproject.toml as setuptools reads it: setup prints no deprecation warning."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_applies_without_setuptools_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``pip install -e .`` parses: a table-form ``project.license`` made setuptools (77+)
    print a deprecation warning box at every install; the SPDX string form does not."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(REPO)  # readme and packages are resolved from the project root
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), REPO / "pyproject.toml")
    messages = [str(w.message).splitlines()[0] for w in caught]
    assert messages == []
    assert dist.metadata.license_expression == "MIT"


def test_the_build_requirement_accepts_an_spdx_license_string() -> None:
    """PEP 639 license strings need setuptools >= 77; an older floor lets pip pick one that
    rejects ``license = "MIT"``."""
    text = (REPO / "pyproject.toml").read_text()
    floor = re.search(r'requires = \["setuptools>=(\d+)', text)
    assert floor is not None and int(floor.group(1)) >= 77
