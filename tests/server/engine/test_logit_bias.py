"""logit_bias (OpenAI's): validation names the field, the bias is added to the raw logits of its own row only, before
penalties, on the CPU sampler and on the GPU sampler's path, and a biased batch still runs ahead."""

from __future__ import annotations

import pickle

import pytest
import torch
from engine_helpers import TINY_VOCAB, greedy, make_engine, prompt, run, run_alone, tokens_of

from weir_server.engine.sampler import Sampler, apply_logit_bias
from weir_server.engine.sequence import Sequence
from weir_server.engine.types import GenerationRequest, SamplingParams
from weir_server.errors import InvalidRequestError
from weir_server.kernels import sampling

FIELD = "sampling_params.logit_bias"


def _seq(params: SamplingParams, prompt_ids: list[int] | None = None, output: tuple[int, ...] = ()) -> Sequence:
    seq = Sequence("r", 0, prompt_ids or [0], params)
    for t in output:
        seq.append_token(t, None)
    return seq


def _invalid(params: SamplingParams, vocab_size: int | None = TINY_VOCAB) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        params.validate(vocab_size)
    assert info.value.field == FIELD
    return info.value


# ---- validation -------------------------------------------------------------------------------------------------


def test_token_id_outside_the_vocabulary_is_invalid_and_named():
    error = _invalid(SamplingParams(logit_bias=((3, 1.0), (TINY_VOCAB, -5.0))))
    assert str(TINY_VOCAB) in error.description and "out of range" in error.description


def test_negative_token_id_is_invalid_even_without_a_vocabulary_size():
    assert "-1" in _invalid(SamplingParams(logit_bias=((-1, 1.0),)), vocab_size=None).description


@pytest.mark.parametrize("bias", [100.5, -101.0, float("nan"), float("inf")])
def test_bias_outside_plus_minus_100_or_not_finite_is_invalid_and_names_the_token(bias: float):
    error = _invalid(SamplingParams(logit_bias=((7, bias),)))
    assert "token id 7" in error.description


def test_at_most_300_entries():
    SamplingParams(logit_bias=tuple((t, 1.0) for t in range(300))).validate(TINY_VOCAB)
    assert "300" in _invalid(SamplingParams(logit_bias=tuple((t, 1.0) for t in range(301)))).description


def test_repeated_token_id_is_invalid():
    assert "token id 4" in _invalid(SamplingParams(logit_bias=((4, 1.0), (4, 2.0)))).description


def test_limits_are_inclusive_and_params_stay_hashable_and_picklable():
    params = SamplingParams(logit_bias=((0, -100.0), (TINY_VOCAB - 1, 100.0)))
    params.validate(TINY_VOCAB)
    assert hash(params) == hash(pickle.loads(pickle.dumps(params)))


# ---- the sampler, on hand-made logits -------------------------------------------------------------------------


def test_batch_without_any_bias_gets_its_logits_back_untouched():
    logits = torch.randn(3, 10)
    assert apply_logit_bias(logits, [SamplingParams()] * 3) is logits


def test_bias_is_added_to_its_own_row_only():
    logits = torch.zeros(3, 5)
    params = [
        SamplingParams(logit_bias=((1, 2.5), (4, -1.0))),
        SamplingParams(),
        SamplingParams(logit_bias=((0, 3.0),)),
    ]
    biased = apply_logit_bias(logits, params)
    assert biased.tolist() == [[0, 2.5, 0, 0, -1.0], [0] * 5, [3.0, 0, 0, 0, 0]]
    assert not logits.any()  # the model's logits are not changed in place


def test_minus_100_bans_the_greedy_token_even_far_ahead_of_the_rest():
    logits = torch.tensor([[30.0, 1.0, 0.5, 0.0], [30.0, 1.0, 0.5, 0.0]])
    seqs = [_seq(SamplingParams(temperature=0.0, logit_bias=((0, -100.0),))), _seq(SamplingParams(temperature=0.0))]
    assert Sampler()(logits, seqs, eos_token_ids=()).token_ids == [1, 0]


def test_logprobs_stay_the_models_before_the_bias():
    logits = torch.randn(1, 10)
    best = int(logits.argmax())
    out = Sampler()(logits, [_seq(SamplingParams(temperature=0.0, logprobs=1, logit_bias=((best, -100.0),)))], ())
    entry = out.logprobs[0]
    assert entry is not None and entry.token_id != best
    raw = torch.log_softmax(logits[0], -1)
    assert abs(entry.logprob - raw[entry.token_id].item()) < 1e-5
    assert entry.top[0].token_id == best  # the alternatives are the model's too


def test_bias_comes_before_the_repetition_penalty():
    # Token 0 was seen: bias first gives (1 + 3) / 2 = 2, the penalty first 1 / 2 + 3 = 3.5, no bias 0.5; against
    # 3.0 and 1.5 that picks [1, 0], [0, 0] and [1, 1].
    logits = torch.tensor([[1.0, 3.0, 0.0, 0.0], [1.0, 1.5, 0.0, 0.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, logit_bias=((0, 3.0),))
    assert Sampler()(logits, [_seq(params, prompt_ids=[0]), _seq(params, prompt_ids=[0])], ()).token_ids == [1, 0]


def test_bias_and_frequency_penalty_add_up():
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    params = SamplingParams(temperature=0.0, frequency_penalty=1.0, logit_bias=((2, 1.5),))
    # 2 - 2*1 = 0 for token 0 (twice in the output), 1 for token 1, 0 + 1.5 for token 2.
    assert Sampler()(logits, [_seq(params, output=(0, 0))], ()).token_ids == [2]


def test_gpu_sampler_path_draws_from_the_biased_logits(monkeypatch):
    # The CUDA sampler's wiring with its float64 torch twin in place of the Triton draw.
    monkeypatch.setattr(Sampler, "uses_generators", staticmethod(lambda device: False))
    monkeypatch.setattr(sampling, "top_k_top_p_min_p_sample", sampling.top_k_top_p_min_p_sample_ref)
    logits = torch.tensor([[30.0, 29.0, 0.0, 0.0, 0.0]]).expand(200, 5).contiguous()
    banned = SamplingParams(temperature=1.0, top_p=0.9, logit_bias=((0, -100.0), (1, -100.0)))
    forced = SamplingParams(temperature=1.0, seed=5, logit_bias=((3, 100.0),))
    seqs = [_seq(banned if i % 2 else forced) for i in range(200)]
    tokens = Sampler()(logits, seqs, ()).token_ids
    assert all(t not in (0, 1) for t in tokens[1::2]) and len(set(tokens[1::2])) > 1
    assert set(tokens[0::2]) == {3}


# ---- the engine, with a tiny random Llama ----------------------------------------------------------------------


def _best_two(loaded, prompt_ids: list[int]) -> tuple[int, int]:
    """The model's two most likely first tokens for a prompt (from greedy logprobs)."""
    request = GenerationRequest("probe", prompt_ids, greedy(1, logprobs=2))
    out = run(make_engine(loaded), {0: [request]})[("probe", 0)]
    entry = next(o.logprobs[0] for o in out if o.logprobs)
    return entry.top[0].token_id, entry.top[1].token_id


def test_banning_the_greedy_token_gives_the_next_best(tiny_loaded):
    ids = prompt(1, 9)
    best, second = _best_two(tiny_loaded, ids)
    banned = run_alone(tiny_loaded, GenerationRequest("b", ids, greedy(1, logit_bias=((best, -100.0),))))
    assert run_alone(tiny_loaded, GenerationRequest("a", ids, greedy(1))) == [best]
    assert banned == [second]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_plus_100_forces_a_token_at_every_step(tiny_loaded, temperature: float):
    params = SamplingParams(max_tokens=6, temperature=temperature, seed=3, logit_bias=((7, 100.0),))
    assert run_alone(tiny_loaded, GenerationRequest("f", prompt(2, 7), params)) == [7] * 6


def test_rows_with_and_without_a_bias_in_one_batch_each_get_their_own(tiny_loaded):
    ids = prompt(3, 11)
    best, _ = _best_two(tiny_loaded, ids)
    requests = [
        GenerationRequest("plain", ids, greedy(5)),
        GenerationRequest("ban", ids, greedy(5, logit_bias=((best, -100.0),))),
        GenerationRequest("force", prompt(4, 6), greedy(5, logit_bias=((9, 100.0),))),
        GenerationRequest("other", prompt(5, 8), greedy(5, logit_bias=((best, 0.5),))),
    ]
    alone = {r.request_id: run_alone(tiny_loaded, r) for r in requests}
    outputs = run(make_engine(tiny_loaded), {0: requests})
    for r in requests:
        assert tokens_of(outputs[(r.request_id, 0)]) == alone[r.request_id], r.request_id
    assert alone["plain"][0] == best and alone["ban"][0] != best and best not in alone["ban"]
    assert alone["force"] == [9] * 5


def test_banned_token_never_appears_with_penalties_on(tiny_loaded):
    ids = prompt(6, 10)
    free = run_alone(tiny_loaded, GenerationRequest("free", ids, greedy(12, repetition_penalty=1.3)))
    banned = free[0]
    params = greedy(12, repetition_penalty=1.3, frequency_penalty=0.5, logit_bias=((banned, -100.0),))
    assert banned not in run_alone(tiny_loaded, GenerationRequest("ban", ids, params))


def test_biased_batch_runs_ahead_and_gives_the_sequential_tokens(tiny_loaded):
    requests = [
        GenerationRequest("ban", prompt(7, 9), greedy(8, logit_bias=((5, -100.0), (6, -100.0)))),
        GenerationRequest("force", prompt(8, 5), greedy(8, logit_bias=((11, 100.0),))),
        GenerationRequest("plain", prompt(9, 7), greedy(8)),
    ]
    sequential = run(make_engine(tiny_loaded), {0: requests})
    engine = make_engine(tiny_loaded)
    engine.overlap_outputs = engine.run_ahead = True  # as on CUDA; the CPU would otherwise run each step to the end
    for r in requests:
        engine.add_request(engine.validate(r))
    outputs = engine.step()
    assert engine._launched is not None, "the biased step waited for its tokens on the host"
    while engine.has_unfinished():
        outputs += engine.step()
    for r in requests:
        got = [t for o in outputs if o.request_id == r.request_id for t in o.token_ids]
        assert got == tokens_of(sequential[(r.request_id, 0)]), r.request_id
