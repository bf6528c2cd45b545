"""`pip install ./client` alone, into a clean virtual environment, is a working client: the weir.v1 contract and
its stubs come inside it, `weir generate` talks to a real server, and nothing of the server (torch) comes along."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CLIENT = Path(__file__).resolve().parents[2] / "client"


def _run(*command: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A clean venv (no system site-packages) holding only what `pip install ./client` brings; its bin folder."""
    root = tmp_path_factory.mktemp("client-install")
    # A copy, so pip's in-tree build writes nothing into the checkout and the folder is shown to stand alone.
    source = shutil.copytree(
        CLIENT, root / "client", ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__")
    )
    venv = root / "venv"
    created = _run(sys.executable, "-m", "venv", venv)
    assert created.returncode == 0, created.stderr
    installed = _run(venv / "bin" / "python", "-m", "pip", "install", "-q", source, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    yield venv / "bin"


def test_weir_generate_from_a_client_only_install_streams_text(client_venv: Path, weir_target: str) -> None:
    result = _run(client_venv / "weir", "generate", "--target", weir_target, "--max-tokens", "8", "Hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_client_only_install_brings_no_torch_and_no_server(client_venv: Path) -> None:
    probe = "import importlib.util as u; print([m for m in ('torch', 'weir_server') if u.find_spec(m)])"
    result = _run(client_venv / "python", "-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_client_only_install_ships_the_contract_and_its_typing_markers(client_venv: Path) -> None:
    probe = (
        "import importlib.resources as r, weir.v1.inference_pb2_grpc; "
        "print(all((r.files(p) / f).is_file() for p, f in "
        "[('weir.v1', 'inference.proto'), ('weir.v1', 'inference_pb2.pyi'), ('weir', 'py.typed'), "
        "('weir_client', 'py.typed')]))"
    )
    result = _run(client_venv / "python", "-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
