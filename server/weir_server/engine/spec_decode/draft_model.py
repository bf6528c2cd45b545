"""A small draft model proposing k greedy tokens per sequence and step, from a paged KV cache of its own.

The draft's KV cache has the target's block count and is addressed through the target's block tables, so it needs
no block manager of its own: a sequence's blocks hold the target's K/V in the target's cache and the draft's in the
draft's. Proposals are made after the schedule (`reserves`): the scheduler first sees k reserved slots per sequence
and allocates their blocks, which the draft then writes. What the draft has computed of a sequence is kept as the
tokens it was fed past the last verified position; at the next step the fed tokens the target accepted are still
valid, the rest are recomputed. A sequence that left the running set (preempted, finished) starts over, since its
blocks may have gone to another sequence; prefix-cached blocks are recomputed too, as the draft may never have
written them.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from weir_server.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig
from weir_server.distributed import parallel_state
from weir_server.engine.sequence import Sequence
from weir_server.engine.spec_decode.config import SpeculativeConfig
from weir_server.executor.batch import PLACEHOLDER, ScheduledSeq, StepSeq, TokenWindow
from weir_server.executor.model_runner import ModelRunner, TokenFeed, kv_cache_shape
from weir_server.models.loader import LoadedModel, load_model


class DraftVocabularyError(ValueError):
    """The draft model does not share the target's vocabulary, so its tokens mean something else to the target."""


def check_same_vocabulary(draft: LoadedModel, target: LoadedModel) -> None:
    """Raise DraftVocabularyError unless the draft's token ids are the target's: the same vocabulary size and, where
    both have a tokenizer, the same token for every id."""
    name = f"the draft model {draft.model_id!r}"
    if draft.vocab_size != target.vocab_size:
        raise DraftVocabularyError(
            f"{name} has a vocabulary of {draft.vocab_size} tokens and the target {target.model_id!r} one of "
            f"{target.vocab_size}: a draft model must share the target's tokenizer"
        )
    if draft.tokenizer is not None and target.tokenizer is not None:
        if draft.tokenizer.get_vocab() != target.tokenizer.get_vocab():
            raise DraftVocabularyError(
                f"{name} has a different tokenizer from the target {target.model_id!r} (same size, other tokens): "
                "a draft model must share the target's tokenizer"
            )


def load_draft(spec: SpeculativeConfig, config: EngineConfig) -> LoadedModel:
    """The draft model, loaded like the target (its device and dtype); ModelLoadError when it does not load. Under
    tensor parallelism it is loaded whole on rank 0 (see `DraftModelProposer`)."""
    assert spec.model is not None
    model = config.model
    with parallel_state.group_of_one():
        return _load(spec.model, model)


def _load(name: str, model: ModelConfig) -> LoadedModel:
    return load_model(
        ModelConfig(
            name,
            # A target with random weights gets a draft with random weights: benchmarks of real shapes need no
            # files, and the same seed and shape give the draft the target's own weights (acceptance 100%).
            load_format="dummy" if model.load_format == "dummy" else "auto",
            seed=model.seed,
            dtype=model.dtype,
            device=model.device,
            max_model_len=model.max_model_len,
            download_dir=model.download_dir,
            trust_remote_code=model.trust_remote_code,
        ),
        "generate",
    )


def kv_bytes_per_block(draft: LoadedModel, block_size: int) -> int:
    """What the draft's KV cache takes per block of the target's (it is never sharded)."""
    shape = kv_cache_shape(draft.hf_config, 1, block_size)
    element = torch.empty((), dtype=draft.dtype).element_size()
    return int(draft.hf_config.num_hidden_layers) * torch.Size(shape).numel() * element


@dataclasses.dataclass(slots=True)
class _Fed:
    """What the draft computed of a sequence past its verified tokens: `tokens` fed from position `base` on."""

    base: int
    tokens: list[int]


class DraftModelProposer:
    """Proposes each sequence's next tokens by running the draft model greedily, k steps per engine step.

    Under tensor parallelism the draft runs whole on rank 0, beside rank 0's shard of the target: a draft is small,
    and sharding it would cost each of its k steps per engine step a message to every worker and two all-reduces per
    layer, more than its matmuls on one device; the workers then only ever see the target's verify steps."""

    reserves = True  # proposes into slots reserved before the schedule

    def __init__(self, config: EngineConfig, draft: LoadedModel, num_blocks: int) -> None:
        self.draft = draft
        assert config.speculative is not None
        executor = config.executor
        most = config.speculative.disable_by_batch_size or executor.cuda_graph_max_batch
        draft_config = dataclasses.replace(
            config,
            model=ModelConfig(draft.model_id, device=str(draft.device)),
            cache=CacheConfig(block_size=config.cache.block_size, num_blocks=num_blocks),
            # Its batches are those that speculate: none above the back-off size, so no graphs for them either.
            executor=dataclasses.replace(executor, cuda_graph_max_batch=min(executor.cuda_graph_max_batch, most)),
            parallel=ParallelConfig(),
            lora=None,  # adapters adapt the target; the draft proposes from its base weights
            speculative=None,
        )
        # On CUDA the draft's steps replay graphs too (at batch 1 a draft step is mostly launch overhead): its first
        # step of an engine step catches up one token, or two when every proposal was accepted; then one each.
        with parallel_state.group_of_one():
            self.runner = ModelRunner(draft, draft_config, graph_query_lens=(1, 2))
        self._fed: dict[int, _Fed] = {}

    def retain(self, seq_ids: set[int]) -> None:
        """Forget the sequences not running now: their blocks may be gone (preempted) or they ended."""
        for seq_id in [s for s in self._fed if s not in seq_ids]:
            del self._fed[seq_id]

    def propose_batch(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        """`ks[i]` tokens for each sequence, whose last `ks[i]` slots are reserved (their blocks allocated)."""
        ends = [len(seq.token_ids) - k for seq, k in zip(seqs, ks, strict=True)]  # first reserved position
        batch: list[ScheduledSeq[StepSeq]] = []
        for seq, end in zip(seqs, ends, strict=True):
            start = self._valid(seq, end)
            batch.append(_slice(seq, start, seq.token_ids[start:end]))
        # Each step's tokens stay on the device and feed the next step's inputs (placeholders, as when the engine
        # runs ahead): one read back per engine step, not one per draft step.
        steps: list[tuple[list[int], torch.Tensor]] = []  # (sequences by index, their greedy tokens)
        active = list(range(len(seqs)))
        feed: TokenFeed | None = None
        for j in range(max(ks)):
            with torch.inference_mode():
                tokens = self.runner.execute(batch, feed).sample_logits.argmax(dim=-1)
            steps.append((active, tokens))
            feed = TokenFeed(tokens, {seqs[i].seq_id: row for row, i in enumerate(active)})
            active = [i for i in active if ks[i] > j + 1]
            batch = [_slice(seqs[i], ends[i] + j, [PLACEHOLDER]) for i in active]
            if not batch:
                break
        host: list[int] = torch.cat([tokens for _, tokens in steps]).tolist()
        proposals: list[list[int]] = [[] for _ in seqs]
        for i, token in zip(itertools.chain.from_iterable(rows for rows, _ in steps), host, strict=True):
            proposals[i].append(token)
        for seq, end, k, proposal in zip(seqs, ends, ks, proposals, strict=True):
            self._fed[seq.seq_id] = _Fed(end, proposal[: k - 1])  # the last proposal was never fed
        return proposals

    def _valid(self, seq: Sequence, end: int) -> int:
        """Positions before which the draft's KV of `seq` holds its current tokens."""
        fed = self._fed.get(seq.seq_id)
        if fed is None:
            return 0
        valid = fed.base
        for token in fed.tokens:
            if valid >= end or seq.token_ids[valid] != token:
                break
            valid += 1
        return min(valid, end - 1)  # at least the last token runs, for its logits


def _slice(seq: Sequence, start: int, tokens: list[int]) -> ScheduledSeq[StepSeq]:
    """The draft's step over `tokens` at `start` of `seq`, through the target's block table."""
    step = StepSeq(seq.seq_id, TokenWindow(start, tokens), seq.block_table, seq.num_prompt_tokens)
    return ScheduledSeq(step, len(tokens), start)
