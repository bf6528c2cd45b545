"""Each distribution (one per top-level folder) carries the license and marks its packages as typed."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Folder -> the packages it ships (folder path = import path).
DISTRIBUTIONS = {
    "client": ["weir", "weir_client"],
    "server": ["weir_server"],
    "gateway": ["weir_gateway"],
    "bench": ["weir_bench"],
}


def _pyproject(folder: str) -> dict[str, object]:
    with open(REPO / folder / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


@pytest.mark.parametrize("folder", sorted(DISTRIBUTIONS))
def test_distribution_ships_the_repository_license(folder: str) -> None:
    project = _pyproject(folder)["project"]
    assert isinstance(project, dict)
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert (REPO / folder / "LICENSE").read_bytes() == (REPO / "LICENSE").read_bytes()


@pytest.mark.parametrize("folder", sorted(DISTRIBUTIONS))
def test_every_package_is_marked_typed(folder: str) -> None:
    tool = _pyproject(folder)["tool"]
    assert isinstance(tool, dict)
    package_data = tool["setuptools"]["package-data"]
    for package in DISTRIBUTIONS[folder]:
        assert (REPO / folder / package / "py.typed").is_file(), package
        assert "py.typed" in package_data[package], package


def test_no_distribution_depends_on_the_retired_proto_distribution() -> None:
    for folder in DISTRIBUTIONS:
        project = _pyproject(folder)["project"]
        assert isinstance(project, dict)
        assert not any(d.startswith("weir-proto") for d in project["dependencies"]), folder
