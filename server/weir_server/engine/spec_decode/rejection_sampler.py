"""Verification of proposed tokens against the target's logits at every proposed position, in one pass.

Proposals here are deterministic (n-gram lookup, a draft model's greedy tokens), so the draft distribution q is
one-hot and standard speculative sampling reduces to: accept proposed token d with probability p(d), else draw from
the residual max(p - q, 0) normalised, which is p with d removed; after k accepted, draw one more from p. The tokens
then follow the target's distribution exactly. Greedy rows accept while d is the argmax, so their output is the
non-speculative one token for token. p is the sampler's own distribution for the row (`Sampler.process` and
`filtered_probs`: constraint mask, bias, penalties, min_tokens, temperature, top-k/p, min-p), taken at each
position as if the proposed tokens before it had been sampled.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from weir_server.engine.sampler import Sampler, filtered_probs, make_generator, token_logprobs
from weir_server.engine.sequence import Sequence
from weir_server.engine.types import SamplingParams, TokenLogprob


class DraftPosition:
    """A sequence as the sampler sees it at one verified position: its tokens before `end` only."""

    __slots__ = ("seq", "end")

    def __init__(self, seq: Sequence, end: int) -> None:
        self.seq = seq
        self.end = end  # the position whose token is sampled: tokens [0, end) precede it

    @property
    def index(self) -> int:
        return self.seq.index

    @property
    def params(self) -> SamplingParams:
        return self.seq.params

    @property
    def generator(self) -> torch.Generator | None:
        return self.seq.generator

    @property
    def num_output_tokens(self) -> int:
        return self.end - self.seq.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.seq.token_ids[self.seq.num_prompt_tokens : self.end]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.seq.prompt_token_ids


@dataclass(slots=True)
class Verified:
    """A sequence's tokens out of one verification: the accepted proposed tokens and one from the target."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]
    num_accepted: int  # of the proposed tokens


def verify(
    sampler: Sampler,
    logits: torch.Tensor,
    seqs: Seq[Sequence],
    drafts: Seq[list[int]],
    eos_token_ids: Seq[int],
) -> list[Verified]:
    """`logits`: 1 + len(drafts[i]) rows per sequence, back to back, each sequence's `token_ids` ending with its
    proposed tokens. Returns what each sequence keeps; its `token_ids` are left as they are."""
    views: list[DraftPosition] = []
    for seq, draft in zip(seqs, drafts, strict=True):
        base = len(seq.token_ids) - len(draft)
        views += [DraftPosition(seq, base + j) for j in range(len(draft) + 1)]
    logits = logits.float()
    assert logits.shape[0] == len(views)
    processed = sampler.process(logits, views, eos_token_ids)
    targets: list[int] = processed.max(dim=-1).indices.tolist()
    sampled = not all(seq.params.greedy for seq in seqs)
    probs = filtered_probs(processed, [view.params for view in views]) if sampled else processed
    out: list[Verified] = []
    row = 0
    for seq, draft in zip(seqs, drafts, strict=True):
        k = len(draft)
        rows = slice(row, row + k + 1)
        if seq.params.greedy:
            tokens = _accept_greedy(draft, targets[rows])
        else:
            tokens = _accept_sampled(seq, draft, probs[rows])
        entries: list[TokenLogprob | None] = [None] * len(tokens)
        if seq.params.logprobs is not None:  # the model's logprobs, before any processing, as the sampler gives
            raw = torch.log_softmax(logits[row : row + len(tokens)], dim=-1)
            ids = torch.tensor(tokens, device=logits.device)
            entries = list(token_logprobs(raw, ids, [seq.params.logprobs] * len(tokens)))
        out.append(Verified(tokens, entries, len(tokens) - 1))
        row += k + 1
    return out


def _accept_greedy(draft: list[int], targets: list[int]) -> list[int]:
    for j, token in enumerate(draft):
        if token != targets[j]:
            return [*draft[:j], targets[j]]
    return [*draft, targets[len(draft)]]


def _accept_sampled(seq: Sequence, draft: list[int], probs: torch.Tensor) -> list[int]:
    """Accept draft[j] with probability p_j(draft[j]); at the first rejection draw from p_j without it."""
    device = probs.device
    generator = _generator(seq, device)
    k = len(draft)
    ids = torch.tensor(draft, dtype=torch.long, device=device)
    accept_p: list[float] = probs[torch.arange(k, device=device), ids].tolist() if k else []
    uniforms: list[float] = torch.rand(k, generator=generator, device=device).tolist() if k else []
    for j in range(k):
        if uniforms[j] >= accept_p[j]:
            residual = probs[j].clone()
            residual[draft[j]] = 0.0
            return [*draft[:j], _draw(residual, generator)]
    return [*draft, _draw(probs[k], generator)]


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    # argmax(p / q) with q ~ Exp(1) is a draw from p (normalised or not), as the sampler draws.
    uniform = torch.rand(probs.shape, generator=generator, device=probs.device)
    q = uniform.clamp_(min=torch.finfo(uniform.dtype).tiny).log_().neg_()
    return int((probs / q).argmax())


def _generator(seq: Sequence, device: torch.device) -> torch.Generator | None:
    """A seeded choice's own RNG, made here where the GPU sampler (hashed seeds) left it without one."""
    seed = seq.params.seed
    if seq.generator is None and seed is not None:
        seq.generator = make_generator(seed, seq.index, device)
    return seq.generator
