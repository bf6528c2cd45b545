"""Engines with and without speculation over one loaded model, and a workload whose outputs repeat its prompts."""

from __future__ import annotations

import dataclasses
import random

import pytest
from engine_helpers import greedy, make_engine, prompt

from weir_server.engine.core import EngineCore
from weir_server.engine.spec_decode.config import SpeculativeConfig
from weir_server.engine.types import GenerationOutput, GenerationRequest
from weir_server.executor.cuda_graphs import DecodeGraphs
from weir_server.executor.model_runner import ModelRunner
from weir_server.models.loader import LoadedModel

# Never backing off: the workloads' batches speculate at every size and every step (test_back_off.py tests backing
# off, test_policy.py the measured choice).
NGRAM = SpeculativeConfig(
    "ngram",
    num_speculative_tokens=4,
    prompt_lookup_min=1,
    prompt_lookup_max=3,
    disable_by_batch_size=None,
    adaptive=False,
)


def spec_engine(loaded: LoadedModel, spec: SpeculativeConfig | None, **kwargs: int | bool) -> EngineCore:
    """`make_engine(loaded, **kwargs)`, speculating with `spec` (None: without)."""
    base = make_engine(loaded, **kwargs)  # type: ignore[arg-type]
    if spec is None:
        return base
    # A draft model loads in the config's dtype: the loaded target's, as `weir serve` would have it.
    assert loaded.model is not None
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    model = dataclasses.replace(base.config.model, dtype=dtype)
    return EngineCore(loaded, dataclasses.replace(base.config, model=model, speculative=spec))


def grounded_prompt(seed: int, length: int = 24) -> list[int]:
    """A prompt that repeats a random phrase: n-gram lookup has something to find, as in a rewrite task."""
    rng = random.Random(seed)
    phrase = prompt(seed, rng.randint(3, 8))
    out: list[int] = []
    while len(out) < length:
        out += phrase if rng.random() < 0.7 else prompt(seed + len(out), 2)
    return out[:length]


def summary(outputs: list[GenerationOutput]) -> tuple[list[int], str, object, object]:
    tokens = [t for o in outputs for t in o.token_ids]
    return tokens, "".join(o.text for o in outputs), outputs[-1].finish_reason, outputs[-1].stop_reason


def random_workload(seed: int, num_requests: int = 12) -> dict[int, list[GenerationRequest]]:
    """Requests arriving over the first steps, with lengths, stop ids, min_tokens, n, logprobs and penalties mixed."""
    rng = random.Random(seed)
    arrivals: dict[int, list[GenerationRequest]] = {}
    for i in range(num_requests):
        extra: dict[str, object] = {}
        if rng.random() < 0.3:
            extra["stop_token_ids"] = (rng.randrange(2, 384),)
            extra["min_tokens"] = rng.randint(0, 4)
        if rng.random() < 0.3:
            extra["logprobs"] = 2
        if rng.random() < 0.2:
            extra["repetition_penalty"] = 1.3
        if rng.random() < 0.2:
            extra["n"] = 2
        params = greedy(rng.randint(1, 40), **extra)
        request = GenerationRequest(f"r{i}", grounded_prompt(seed * 100 + i, rng.randint(6, 40)), params)
        arrivals.setdefault(rng.randint(0, 6), []).append(request)
    return arrivals


def assert_same(base: dict, spec: dict) -> None:
    assert base.keys() == spec.keys()
    for key in base:
        assert summary(spec[key]) == summary(base[key]), key
        lp_base = [lp for o in base[key] for lp in (o.logprobs or ())]
        lp_spec = [lp for o in spec[key] for lp in (o.logprobs or ())]
        assert [lp.token_id for lp in lp_spec] == [lp.token_id for lp in lp_base]
        for a, b in zip(lp_spec, lp_base, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t.token_id for t in a.top] == [t.token_id for t in b.top]


def graphed_on_cpu(runner: ModelRunner, query_lens: tuple[int, ...], max_batch: int = 16) -> list[int]:
    """Give `runner` decode graphs whose replay runs eagerly; the query length of each replay is recorded."""
    graphs = DecodeGraphs(
        runner._graph_forward, runner.device, max_batch, runner.block_size, runner.max_model_len, query_lens=query_lens
    )
    replayed: list[int] = []

    def replay(decode):
        replayed.append(decode.query_len)
        return graphs.replay_eager(decode)

    graphs.replay = replay  # type: ignore[method-assign]
    runner.graphs = graphs
    return replayed
