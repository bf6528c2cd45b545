"""`weir --version` and `weir -V`: the installed Weir distributions, one per line."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_prints_each_installed_distribution(flag: str) -> None:
    done = subprocess.run([sys.executable, "-m", "weir_client.cli", flag], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"weir-client {importlib.metadata.version('weir-client')}"
    for distribution in ("weir-server", "weir-gateway", "weir-bench"):
        try:
            expected = f"{distribution} {importlib.metadata.version(distribution)}"
        except importlib.metadata.PackageNotFoundError:
            continue
        assert expected in lines
