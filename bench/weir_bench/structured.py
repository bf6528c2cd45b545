"""Structured-output load: streams constrained by a JSON schema beside free-text streams, in one run, over gRPC.

    python -m weir_bench.structured --target 127.0.0.1:50051 --streams 32 --output-tokens 64

Both groups share the server's batches; the table shows what the grammar costs the constrained streams (mask
fill and apply per step) and whether it slows the unconstrained ones beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from grpc import aio

from weir.v1 import inference_pb2 as pb
from weir.v1 import inference_pb2_grpc
from weir_bench.grpc_driver import CHANNEL_OPTIONS
from weir_bench.load import RequestTiming
from weir_bench.report import percentile

REQUIRED = ("name", "age", "city", "hobbies", "employed")
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 40},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
        "employed": {"type": "boolean"},
    },
    "required": list(REQUIRED),
}
PROMPT = "Describe a fictional person as JSON with their name, age, city, hobbies and whether they are employed."


@dataclass
class Outcome:
    """One stream's timing, its text and how it ended."""

    timing: RequestTiming
    text: str = ""
    finish_reason: int = pb.FINISH_REASON_UNSPECIFIED


@dataclass(frozen=True)
class GroupRow:
    """One group of streams: how many ended well, how fast, and (constrained) how many outputs parsed."""

    group: str
    streams: int
    errors: int
    valid_json: int | None
    mean_output_tokens: float
    tokens_per_s_per_stream: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float


def _request(index: int, output_tokens: int, constrained: bool, model: str) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        model=model,
        messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=PROMPT)]),
        sampling_params=pb.SamplingParams(max_tokens=output_tokens, temperature=0.7, seed=index),
    )
    if constrained:
        request.json_schema = json.dumps(SCHEMA)
    else:  # free streams run their full length so they stay in the batch as long as the constrained ones
        request.sampling_params.ignore_eos = True
    return request


async def _stream(stub: inference_pb2_grpc.InferenceServiceStub, request: pb.GenerateRequest) -> Outcome:
    outcome = Outcome(RequestTiming.begin())
    count: int | None = None
    try:
        async for message in stub.Generate(request, timeout=600):
            outcome.timing.record(len(message.token_ids))
            outcome.text += message.text
            if message.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                outcome.finish_reason = message.finish_reason
                count = message.usage.completion_tokens if message.HasField("usage") else None
    except aio.AioRpcError as exc:
        outcome.timing.finish(error=f"gRPC {exc.code().name}: {exc.details()}")
        return outcome
    error = "the server reported FINISH_REASON_ERROR" if outcome.finish_reason == pb.FINISH_REASON_ERROR else None
    outcome.timing.finish(count, error=error)
    return outcome


def _valid(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and all(key in value for key in REQUIRED)


def summarize(group: str, outcomes: list[Outcome], constrained: bool) -> GroupRow:
    """Aggregate one group's streams; latencies in milliseconds."""
    ok = [o for o in outcomes if o.timing.ok]
    ttfts = [o.timing.ttft * 1e3 for o in ok if o.timing.ttft is not None]
    itls = [gap * 1e3 for o in ok for gap in o.timing.inter_token_latencies()]
    rates = [o.timing.num_output_tokens / (o.timing.end - o.timing.start) for o in ok if o.timing.end > o.timing.start]
    return GroupRow(
        group=group,
        streams=len(outcomes),
        errors=len(outcomes) - len(ok),
        valid_json=sum(_valid(o.text) for o in ok) if constrained else None,
        mean_output_tokens=sum(o.timing.num_output_tokens for o in ok) / len(ok) if ok else math.nan,
        tokens_per_s_per_stream=sum(rates) / len(rates) if rates else math.nan,
        ttft_p50_ms=percentile(ttfts, 50),
        ttft_p99_ms=percentile(ttfts, 99),
        itl_p50_ms=percentile(itls, 50),
        itl_p99_ms=percentile(itls, 99),
    )


async def run(target: str, streams: int, output_tokens: int, model: str = "") -> tuple[list[GroupRow], float]:
    """Start `streams` constrained and `streams` free requests at once; return one row per group and the wall time."""
    async with aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        started = time.perf_counter()
        calls = [_stream(stub, _request(i, output_tokens, i % 2 == 0, model)) for i in range(2 * streams)]
        outcomes = await asyncio.gather(*calls)
        duration = time.perf_counter() - started
    rows = [
        summarize("json_schema", list(outcomes[0::2]), constrained=True),
        summarize("free", list(outcomes[1::2]), constrained=False),
    ]
    return rows, duration


def format_table(rows: Sequence[GroupRow], duration_s: float) -> str:
    """The rows as one Markdown table, with the run's wall time under it."""
    columns = ["group", "streams", "errors", "valid JSON", "mean tokens", "tok/s/stream"]
    columns += ["TTFT p50", "TTFT p99", "ITL p50", "ITL p99"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        valid = "-" if r.valid_json is None else f"{r.valid_json}/{r.streams - r.errors}"
        lines.append(
            f"| {r.group} | {r.streams} | {r.errors} | {valid} | {r.mean_output_tokens:.1f} | "
            f"{r.tokens_per_s_per_stream:.1f} | {r.ttft_p50_ms:.0f} ms | {r.ttft_p99_ms:.0f} ms | "
            f"{r.itl_p50_ms:.1f} ms | {r.itl_p99_ms:.1f} ms |"
        )
    lines.append(f"\nwall time {duration_s:.1f} s")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="weir bench structured", description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="a running Weir gRPC server, HOST:PORT")
    p.add_argument("--model", default="", help="model id (default: the server's default generation model)")
    p.add_argument("--streams", type=int, default=32, help="streams per group (default %(default)s)")
    p.add_argument("--output-tokens", type=int, default=64, help="max_tokens per stream (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the structured-output benchmark once and print its table."""
    args = build_parser().parse_args(argv)
    if args.streams < 1 or args.output_tokens < 1:
        build_parser().error("--streams and --output-tokens must be at least 1")
    rows, duration = asyncio.run(run(args.target, args.streams, args.output_tokens, args.model))
    if args.json:
        print(json.dumps({"duration_s": duration, "rows": [r.__dict__ for r in rows]}, indent=2))
    else:
        print(format_table(rows, duration))
    return 1 if any(r.errors for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
