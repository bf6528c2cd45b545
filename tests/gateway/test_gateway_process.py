"""The gateway as its own process: `weir_gateway.cli.main` serves requests and never imports torch."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import pytest
from gateway_fakes import GEN_MODEL

PROBE = textwrap.dedent(
    """
    import importlib, json, os, pkgutil, signal, sys, threading, time, urllib.request
    import weir_gateway
    from weir_gateway.cli import main

    URL = "http://127.0.0.1:{port}"

    def probe():
        for _ in range(400):
            try:
                urllib.request.urlopen(URL + "/health", timeout=2)
                break
            except Exception:
                time.sleep(0.05)
        body = json.dumps({{"model": "{model}", "prompt": "hi", "max_tokens": 2}}).encode()
        request = urllib.request.Request(URL + "/v1/completions", body, {{"Content-Type": "application/json"}})
        completion = json.load(urllib.request.urlopen(request, timeout=10))
        for module in pkgutil.iter_modules(weir_gateway.__path__):
            if module.name != "__main__":
                importlib.import_module("weir_gateway." + module.name)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "weir_server"))
        print("RESULT " + json.dumps({{"text": completion["choices"][0]["text"], "heavy": heavy}}), flush=True)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=probe, daemon=True).start()
    sys.exit(main(["--backend", "{backend}", "--port", "{port}", "--log-level", "warning"]))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gateway_process_serves_without_torch_or_transformers(fake) -> None:
    script = PROBE.format(port=free_port(), backend=fake.address, model=GEN_MODEL)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["text"] == " c0t0 c0t1"
    assert result["heavy"] == []


def test_cli_rejects_bad_configuration() -> None:
    from weir_gateway.cli import main

    assert main(["--max-n", "0"]) == 2


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--response-store-size", "-1"], "response_store_size must be >= 0"),
     (["--response-store-ttl", "0"], "response_store_ttl_s must be positive")],
)  # fmt: skip
def test_cli_reports_bad_response_store_flags_as_invalid_configuration(flags: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "weir_gateway", "--port", str(free_port()), *flags],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"invalid configuration: {message}" in done.stderr and "Traceback" not in done.stderr
