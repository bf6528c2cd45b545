"""Turn request timings into result rows and print them as one table (Markdown) or as JSON."""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import platform
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from weir_bench.load import LoadResult, RequestTiming

MIB = 1024 * 1024
logger = logging.getLogger(__name__)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between ranks; NaN for no values."""
    if not values:
        return math.nan
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


@dataclass(frozen=True)
class Row:
    """One target at one load point (a concurrency, or a request rate in open loop): throughput, latencies
    (milliseconds) and the server's peak memory."""

    target: str
    concurrency: int
    requests: int  # completed without error
    errors: int
    prompt_tokens: int
    output_tokens: int  # asked per request
    duration_s: float
    output_tokens_per_s: float
    requests_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    short_outputs: int  # requests that returned fewer tokens than asked (the target stopped early)
    peak_rss_mib: float | None = None
    mode: str = "closed"  # closed: `concurrency` streams; open: arrivals at `request_rate`, capped at `concurrency`
    request_rate: float | None = None  # open loop: the mean arrival rate asked for (inf: all at once)
    sent_per_s: float = math.nan  # requests actually sent per second, first to last send (open loop's achieved rate)
    ttft_mean_ms: float = math.nan
    ttft_p90_ms: float = math.nan
    itl_mean_ms: float = math.nan
    itl_p90_ms: float = math.nan
    e2e_mean_ms: float = math.nan
    e2e_p50_ms: float = math.nan
    e2e_p90_ms: float = math.nan
    e2e_p99_ms: float = math.nan
    started_at: float = 0.0  # Unix seconds: the measured part's start and end
    ended_at: float = 0.0

    @property
    def load(self) -> float:
        """This point's place on the x axis: its request rate in open loop, else its concurrency."""
        return self.request_rate if self.mode == "open" and self.request_rate is not None else self.concurrency


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _sent_per_s(timings: Sequence[RequestTiming]) -> float:
    starts = sorted(t.start for t in timings)
    span = starts[-1] - starts[0] if starts else 0.0
    return (len(starts) - 1) / span if span > 0 else math.nan


def summarize(target: str, result: LoadResult, peak_rss_bytes: int | None = None) -> Row:
    """Aggregate one run into a row; failed requests count only as errors."""
    spec = result.spec
    ok = [t for t in result.timings if t.ok]
    ttfts = [t.ttft * 1e3 for t in ok if t.ttft is not None]
    itls = [gap * 1e3 for t in ok for gap in t.inter_token_latencies()]
    e2es = [t.e2e * 1e3 for t in ok]
    tokens = sum(t.num_output_tokens for t in ok)
    duration = result.duration_s
    return Row(
        target=target,
        concurrency=spec.concurrency,
        requests=len(ok),
        errors=len(result.timings) - len(ok),
        prompt_tokens=spec.prompt_tokens,
        output_tokens=spec.output_tokens,
        duration_s=duration,
        output_tokens_per_s=tokens / duration if duration > 0 else math.nan,
        requests_per_s=len(ok) / duration if duration > 0 else math.nan,
        ttft_p50_ms=percentile(ttfts, 50),
        ttft_p99_ms=percentile(ttfts, 99),
        itl_p50_ms=percentile(itls, 50),
        itl_p99_ms=percentile(itls, 99),
        short_outputs=sum(1 for t in ok if t.num_output_tokens < (t.requested_tokens or spec.output_tokens)),
        peak_rss_mib=peak_rss_bytes / MIB if peak_rss_bytes is not None else None,
        mode="open" if spec.open_loop else "closed",
        request_rate=spec.request_rate,
        sent_per_s=_sent_per_s(result.timings),
        ttft_mean_ms=_mean(ttfts),
        ttft_p90_ms=percentile(ttfts, 90),
        itl_mean_ms=_mean(itls),
        itl_p90_ms=percentile(itls, 90),
        e2e_mean_ms=_mean(e2es),
        e2e_p50_ms=percentile(e2es, 50),
        e2e_p90_ms=percentile(e2es, 90),
        e2e_p99_ms=percentile(e2es, 99),
        started_at=result.started_at,
        ended_at=result.ended_at,
    )


@dataclass(frozen=True)
class PrefixRow:
    """Time to first token of a cold prompt and of a second prompt sharing its prefix (medians over repeats)."""

    target: str
    prefix_tokens: int
    suffix_tokens: int
    repeats: int
    errors: int
    cold_ttft_ms: float
    warm_ttft_ms: float
    speedup: float  # cold / warm: how many times faster the cached prompt starts
    warm_cached_tokens: float | None  # median prompt tokens the server says it took from cache (None: not said)
    peak_rss_mib: float | None = None


def summarize_prefix(
    target: str,
    pairs: Sequence[tuple[RequestTiming, RequestTiming]],
    prefix_tokens: int,
    suffix_tokens: int,
    peak_rss_bytes: int | None = None,
) -> PrefixRow:
    """Aggregate (cold, warm) request pairs into a row; a pair with a failed request counts as an error."""
    good = [(c, w) for c, w in pairs if c.ok and w.ok]
    cold = percentile([c.ttft for c, _ in good if c.ttft is not None], 50) * 1e3
    warm = percentile([w.ttft for _, w in good if w.ttft is not None], 50) * 1e3
    return PrefixRow(
        target=target,
        prefix_tokens=prefix_tokens,
        suffix_tokens=suffix_tokens,
        repeats=len(good),
        errors=len(pairs) - len(good),
        cold_ttft_ms=cold,
        warm_ttft_ms=warm,
        speedup=cold / warm if warm > 0 else math.nan,
        warm_cached_tokens=_median_known([w.cached_tokens for _, w in good]),
        peak_rss_mib=peak_rss_bytes / MIB if peak_rss_bytes is not None else None,
    )


def _median_known(values: Sequence[int | None]) -> float | None:
    known = [float(v) for v in values if v is not None]
    return percentile(known, 50) if known else None


# (field, column header, format) of the printed tables; every other field appears in --json only.
THROUGHPUT_COLUMNS = (
    ("target", "target", "{}"),
    ("concurrency", "conc", "{}"),
    ("requests", "reqs", "{}"),
    ("errors", "errors", "{}"),
    ("output_tokens_per_s", "out tok/s", "{:.1f}"),
    ("requests_per_s", "req/s", "{:.2f}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.1f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.1f}"),
    ("itl_p50_ms", "ITL p50 ms", "{:.1f}"),
    ("itl_p99_ms", "ITL p99 ms", "{:.1f}"),
    ("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
)
PREFIX_COLUMNS = (
    ("target", "target", "{}"),
    ("prefix_tokens", "prefix tok", "{}"),
    ("suffix_tokens", "suffix tok", "{}"),
    ("repeats", "pairs", "{}"),
    ("errors", "errors", "{}"),
    ("cold_ttft_ms", "cold TTFT ms", "{:.1f}"),
    ("warm_ttft_ms", "cached TTFT ms", "{:.1f}"),
    ("speedup", "cold/cached", "{:.2f}x"),
    ("warm_cached_tokens", "cached tok", "{:.0f}"),
    ("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


# Open-loop rows show their rate, their cap and the rate they achieved where closed-loop rows show concurrency.
OPEN_LOOP_COLUMNS = (
    ("target", "target", "{}"),
    ("request_rate", "rate req/s", "{:g}"),
    ("concurrency", "max conc", "{}"),
    ("sent_per_s", "sent req/s", "{:.2f}"),
    *THROUGHPUT_COLUMNS[2:],
)


def _columns(rows: Sequence[Row | PrefixRow]) -> tuple[tuple[str, str, str], ...]:
    if isinstance(rows[0], PrefixRow):
        return PREFIX_COLUMNS
    return OPEN_LOOP_COLUMNS if any(isinstance(r, Row) and r.mode == "open" for r in rows) else THROUGHPUT_COLUMNS


def _value(row: Row | PrefixRow, name: str) -> Any:
    if isinstance(row, Row) and name == "concurrency" and row.mode == "open" and not row.concurrency:
        return None  # open loop without a cap
    return getattr(row, name)


def format_table(rows: Sequence[Row | PrefixRow]) -> str:
    """A Markdown table (readable in a terminal, pasteable into RESULTS.md); rows of one kind only."""
    if not rows:
        return "(no results)"
    columns = _columns(rows)
    cells = [[_cell(_value(row, name), fmt) for name, _, fmt in columns] for row in rows]
    headers = [header for _, header, _ in columns]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(
                v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))
            )
            + " |"
        )

    separator = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), separator, *(line(r) for r in cells)])


def sort_side_by_side(rows: Sequence[Row]) -> list[Row]:
    """Group rows by load point so each point's targets sit next to each other (target order kept)."""
    order = {name: i for i, name in enumerate(dict.fromkeys(r.target for r in rows))}
    return sorted(rows, key=lambda r: (r.load, order[r.target]))


def machine_info() -> dict[str, Any]:
    """The CPU model, core count, memory and date, for the header of a results table."""
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
        model = next(
            (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name:")), model
        )
    except (OSError, subprocess.SubprocessError) as exc:
        # Not fatal: the header then shows what the platform module knows.
        logger.info("lscpu unavailable (%s); using platform.processor()", exc)
    mem_gib = None
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": mem_gib,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def format_header(argv: Sequence[str], machine: dict[str, Any]) -> str:
    """The command and machine lines printed above a table."""
    return (
        f"command: weir bench {shlex.join(argv)}\n"
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB; {machine['date']}"
    )


def row_to_dict(row: Row | PrefixRow) -> dict[str, Any]:
    """The row's fields as strict JSON values: NaN becomes null and an infinite rate the string "inf"."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, float) and math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value

    data = asdict(row)
    return {f.name: clean(data[f.name]) for f in fields(row)}


def row_from_dict(data: dict[str, Any]) -> Row:
    """The inverse of `row_to_dict` for throughput rows (unknown keys are ignored, missing ones take defaults)."""
    known = {f.name: f for f in fields(Row)}
    values: dict[str, Any] = {}
    for name, value in data.items():
        if name not in known:
            continue
        if value is None and name not in ("peak_rss_mib", "request_rate"):
            value = math.nan
        elif isinstance(value, str) and value in ("inf", "-inf"):
            value = float(value)
        values[name] = value
    return Row(**values)


def to_json(rows: Sequence[Row | PrefixRow], argv: Sequence[str], machine: dict[str, Any]) -> str:
    """The rows with the command and machine, as one JSON document (NaN becomes null)."""
    return json.dumps(
        {"command": ["weir", "bench", *argv], "machine": machine, "rows": [row_to_dict(r) for r in rows]}, indent=2
    )
