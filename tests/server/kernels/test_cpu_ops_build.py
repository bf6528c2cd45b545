"""The C++ CPU ops must build wherever a compiler is present: a build error falls back to the torch paths with
one warning, which would otherwise turn every op test into a skip and every CPU step slow without a failure."""

from __future__ import annotations

import os
import shutil

import pytest

from weir_server.kernels.cpu_ops import ENV_SWITCH, cpu_ops


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler here")
@pytest.mark.skipif(os.environ.get(ENV_SWITCH) == "0", reason=f"{ENV_SWITCH}=0 switches the ops off")
def test_the_ops_build_where_a_compiler_is_present() -> None:
    assert cpu_ops() is not None
