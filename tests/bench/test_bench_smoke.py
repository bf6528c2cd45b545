"""`weir bench` end to end: a handful of tiny requests against the real server fixture (no speed asserted)."""

from __future__ import annotations

import json
import os

import pytest

from weir_bench.cli import main


def _run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    code = main([*argv, "--json", "--log-level", "warning"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def test_throughput_run_against_the_grpc_server_gives_one_row_per_level(weir_target, capsys):
    doc = _run_json(
        capsys,
        [
            "--address",
            weir_target,
            "--server-pid",
            str(os.getpid()),
            "--concurrency",
            "1,2",
            "--requests",
            "3",
            "--warmup",
            "1",
            "--prompt-tokens",
            "8",
            "--output-tokens",
            "4",
        ],
    )
    rows = doc["rows"]
    assert [(r["target"], r["concurrency"]) for r in rows] == [("weir-grpc", 1), ("weir-grpc", 2)]
    for row in rows:
        assert row["requests"] == 3 and row["errors"] == 0
        assert row["short_outputs"] == 0  # ignore_eos + min_tokens: every request returns all 4 tokens
        assert row["output_tokens_per_s"] > 0 and row["ttft_p50_ms"] > 0 and row["itl_p50_ms"] is not None
        assert row["peak_rss_mib"] > 0  # the fixture's server lives in this process
    assert doc["machine"]["cores"] >= 1


def test_prefix_scenario_reports_cold_and_cached_ttft(weir_target, capsys):
    doc = _run_json(
        capsys,
        [
            "--address",
            weir_target,
            "--scenario",
            "prefix",
            "--prefix-tokens",
            "96",
            "--suffix-tokens",
            "4",
            "--output-tokens",
            "2",
            "--repeats",
            "1",
        ],
    )
    (row,) = doc["rows"]
    assert row["target"] == "weir-grpc" and row["repeats"] == 1 and row["errors"] == 0
    assert row["cold_ttft_ms"] > 0 and row["warm_ttft_ms"] > 0 and row["speedup"] > 0
    assert row["warm_cached_tokens"] is not None  # taken from the server's usage.cached_tokens
