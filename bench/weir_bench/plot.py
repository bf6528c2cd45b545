"""Plot a run: output throughput, TTFT and ITL percentiles against concurrency or request rate, one line per
target (`--plot FILE.png` at the end of a run; `weir bench plot RESULT.json --out FILE.png` for a saved one)."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from weir_bench.report import Row
from weir_bench.result import ResultError, load_result

logger = logging.getLogger(__name__)

PERCENTILES = (("p50", "-"), ("p90", "--"), ("p99", ":"))


def _label(load: float) -> str:
    return "inf" if math.isinf(load) else f"{load:g}"


def plot_rows(rows: Sequence[Row], out: Path, title: str = "") -> Path:
    """Draw the rows into a PNG at `out`: one panel each for output tok/s, TTFT and ITL, one colour per target.
    Load points are evenly spaced and labelled (a sweep is usually geometric, and `inf` has no place on a line)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never look for a display
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("no throughput rows to plot")
    open_loop = any(r.mode == "open" for r in rows)
    loads = sorted({r.load for r in rows})
    position = {load: i for i, load in enumerate(loads)}
    targets = list(dict.fromkeys(r.target for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), constrained_layout=True)
    tput, ttft, itl = axes
    for i, target in enumerate(targets):
        color = colors[i % len(colors)]
        points = sorted((r for r in rows if r.target == target), key=lambda r: r.load)
        xs = [position[r.load] for r in points]
        tput.plot(xs, [r.output_tokens_per_s for r in points], "o-", color=color, label=target)
        for axis, metric in ((ttft, "ttft"), (itl, "itl")):
            for pct, style in PERCENTILES:
                ys = [getattr(r, f"{metric}_{pct}_ms") for r in points]
                if any(math.isfinite(y) for y in ys):  # rows copied from older tables have no p90
                    axis.plot(xs, ys, marker="o", linestyle=style, color=color, label=f"{target} {pct}")
    tput.set_ylabel("output tokens/s")
    tput.set_ylim(bottom=0)
    ttft.set_ylabel("TTFT ms")
    itl.set_ylabel("ITL ms")
    for axis in axes:
        axis.set_xticks(range(len(loads)), [_label(v) for v in loads])
        axis.set_xlabel("request rate (req/s)" if open_loop else "concurrency (streams in flight)")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
    _log_scale_if_wide(ttft)
    _log_scale_if_wide(itl)
    tput.set_title("output throughput")
    ttft.set_title("time to first token")
    itl.set_title("inter-token latency")
    if title:
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _log_scale_if_wide(axis: Any) -> None:
    """A log y axis when the latencies span more than 20x (a saturated peer would flatten everyone else)."""
    ys = [y for line in axis.get_lines() for y in line.get_ydata() if math.isfinite(y) and y > 0]
    if ys and max(ys) / min(ys) > 20:
        axis.set_yscale("log")


def title_of(config: dict[str, object], mode: str) -> str:
    """A one-line title from a saved run's config."""
    shape = (
        f"dataset {config.get('dataset_name')}"
        if config.get("dataset_name") not in (None, "random")
        else f"prompt {config.get('prompt_tokens')} / output {config.get('output_tokens')} tokens"
    )
    return f"weir bench, {'open loop' if mode == 'open' else 'closed loop'}: {shape}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="weir bench plot", description="Plot a `weir bench --save-result` JSON file.")
    p.add_argument("result", type=Path, help="the JSON file --save-result wrote")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.add_argument("--title", help="figure title (default: the config's `title`, else one made from the config)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`weir bench plot RESULT.json --out FILE.png`."""
    args = build_parser().parse_args(argv)
    try:
        saved = load_result(args.result)
        title = args.title or str(saved.config.get("title") or title_of(saved.config, saved.mode))
        out = plot_rows(saved.rows, args.out, title)
    except (ResultError, ValueError) as exc:
        print(f"weir bench plot: error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
