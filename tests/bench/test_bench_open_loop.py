"""`weir bench` as a user runs it: a subprocess, open loop over a ShareGPT sample, saving JSON and a plot
(a handful of tiny requests against the real server fixture; no speed asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SAMPLE = Path(__file__).parent / "data" / "sharegpt_sample.json"


def test_open_loop_run_over_a_dataset_saves_its_result_and_plot(weir_target, tmp_path):
    result, plot = tmp_path / "run.json", tmp_path / "run.png"
    argv = [
        "--address", weir_target,
        "--request-rate", "4,inf",
        "--max-concurrency", "2",
        "--dataset-name", "sharegpt",
        "--dataset-path", str(SAMPLE),
        "--output-len", "3",
        "--requests", "3",
        "--warmup", "1",
        "--save-result", str(result),
        "--plot", str(plot),
        "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "weir_bench", *argv], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "open loop, Poisson arrivals at 4,inf req/s (inf: all at once), at most 2 in flight" in proc.stdout
    assert "rate req/s" in proc.stdout and "sent req/s" in proc.stdout
    assert "\r" not in proc.stderr  # stderr is a pipe: no progress bar

    doc = json.loads(result.read_text())
    assert doc["config"]["mode"] == "open" and doc["config"]["dataset_name"] == "sharegpt"
    (target,) = doc["targets"]
    assert target["name"] == "weir-grpc"
    assert [p["request_rate"] for p in target["points"]] == [4.0, "inf"]
    for point in target["points"]:
        assert point["requests"] == 3 and point["errors"] == 0 and point["short_outputs"] == 0
        assert point["concurrency"] == 2 and point["output_tokens"] == 3
        assert point["ttft_p90_ms"] > 0 and point["e2e_p99_ms"] >= point["ttft_p99_ms"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
