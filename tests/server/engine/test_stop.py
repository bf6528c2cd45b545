"""check_stop: the stop rules as a pure function of a choice's state after its sampled token is set."""

from __future__ import annotations

from weir_server.engine.sequence import Sequence
from weir_server.engine.stop import check_stop
from weir_server.engine.types import FinishReason, SamplingParams

EOS = 1
PROMPT = [5, 6, 7]


def _with_output(output: list[int], eos: tuple[int, ...] = (EOS,), **params) -> tuple[Sequence, int]:
    """A choice whose output so far is `output`; returns it and the index of its last token."""
    seq = Sequence("r", 0, PROMPT, SamplingParams(**params), eos_token_ids=eos)
    for token_id in output:
        seq.append_token(token_id, None)
    return seq, len(seq.token_ids) - 1


def test_an_ordinary_token_does_not_stop():
    assert check_stop(*_with_output([9, 10], max_tokens=8)) is None


def test_eos_stops_unless_ignored():
    assert check_stop(*_with_output([9, EOS], max_tokens=8)) is FinishReason.STOP
    assert check_stop(*_with_output([9, EOS], max_tokens=8, ignore_eos=True)) is None


def test_a_stop_token_id_stops():
    assert check_stop(*_with_output([9, 42], max_tokens=8, stop_token_ids=(42,))) is FinishReason.STOP


def test_stop_tokens_before_min_tokens_do_not_stop():
    assert check_stop(*_with_output([EOS], max_tokens=8, min_tokens=2)) is None
    assert check_stop(*_with_output([9, EOS], max_tokens=8, min_tokens=2)) is FinishReason.STOP


def test_the_last_allowed_token_ends_with_length():
    assert check_stop(*_with_output([9, 10, 11], max_tokens=3)) is FinishReason.LENGTH
    assert check_stop(*_with_output([9, 10], max_tokens=3)) is None


def test_a_stop_token_at_the_length_limit_is_a_stop():
    assert check_stop(*_with_output([9, 10, EOS], max_tokens=3)) is FinishReason.STOP


def test_the_engines_context_limit_ends_with_length():
    seq, index = _with_output([9, 10], max_tokens=50)
    seq.length_limit = len(PROMPT) + 2  # the engine caps it at what its KV pool holds
    assert check_stop(seq, index) is FinishReason.LENGTH


def test_a_token_behind_one_in_flight_is_judged_at_its_own_position():
    seq, index = _with_output([9, 10], max_tokens=3)
    seq.add_placeholder()  # the next token is sampled but not read back yet: the output's third, and last
    assert check_stop(seq, index) is None
