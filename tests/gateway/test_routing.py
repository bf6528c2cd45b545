"""Routing policies (pure), per-API-key rate limits (pure and over HTTP), retries of RESOURCE_EXHAUSTED, and the
scale-out flags' validation. Real servers going away and DNS re-resolution are in test_routing_failover.py."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
from gateway_fakes import GEN_MODEL
from gateway_support import http as request

from weir.v1 import inference_pb2 as pb
from weir_gateway.config import GatewayConfig
from weir_gateway.errors import ApiError
from weir_gateway.ratelimit import RateLimiter
from weir_gateway.routing import CacheAware, LeastLoad, RoundRobin, prefix_key, rendezvous_score


@dataclass
class Node:
    address: str
    load: int = 0


def nodes(count: int) -> list[Node]:
    return [Node(f"10.0.0.{i}:50051") for i in range(1, count + 1)]


def key(text: str) -> bytes:
    found = prefix_key(pb.GenerateRequest(prompt=text), 1024)
    assert found is not None
    return found


def home_of(k: bytes, candidates: list[Node]) -> Node:
    return max(candidates, key=lambda n: rendezvous_score(k, n.address))


def test_round_robin_takes_each_backend_in_turn_whatever_its_load() -> None:
    backends = nodes(3)
    backends[0].load = 50
    policy = RoundRobin()
    assert [policy.choose(backends, None).address for _ in range(6)] == [b.address for b in backends * 2]


def test_least_load_takes_the_backend_with_fewest_requests_in_flight() -> None:
    backends = nodes(3)
    backends[0].load, backends[1].load, backends[2].load = 3, 1, 2
    assert LeastLoad().choose(backends, key("anything")) is backends[1]


def test_cache_aware_sends_a_prefix_to_the_same_home_every_time() -> None:
    backends, policy = nodes(4), CacheAware()
    k = key("You are a helpful assistant. " * 50 + "Question one?")
    chosen = {policy.choose(backends, k).address for _ in range(10)}
    assert chosen == {home_of(k, backends).address}


def test_cache_aware_spreads_different_prefixes_over_the_backends() -> None:
    backends, policy = nodes(4), CacheAware()
    homes = {policy.choose(backends, key(f"document {i} " * 100)).address for i in range(64)}
    assert homes == {b.address for b in backends}


def test_cache_aware_leaves_a_home_busier_than_the_imbalance_threshold() -> None:
    backends, policy = nodes(2), CacheAware(factor=2.0, slack=4)
    k = key("shared system prompt " * 60)
    home = home_of(k, backends)
    other = next(b for b in backends if b is not home)
    other.load, home.load = 1, 6  # 6 <= 2 x 1 + 4: still home
    assert policy.choose(backends, k) is home
    home.load = 7  # 7 > 2 x 1 + 4: the least-loaded backend
    assert policy.choose(backends, k) is other


def test_cache_aware_without_a_prefix_goes_by_least_load() -> None:
    backends = nodes(3)
    backends[0].load, backends[1].load, backends[2].load = 2, 0, 1
    assert CacheAware().choose(backends, None) is backends[1]


def test_a_backend_leaving_moves_only_the_prefixes_it_was_home_to() -> None:
    backends = nodes(5)
    keys = [key(f"tenant {i} system prompt " * 40) for i in range(200)]
    before = {k: home_of(k, backends) for k in keys}
    leaving = backends[2]
    after = {k: home_of(k, [b for b in backends if b is not leaving]) for k in keys}
    moved = [k for k in keys if before[k] is not after[k]]
    assert moved and all(before[k] is leaving for k in moved)


def test_a_backend_joining_takes_prefixes_only_for_itself() -> None:
    backends = nodes(4)
    keys = [key(f"tenant {i} system prompt " * 40) for i in range(200)]
    before = {k: home_of(k, backends) for k in keys}
    joined = Node("10.0.0.9:50051")
    after = {k: home_of(k, [*backends, joined]) for k in keys}
    assert all(after[k] is before[k] or after[k] is joined for k in keys)
    assert any(after[k] is joined for k in keys)


def test_prompts_sharing_a_long_head_share_a_key_and_short_distinct_ones_do_not() -> None:
    document = "The quarterly report says revenue grew in every region. " * 30  # > 1024 bytes
    assert key(document + "Summarise it.") == key(document + "List the risks.")
    assert key("What is 2 + 2?") != key("Name a prime number.")


def test_a_varying_tail_inside_the_last_partial_block_keeps_the_key() -> None:
    system = "s" * 600  # two whole 256-byte blocks, then a partial one
    assert key(system + " question A") == key(system + " question B, longer")


def test_chat_messages_and_token_ids_have_prefix_keys() -> None:
    def chat(user: str) -> pb.GenerateRequest:
        system = pb.ChatMessage(role="system", content="You are terse. " * 100)
        return pb.GenerateRequest(
            messages=pb.ChatMessages(messages=[system, pb.ChatMessage(role="user", content=user)])
        )

    assert prefix_key(chat("hi"), 1024) == prefix_key(chat("bye"), 1024)
    ids = list(range(1000))
    assert prefix_key(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids + [1])), 1024) == prefix_key(
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids + [2])), 1024
    )
    assert prefix_key(pb.GenerateRequest(), 1024) is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_over_the_per_minute_limit_are_refused_with_a_wait_until_a_slot_refills() -> None:
    clock = Clock()
    limiter = RateLimiter(rpm=2, tpm=0, clock=clock)
    limiter.admit("a", 0)
    limiter.admit("a", 0)
    with pytest.raises(ApiError) as refused:
        limiter.admit("a", 0)
    assert refused.value.status == 429 and refused.value.retry_after_s == 30  # one request refills every 30 s
    limiter.admit("b", 0)  # another key has its own bucket
    clock.now += 30
    limiter.admit("a", 0)


def test_a_refused_request_costs_no_tokens_and_usage_settles_the_estimate() -> None:
    clock = Clock()
    limiter = RateLimiter(rpm=0, tpm=100, clock=clock)
    limiter.admit("a", 80)
    with pytest.raises(ApiError):
        limiter.admit("a", 30)
    limiter.settle("a", charged=80, used=20)  # the request used less than its max_tokens
    limiter.admit("a", 70)


def test_a_request_larger_than_the_token_limit_is_refused_outright() -> None:
    with pytest.raises(ApiError, match="too large"):
        RateLimiter(rpm=0, tpm=100).admit("a", 101)


def completion(max_tokens: int = 4) -> dict:
    return {"model": GEN_MODEL, "prompt": "hello there", "max_tokens": max_tokens}


def test_a_burst_over_the_request_limit_gets_429_with_retry_after(make_fake, make_gateway) -> None:
    fake = make_fake()
    gateway = make_gateway(GatewayConfig(backends=(fake.address,), api_keys=("alpha", "beta"), rate_limit_rpm=3))
    alpha, beta = {"Authorization": "Bearer alpha"}, {"Authorization": "Bearer beta"}
    replies = [request("POST", gateway.url + "/v1/completions", completion(), alpha) for _ in range(5)]
    assert [r.status for r in replies] == [200, 200, 200, 429, 429]
    refused = replies[3]
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert request("POST", gateway.url + "/v1/completions", completion(), beta).status == 200
    assert fake.servicer.calls == 4  # refused requests never reach a backend
    assert request("GET", gateway.url + "/v1/models", headers=alpha).status == 200  # only POST /v1/* is limited


def test_a_burst_over_the_token_limit_gets_429(make_fake, make_gateway) -> None:
    fake = make_fake()
    gateway = make_gateway(GatewayConfig(backends=(fake.address,), rate_limit_tpm=250))
    statuses = [request("POST", gateway.url + "/v1/completions", completion(100)).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    too_large = request("POST", gateway.url + "/v1/completions", completion(1000))
    assert too_large.status == 429 and "too large" in too_large.json()["error"]["message"]


def test_resource_exhausted_is_tried_on_every_backend_then_answered_429(make_fake, make_gateway) -> None:
    fakes = [make_fake(), make_fake()]
    gateway = make_gateway(GatewayConfig(backends=tuple(f.address for f in fakes), retry_backoff_s=0.01))
    reply = request("POST", gateway.url + "/v1/completions", {"model": GEN_MODEL, "prompt": "FAIL_EXHAUSTED"})
    assert reply.status == 429 and reply.headers["Retry-After"] == "3"
    assert [f.servicer.calls for f in fakes] == [1, 1]
    assert all(b.available for b in gateway.pool.backends)  # a full queue is load, not a fault: nobody ejected


def test_max_attempts_bounds_the_retries(make_fake, make_gateway) -> None:
    fakes = [make_fake(), make_fake()]
    config = GatewayConfig(backends=tuple(f.address for f in fakes), max_attempts=1)
    gateway = make_gateway(config)
    reply = request("POST", gateway.url + "/v1/completions", {"model": GEN_MODEL, "prompt": "FAIL_EXHAUSTED"})
    assert reply.status == 429
    assert sum(f.servicer.calls for f in fakes) == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--routing-imbalance", "0.5"], "routing_imbalance must be at least 1"),
     (["--max-attempts", "0"], "max_attempts must be at least 1"),
     (["--rate-limit-rpm", "-1"], "rate_limit_rpm must be >= 0"),
     (["--resolve-interval", "0"], "resolve_interval_s must be positive"),
     (["--backend", "dns:///headless"], "a dns: backend needs a name and a port")],
)  # fmt: skip
def test_bad_scale_out_flags_are_one_line_and_exit_2(flags: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "weir_gateway", "--port", "0", *flags],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr
