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
    """One target at one concurrency: throughput, latencies (milliseconds) and the server's peak memory."""

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


def summarize(target: str, result: LoadResult, peak_rss_bytes: int | None = None) -> Row:
    """Aggregate one closed-loop run into a row; failed requests count only as errors."""
    ok = [t for t in result.timings if t.ok]
    ttfts = [t.ttft for t in ok if t.ttft is not None]
    itls = [gap for t in ok for gap in t.inter_token_latencies()]
    tokens = sum(t.num_output_tokens for t in ok)
    duration = result.duration_s
    return Row(
        target=target,
        concurrency=result.spec.concurrency,
        requests=len(ok),
        errors=len(result.timings) - len(ok),
        prompt_tokens=result.spec.prompt_tokens,
        output_tokens=result.spec.output_tokens,
        duration_s=duration,
        output_tokens_per_s=tokens / duration if duration > 0 else math.nan,
        requests_per_s=len(ok) / duration if duration > 0 else math.nan,
        ttft_p50_ms=percentile(ttfts, 50) * 1e3,
        ttft_p99_ms=percentile(ttfts, 99) * 1e3,
        itl_p50_ms=percentile(itls, 50) * 1e3,
        itl_p99_ms=percentile(itls, 99) * 1e3,
        short_outputs=sum(1 for t in ok if t.num_output_tokens < result.spec.output_tokens),
        peak_rss_mib=peak_rss_bytes / MIB if peak_rss_bytes is not None else None,
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


def format_table(rows: Sequence[Row | PrefixRow]) -> str:
    """A Markdown table (readable in a terminal, pasteable into RESULTS.md); rows of one kind only."""
    if not rows:
        return "(no results)"
    columns = PREFIX_COLUMNS if isinstance(rows[0], PrefixRow) else THROUGHPUT_COLUMNS
    cells = [[_cell(getattr(row, name), fmt) for name, _, fmt in columns] for row in rows]
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
    """Group rows by concurrency so each level's targets sit next to each other (target order kept)."""
    order = {name: i for i, name in enumerate(dict.fromkeys(r.target for r in rows))}
    return sorted(rows, key=lambda r: (r.concurrency, order[r.target]))


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


def to_json(rows: Sequence[Row | PrefixRow], argv: Sequence[str], machine: dict[str, Any]) -> str:
    """The rows with the command and machine, as one JSON document (NaN becomes null)."""

    def clean(row: Row | PrefixRow) -> dict[str, Any]:
        data = asdict(row)
        return {
            f.name: None if isinstance(data[f.name], float) and math.isnan(data[f.name]) else data[f.name]
            for f in fields(row)
        }

    return json.dumps(
        {"command": ["weir", "bench", *argv], "machine": machine, "rows": [clean(r) for r in rows]}, indent=2
    )
