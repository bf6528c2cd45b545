"""SpecDecoder: proposes tokens before the schedule, fits them to it, and verifies them after the forward pass.

A proposal rides in the sequence itself: its tokens are appended to `token_ids` before `Scheduler.schedule()`, so the
scheduler sees a sequence with 1 + k uncomputed tokens and budgets, allocates and preempts for them like a prefill
chunk, and the model runner computes them through the same multi-token path, returning the logits of all 1 + k
positions (`ScheduledSeq.num_logits`). After sampling, the proposed tokens leave `token_ids` again and the accepted
ones come back through the core's ordinary per-token path (stop tokens, lengths, stop strings, logprobs), and
`num_new_tokens` is cut to what was accepted, so only KV of accepted tokens is ever counted as computed or hashed
into the prefix cache; the slots of rejected ones are overwritten by the next step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from weir_server.engine.sampler import Sampler
from weir_server.engine.sequence import Sequence, SequenceStatus
from weir_server.engine.spec_decode.config import SpeculativeConfig
from weir_server.engine.spec_decode.ngram import NgramProposer
from weir_server.engine.spec_decode.policy import SpeculationPolicy
from weir_server.engine.spec_decode.rejection_sampler import verify
from weir_server.engine.structured import TokenMask
from weir_server.engine.types import TokenLogprob
from weir_server.executor.batch import PLACEHOLDER, ScheduledSeq

if TYPE_CHECKING:
    from weir_server.engine.scheduler import SchedulerOutput
    from weir_server.executor.model_runner import ModelOutput

logger = logging.getLogger(__name__)


class Proposer(Protocol):
    """Proposes up to `k` tokens to follow each sequence; an empty list for none.

    `reserves`: it proposes after the schedule, exactly `k` tokens into `k` slots reserved before it (a draft
    model writes their KV into the blocks allocated for them); otherwise before it, from the tokens alone."""

    reserves: bool

    def propose_batch(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]: ...

    def retain(self, seq_ids: set[int]) -> None:
        """Forget what it keeps of sequences no longer running."""


class NgramBatchProposer:
    """`NgramProposer` over a batch."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.ngram = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)

    reserves = False

    def propose_batch(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        return [self.ngram.propose(seq.token_ids, k) for seq, k in zip(seqs, ks, strict=True)]

    def retain(self, seq_ids: set[int]) -> None:
        pass  # keeps nothing


@dataclass(slots=True)
class SampledRun:
    """A sampled sequence's tokens of one step: one, or the accepted proposed tokens plus one."""

    seq: Sequence
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


@dataclass
class SpecDecodeStats:
    """Cumulative counts: proposals made, tokens proposed, tokens accepted (vLLM's spec_decode counters)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def as_engine_stats(self) -> dict[str, Any]:  # splatted into EngineStats beside other groups
        """The `EngineStats` fields these counts fill."""
        return {
            "spec_num_drafts": self.num_drafts,
            "spec_num_draft_tokens": self.num_draft_tokens,
            "spec_num_accepted_tokens": self.num_accepted_tokens,
        }


class SpecDecoder:
    """The engine's speculative decoding: n-gram lookup or a draft model proposes, the target verifies."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer) -> None:
        self.config = config
        self.proposer = proposer
        self.stats = SpecDecodeStats()
        self._drafts: dict[int, tuple[Sequence, list[int]]] = {}  # seq_id -> proposal riding in token_ids
        # This step proposes nothing: the batch is too large for speculation to pay, or the policy measured that it
        # does not.
        self.backed_off = False
        self.policy = SpeculationPolicy() if config.measures else None
        self._measures = False  # the policy chose this step's kind

    @property
    def has_drafts(self) -> bool:
        """Whether this step verifies proposals (its tokens are then sampled by `sample`, on the host)."""
        return bool(self._drafts)

    def propose(self, running: Seq[Sequence]) -> None:
        """Append proposals to the running sequences that decode this step (none for constrained ones, nor past
        the tokens a sequence may still emit: max_tokens, the context, nor while the batch is large: `backed_off`).
        A sequence whose last token is still on the device (the engine ran ahead) gets none either."""
        self._drafts.clear()  # left only by a step that failed, whose sequences were failed with it
        self.proposer.retain({seq.seq_id for seq in running})
        self.backed_off = self.config.backs_off(len(running))
        self._measures = (
            self.policy is not None and bool(running) and not self.backed_off and not _any_seeded_sampling(running)
        )
        if self._measures:
            assert self.policy is not None
            self.backed_off = not self.policy.speculates(running)
        elif self.policy is not None:
            self.policy.forget_step()
        if self.backed_off:
            return
        seqs: list[Sequence] = []
        ks: list[int] = []
        k_max = self.config.num_speculative_tokens
        for seq in running:
            n = len(seq.token_ids)
            if seq.status is not SequenceStatus.RUNNING or seq.num_computed_tokens + 1 != n or seq.grammar is not None:
                continue
            k = min(k_max, seq.length_limit - n - 1)  # never past the last token it may emit
            if k > 0 and seq.token_ids[-1] != PLACEHOLDER:
                seqs.append(seq)
                ks.append(k)
        if not seqs:
            return
        if self.proposer.reserves:
            proposals = [[PLACEHOLDER] * k for k in ks]
        else:
            proposals = self.proposer.propose_batch(seqs, ks)
        for seq, draft in zip(seqs, proposals, strict=True):
            if draft:
                seq.token_ids.extend(draft)
                self._drafts[seq.seq_id] = (seq, draft)

    def fit(self, output: SchedulerOutput) -> None:
        """Cut proposals to what the schedule computes: all of one, its head (token budget), or none (preempted,
        not scheduled); mark the verified sequences' logits rows."""
        if self._measures:
            assert self.policy is not None
            decode_only = bool(output.scheduled) and all(
                s.num_new_tokens == 1 + len(self._drafts[s.seq.seq_id][1] if s.seq.seq_id in self._drafts else ())
                for s in output.scheduled
            )
            # A speculating step that found nothing to propose measures neither kind.
            self.policy.observe(decode_only and (self.backed_off or bool(self._drafts)))
        if not self._drafts:
            return
        scheduled = {s.seq.seq_id: s for s in output.scheduled}
        for seq_id, (seq, draft) in list(self._drafts.items()):
            s = scheduled.get(seq_id)
            kept = 0 if s is None else min(len(draft), s.num_new_tokens - 1)
            if kept < len(draft):
                del seq.token_ids[len(seq.token_ids) - len(draft) + kept :]
                del draft[kept:]
            if s is None or not draft:
                del self._drafts[seq_id]
                if s is not None:
                    s.do_sample = True
                continue
            s.do_sample = True
            s.num_logits = 1 + kept
        if self.proposer.reserves and self._drafts:
            self._fill(list(self._drafts.values()))

    def _fill(self, reserved: list[tuple[Sequence, list[int]]]) -> None:
        """Let the proposer write its tokens into the reserved slots that survived the schedule."""
        seqs = [seq for seq, _ in reserved]
        proposals = self.proposer.propose_batch(seqs, [len(draft) for _, draft in reserved])
        for (seq, draft), proposal in zip(reserved, proposals, strict=True):
            assert len(proposal) == len(draft)
            draft[:] = proposal
            seq.token_ids[len(seq.token_ids) - len(draft) :] = proposal

    def sample(
        self,
        result: ModelOutput[Sequence],
        sampler: Sampler,
        eos_token_ids: Seq[int],
        mask: TokenMask | None,
    ) -> list[SampledRun]:
        """Each sampled sequence's tokens: plain rows through the sampler as without speculation, verified rows
        through `verify`. The proposals leave `token_ids`, and `num_new_tokens` counts only accepted ones."""
        drafts, self._drafts = self._drafts, {}
        plain: list[tuple[int, int, ScheduledSeq[Sequence]]] = []  # (index among sampled, first logits row, it)
        spec: list[tuple[int, ScheduledSeq[Sequence]]] = []
        row = 0
        for i, s in enumerate(result.sample_seqs):
            if s.seq.seq_id in drafts:
                spec.append((row, s))
            else:
                plain.append((i, row, s))
            row += s.num_logits
        runs: dict[int, SampledRun] = {}
        logits = result.sample_logits
        if plain:
            rows = [r for _, r, _ in plain]
            seqs = [s.seq for _, _, s in plain]
            picked = _rows_of(mask, [i for i, _, _ in plain])
            tokens, entries = sampler.sample(logits[rows], seqs, eos_token_ids, picked)
            for seq, token, entry in zip(seqs, tokens.tolist(), entries, strict=True):
                runs[seq.seq_id] = SampledRun(seq, [token], [entry])
        if spec:
            index = torch.cat([torch.arange(r, r + s.num_logits) for r, s in spec]).to(logits.device)
            seqs = [s.seq for _, s in spec]
            proposals = [drafts[seq.seq_id][1] for seq in seqs]
            verified = verify(sampler, logits[index], seqs, proposals, eos_token_ids)
            for (_, s), draft, v in zip(spec, proposals, verified, strict=True):
                seq = s.seq
                del seq.token_ids[len(seq.token_ids) - len(draft) :]
                s.num_new_tokens -= len(draft) - v.num_accepted  # rejected slots are not computed tokens
                runs[seq.seq_id] = SampledRun(seq, v.token_ids, v.logprobs)
                self.stats.num_drafts += 1
                self.stats.num_draft_tokens += len(draft)
                self.stats.num_accepted_tokens += v.num_accepted
        sampled = [runs[s.seq.seq_id] for s in result.sample_seqs]
        if self._measures and sampled:
            assert self.policy is not None
            self.policy.observe(True, sum(len(run.token_ids) for run in sampled) / len(sampled))
        return sampled


def _any_seeded_sampling(running: Seq[Sequence]) -> bool:
    """Whether a running sequence samples from its own seed. Its tokens depend on which steps speculate (a
    verified position draws differently from a plain one), so while one runs the policy does not choose: timing
    must not change what a seeded request returns."""
    return any(seq.params.seed is not None and not seq.params.greedy for seq in running)


def _rows_of(mask: TokenMask | None, picked: list[int]) -> TokenMask | None:
    """The constraint mask of some sampled sequences (`picked`, by their order among the sampled; a mask has a row
    each). Constrained sequences get no proposals, so all of theirs are among the plain ones picked here."""
    if mask is None:
        return None
    position = {i: j for j, i in enumerate(picked)}
    return TokenMask(mask.bitmask[picked], [position[r] for r in mask.rows if r in position])
