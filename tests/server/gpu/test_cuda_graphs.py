"""Decode CUDA graphs: the batch ladder, the static-buffer preparation (checked on CPU against the eager step),
and on a GPU the replayed graphs and fused layers against the eager and torch paths."""

from __future__ import annotations

import pytest
import torch

from weir_server.engine.types import GenerationRequest, SamplingParams
from weir_server.executor.cuda_graphs import DecodeGraphs, batch_size_ladder, padded_size

VOCAB = 320  # tiny_model's


def random_requests(num_requests: int, max_tokens: int = 24) -> list[GenerationRequest]:
    """Greedy requests of prompts of 5, 12, 19, ... random tokens."""
    generator = torch.Generator().manual_seed(3)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [
        GenerationRequest(f"r{i}", torch.randint(2, VOCAB, (5 + 7 * i,), generator=generator).tolist(), params)
        for i in range(num_requests)
    ]


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


def test_static_buffers_reproduce_the_eager_decode_step_on_cpu(tiny_model, make_core):
    eng = make_core(tiny_model("cpu"), enforce_eager=True)
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


def test_non_decode_batches_are_not_graphed(tiny_model, make_core):
    eng = make_core(tiny_model("cpu"), enforce_eager=True)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    eng.add_request(eng.validate(GenerationRequest("p", list(range(2, 30)), params)))
    batch = eng.scheduler.schedule().scheduled
    graphs = DecodeGraphs(eng.runner._graph_forward, eng.runner.device, 8, 16, 512)
    assert graphs.prepare(batch) is None


@pytest.mark.gpu
def test_cuda_graphs_give_the_eager_greedy_tokens(tiny_model, make_core, run):
    loaded = tiny_model("cuda")
    graphed = make_core(loaded, enforce_eager=False)
    assert graphed.runner.graphs is not None
    eager = make_core(loaded, enforce_eager=True)
    assert eager.runner.graphs is None
    assert run(graphed, random_requests(11)) == run(eager, random_requests(11))


@pytest.mark.gpu
def test_cuda_path_matches_the_cpu_path(tiny_model, make_core, run):
    cpu = run(make_core(tiny_model("cpu"), enforce_eager=True), random_requests(6))
    cuda = run(make_core(tiny_model("cuda"), enforce_eager=False), random_requests(6))
    same = sum(cpu[k] == cuda[k] for k in cpu)
    assert same >= len(cpu) - 1, (cpu, cuda)  # fp32 both; allow one near-tie flip


@pytest.mark.gpu
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
