"""A small draft model proposing k greedy tokens per step from its own paged KV cache."""

from __future__ import annotations

from weir_server.config import EngineConfig
from weir_server.engine.sequence import Sequence
from weir_server.engine.spec_decode.config import SpeculativeConfig
from weir_server.models.loader import LoadedModel


class DraftModelProposer:
    """Not yet: the draft model proposer."""

    def __init__(self, spec: SpeculativeConfig, config: EngineConfig, target: LoadedModel) -> None:
        raise NotImplementedError("draft-model speculation is not implemented yet")

    def propose_batch(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        return [[] for _ in seqs]
