"""Speculative decoding through a real server: SmolLM2 with n-gram lookup answers a rewrite request exactly as the
server without speculation does (greedy), with the engine core in its own process, and reports its proposals and
acceptances in the stats and on /metrics under vLLM's names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from weir_client import WeirClient
from weir_server.config import (
    CacheConfig,
    EngineConfig,
    ExecutorConfig,
    ModelConfig,
    ObservabilityConfig,
    ServerConfig,
)
from weir_server.engine.spec_decode.config import SpeculativeConfig

pytestmark = pytest.mark.timeout(300)

PASSAGE = (
    "The river rose slowly through the night. By morning the low fields were under water, and the farmers moved "
    "their animals to the hill behind the church. Nobody was hurt, but the old bridge was gone."
)
MESSAGES = [{"role": "user", "content": f"Repeat this passage word for word, changing nothing:\n\n{PASSAGE}"}]


# float32 on both sides: in bf16 a verify step of more than 4 rows a sequence (K = 4 here) takes other CPU
# kernels than a one-row decode (the bf16 weights and head, not the 4-bit copies and the file's int8 head), so
# near-ties may flip; in float32 both read the same weights and differ only by rounding far below a token's
# margin. Exactness of the mechanism itself is tested on tiny float32 models in tests/server/spec_decode.
def _generate_config(**kwargs: Any) -> EngineConfig:
    return EngineConfig(
        ModelConfig("smollm2-135m-instruct", dtype="float32", max_model_len=1024),
        cache=CacheConfig(kv_cache_memory_gb=0.25),
        **kwargs,
    )


# The core process only: the thread core runs the same EngineCore, whose speculation tests/server/spec_decode covers,
# and each SmolLM2 server costs the suite half a minute.
@pytest.fixture(scope="module", params=["process"])
def spec_server(request: Any, start_server: Callable[..., Any]) -> Any:
    generate = _generate_config(
        executor=ExecutorConfig(engine_core=request.param),
        speculative=SpeculativeConfig("ngram", num_speculative_tokens=4, prompt_lookup_min=2, prompt_lookup_max=4),
    )
    observability = ObservabilityConfig(metrics_port=0)
    return start_server(
        ServerConfig(host="127.0.0.1", port=0, generate=generate, embed=None, observability=observability)
    )


@pytest.fixture(scope="module")
def reference_client(start_server: Callable[..., Any]) -> Any:
    """A client of the same model without speculation."""
    server = start_server(ServerConfig(host="127.0.0.1", port=0, generate=_generate_config(), embed=None))
    with WeirClient(server.target, timeout=120) as client:
        yield client


def test_greedy_rewrite_is_identical_with_speculation(spec_server: Any, reference_client: WeirClient) -> None:
    keywords: dict[str, Any] = {"messages": MESSAGES, "max_tokens": 64, "temperature": 0.0}
    expected = reference_client.complete(**keywords).choices[0]
    with WeirClient(spec_server.target, timeout=120) as client:
        got = client.complete(**keywords).choices[0]
        stop = expected.text.split()[12]  # a word well inside the copied passage: inside an accepted run
        stopped_expected = reference_client.complete(**keywords, stop=[stop]).choices[0]
        stopped = client.complete(**keywords, stop=[stop]).choices[0]
    assert (got.text, got.token_ids, got.finish_reason) == (expected.text, expected.token_ids, expected.finish_reason)
    assert (stopped.text, stopped.finish_reason) == (stopped_expected.text, stopped_expected.finish_reason)
    stats = spec_server.generate_engine.stats()
    assert stats.spec_num_accepted_tokens > 0 and stats.spec_mean_acceptance_length > 1.0
    metrics = spec_server.server.observability.metrics.exposition().decode()
    accepted = [line for line in metrics.splitlines() if line.startswith("vllm:spec_decode_num_accepted_tokens_total")]
    assert accepted and float(accepted[0].rsplit(" ", 1)[1]) == stats.spec_num_accepted_tokens
    assert "vllm:spec_decode_num_draft_tokens_total" in metrics
