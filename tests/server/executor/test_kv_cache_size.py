"""The CPU KV cache's default size follows the model (bytes per token) and the machine (available RAM)."""

from __future__ import annotations

from weir_server.config import CacheConfig
from weir_server.executor.kv_cache_size import (
    AVAILABLE_FRACTION,
    CONTEXT_PER_SEQ,
    available_memory_bytes,
    default_cpu_kv_cache_bytes,
)

GIB = 2**30


def test_the_default_holds_every_admitted_sequence_at_a_short_context():
    size = default_cpu_kv_cache_bytes(23_040, max_num_seqs=256, max_model_len=8192, available_bytes=64 * GIB)
    assert size == 256 * CONTEXT_PER_SEQ * 23_040


def test_the_default_holds_one_sequence_of_the_full_model_length():
    size = default_cpu_kv_cache_bytes(1000, max_num_seqs=2, max_model_len=32_768, available_bytes=64 * GIB)
    assert size == 32_768 * 1000


def test_a_bigger_model_gets_a_bigger_cache():
    small = default_cpu_kv_cache_bytes(23_040, 256, 8192, 64 * GIB)
    large = default_cpu_kv_cache_bytes(4 * 23_040, 256, 8192, 64 * GIB)
    assert large == 4 * small


def test_the_default_takes_at_most_a_fraction_of_the_available_memory():
    size = default_cpu_kv_cache_bytes(131_072, max_num_seqs=256, max_model_len=131_072, available_bytes=8 * GIB)
    assert size == int(8 * GIB * AVAILABLE_FRACTION)


def test_unknown_available_memory_leaves_the_wanted_size():
    assert default_cpu_kv_cache_bytes(100, 4, 1000, None) == 1000 * 100


def test_the_cpu_cache_size_defaults_to_automatic():
    assert CacheConfig().kv_cache_memory_gb is None


def test_available_memory_is_read_from_this_machine():
    available = available_memory_bytes()
    assert available is None or available > 0
