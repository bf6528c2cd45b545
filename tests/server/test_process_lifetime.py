"""What an engine process does around its start-up: Triton kept out where no kernel can run, the heap trimmed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

_PROBE = """
import importlib.util, sys
from weir_server.process_lifetime import keep_unusable_triton_out
keep_unusable_triton_out()
import torch._dynamo  # probes for Triton (transformers' modeling code imports it)
print(importlib.util.find_spec("triton") is None, sys.modules.get("triton") is None)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a CUDA device Triton's kernels can run")
def test_a_cpu_only_process_keeps_triton_out_and_torch_still_imports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]


def test_triton_stays_importable_under_its_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    installed = subprocess.run([sys.executable, "-c", "import triton"], capture_output=True).returncode == 0
    expected = ["False", "False"] if installed else ["True", "True"]
    assert done.stdout.split() == expected
