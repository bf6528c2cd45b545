"""The statistics and table code, on synthetic timings."""

from __future__ import annotations

import json
import math

import pytest

from weir_bench.load import LoadResult, LoadSpec, RequestTiming
from weir_bench.report import (
    Row,
    format_table,
    percentile,
    sort_side_by_side,
    summarize,
    summarize_prefix,
    to_json,
)


def timing(
    start: float, arrivals: list[tuple[float, int]], error: str | None = None, output_tokens: int | None = None
) -> RequestTiming:
    t = RequestTiming(start=start, events=list(arrivals), end=arrivals[-1][0] if arrivals else start)
    t.error = error
    t.output_tokens = output_tokens
    return t


def test_percentile_interpolates_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 99) == pytest.approx(3.97)


def test_percentile_of_no_values_is_nan_and_rejects_out_of_range_q():
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_ttft_is_time_to_first_token_message():
    assert timing(10.0, [(10.25, 1), (10.5, 1)]).ttft == pytest.approx(0.25)
    assert timing(10.0, []).ttft is None


def test_inter_token_latency_splits_a_merged_message_over_its_tokens():
    t = timing(0.0, [(1.0, 1), (1.1, 1), (1.4, 3)])
    assert t.inter_token_latencies() == pytest.approx([0.1, 0.1, 0.1, 0.1])
    assert t.num_output_tokens == 5


def test_server_reported_count_overrides_the_sum_of_messages():
    assert timing(0.0, [(1.0, 1)], output_tokens=7).num_output_tokens == 7


def test_summarize_counts_throughput_over_the_measured_duration_and_excludes_failures():
    spec = LoadSpec(concurrency=2, num_requests=3, prompt_tokens=8, output_tokens=4)
    ok_a = timing(0.0, [(0.1, 1), (0.2, 1), (0.3, 1), (0.4, 1)])
    ok_b = timing(0.0, [(0.3, 1), (0.4, 1), (0.5, 1), (0.6, 1)])
    failed = timing(0.0, [], error="boom")
    row = summarize("t", LoadResult(spec, [ok_a, ok_b, failed], duration_s=2.0), peak_rss_bytes=3 * 1024 * 1024)
    assert (row.requests, row.errors) == (2, 1)
    assert row.output_tokens_per_s == pytest.approx(4.0)
    assert row.requests_per_s == pytest.approx(1.0)
    assert row.ttft_p50_ms == pytest.approx(200.0)
    assert row.itl_p50_ms == pytest.approx(100.0)
    assert row.peak_rss_mib == pytest.approx(3.0)
    assert row.short_outputs == 0


def test_summarize_flags_requests_that_stopped_early():
    spec = LoadSpec(concurrency=1, num_requests=1, prompt_tokens=8, output_tokens=4)
    row = summarize("t", LoadResult(spec, [timing(0.0, [(0.1, 1), (0.2, 1)])], duration_s=1.0))
    assert row.short_outputs == 1


def test_summarize_with_every_request_failed_gives_empty_latencies():
    spec = LoadSpec(concurrency=1, num_requests=1, prompt_tokens=8, output_tokens=4)
    row = summarize("t", LoadResult(spec, [timing(0.0, [], error="down")], duration_s=1.0))
    assert row.errors == 1 and row.requests == 0
    assert math.isnan(row.ttft_p50_ms)
    assert "| t " in format_table([row]) and " - " in format_table([row])


def test_prefix_summary_reports_cold_over_cached_ttft():
    pairs = [
        (timing(0.0, [(0.4, 1)]), timing(0.0, [(0.1, 1)])),
        (timing(0.0, [(0.6, 1)]), timing(0.0, [(0.1, 1)])),
        (timing(0.0, []), timing(0.0, [(0.1, 1)])),
    ]
    row = summarize_prefix("t", pairs, prefix_tokens=1000, suffix_tokens=8)
    assert (row.repeats, row.errors) == (2, 1)
    assert row.cold_ttft_ms == pytest.approx(500.0)
    assert row.warm_ttft_ms == pytest.approx(100.0)
    assert row.speedup == pytest.approx(5.0)


def _row(target: str, concurrency: int) -> Row:
    return Row(target, concurrency, 1, 0, 8, 4, 1.0, 4.0, 1.0, 1.0, 2.0, 3.0, 4.0, 0, None)


def test_rows_are_grouped_by_concurrency_keeping_target_order():
    rows = [_row("weir", 1), _row("weir", 8), _row("llama", 1), _row("llama", 8)]
    assert [(r.target, r.concurrency) for r in sort_side_by_side(rows)] == [
        ("weir", 1),
        ("llama", 1),
        ("weir", 8),
        ("llama", 8),
    ]


def test_table_is_markdown_with_one_line_per_row():
    lines = format_table([_row("weir-grpc", 1), _row("llama-server", 32)]).splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("| target") and "out tok/s" in lines[0] and "peak RSS MiB" in lines[0]
    assert set(lines[1]) <= {"|", "-", ":"}
    assert len({len(line) for line in lines}) == 1  # columns line up


def test_json_output_has_rows_and_turns_nan_into_null():
    nan_row = Row("t", 1, 0, 1, 8, 4, 1.0, 0.0, 0.0, math.nan, math.nan, math.nan, math.nan, 0, None)
    doc = json.loads(to_json([nan_row], ["--json"], {"cpu": "x", "cores": 2}))
    assert doc["command"] == ["weir", "bench", "--json"]
    assert doc["rows"][0]["ttft_p50_ms"] is None
    assert doc["rows"][0]["target"] == "t"
