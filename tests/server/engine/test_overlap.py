"""Overlapped output processing (a step's outputs are made during the next step), and running ahead (a step is
launched before the previous step's tokens are read back, its inputs fed from them on the device), give exactly
the outputs of the sequential engine: tokens, text, finish and stop reasons, usage; and free every block."""

from __future__ import annotations

import pytest
from engine_helpers import greedy, make_engine, prompt, run

from weir_server.engine.types import FinishReason, GenerationRequest, SamplingParams
from weir_server.executor.cuda_graphs import DecodeGraphs


def _summary(outputs):
    return {
        key: (
            [t for o in outs for t in o.token_ids],
            "".join(o.text for o in outs),
            outs[-1].finish_reason,
            outs[-1].stop_reason,
            outs[-1].usage,
            sum(o.finished for o in outs),
        )
        for key, outs in outputs.items()
    }


MODES = ["overlap", "run-ahead", "run-ahead-graphs"]


def _engine(loaded, mode: str, **engine_kwargs):
    """`mode`: sequential, overlap, run-ahead, or run-ahead-graphs (decode inputs laid out as for the CUDA graphs,
    whose captured forward is run eagerly here)."""
    engine = make_engine(loaded, **engine_kwargs)
    engine.overlap_outputs = mode != "sequential"
    engine.run_ahead = mode.startswith("run-ahead")
    if mode == "run-ahead-graphs":
        runner = engine.runner
        graphs = DecodeGraphs(runner._graph_forward, runner.device, 8, runner.block_size, runner.max_model_len)
        graphs.replay = lambda d: graphs.run_eager(d.padded)[: d.num_seqs]
        runner.graphs = graphs
    return engine


def _run(loaded, mode: str, arrivals, **engine_kwargs):
    engine = _engine(loaded, mode, **engine_kwargs)
    outputs = run(engine, arrivals)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks
    return _summary(outputs)


@pytest.mark.parametrize("mode", MODES)
def test_overlap_matches_sequential_with_stop_strings_tokens_and_lengths(tiny_loaded_with_tokenizer, mode):
    loaded = tiny_loaded_with_tokenizer
    ids = loaded.tokenizer.encode("Once upon a time", add_special_tokens=False)
    free = run(make_engine(loaded), {0: [GenerationRequest("free", ids, greedy(24))]})[("free", 0)]
    text = "".join(o.text for o in free)
    stop = text[len(text) // 3 : len(text) // 3 + 4]
    stop_token = [t for o in free for t in o.token_ids][5]
    requests = [
        GenerationRequest("stop-str", ids, greedy(24, stop=(stop,))),
        GenerationRequest("stop-str-kept", ids, greedy(24, stop=(stop,), include_stop_str_in_output=True)),
        GenerationRequest("stop-id", ids, greedy(24, stop_token_ids=(stop_token,))),
        GenerationRequest("min-tokens", ids, greedy(24, stop=(stop,), min_tokens=12)),
        GenerationRequest("length", prompt(3, 9, vocab=len(loaded.tokenizer)), greedy(7)),
        GenerationRequest("n2", ids, SamplingParams(n=2, max_tokens=10, seed=7, ignore_eos=True)),
        # These read their own tokens on the host, so a step holding them waits for the tokens in flight.
        GenerationRequest("logprobs", ids, greedy(9, logprobs=2)),
        GenerationRequest("penalty", ids, SamplingParams(max_tokens=9, temperature=0.0, repetition_penalty=1.3)),
        GenerationRequest("top-p", ids, SamplingParams(max_tokens=11, temperature=0.8, top_p=0.9, seed=3)),
    ]
    arrivals = {0: requests[:3], 2: requests[3:6], 5: requests[6:]}
    sequential = _run(loaded, "sequential", arrivals)
    overlapped = _run(loaded, mode, arrivals)
    assert overlapped == sequential
    assert sequential[("stop-str", 0)][2] is FinishReason.STOP_SEQUENCE
    assert sequential[("stop-id", 0)][2] is FinishReason.STOP
    assert all(count == 1 for *_, count in sequential.values())


@pytest.mark.parametrize("mode", MODES)
def test_overlap_preemption_and_abort(tiny_loaded, mode):
    requests = [GenerationRequest(f"r{i}", prompt(i, 6 + 5 * i), greedy(20)) for i in range(5)]
    arrivals = {0: requests[:3], 1: requests[3:]}
    expected = _run(tiny_loaded, "sequential", arrivals, num_blocks=24)
    assert _run(tiny_loaded, mode, arrivals, num_blocks=24) == expected

    engine = _engine(tiny_loaded, mode)
    engine.add_request(GenerationRequest("a", prompt(1, 8), greedy(30)))
    engine.add_request(GenerationRequest("b", prompt(2, 8), greedy(30)))
    for _ in range(3):
        engine.step()
    aborted = engine.abort_request("a")
    assert [o.finish_reason for o in aborted] == [FinishReason.CANCELLED]
    rest = run(engine, {})
    assert ("a", 0) not in rest  # its deferred delta is dropped: the abort's output was its last
    assert rest[("b", 0)][-1].finish_reason is FinishReason.LENGTH
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks
