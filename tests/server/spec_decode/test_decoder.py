"""Who gets proposals: decoding sequences only, never constrained ones, never past what they may still emit."""

from __future__ import annotations

from engine_helpers import greedy

from weir_server.engine.sequence import Sequence, SequenceStatus
from weir_server.engine.spec_decode.config import SpeculativeConfig
from weir_server.engine.spec_decode.decoder import NgramBatchProposer, SpecDecoder

SPEC = SpeculativeConfig("ngram", num_speculative_tokens=4, prompt_lookup_min=1, prompt_lookup_max=2)
REPEATING = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5]


def decoding(max_tokens: int, prompt: list[int] = REPEATING) -> Sequence:
    seq = Sequence("r", 0, prompt, greedy(max_tokens))
    seq.status = SequenceStatus.RUNNING
    seq.num_computed_tokens = len(prompt) - 1
    return seq


def test_a_decoding_sequence_gets_up_to_k_tokens_from_its_context():
    seq = decoding(20)
    SpecDecoder(SPEC, NgramBatchProposer(SPEC)).propose([seq])
    assert seq.token_ids[len(REPEATING) :] == [6, 7, 8, 9]


def test_proposals_never_reach_past_max_tokens():
    seq = decoding(3)  # 3 tokens left: 2 proposed + 1 from the target
    SpecDecoder(SPEC, NgramBatchProposer(SPEC)).propose([seq])
    assert seq.token_ids[len(REPEATING) :] == [6, 7]


def test_constrained_and_prefilling_sequences_get_no_proposals():
    constrained = decoding(20)
    constrained.grammar = object()  # type: ignore[assignment]  # any grammar: its mask is per position
    prefilling = decoding(20)
    prefilling.num_computed_tokens = 3
    SpecDecoder(SPEC, NgramBatchProposer(SPEC)).propose([constrained, prefilling])
    assert constrained.token_ids == REPEATING and prefilling.token_ids == REPEATING
