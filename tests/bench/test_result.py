"""`--save-result` documents (schema, strict JSON, round trip) and the plots drawn from them."""

from __future__ import annotations

import json
import math

import pytest

from weir_bench.load import LoadResult, LoadSpec, RequestTiming
from weir_bench.plot import main as plot_main
from weir_bench.plot import plot_rows
from weir_bench.report import Row, summarize
from weir_bench.result import SCHEMA, ResultError, load_result, result_document, save_result

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _timing(start: float, gaps: list[float]) -> RequestTiming:
    timing = RequestTiming(start=start)
    now = start + 0.1
    for gap in gaps:
        now += gap
        timing.events.append((now, 1))
    timing.end = now
    timing.requested_tokens = len(gaps)
    return timing


def _row(target: str, rate: float, tok_s_scale: float = 1.0) -> Row:
    spec = LoadSpec(0, 4, 16, 3, request_rate=rate)
    timings = [_timing(i * 0.5, [0.0, 0.02 * tok_s_scale, 0.03]) for i in range(4)]
    return summarize(target, LoadResult(spec, timings, 2.0, 1_700_000_000.0, 1_700_000_002.0))


def _rows() -> list[Row]:
    return [_row("weir-grpc", 2.0), _row("openai", 2.0, 2.0), _row("weir-grpc", math.inf), _row("openai", math.inf)]


def test_summary_of_an_open_loop_point_has_its_mode_rate_and_percentiles():
    row = _row("weir-grpc", 2.0)
    assert row.mode == "open" and row.request_rate == 2.0 and row.load == 2.0
    assert row.sent_per_s == pytest.approx(2.0)  # starts 0.5 s apart
    assert row.ttft_mean_ms == pytest.approx(100.0) and row.ttft_p90_ms == pytest.approx(100.0)
    assert row.e2e_p50_ms == pytest.approx(150.0)
    assert row.short_outputs == 0


def test_saved_result_is_strict_json_with_config_targets_points_and_versions(tmp_path):
    path = tmp_path / "run.json"
    config = {"mode": "open", "request_rate": [2.0, math.inf], "dataset_path": tmp_path / "d.json"}
    save_result(path, result_document(_rows(), config, ["--request-rate", "2,inf"], {"cores": 2}))
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text
    doc = json.loads(text)
    assert doc["schema"] == SCHEMA
    assert doc["command"] == ["weir", "bench", "--request-rate", "2,inf"]
    assert doc["config"]["request_rate"] == [2.0, "inf"]
    assert doc["versions"]["python"] and "weir-bench" in doc["versions"]
    assert doc["started_at"].startswith("2023-11-14")
    assert [t["name"] for t in doc["targets"]] == ["weir-grpc", "openai"]
    point = doc["targets"][0]["points"][1]
    assert point["request_rate"] == "inf" and point["mode"] == "open"
    for key in ("requests_per_s", "output_tokens_per_s", "errors", "started_at", "ended_at"):
        assert key in point
    for metric in ("ttft", "itl", "e2e"):
        for stat in ("mean", "p50", "p90", "p99"):
            assert f"{metric}_{stat}_ms" in point


def test_saved_result_reads_back_to_the_same_rows(tmp_path):
    path = tmp_path / "run.json"
    rows = _rows()
    save_result(path, result_document(rows, {"mode": "open"}, [], {}))
    saved = load_result(path)
    assert saved.mode == "open"
    by_key = {(r.target, r.load): r for r in rows}
    assert len(saved.rows) == len(rows)
    for row in saved.rows:
        original = by_key[(row.target, row.load)]
        assert row.request_rate == original.request_rate
        assert row.itl_p99_ms == pytest.approx(original.itl_p99_ms)
        assert math.isnan(row.peak_rss_mib or math.nan)


def test_a_file_of_another_shape_is_refused(tmp_path):
    path = tmp_path / "other.json"
    path.write_text('{"rows": []}')
    with pytest.raises(ResultError, match="schema"):
        load_result(path)


def test_plot_writes_a_png(tmp_path):
    out = plot_rows(_rows(), tmp_path / "plots" / "run.png", "open loop")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_weir_bench_plot_draws_a_saved_result(tmp_path, capsys):
    saved = tmp_path / "run.json"
    save_result(saved, result_document(_rows(), {"mode": "open", "dataset_name": "random"}, [], {}))
    assert plot_main([str(saved), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC
    assert plot_main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "q.png")]) == 2
    assert "missing.json" in capsys.readouterr().err
