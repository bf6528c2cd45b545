"""Batched sampling over a step's sequences: logit bias, penalties, temperature, top-k/p, min-p, seeds, logprobs."""

from __future__ import annotations

import random
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from weir_server.engine.sequence import Sequence
from weir_server.engine.types import SamplingParams, TokenLogprob, TopLogprob
from weir_server.executor.transfer import to_device
from weir_server.kernels import HAS_TRITON

if TYPE_CHECKING:
    from weir_server.engine.structured import TokenMask

_SEED_MASK = 2**63 - 1
_TOP_P_CANDIDATES = 256  # candidates per row that top-k/top-p masking looks at before sorting everything


class SampledSeq(Protocol):
    """What sampling reads of a choice: its params, its tokens so far and its RNG (`Sequence` is one; speculative
    verification passes views of a sequence at each drafted position)."""

    @property
    def index(self) -> int: ...

    @property
    def params(self) -> SamplingParams: ...

    @property
    def generator(self) -> torch.Generator | None: ...

    @property
    def num_output_tokens(self) -> int: ...

    @property
    def output_token_ids(self) -> list[int]: ...

    @property
    def prompt_token_ids(self) -> list[int]: ...


@dataclass
class SamplerOutput:
    """One sampled token per row, with its logprob entry where the row asked for logprobs."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def make_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """A choice's private RNG: choice 0 uses the seed itself, the other choices of one request differ."""
    mixed = seed if index == 0 else (seed * 1_000_003 + index) % (2**63)
    return torch.Generator(device=device).manual_seed(mixed % (2**63))


def _pad(rows: list[list[int]], fill: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return to_device(out, device)


def token_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: Seq[int]) -> list[TokenLogprob]:
    """TokenLogprob per row of a [N, V] log-softmax: the logprob of `token_ids[i]` and the top `num_top[i]`."""
    chosen = logprobs.gather(1, token_ids.view(-1, 1)).squeeze(1).tolist()
    k = max(num_top, default=0)
    top_vals: list[list[float]] = [[] for _ in chosen]
    top_ids: list[list[int]] = [[] for _ in chosen]
    if k > 0:
        vals, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        top_vals, top_ids = vals.tolist(), ids.tolist()
    ids_list = token_ids.tolist()
    return [
        TokenLogprob(
            token_id=ids_list[i],
            logprob=chosen[i],
            top=tuple(
                TopLogprob(t, v) for t, v in zip(top_ids[i][: num_top[i]], top_vals[i][: num_top[i]], strict=True)
            ),
        )
        for i in range(len(chosen))
    ]


class Sampler:
    """Chooses the next token of every row of a logits batch with tensor ops (no per-row vocab loops)."""

    def __init__(self, seed: int | None = None) -> None:
        """`seed` (`weir serve --seed`) makes the draws of requests without a seed of their own repeat across starts;
        None draws them from the OS."""
        self._rng = random.Random(seed)  # seeds of unseeded rows on the GPU sampler
        if seed is not None:
            torch.manual_seed(seed)  # unseeded rows of the torch path draw from torch's default generator

    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: Seq[int], mask: TokenMask | None = None
    ) -> SamplerOutput:
        """`mask` holds the tokens each constrained row may take; logprobs are the model's, before it."""
        tokens, entries = self.sample(logits, seqs, eos_token_ids, mask)
        return SamplerOutput(tokens.tolist(), entries)

    def sample(
        self, logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: Seq[int], mask: TokenMask | None = None
    ) -> tuple[torch.Tensor, list[TokenLogprob | None]]:
        """The chosen tokens left on the logits' device, and the logprob entries (which do read back)."""
        assert logits.shape[0] == len(seqs)
        logits = logits.float()
        device = logits.device
        params = [s.params for s in seqs]

        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = torch.log_softmax(logits[lp_rows], dim=-1) if lp_rows else None

        logits = self.process(logits, seqs, eos_token_ids, mask)

        greedy_rows = [p.greedy for p in params]
        tokens = logits.max(dim=-1).indices  # same first-max ties as argmax, several times faster on CPU
        if not all(greedy_rows):  # decided on the host: no device round trip for all-greedy batches
            greedy = to_device(greedy_rows, device)
            sampled = self._sample(logits, seqs)
            tokens = torch.where(greedy, tokens, sampled)

        entries: list[TokenLogprob | None] = [None] * len(seqs)
        if raw_logprobs is not None:
            rows = torch.tensor(lp_rows, device=device)
            found = token_logprobs(raw_logprobs, tokens[rows], [params[i].logprobs or 0 for i in lp_rows])
            for i, entry in zip(lp_rows, found, strict=True):
                entries[i] = entry
        return tokens, entries

    def process(
        self,
        logits: torch.Tensor,
        seqs: Seq[SampledSeq],
        eos_token_ids: Seq[int],
        mask: TokenMask | None = None,
    ) -> torch.Tensor:
        """The logits a row's draw starts from: constraint mask, logit bias, penalties, and stop ids masked before
        `min_tokens` (float32 logits; the model's own may be updated in place by the mask)."""
        # First, so the min_tokens mask below keeps a constrained row's stop token when nothing else is allowed.
        if mask is not None:
            mask.apply(logits)
        logits = apply_logit_bias(logits, [s.params for s in seqs])  # on the raw logits, as vLLM and OpenAI do
        logits = self._apply_penalties(logits, seqs)
        return self._mask_stops_before_min_tokens(logits, seqs, eos_token_ids)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, seqs: Seq[SampledSeq]) -> torch.Tensor:
        params = [s.params for s in seqs]
        use_rep = any(p.repetition_penalty != 1.0 for p in params)
        use_add = any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)
        if not (use_rep or use_add):
            return logits
        device, vocab = logits.device, logits.shape[-1]
        n = len(seqs)
        # Column `vocab` is a sink for padding so padded slots never count as a token.
        outputs = _pad([s.output_token_ids for s in seqs], vocab, device)
        counts = torch.zeros(n, vocab + 1, device=device).scatter_add_(
            1, outputs, torch.ones_like(outputs, dtype=torch.float)
        )
        counts = counts[:, :vocab]
        if use_add:
            freq = to_device([p.frequency_penalty for p in params], device).unsqueeze(1)
            pres = to_device([p.presence_penalty for p in params], device).unsqueeze(1)
            logits = logits - freq * counts - pres * (counts > 0).float()
        if use_rep:
            prompts = _pad([s.prompt_token_ids for s in seqs], vocab, device)
            seen = torch.zeros(n, vocab + 1, dtype=torch.bool, device=device)
            seen.scatter_(1, prompts, True)
            seen = seen[:, :vocab] | (counts > 0)
            rep = to_device([p.repetition_penalty for p in params], device).unsqueeze(1).expand_as(logits)
            penalized = torch.where(logits > 0, logits / rep, logits * rep)
            logits = torch.where(seen, penalized, logits)
        # A large logit over a tiny penalty overflows to +inf, and one +inf makes its row's softmax all NaN (a draw
        # could then land on a masked token): the largest float keeps it the likeliest.
        return logits.clamp(max=torch.finfo(logits.dtype).max)

    @staticmethod
    def _mask_stops_before_min_tokens(
        logits: torch.Tensor, seqs: Seq[SampledSeq], eos_token_ids: Seq[int]
    ) -> torch.Tensor:
        rows: list[int] = []
        cols: list[int] = []
        vocab = logits.shape[-1]
        for i, s in enumerate(seqs):
            p = s.params
            if s.num_output_tokens >= p.min_tokens or (p.ignore_eos and not p.stop_token_ids):
                continue
            stops = set(p.stop_token_ids)
            if not p.ignore_eos:
                stops.update(eos_token_ids)
            for t in stops:
                if 0 <= t < vocab:
                    rows.append(i)
                    cols.append(t)
        if not rows:
            return logits
        masked = logits.clone()
        masked[torch.tensor(rows), torch.tensor(cols)] = float("-inf")
        # A row whose stop ids cover the whole vocabulary keeps its logits rather than sampling from nothing.
        possible = torch.isfinite(masked).any(dim=-1, keepdim=True)
        return torch.where(possible, masked, logits)

    @staticmethod
    def uses_generators(device: torch.device) -> bool:
        """Whether seeded rows draw from their own `torch.Generator` (`make_generator`) on `device`; the GPU
        sampler derives its per-row seeds instead."""
        return not (device.type == "cuda" and HAS_TRITON)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Random draw per row after temperature, top-k, top-p and min-p (greedy rows get temperature 1)."""
        if not self.uses_generators(logits.device):
            from weir_server.kernels.sampling import top_k_top_p_min_p_sample

            return self._sample_hashed(logits, seqs, top_k_top_p_min_p_sample)
        device, vocab = logits.device, logits.shape[-1]
        probs = filtered_probs(logits, [s.params for s in seqs])
        # argmax(p / q) with q ~ Exp(1) is a draw from p; seeded rows take their uniforms from their own RNG.
        uniform = torch.rand_like(probs)
        for i, s in enumerate(seqs):
            if s.generator is not None and not s.params.greedy:
                uniform[i] = torch.rand(vocab, device=device, generator=s.generator)
        q = uniform.clamp_(min=torch.finfo(uniform.dtype).tiny).log_().neg_()
        return (probs / q).argmax(dim=-1)

    def _sample_hashed(
        self, logits: torch.Tensor, seqs: list[Sequence], draw: Callable[..., torch.Tensor]
    ) -> torch.Tensor:
        """The GPU sampler (`weir_server.kernels.sampling`): filters and a Gumbel-max draw whose noise is a hash of
        a per-row seed, so nothing is read back to the host and the engine can run ahead. A seeded choice's seed
        for a step is derived from (seed, choice index, tokens so far): it reproduces whatever else is batched."""
        params = [s.params for s in seqs]
        device, vocab = logits.device, logits.shape[-1]
        top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        top_p = [p.top_p for p in params]
        rng = self._rng
        seeds = [
            rng.getrandbits(63) if p.seed is None else hash((p.seed, s.index, s.num_output_tokens)) & _SEED_MASK
            for s, p in zip(seqs, params, strict=True)
        ]
        return draw(
            logits,
            to_device([0.0 if p.greedy else p.temperature for p in params], device),
            to_device(top_k, device) if any(top_k) else None,  # None: no row filters, so no sort at all
            to_device(top_p, device) if any(x < 1.0 for x in top_p) else None,
            to_device([p.min_p for p in params], device),
            to_device(seeds, device),
        )


def filtered_probs(logits: torch.Tensor, params: Seq[SamplingParams]) -> torch.Tensor:
    """The distribution each row draws from: processed logits after temperature, top-k, top-p and min-p (greedy
    rows get temperature 1)."""
    device, vocab = logits.device, logits.shape[-1]
    temps = to_device([1.0 if p.greedy else p.temperature for p in params], device)
    logits = (logits / temps.unsqueeze(1)).clamp(max=torch.finfo(logits.dtype).max)  # a small temperature overflows
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p for p in params]
    if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        logits = apply_top_k_top_p(logits, to_device(top_k, device), to_device(top_p, device))
    min_p = [p.min_p for p in params]
    if any(m > 0.0 for m in min_p):
        logits = apply_min_p(logits, to_device(min_p, device))
    return torch.softmax(logits, dim=-1)


def apply_logit_bias(logits: torch.Tensor, params: Seq[SamplingParams]) -> torch.Tensor:
    """Add each row's `logit_bias` to its logits with one indexed add on the logits' device; a batch where no row has
    a bias gets its logits back untouched, having cost one pass over its params.

    Additive, as OpenAI and vLLM define it: -100 bans a token in practice and +100 all but forces it. Needs no
    tokens from the host, so a biased step can still run ahead.
    """
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for row, p in enumerate(params):
        for token_id, bias in p.logit_bias:
            rows.append(row)
            cols.append(token_id)
            values.append(bias)
    if not rows:
        return logits
    device = logits.device
    index = to_device([rows, cols], device, torch.long)
    # Out of place: the logits may be the model's inference-mode output, which must not change outside it.
    return logits.index_put((index[0], index[1]), to_device(values, device, logits.dtype), accumulate=True)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf every token outside each row's top-k and outside its smallest set with mass >= top_p.

    Works on the best few hundred candidates of each row (a full-vocabulary sort is ~10x slower) and falls back
    to the whole vocabulary only when the candidates cannot hold some row's top-p mass; both give equal masks.
    """
    vocab = logits.shape[-1]
    limited = top_k < vocab
    num_candidates = min(vocab, max(_TOP_P_CANDIDATES, int(top_k[limited].max()) if bool(limited.any()) else 0))
    vals, idx = logits.topk(num_candidates, dim=-1)  # sorted, best first
    ranks = torch.arange(num_candidates, device=logits.device).unsqueeze(0)
    vals = vals.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
    # Top-p mass is relative to the whole row left after top-k: the candidates if top-k cut, else the vocabulary.
    norm = torch.where(limited, vals.logsumexp(dim=-1), logits.logsumexp(dim=-1)).unsqueeze(1)
    probs = (vals - norm).exp()
    cumulative = probs.cumsum(dim=-1)
    nucleus = top_p < 1.0
    if num_candidates < vocab and bool((nucleus & ~limited & (cumulative[:, -1] < top_p)).any()):
        return _top_k_top_p_full_sort(logits, top_k, top_p)
    # Rows with top_p == 1 are exempt: rounding in the cumsum must not trim their tail.
    outside = (cumulative - probs >= top_p.unsqueeze(1)) & (ranks > 0) & nucleus.unsqueeze(1)
    kept = vals.masked_fill(outside, float("-inf"))
    masked = torch.full_like(logits, float("-inf")).scatter_(-1, idx, kept)
    untouched = ~limited & ~nucleus
    return torch.where(untouched.unsqueeze(1), logits, masked)


def _top_k_top_p_full_sort(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    outside = (mass_before >= top_p.unsqueeze(1)) & (ranks > 0) & (top_p < 1.0).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times the row's top probability."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))
