"""Weir's C++ CPU ops (kernels/cpu/: decode_ops.cpp, quant_matmul.cpp), compiled for this machine on first use.

A decode step of a few tokens spends as long in a layer's small torch ops (norms, rotary, cache writes, the
attention's gathers and casts) as in its matmuls; these ops do each group in one call, and the quantized matmuls
use integer dot products. They are built with torch's extension builder (a C++ compiler and ninja; about 30 s
once per machine and source version, then loaded from torch's extension cache) for the host CPU (`-march=native`,
so the cache name carries the CPU's identity and the sources' hash). Where the build fails, or
`WEIR_CPU_KERNELS=0`, `cpu_ops()` is None and the layers keep their torch paths, which stay the reference the
tests compare the ops against.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import time
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).parent / "cpu" / name for name in ("decode_ops.cpp", "quant_matmul.cpp"))
HEADERS = (Path(__file__).parent / "cpu" / "quant_matmul.h",)
ENV_SWITCH = "WEIR_CPU_KERNELS"  # "0" keeps every layer on its torch path


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU model and flags (a cache shared by other CPUs must not match)."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    text += line
                if line.strip() == "":  # the first processor describes them all
                    break
    except OSError:
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _source_identity() -> str:
    """The sources' own hash: two Weir versions (two venvs, two checkouts) on one machine build side by side
    instead of rebuilding over each other in torch's shared extension cache."""
    digest = hashlib.sha1()
    for path in SOURCES + HEADERS:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:8]


def _put_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the `ninja` wheel's binary is not there when the venv is not
    activated (e.g. `.venv/bin/weir serve`)."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def cpu_ops() -> ModuleType | None:
    """The compiled ops module, or None where they are switched off or cannot be built (logged once)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        logger.info("CPU kernels off (%s=0): torch paths only", ENV_SWITCH)
        return None
    _put_ninja_on_path()
    started = time.monotonic()
    try:
        from torch.utils.cpp_extension import load

        module = load(
            name=f"weir_cpu_ops_{_cpu_identity()}_{_source_identity()}",
            sources=[str(path) for path in SOURCES],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, an unsupported platform: the torch paths still work
        logger.warning("CPU kernels unavailable, using torch paths (slower decode): %s", str(error)[:300])
        return None
    logger.info("CPU kernels ready in %.1f s", time.monotonic() - started)
    return module
