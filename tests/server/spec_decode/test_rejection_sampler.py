"""Rejection sampling against one-hot proposals keeps the target's distribution at every verified position."""

from __future__ import annotations

import torch
from engine_helpers import run, tiny_loaded_model
from spec_helpers import NGRAM, spec_engine

from weir_server.engine.sampler import Sampler, filtered_probs
from weir_server.engine.sequence import Sequence
from weir_server.engine.spec_decode.rejection_sampler import verify
from weir_server.engine.types import GenerationRequest, SamplingParams

VOCAB = 6
# Pearson chi-square critical values at p = 0.001 by degrees of freedom: a correct sampler fails 1 run in 1000,
# and the seeded draws below make each run the same.
CRITICAL = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88}


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    expected = probs * counts.sum()
    cells = expected > 0
    assert counts[~cells].sum() == 0, "a token outside the target's support was emitted"
    stat = float((((counts - expected) ** 2)[cells] / expected[cells]).sum())
    return stat, int(cells.sum()) - 1


def test_emitted_tokens_follow_the_target_distribution_at_each_position():
    torch.manual_seed(0)
    logits = torch.tensor(
        [[2.0, 1.0, 0.5, 0.0, -1.0, 0.3], [0.1, 1.5, -0.5, 0.7, 0.0, 0.2], [1.0, 0.0, 1.0, 0.5, 0.2, -0.3]]
    )
    params = SamplingParams(max_tokens=8, temperature=0.9, top_k=5)
    draft = [1, 3]  # token 1 is likely at the first position, token 3 middling at the second
    seqs = [Sequence("r", i, [2, 4], params) for i in range(2000)]
    for seq in seqs:
        seq.token_ids += draft
    sampler = Sampler(0)
    target = filtered_probs(logits, [params] * 3)  # temperature and top-k applied as the sampler applies them
    first = torch.zeros(VOCAB)
    second = torch.zeros(VOCAB)
    for _ in range(3):
        for verified in verify(sampler, logits.repeat(len(seqs), 1), seqs, [draft] * len(seqs), eos_token_ids=()):
            tokens = verified.token_ids
            first[tokens[0]] += 1
            if tokens[0] == draft[0]:
                second[tokens[1]] += 1
    for counts, probs in ((first, target[0]), (second, target[1])):
        stat, dof = chi_square(counts, probs)
        assert stat < CRITICAL[dof], (stat, counts, probs)


def test_greedy_rows_accept_while_the_proposal_is_the_argmax():
    logits = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    seq = Sequence("g", 0, [0], SamplingParams(max_tokens=8, temperature=0.0))
    seq.token_ids += [1, 2, 1]
    verified = verify(Sampler(0), logits, [seq], [[1, 2, 1]], eos_token_ids=())[0]
    assert verified.token_ids == [1, 2, 0] and verified.num_accepted == 2


def test_a_seeded_choice_verifies_the_same_way_twice():
    logits = torch.randn(4, VOCAB)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=3)

    def once() -> list[int]:
        seq = Sequence("s", 0, [1], params)
        seq.generator = torch.Generator().manual_seed(3)
        seq.token_ids += [2, 2, 2]
        return verify(Sampler(), logits, [seq], [[2, 2, 2]], eos_token_ids=())[0].token_ids

    assert once() == once()


def test_the_engine_samples_the_same_distribution_with_and_without_speculation():
    """Through the whole engine on an 8-token vocabulary: the second and third tokens (the verified one and the
    target's own) have the same distribution with n-gram proposals as without (two-sample chi-square)."""
    loaded = tiny_loaded_model(vocab_size=VOCAB + 2)
    params = SamplingParams(max_tokens=3, temperature=1.0, top_k=6, ignore_eos=True, n=8)
    prompt = [2, 3, 4, 5, 6, 7, 2, 3, 4, 5, 6, 7]
    counts = {}
    for spec in (None, NGRAM):
        engine = spec_engine(loaded, spec, max_num_seqs=256, num_blocks=1024)
        requests = {0: [GenerationRequest(f"r{i}", prompt, params) for i in range(250)]}
        outputs = run(engine, requests)
        tokens = [[t for o in outs for t in o.token_ids] for outs in outputs.values()]
        counts[spec is None] = [
            torch.bincount(torch.tensor([t[j] for t in tokens]), minlength=VOCAB + 2) for j in (1, 2)
        ]
        if spec is not None:
            assert engine.stats().spec_num_draft_tokens > 1000
    for with_spec, without in zip(counts[False], counts[True], strict=True):
        cells = (with_spec + without) > 0
        stat = float((((with_spec - without) ** 2)[cells] / (with_spec + without)[cells]).sum())
        assert stat < CRITICAL[int(cells.sum()) - 1], (stat, with_spec, without)
