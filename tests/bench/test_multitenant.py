"""The multi-tenant scenario's workload generator, counter parsing, per-policy summary, table and options."""

from __future__ import annotations

import math

import pytest

from weir_bench.cli import build_parser
from weir_bench.load import RequestTiming
from weir_bench.multitenant import (
    FINISHED,
    PREFIX_HITS,
    PREFIX_QUERIES,
    CacheShape,
    MultiTenantSpec,
    PolicyRow,
    TenantRequest,
    bar_verdict,
    format_policy_table,
    ideal_hit_rate,
    make_workload,
    parse_cache_config,
    parse_counters,
    spec_from_args,
    summarize_policy,
)

SPEC = MultiTenantSpec(documents=3, users=12, document_tokens=40, question_tokens=5, requests=30)


def test_every_prompt_is_its_users_document_followed_by_a_question():
    workload = make_workload(SPEC, vocab_size=1000, seed=7)
    assert len(workload) == SPEC.requests
    documents: dict[int, list[int]] = {}
    for request in workload:
        assert request.document == request.user % SPEC.documents
        assert len(request.prompt) == SPEC.document_tokens + SPEC.question_tokens
        document = request.prompt[: SPEC.document_tokens]
        assert documents.setdefault(request.document, document) == document
        assert all(0 <= t < 1000 for t in request.prompt)
    assert len({tuple(d) for d in documents.values()}) == len(documents)  # documents differ from one another


def test_questions_are_fresh_and_the_workload_repeats_per_seed():
    workload = make_workload(SPEC, vocab_size=1000, seed=7)
    questions = [tuple(r.prompt[SPEC.document_tokens :]) for r in workload]
    assert len(set(questions)) == len(questions)
    assert [r.prompt for r in make_workload(SPEC, 1000, seed=7)] == [r.prompt for r in workload]
    other = make_workload(SPEC, 1000, seed=8)
    assert other[0].prompt[: SPEC.document_tokens] != workload[0].prompt[: SPEC.document_tokens]


def test_many_users_share_few_documents():
    workload = make_workload(SPEC, vocab_size=1000, seed=1)
    assert len({r.user for r in workload}) > len({r.document for r in workload})


def test_counters_are_summed_over_labels():
    text = (
        "# HELP vllm:prefix_cache_hits Prefix cache hits.\n# TYPE vllm:prefix_cache_hits counter\n"
        'vllm:prefix_cache_hits_total{engine="0",model_name="a"} 30.0\n'
        'vllm:prefix_cache_hits_total{engine="0",model_name="b"} 2.0\n'
        'vllm:prefix_cache_queries_total{engine="0",model_name="a"} 64.0\n'
        'vllm:request_success_total{engine="0",finished_reason="length",model_name="a"} 3.0\n'
        'vllm:prefix_cache_hits_created{engine="0"} 1.7e9\n'
    )
    assert parse_counters(text) == {PREFIX_HITS: 32.0, PREFIX_QUERIES: 64.0, FINISHED: 3.0}
    assert parse_counters("") == {PREFIX_HITS: 0.0, PREFIX_QUERIES: 0.0, FINISHED: 0.0}


def _timing(ttft: float, tokens: int, error: str | None = None) -> RequestTiming:
    timing = RequestTiming(start=0.0)
    if error is None:
        timing.events = [(ttft, 1), (ttft + 0.1, tokens - 1)]
    timing.end, timing.error = 1.0, error
    return timing


def test_policy_row_takes_the_hit_rate_and_spread_from_counter_deltas():
    timings = [_timing(0.1, 8), _timing(0.3, 8), _timing(0.0, 0, error="HTTP 503")]
    before = [{PREFIX_HITS: 100, PREFIX_QUERIES: 200, FINISHED: 5}, {PREFIX_HITS: 0, PREFIX_QUERIES: 0, FINISHED: 0}]
    after = [{PREFIX_HITS: 160, PREFIX_QUERIES: 300, FINISHED: 6}, {PREFIX_HITS: 20, PREFIX_QUERIES: 100, FINISHED: 1}]
    row = summarize_policy("cache-aware", timings, 2.0, before, after)
    assert row.prefix_hit_rate == pytest.approx(80 / 200)
    assert row.per_replica == (1, 1)
    assert (row.requests, row.errors) == (3, 1)
    assert row.ttft_p50_ms == pytest.approx(200.0)
    assert row.output_tok_per_s == pytest.approx(8.0)
    assert row.requests_per_s == pytest.approx(1.0)


def test_no_prefix_lookups_leave_the_hit_rate_unknown():
    zero = [{PREFIX_HITS: 0, PREFIX_QUERIES: 0, FINISHED: 0}]
    assert math.isnan(summarize_policy("round-robin", [], 1.0, zero, zero).prefix_hit_rate)


def test_table_has_a_line_per_policy_and_says_why_one_was_skipped():
    rows = [
        PolicyRow("round-robin", 4, 0, 0.25, 100.0, 300.0, 12.5, 1.5, (2, 2)),
        PolicyRow("cache-aware", skipped="the gateway refused it"),
    ]
    lines = format_policy_table(rows).splitlines()
    assert len(lines) == 4 and "prefix hit" in lines[0]
    assert "25.0%" in lines[2] and "2/2" in lines[2]
    assert "skipped: the gateway refused it" in lines[3]


def test_options_make_the_spec_and_the_policies():
    parser = build_parser()
    args = parser.parse_args(
        ["--scenario", "multi-tenant", "--routing", "least-load,cache-aware", "--replicas", "3", "--documents", "2",
         "--prefix-tokens", "64", "--concurrency", "8", "--requests", "20"]
    )  # fmt: skip
    spec, policies = spec_from_args(parser, args)
    assert policies == ["least-load", "cache-aware"]
    assert (spec.replicas, spec.documents, spec.document_tokens, spec.concurrency, spec.requests) == (3, 2, 64, 8, 20)


@pytest.mark.parametrize("bad", [["--concurrency", "1,8"], ["--routing", "a,a"], ["--replicas", "0"]])
def test_bad_options_are_a_usage_error(bad, capsys):
    parser = build_parser()
    args = parser.parse_args(["--scenario", "multi-tenant", *bad])
    with pytest.raises(SystemExit) as exit_info:
        spec_from_args(parser, args)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_the_ideal_hit_rate_prefills_each_document_once_and_hits_its_full_blocks_after():
    # Two documents of 40 tokens (2 full blocks of 16 + 8), questions of 5: 45-token prompts.
    workload = [TenantRequest(u, u % 2, [0] * 45) for u in range(6)]
    assert ideal_hit_rate(workload, document_tokens=40, block_size=16) == pytest.approx(4 * 32 / (6 * 45))
    assert ideal_hit_rate(workload[:2], document_tokens=40, block_size=16) == 0.0
    assert math.isnan(ideal_hit_rate([], 40, 16))


def test_cache_config_is_read_from_the_gie_info_gauge():
    text = (
        "# TYPE vllm:cache_config_info gauge\n"
        'vllm:cache_config_info{block_size="16",engine="0",model_name="m",num_gpu_blocks="176"} 1.0\n'
    )
    assert parse_cache_config(text) == (16, 176)
    assert parse_cache_config("") == (0, 0)


@pytest.mark.parametrize(
    ("working_set", "regime"), [(100, "fits in one replica"), (300, "the regime cache-aware"), (500, "outgrows all")]
)
def test_the_report_names_the_regime_the_caches_put_the_run_in(working_set, regime):
    assert regime in CacheShape(16, (176, 176), working_set).describe()


def _row(routing: str, hit: float, ttft: float, tok_s: float, ideal: float = 0.8) -> PolicyRow:
    return PolicyRow(routing, 10, 0, hit, ttft, 2 * ttft, tok_s, 1.0, (5, 5), ideal_hit_rate=ideal)


def test_the_bar_passes_only_with_twice_the_ttft_most_of_the_ideal_hits_and_no_less_throughput():
    rr = _row("round-robin", 0.3, 1000.0, 10.0)
    assert bar_verdict([rr, _row("cache-aware", 0.75, 400.0, 10.5)]).startswith("bar: PASS")
    slow = bar_verdict([rr, _row("cache-aware", 0.75, 600.0, 10.5)])
    assert slow.startswith("bar: FAIL") and "TTFT p50 1.67x round-robin's (bar >= 2x) missed" in slow
    assert "of the ideal (bar >= 90%) missed" in bar_verdict([rr, _row("cache-aware", 0.6, 400.0, 10.5)])
    assert "throughput 0.90x" in bar_verdict([rr, _row("cache-aware", 0.75, 400.0, 9.0)])
    assert bar_verdict([rr]) == ""
