"""The multi-tenant scenario: several `weir serve` replicas behind one `weir gateway`, loaded with many users who
share a few long documents (system prompts) and ask short questions; run once per routing policy of the gateway,
reporting the replicas' prefix-cache hit rate (from their `vllm:prefix_cache_*` counters) next to the ideal one (every
request on its document's home replica), TTFT and throughput, and the issue's bar as measured.

Routing matters when the documents together outgrow one replica's KV cache but fit in all of them: size the caches
through `--server-args` (`--num-kv-blocks N`, the same on CPU and GPU); the report prints the working set and each
replica's blocks (from `vllm:cache_config_info`) so a run shows which regime it measured.

Each policy gets documents of its own (same shape, fresh tokens), so what an earlier policy left in the replicas'
prefix caches never helps a later one; the hit rate counts only the measured requests (counters read before and
after them)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from weir_bench.load import LoadSpec, RequestTiming, make_prompts, run_load
from weir_bench.peers import ManagedProcess, TargetError, free_port, start_weir_server
from weir_bench.report import percentile

logger = logging.getLogger(__name__)

ROUTING_POLICIES = ("round-robin", "least-load", "cache-aware")
# The replicas' cumulative counters the report is made of (vLLM's names; Weir serves them on its metrics port).
PREFIX_HITS, PREFIX_QUERIES, FINISHED = (
    "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_queries_total",
    "vllm:request_success_total",
)
CACHE_CONFIG = "vllm:cache_config_info"  # labels block_size and num_gpu_blocks (the GIE protocol's gauge)
# The bar: cache-aware's TTFT p50 at least this many times round-robin's, its hit rate at least this share of
# the ideal, and no less throughput.
BAR_TTFT_SPEEDUP, BAR_HIT_SHARE = 2.0, 0.9


@dataclass(frozen=True)
class MultiTenantSpec:
    """The workload: `users` users, each reading one of `documents` shared documents of `document_tokens`, send
    `requests` questions of `question_tokens` (each answered in `output_tokens`), `concurrency` in flight."""

    replicas: int = 2
    documents: int = 4
    users: int = 32
    document_tokens: int = 512
    question_tokens: int = 16
    output_tokens: int = 8
    requests: int = 48
    concurrency: int = 4


@dataclass(frozen=True)
class TenantRequest:
    """One request of the workload: who asks, about which document, and the token ids sent."""

    user: int
    document: int
    prompt: list[int]


def make_workload(spec: MultiTenantSpec, vocab_size: int, seed: int) -> list[TenantRequest]:
    """`spec.requests` requests in arrival order: a random user each, whose prompt is their document (user `u`
    reads document `u % documents`) followed by a fresh question."""
    rng = random.Random(seed)
    docs = make_prompts(spec.documents, spec.document_tokens, vocab_size, rng.getrandbits(63))
    questions = make_prompts(spec.requests, spec.question_tokens, vocab_size, rng.getrandbits(63))
    requests = []
    for question in questions:
        user = rng.randrange(spec.users)
        document = user % spec.documents
        requests.append(TenantRequest(user, document, docs[document] + question))
    return requests


def ideal_hit_rate(workload: Sequence[TenantRequest], document_tokens: int, block_size: int) -> float:
    """The hit rate if every request went to its document's home replica and found it there once prefilled: each
    document's first request is cold, every later one hits the document's full blocks (the cache's unit)."""
    seen: set[int] = set()
    hits = queried = 0
    for request in workload:
        queried += len(request.prompt)
        if request.document in seen:
            hits += min(document_tokens, len(request.prompt) - 1) // block_size * block_size
        seen.add(request.document)
    return hits / queried if queried else math.nan


@dataclass(frozen=True)
class CacheShape:
    """The regime a run measured: the documents' blocks against each replica's KV blocks."""

    block_size: int
    replica_blocks: tuple[int, ...]
    working_set_blocks: int  # every document's blocks (partial last block included)

    def describe(self) -> str:
        smallest, total = min(self.replica_blocks), sum(self.replica_blocks)
        if self.working_set_blocks <= smallest:
            regime = "fits in one replica: every policy can cache every document, routing has little to win"
        elif self.working_set_blocks > total:
            regime = "outgrows all replicas together: even ideal routing evicts"
        else:
            regime = "outgrows one replica, fits in all: the regime cache-aware routing is for"
        blocks = "/".join(map(str, self.replica_blocks))
        return (
            f"working set {self.working_set_blocks} blocks of {self.block_size} tokens; replicas hold {blocks} "
            f"blocks: {regime}"
        )


@dataclass(frozen=True)
class PolicyRow:
    """One routing policy's result; `skipped` says why it was not measured (the other fields are then empty)."""

    routing: str
    requests: int = 0
    errors: int = 0
    prefix_hit_rate: float = math.nan  # prompt tokens served from the replicas' prefix caches / looked up
    ttft_p50_ms: float = math.nan
    ttft_p99_ms: float = math.nan
    output_tok_per_s: float = math.nan
    requests_per_s: float = math.nan
    per_replica: tuple[int, ...] = ()  # requests each replica finished
    ideal_hit_rate: float = math.nan  # the same workload with every request on its document's home (ideal_hit_rate)
    skipped: str = ""


Counters = dict[str, float]


def parse_counters(text: str, names: Sequence[str] = (PREFIX_HITS, PREFIX_QUERIES, FINISHED)) -> Counters:
    """The sum over labels of each of `names` in a Prometheus text exposition (0 when absent)."""
    totals = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def summarize_policy(
    routing: str,
    timings: Sequence[RequestTiming],
    duration_s: float,
    before: Sequence[Counters],
    after: Sequence[Counters],
    ideal: float = math.nan,
) -> PolicyRow:
    """A policy's row from its measured requests and each replica's counters before and after them."""
    ok = [t for t in timings if t.ok]
    ttfts = [t.ttft * 1e3 for t in ok if t.ttft is not None]
    hits = sum(a[PREFIX_HITS] - b[PREFIX_HITS] for a, b in zip(after, before, strict=True))
    queries = sum(a[PREFIX_QUERIES] - b[PREFIX_QUERIES] for a, b in zip(after, before, strict=True))
    return PolicyRow(
        routing=routing,
        requests=len(timings),
        errors=len(timings) - len(ok),
        prefix_hit_rate=hits / queries if queries else math.nan,
        ideal_hit_rate=ideal,
        ttft_p50_ms=percentile(ttfts, 50),
        ttft_p99_ms=percentile(ttfts, 99),
        output_tok_per_s=sum(t.num_output_tokens for t in ok) / duration_s if duration_s > 0 else math.nan,
        requests_per_s=len(ok) / duration_s if duration_s > 0 else math.nan,
        per_replica=tuple(round(a[FINISHED] - b[FINISHED]) for a, b in zip(after, before, strict=True)),
    )


COLUMNS = ("routing", "requests", "errors", "prefix hit", "ideal hit", "TTFT p50 ms", "TTFT p99 ms", "out tok/s",
           "req/s", "per replica")  # fmt: skip


def format_policy_table(rows: Sequence[PolicyRow]) -> str:
    """One line per policy (a skipped one says why), columns aligned, as a Markdown table."""
    lines = [COLUMNS, tuple("-" * len(c) for c in COLUMNS)]
    for r in rows:
        if r.skipped:
            lines.append((r.routing, f"skipped: {r.skipped}", *("",) * (len(COLUMNS) - 2)))
            continue
        lines.append((
            r.routing, str(r.requests), str(r.errors), _num(r.prefix_hit_rate, ".1%"), _num(r.ideal_hit_rate, ".1%"),
            _num(r.ttft_p50_ms, ".0f"),
            _num(r.ttft_p99_ms, ".0f"), _num(r.output_tok_per_s, ".1f"), _num(r.requests_per_s, ".2f"),
            "/".join(map(str, r.per_replica)),
        ))  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join("| " + " | ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) + " |" for line in lines)


def bar_verdict(rows: Sequence[PolicyRow]) -> str:
    """The issue's bar as measured: cache-aware against round-robin (TTFT p50, throughput) and against the ideal hit
    rate; empty when either policy was not measured."""
    by_policy = {r.routing: r for r in rows if not r.skipped}
    aware, rr = by_policy.get("cache-aware"), by_policy.get("round-robin")
    if aware is None or rr is None:
        return ""
    speedup = rr.ttft_p50_ms / aware.ttft_p50_ms if aware.ttft_p50_ms > 0 else math.nan
    hit_share = aware.prefix_hit_rate / aware.ideal_hit_rate if aware.ideal_hit_rate > 0 else math.nan
    throughput = aware.output_tok_per_s / rr.output_tok_per_s if rr.output_tok_per_s > 0 else math.nan
    checks = (
        (speedup >= BAR_TTFT_SPEEDUP, f"TTFT p50 {speedup:.2f}x round-robin's (bar >= {BAR_TTFT_SPEEDUP:g}x)"),
        (hit_share >= BAR_HIT_SHARE, f"hit rate {hit_share:.0%} of the ideal (bar >= {BAR_HIT_SHARE:.0%})"),
        (throughput >= 1.0, f"throughput {throughput:.2f}x round-robin's (bar >= 1x)"),
    )
    verdict = "PASS" if all(ok for ok, _ in checks) else "FAIL"
    return f"bar: {verdict}: cache-aware " + "; ".join(f"{text} {'ok' if ok else 'missed'}" for ok, text in checks)


def _num(value: float, fmt: str) -> str:
    return "-" if math.isnan(value) else format(value, fmt)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options only --scenario multi-tenant reads. It also reads --prefix-tokens (the document length),
    --suffix-tokens (the question length), --output-tokens (default 8 here), --requests (default 48), one
    --concurrency (default 4), --server-args, --seed and --vocab-size."""
    m = parser.add_argument_group("multi-tenant scenario")
    m.add_argument("--replicas", type=int, default=2, help="`weir serve` replicas behind the gateway (default 2)")
    m.add_argument(
        "--routing",
        default=",".join(ROUTING_POLICIES),
        help="comma list of the gateway's --routing policies, each measured in turn (default %(default)s)",
    )
    m.add_argument("--documents", type=int, default=4, help="shared documents (system prompts) (default 4)")
    m.add_argument("--users", type=int, default=32, help="users, each reading one document (default 32)")
    m.add_argument("--gateway-args", default="", help='extra `weir gateway` options (e.g. "--max-tokens 64")')


def spec_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[MultiTenantSpec, list[str]]:
    """The workload and the policies `args` ask for; a bad value is a usage error (exit 2) before anything starts."""
    policies = [p.strip() for p in args.routing.split(",") if p.strip()]
    if not policies or len(set(policies)) != len(policies):
        parser.error(f"--routing: expected distinct comma-separated policies, got {args.routing!r}")
    concurrency = args.concurrency or [4]
    if len(concurrency) != 1:
        parser.error("--scenario multi-tenant runs at one --concurrency")
    if args.request_rate is not None or args.dataset_name != "random":
        parser.error("--scenario multi-tenant makes its own prompts, closed loop; drop --request-rate/--dataset-name")
    spec = MultiTenantSpec(
        replicas=args.replicas, documents=args.documents, users=args.users, document_tokens=args.prefix_tokens,
        question_tokens=args.suffix_tokens, output_tokens=args.output_tokens or 8, requests=args.requests or 48,
        concurrency=concurrency[0],
    )  # fmt: skip
    for name in ("replicas", "documents", "users", "document_tokens", "question_tokens", "output_tokens"):
        if getattr(spec, name) < 1:
            parser.error(f"--{name.replace('_tokens', '').replace('_', '-')}: must be at least 1")
    return spec, policies


def parse_cache_config(text: str) -> tuple[int, int]:
    """(block size, KV blocks) of the first model in `vllm:cache_config_info`; (0, 0) when absent."""
    for line in text.splitlines():
        if line.startswith(CACHE_CONFIG + "{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
            return int(labels.get("block_size", 0)), int(labels.get("num_gpu_blocks", 0))
    return 0, 0


async def _scrape_texts(urls: Sequence[str]) -> list[str]:
    import aiohttp  # the gateway extra, as for every HTTP target

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        texts = []
        for url in urls:
            async with session.get(url) as reply:
                reply.raise_for_status()
                texts.append(await reply.text())
    return texts


async def _scrape(urls: Sequence[str]) -> list[Counters]:
    return [parse_counters(text) for text in await _scrape_texts(urls)]


async def cache_shape(urls: Sequence[str], spec: MultiTenantSpec) -> CacheShape:
    """The replicas' block size and KV blocks (from their metrics) against the documents' blocks."""
    configs = [parse_cache_config(text) for text in await _scrape_texts(urls)]
    block_size = configs[0][0] or 16
    per_document = -(-spec.document_tokens // block_size)
    return CacheShape(block_size, tuple(blocks for _, blocks in configs), spec.documents * per_document)


async def _start_replicas(args: argparse.Namespace, count: int) -> list[tuple[ManagedProcess, str, str]]:
    """`count` servers loading side by side, each with its own metrics port: (process, gRPC address, metrics URL)."""
    from weir_bench.grpc_driver import grpc_ready
    from weir_bench.targets import weir_server_args

    ports = [free_port() for _ in range(count)]
    started = await asyncio.gather(
        *(start_weir_server([*weir_server_args(args), "--metrics-port", str(port)], grpc_ready, args.server_timeout)
          for port in ports),
        return_exceptions=True,
    )  # fmt: skip
    replicas: list[tuple[ManagedProcess, str, str]] = []
    failures: list[BaseException] = []
    for item, port in zip(started, ports, strict=True):
        if isinstance(item, BaseException):
            failures.append(item)
        else:
            replicas.append((item[0], item[1], f"http://127.0.0.1:{port}/metrics"))
    if failures:
        for proc, _, _ in replicas:
            proc.stop()
        raise failures[0]
    return replicas


async def _measure_policy(
    args: argparse.Namespace,
    spec: MultiTenantSpec,
    policy: str,
    addresses: list[str],
    metrics_urls: list[str],
    workload: list[TenantRequest],
    warmup: list[list[int]],
    block_size: int,
) -> PolicyRow:
    """Start the gateway with `--routing policy` over the replicas, warm up, and time the workload through it."""
    from weir_bench.openai_driver import OpenAIDriver

    port = free_port()
    backends = [a for address in addresses for a in ("--backend", address)]
    command = [sys.executable, "-m", "weir_gateway.cli", "--host", "127.0.0.1", "--port", str(port), *backends,
               "--routing", policy, *shlex.split(args.gateway_args)]  # fmt: skip
    gateway = ManagedProcess(f"weir-gateway-{policy}", command)
    driver = OpenAIDriver(f"http://127.0.0.1:{port}", name=policy, temperature=0.0, timeout_s=args.timeout)
    try:
        try:
            await gateway.wait_ready(driver.ready, args.server_timeout)
        except TargetError:
            if gateway.proc.returncode == 2:  # a usage error: this gateway has no such policy
                reason = gateway.log_tail(1).strip() or "refused"
                logger.warning("gateway refused --routing %s: %s", policy, reason)
                return PolicyRow(policy, skipped=f"the gateway refused it ({reason[-120:]})")
            raise
        await run_load(driver, LoadSpec(spec.concurrency, len(warmup), len(warmup[0]), 1), warmup)
        before = await _scrape(metrics_urls)
        prompts = [r.prompt for r in workload]
        load = LoadSpec(spec.concurrency, len(prompts), len(prompts[0]), spec.output_tokens)
        logger.info("%s: %d requests at concurrency %d", policy, len(prompts), spec.concurrency)
        result = await run_load(driver, load, prompts)
        after = await _scrape(metrics_urls)
    finally:
        await driver.close()
        gateway.stop()
    ideal = ideal_hit_rate(workload, spec.document_tokens, block_size)
    return summarize_policy(policy, result.timings, result.duration_s, before, after, ideal)


async def run_multitenant(
    args: argparse.Namespace, spec: MultiTenantSpec, policies: list[str]
) -> tuple[CacheShape, list[PolicyRow]]:
    """Start the replicas once, then measure each policy in turn behind a gateway of its own."""
    from weir_bench.grpc_driver import GrpcDriver

    replicas = await _start_replicas(args, spec.replicas)
    try:
        addresses = [address for _, address, _ in replicas]
        probe = GrpcDriver(addresses[0], model=args.model)
        vocab = args.vocab_size or await probe.vocab_size()
        await probe.close()
        if not vocab:
            raise TargetError("the server does not report its vocabulary size; pass --vocab-size")
        metrics_urls = [u for *_, u in replicas]
        shape = await cache_shape(metrics_urls, spec)
        logger.info("%s", shape.describe())
        rows = []
        for i, policy in enumerate(policies):
            seed = args.seed * 1_000_003 + i  # fresh documents per policy: no policy inherits another's cache
            workload = make_workload(spec, vocab, seed)
            warmup = make_prompts(2 * spec.replicas, 8, vocab, seed=seed + 500_000)
            rows.append(await _measure_policy(args, spec, policy, addresses, metrics_urls, workload, warmup,
                                              shape.block_size))  # fmt: skip
        return shape, rows
    finally:
        for proc, _, _ in replicas:
            proc.stop()


def main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`weir bench --scenario multi-tenant`: 0 when every request succeeded, 1 when some failed, 2 on a bad target."""
    spec, policies = spec_from_args(parser, args)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        shape, rows = asyncio.run(run_multitenant(args, spec, policies))
    except (TargetError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    if args.json:
        report = {"spec": asdict(spec), "cache": asdict(shape), "rows": [asdict(r) for r in rows]}
        print(json.dumps(report | {"bar": bar_verdict(rows)}, indent=1))
    else:
        print(
            f"multi-tenant: {spec.replicas} replicas, {spec.users} users over {spec.documents} documents of "
            f"{spec.document_tokens} tokens, questions of {spec.question_tokens} tokens, {spec.output_tokens} "
            f"output tokens, {spec.requests} requests at concurrency {spec.concurrency}\n{shape.describe()}\n"
        )
        print(format_policy_table(rows))
        if verdict := bar_verdict(rows):
            print(f"\n{verdict}")
    return 1 if any(r.errors for r in rows) else 0
