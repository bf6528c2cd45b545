"""Sampler: masks, penalties, seeds and logprobs, on hand-made logits."""

from __future__ import annotations

import torch

from weir_server.engine.sampler import Sampler, apply_min_p, apply_top_k_top_p, make_generator
from weir_server.engine.sequence import Sequence
from weir_server.engine.types import SamplingParams

VOCAB = 10


def _seq(params: SamplingParams, prompt: list[int] | None = None, output: list[int] = (), seed_index: int = 0):
    seq = Sequence("r", seed_index, prompt or [0], params)
    for t in output:
        seq.append_token(t, None)
    if params.seed is not None:
        seq.generator = make_generator(params.seed, seed_index, torch.device("cpu"))
    return seq


def test_top_k_keeps_only_the_k_largest_per_row():
    logits = torch.tensor([[1.0, 5.0, 3.0, 2.0], [4.0, 3.0, 2.0, 1.0]])
    out = apply_top_k_top_p(logits, torch.tensor([2, 4]), torch.tensor([1.0, 1.0]))
    assert torch.isinf(out[0]).tolist() == [True, False, False, True]
    assert torch.equal(out[1], logits[1])


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]])
    out = apply_top_k_top_p(probs.log(), torch.tensor([4, 4]), torch.tensor([0.45, 0.75]))
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]
    assert torch.isfinite(out[1]).tolist() == [True, True, False, False]


def test_top_p_of_one_never_trims_the_tail():
    logits = torch.randn(3, 1000) * 10
    out = apply_top_k_top_p(logits, torch.tensor([1000] * 3), torch.tensor([1.0, 1.0, 1.0]))
    assert torch.equal(out, logits)


def test_min_p_drops_tokens_below_fraction_of_top_probability():
    probs = torch.tensor([[0.6, 0.25, 0.1, 0.05]])
    out = apply_min_p(probs.log(), torch.tensor([0.2]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(3, VOCAB)
    seqs = [_seq(SamplingParams(temperature=0.0)) for _ in range(3)]
    assert Sampler()(logits, seqs, eos_token_ids=()).token_ids == logits.argmax(-1).tolist()


def test_top_k_one_is_greedy_even_at_high_temperature():
    logits = torch.randn(4, VOCAB)
    seqs = [_seq(SamplingParams(temperature=2.0, top_k=1)) for _ in range(4)]
    assert Sampler()(logits, seqs, eos_token_ids=()).token_ids == logits.argmax(-1).tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 1.5, 0.0]])
    seq = _seq(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt=[0], output=[1])
    penalized = Sampler._apply_penalties(logits, [seq])
    assert penalized.tolist() == [[1.0, -4.0, 1.5, 0.0]]
    assert Sampler()(logits, [seq], eos_token_ids=()).token_ids == [2]


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = torch.zeros(1, 4)
    seq = _seq(SamplingParams(frequency_penalty=0.5, presence_penalty=1.0), prompt=[3], output=[0, 0, 1])
    assert Sampler._apply_penalties(logits, [seq]).tolist() == [[-2.0, -1.5, 0.0, 0.0]]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 10.0, 9.0, 8.0]] * 2)
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(2,))
    early, done = _seq(params, output=[3]), _seq(params, output=[3, 3])
    assert Sampler()(logits, [early, done], eos_token_ids=(1,)).token_ids == [3, 1]


def test_equal_seeds_give_equal_samples_also_when_batched_with_others():
    logits = torch.randn(1, 50)
    params = SamplingParams(temperature=1.0, seed=42)
    alone = [Sampler()(logits, [_seq(params)], ()).token_ids[0] for _ in range(1)]
    seqs = [_seq(SamplingParams(temperature=1.0)), _seq(params), _seq(SamplingParams(temperature=0.7, seed=7))]
    batched = Sampler()(torch.cat([torch.randn(1, 50), logits, torch.randn(1, 50)]), seqs, ())
    assert batched.token_ids[1] == alone[0]
    draws_a = [Sampler()(logits, [s], ()).token_ids[0] for s in [_seq(params)] for _ in range(20)]
    seq_b = _seq(params)
    draws_b = [Sampler()(logits, [seq_b], ()).token_ids[0] for _ in range(20)]
    assert draws_a[0] == draws_b[0] and len(set(draws_b)) > 1  # the generator advances between draws


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1, 0.0])
    seqs = [_seq(SamplingParams(temperature=1.0)) for _ in range(4000)]
    tokens = torch.tensor(Sampler()(probs.log().expand(4000, 4), seqs, ()).token_ids)
    freq = torch.bincount(tokens, minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_logprobs_are_raw_log_softmax_with_top_n_best_first():
    logits = torch.randn(2, VOCAB)
    seqs = [
        _seq(SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.5), output=[int(logits[0].argmax())]),
        _seq(SamplingParams(temperature=0.0)),
    ]
    out = Sampler()(logits, seqs, ())
    expected = torch.log_softmax(logits[0], -1)
    entry = out.logprobs[0]
    assert entry is not None and out.logprobs[1] is None
    assert entry.token_id == out.token_ids[0]
    assert abs(entry.logprob - expected[entry.token_id].item()) < 1e-5
    top = expected.topk(3)
    assert [t.token_id for t in entry.top] == top.indices.tolist()
    assert [round(t.logprob, 5) for t in entry.top] == [round(v, 5) for v in top.values.tolist()]


def test_logprobs_zero_returns_only_the_chosen_token():
    out = Sampler()(torch.randn(1, VOCAB), [_seq(SamplingParams(temperature=0.0, logprobs=0))], ())
    assert out.logprobs[0] is not None and out.logprobs[0].top == ()


def test_candidate_top_k_top_p_equals_the_full_sort_reference():
    from weir_server.engine.sampler import _top_k_top_p_full_sort

    torch.manual_seed(1)
    vocab = 5000
    peaked = torch.randn(6, vocab) * 8
    flat = torch.randn(2, vocab) * 0.01  # top_p 0.9 of a flat row needs far more than the candidates
    top_k = torch.tensor([vocab, 10, 400, vocab, 3, vocab])
    top_p = torch.tensor([0.9, 0.5, 1.0, 1.0, 0.99, 0.3])
    for logits, k, p in ((peaked, top_k, top_p), (flat, top_k[:2], torch.tensor([0.9, 1.0]))):
        fast = apply_top_k_top_p(logits, k, p)
        reference = _top_k_top_p_full_sort(logits, k, p)
        assert torch.equal(torch.isinf(fast), torch.isinf(reference))
        assert torch.equal(fast[torch.isfinite(fast)], logits[torch.isfinite(fast)])


# ---- the GPU sampler's wiring (its Triton kernel is checked on the device; here its torch twin draws) ----------


def _hashed(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    from weir_server.kernels.sampling import sample_torch

    return Sampler()._sample_hashed(logits, seqs, sample_torch).tolist()


def test_gpu_sampler_seeded_choices_repeat_whatever_else_is_batched():
    logits = torch.randn(1, 50)
    params = SamplingParams(temperature=1.0, seed=42)
    alone = _hashed(logits, [_seq(params)])[0]
    seqs = [_seq(SamplingParams(temperature=1.0)), _seq(params), _seq(SamplingParams(temperature=0.7, seed=7))]
    assert _hashed(torch.cat([torch.randn(1, 50), logits, torch.randn(1, 50)]), seqs)[1] == alone
    # Each step (tokens so far) and each choice index draws differently.
    later = [_hashed(logits, [_seq(params, output=[1] * n)])[0] for n in range(12)]
    assert len(set(later)) > 1
    siblings = {_hashed(logits, [_seq(params, seed_index=i)])[0] for i in range(12)}
    assert len(siblings) > 1


def test_gpu_sampler_filters_and_greedy_rows():
    logits = torch.randn(3, VOCAB)
    seqs = [
        _seq(SamplingParams(temperature=0.0)),
        _seq(SamplingParams(temperature=5.0, top_k=1)),
        _seq(SamplingParams(temperature=5.0, top_p=1e-6)),
    ]
    assert _hashed(logits, seqs) == logits.argmax(dim=-1).tolist()


def test_gpu_sampler_follows_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1, 0.0])
    seqs = [_seq(SamplingParams(temperature=1.0)) for _ in range(4000)]
    tokens = torch.tensor(_hashed(probs.log().expand(4000, 4).contiguous(), seqs))
    freq = torch.bincount(tokens, minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_an_overflowing_penalty_or_temperature_never_draws_a_masked_token():
    """A positive logit over the smallest repetition penalty (or a huge one over a small temperature) overflows to
    +inf, which made the row's softmax NaN and let the draw land anywhere, masked tokens too (found by
    tests/reliability/test_fuzz.py)."""
    row = torch.full((VOCAB,), float("-inf"))
    row[[2, 5]] = torch.tensor([1.0, 0.0])
    for params in (
        SamplingParams(temperature=1.0, repetition_penalty=1.401298464324817e-45),
        SamplingParams(temperature=1e-30),
    ):
        for seed in range(20):
            seq = _seq(SamplingParams(**{**params.__dict__, "seed": seed}), prompt=[2])
            token = Sampler()(row.clone().unsqueeze(0), [seq], eos_token_ids=()).token_ids[0]
            assert token == 2  # the overflowing one stays the likeliest; 5 never wins against it
