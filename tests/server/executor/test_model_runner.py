"""ModelRunner: batch tensors, KV cache sizing, and logits equal to a dense Hugging Face forward."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from weir_server.config import CacheConfig, EngineConfig, ModelConfig
from weir_server.engine.block_manager import BlockManager
from weir_server.engine.sequence import Sequence
from weir_server.engine.types import SamplingParams
from weir_server.executor.batch import ScheduledSeq
from weir_server.executor.kv_cache_size import available_memory_bytes, default_cpu_kv_cache_bytes
from weir_server.executor.model_runner import CPU_STEP_NICENESS, ModelRunner, kv_cache_shape
from weir_server.models.llama import LlamaForCausalLM
from weir_server.models.loader import LoadedModel


@pytest.fixture(scope="module")
def models():
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    reference = HFLlama(config).eval()
    ours = LlamaForCausalLM(config)
    ours.load_weights(reference.state_dict().items())
    return config, ours.eval(), reference


def _runner(config, model, publisher=None, **cache) -> ModelRunner:
    loaded = LoadedModel(
        model=model,
        hf_config=config,
        tokenizer=None,
        model_id="tiny",
        architecture="LlamaForCausalLM",
        task="generate",
        max_model_len=128,
        vocab_size=300,
        dtype=torch.float32,
        device=torch.device("cpu"),
        eos_token_ids=(),
        pooling="last",
    )
    return ModelRunner(loaded, EngineConfig(ModelConfig("tiny"), cache=CacheConfig(block_size=4, **cache)), publisher)


def test_kv_cache_is_sized_from_memory_budget_on_cpu(models):
    config, model, _ = models
    runner = _runner(config, model, kv_cache_memory_gb=0.001)
    per_block = 2 * 2 * 4 * 2 * 16 * 4  # layers * (K, V) * block_size * kv_heads * head_dim * fp32
    assert runner.num_blocks == int(0.001 * 2**30) // per_block
    assert len(runner.kv_caches) == 2
    assert runner.kv_caches[0].shape == kv_cache_shape(config, runner.num_blocks, 4) == (2, runner.num_blocks, 4, 2, 16)


def test_kv_cache_without_a_budget_is_sized_from_the_model_and_the_machine(models):
    config, model, _ = models
    runner = _runner(config, model)
    per_token = 2 * 2 * 2 * 16 * 4  # layers * (K, V) * kv_heads * head_dim * fp32
    expected = default_cpu_kv_cache_bytes(per_token, 256, 128, available_memory_bytes())  # max_num_seqs, max len
    assert runner.num_blocks == expected // (4 * per_token)


def test_prepare_flattens_mixed_prefill_chunks_and_decodes(models):
    config, model, _ = models
    runner = _runner(config, model, num_blocks=32)
    prefill = Sequence("p", 0, list(range(10, 20)), SamplingParams())
    prefill.block_table = [7, 3, 9]
    decode = Sequence("d", 0, [5, 6, 7, 8, 9], SamplingParams())
    decode.block_table = [2, 4]
    decode.num_computed_tokens = 4
    batch = [ScheduledSeq(prefill, 6, prefill.num_computed_tokens), ScheduledSeq(decode, 1, decode.num_computed_tokens)]
    model_input = runner.prepare(batch)
    assert model_input.input_ids.tolist() == [10, 11, 12, 13, 14, 15, 9]
    assert model_input.positions.tolist() == [0, 1, 2, 3, 4, 5, 4]
    assert model_input.attn.slot_mapping.tolist() == [28, 29, 30, 31, 12, 13, 16]
    assert model_input.attn.query_start_loc.tolist() == [0, 6, 7]
    assert model_input.attn.context_lens_cpu == [6, 5]
    assert model_input.attn.block_tables.tolist() == [[7, 3, 9], [2, 4, 0]]
    assert model_input.logits_indices.tolist() == [6]  # the prefill chunk does not reach its last token


def _run_to_end(runner: ModelRunner, bm: BlockManager, seqs: list[Sequence], chunk: int) -> dict[int, torch.Tensor]:
    """Prefill every sequence in chunks of `chunk` tokens, all in one batch per step; last-token logits per seq."""
    last: dict[int, torch.Tensor] = {}
    while any(s.num_uncomputed_tokens for s in seqs):
        batch = [
            ScheduledSeq(s, min(chunk, s.num_uncomputed_tokens), s.num_computed_tokens)
            for s in seqs
            if s.num_uncomputed_tokens
        ]
        for s in batch:
            bm.allocate(s.seq, s.num_new_tokens)
        out = runner.execute(batch)
        for s, logits in zip(out.sample_seqs, out.sample_logits, strict=True):
            last[s.seq.seq_id] = logits
        for s in batch:
            s.seq.num_computed_tokens += s.num_new_tokens
    return last


def test_chunked_batched_logits_equal_a_dense_forward(models):
    config, model, reference = models
    runner = _runner(config, model, num_blocks=64)
    bm = BlockManager(64, 4)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (13, 5, 22)]
    seqs = [Sequence(f"s{i}", 0, p, SamplingParams()) for i, p in enumerate(prompts)]
    last = _run_to_end(runner, bm, seqs, chunk=6)
    with torch.no_grad():
        for seq, p in zip(seqs, prompts, strict=True):
            expected = reference(torch.tensor([p])).logits[0, -1]
            torch.testing.assert_close(last[seq.seq_id], expected, atol=1e-4, rtol=1e-4)


def test_prompt_logits_cover_every_prompt_position_but_the_last(models):
    config, model, reference = models
    runner = _runner(config, model, num_blocks=16)
    bm = BlockManager(16, 4)
    seq = Sequence("p", 0, torch.randint(0, 300, (9,)).tolist(), SamplingParams(prompt_logprobs=2))
    bm.allocate(seq, 9)
    out = runner.execute([ScheduledSeq(seq, 9, 0)])
    ((scheduled, logits),) = out.prompt_logits
    with torch.no_grad():
        expected = reference(torch.tensor([seq.token_ids])).logits[0]
    assert logits.shape == (8, 300)
    torch.testing.assert_close(logits, expected[:8], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.sample_logits[0], expected[8], atol=1e-4, rtol=1e-4)


def test_the_runner_hands_each_batch_to_the_publisher_it_was_given_before_running_it(models):
    config, model, _ = models
    published: list[list[tuple[int, int]]] = []

    class Recorder:
        def publish(self, batch):
            published.append([(s.start, s.num_new_tokens) for s in batch])

    runner = _runner(config, model, publisher=Recorder(), num_blocks=16)
    bm = BlockManager(16, 4)
    seq = Sequence("p", 0, [5, 6, 7, 8, 9], SamplingParams())
    bm.allocate(seq, 5)
    runner.execute([ScheduledSeq(seq, 3, 0)])
    seq.num_computed_tokens = 3
    runner.execute([ScheduledSeq(seq, 2, 3)])
    assert published == [[(0, 3)], [(3, 2)]]


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice values are a Linux/Unix facility")
def test_the_thread_stepping_a_cpu_model_runs_below_normal_priority_and_other_threads_do_not(models):
    """The server's event loop shares the cores with the steps: the stepping thread (and the OpenMP team it
    starts, which inherits it) gives way to it, while the thread that built the runner keeps its priority."""
    config, model, _ = models
    runners = [_runner(config, model, num_blocks=64) for _ in range(2)]  # a target and its draft share a thread
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: list[int] = []

    def step() -> None:
        for runner in runners:
            for _ in range(2):
                seq = Sequence("s", 0, [1, 2, 3], SamplingParams())
                _run_to_end(runner, BlockManager(64, 4), [seq], chunk=3)
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    for _ in range(2):  # a second thread stepping the same runners is lowered too, and each of them once
        thread = threading.Thread(target=step)
        thread.start()
        thread.join()
    assert seen == [min(19, before + CPU_STEP_NICENESS)] * 2
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
