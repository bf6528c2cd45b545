"""N-gram prompt lookup proposes what followed the longest, latest earlier occurrence of the context's suffix."""

from __future__ import annotations

from weir_server.engine.spec_decode.ngram import NgramProposer


def test_the_tokens_after_an_earlier_occurrence_of_the_suffix_are_proposed():
    assert NgramProposer(2, 4).propose([1, 2, 3, 4, 5, 1, 2, 3], 3) == [4, 5, 1]


def test_the_longest_matching_suffix_wins_over_a_later_shorter_one():
    assert NgramProposer(2, 4).propose([1, 2, 3, 9, 9, 2, 3, 7, 7, 1, 2, 3], 2) == [9, 9]


def test_among_equally_long_matches_the_latest_wins():
    assert NgramProposer(2, 2).propose([5, 6, 1, 5, 6, 2, 5, 6], 1) == [2]


def test_no_proposal_below_the_minimum_length_or_without_a_match():
    assert NgramProposer(3, 4).propose([1, 2, 9, 2], 3) == []
    assert NgramProposer(1, 3).propose([1, 2, 3], 3) == []


def test_a_proposal_stops_at_the_end_of_the_context_and_at_k():
    assert NgramProposer(1, 3).propose([7, 8, 7], 5) == [8, 7]
    assert NgramProposer(1, 1).propose([4, 1, 2, 3, 4], 2) == [1, 2]
