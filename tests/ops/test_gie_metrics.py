"""A real server's metrics port meets the Gateway API Inference Extension's model-server protocol: the series its
endpoint picker scrapes exist under vLLM's names with the protocol's types and labels (protocol: the
gateway-api-inference-extension repository, docs/proposals/003-model-server-protocol/README.md)."""

from __future__ import annotations

import urllib.request

import pytest
from ops_support import TINY_MODEL_NAME, ServerProcess
from prometheus_client.parser import text_string_to_metric_families

# (name, type): TotalQueuedRequests, TotalRunningRequests, KVCacheUtilization; then the optional BlockSize and
# NumGPUBlocks (labels of cache_config_info) and the LoRA adapters' gauge.
REQUIRED = (
    ("vllm:num_requests_waiting", "gauge"),
    ("vllm:num_requests_running", "gauge"),
    ("vllm:kv_cache_usage_perc", "gauge"),
    ("vllm:cache_config_info", "gauge"),
    ("vllm:lora_requests_info", "gauge"),
)


@pytest.fixture(scope="module")
def families(traced_server: ServerProcess) -> dict:
    with urllib.request.urlopen(traced_server.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


@pytest.mark.parametrize(("name", "kind"), REQUIRED)
def test_protocol_metric_is_served_with_its_type(families: dict, name: str, kind: str):
    assert name in families, f"{name} missing from the scrape"
    assert families[name].type == kind
    samples = [s for s in families[name].samples if s.labels.get("model_name") == TINY_MODEL_NAME]
    assert len(samples) == 1, families[name].samples


def test_kv_cache_utilisation_is_a_fraction(families: dict):
    (sample,) = families["vllm:kv_cache_usage_perc"].samples
    assert 0.0 <= sample.value <= 1.0


def test_cache_config_names_the_block_size_and_block_count(families: dict):
    (sample,) = families["vllm:cache_config_info"].samples
    assert int(sample.labels["block_size"]) >= 1
    assert int(sample.labels["num_gpu_blocks"]) >= 1


def test_lora_info_says_no_adapters_and_carries_a_timestamp(families: dict):
    (sample,) = families["vllm:lora_requests_info"].samples
    assert sample.labels["max_lora"] == "0"
    assert sample.labels["running_lora_adapters"] == sample.labels["waiting_lora_adapters"] == ""
    assert sample.value > 1.6e9  # seconds since the epoch: the picker keeps the newest series
