"""Decode CUDA graphs: the batch ladder, the static-buffer preparation (checked on CPU against the eager step),
and on a GPU the replayed graphs and fused layers against the eager and torch paths."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from weir_server.config import CacheConfig, EngineConfig, ExecutorConfig, ModelConfig, SchedulerConfig
from weir_server.engine.llm_engine import LLMEngine
from weir_server.engine.types import GenerationRequest, SamplingParams
from weir_server.executor.cuda_graphs import DecodeGraphs, batch_size_ladder, padded_size
from weir_server.models.llama import LlamaForCausalLM
from weir_server.models.loader import LoadedModel

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
VOCAB = 320


def tiny_loaded(device: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=1, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * (1.0 if "embed" in name else 0.2))
            elif not name.endswith("bias"):
                param.fill_(1.0)
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(
        model, config, None, "tiny", "LlamaForCausalLM", "generate", 512, VOCAB, dtype, torch.device(device), (1,),
        "last",
    )  # fmt: skip


def engine(loaded: LoadedModel, enforce_eager: bool, max_num_seqs: int = 32) -> LLMEngine:
    config = EngineConfig(
        ModelConfig("tiny"),
        CacheConfig(block_size=16, num_blocks=256),
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=512),
        ExecutorConfig(enforce_eager=enforce_eager),
    )
    return LLMEngine(loaded, config)


def greedy_run(eng: LLMEngine, num_requests: int, max_tokens: int = 24) -> dict[str, list[int]]:
    generator = torch.Generator().manual_seed(3)
    for i in range(num_requests):
        prompt = torch.randint(2, VOCAB, (5 + 7 * i,), generator=generator).tolist()
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        eng.add_request(eng.validate(GenerationRequest(f"r{i}", prompt, params)))
    tokens: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for out in eng.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    return tokens


def test_ladder_is_powers_of_two_then_multiples_of_eight_up_to_the_maximum():
    assert batch_size_ladder(512)[:6] == [1, 2, 4, 8, 16, 24]
    assert batch_size_ladder(512)[-1] == 512
    assert batch_size_ladder(20) == [1, 2, 4, 8, 16, 20]
    assert batch_size_ladder(1) == [1]


def test_batches_pad_to_the_next_captured_size():
    sizes = batch_size_ladder(64)
    assert padded_size(sizes, 3) == 4
    assert padded_size(sizes, 17) == 24
    assert padded_size(sizes, 64) == 64
    assert padded_size(sizes, 65) is None


def test_static_buffers_reproduce_the_eager_decode_step_on_cpu():
    eng = engine(tiny_loaded("cpu"), enforce_eager=True)
    greedy_run(eng, 0)
    generator = torch.Generator().manual_seed(5)
    for i in range(5):
        prompt = torch.randint(2, VOCAB, (9 + 11 * i,), generator=generator).tolist()
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        eng.add_request(eng.validate(GenerationRequest(f"r{i}", prompt, params)))
    eng.step()  # prefill everything
    batch = eng.scheduler.schedule().scheduled
    assert all(s.num_new_tokens == 1 for s in batch)
    runner = eng.runner
    graphs = DecodeGraphs(runner._graph_forward, runner.device, 8, runner.block_size, runner.max_model_len)
    decode = graphs.prepare(batch)
    assert decode is not None and decode.padded == 8 and decode.num_seqs == 5
    with torch.inference_mode():
        padded = graphs.run_eager(decode.padded)[: decode.num_seqs]
        model_input = runner.prepare(batch)
        eager = runner.forward(model_input)
    torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5)
    assert graphs.i64[2, 5:].eq(-1).all(), "padding rows must write to slot -1"


def test_non_decode_batches_are_not_graphed():
    eng = engine(tiny_loaded("cpu"), enforce_eager=True)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    eng.add_request(eng.validate(GenerationRequest("p", list(range(2, 30)), params)))
    batch = eng.scheduler.schedule().scheduled
    graphs = DecodeGraphs(eng.runner._graph_forward, eng.runner.device, 8, 16, 512)
    assert graphs.prepare(batch) is None


@needs_cuda
def test_cuda_graphs_give_the_eager_greedy_tokens():
    loaded = tiny_loaded("cuda")
    graphed = engine(loaded, enforce_eager=False)
    assert graphed.runner.graphs is not None
    eager = engine(loaded, enforce_eager=True)
    assert eager.runner.graphs is None
    assert greedy_run(graphed, 11) == greedy_run(eager, 11)


@needs_cuda
def test_cuda_path_matches_the_cpu_path():
    cpu = greedy_run(engine(tiny_loaded("cpu"), enforce_eager=True), 6)
    cuda = greedy_run(engine(tiny_loaded("cuda"), enforce_eager=False), 6)
    same = sum(cpu[k] == cuda[k] for k in cpu)
    assert same >= len(cpu) - 1, (cpu, cuda)  # fp32 both; allow one near-tie flip


@needs_cuda
def test_fused_layers_match_the_torch_path():
    from weir_server.layers.activation import SiluAndMul
    from weir_server.layers.norm import RMSNorm

    x = torch.randn(37, 96, device="cuda")
    residual = torch.randn(37, 96, device="cuda")
    norm = RMSNorm(96).cuda()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96) + 0.5)
    want_out, want_res = norm.cpu()(x.cpu(), residual.cpu())
    got_out, got_res = norm.cuda()(x.clone(), residual.clone())
    torch.testing.assert_close(got_out.cpu(), want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_res.cpu(), want_res, rtol=1e-5, atol=1e-5)
    gate_up = torch.randn(37, 256, device="cuda")
    torch.testing.assert_close(SiluAndMul()(gate_up).cpu(), SiluAndMul()(gate_up.cpu()), rtol=1e-5, atol=1e-5)
