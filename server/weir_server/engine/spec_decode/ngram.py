"""N-gram prompt lookup: propose the tokens that followed the latest earlier occurrence of the context's suffix."""

from __future__ import annotations

import numpy as np


class NgramProposer:
    """Looks the last `max_n` .. `min_n` tokens of a sequence (prompt + output) up earlier in it; the longest suffix
    found wins, its most recent occurrence if several, and the tokens after it are the proposal. No model, no state:
    a few vectorised comparisons over the context per sequence and step."""

    def __init__(self, min_n: int, max_n: int) -> None:
        assert 1 <= min_n <= max_n
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """Up to `k` tokens to follow `token_ids`; empty when no suffix of at least `min_n` tokens recurs."""
        n = len(token_ids)
        if k < 1 or n <= self.min_n:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        # Candidates: earlier positions holding the last token (a match's last token), excluding the last one.
        ends = np.flatnonzero(tokens[:-1] == tokens[-1])
        if ends.size == 0:
            return []
        matched = np.ones(ends.size, dtype=np.int64)  # suffix length each candidate matches so far
        alive = np.ones(ends.size, dtype=bool)
        for length in range(1, min(self.max_n, n - 1)):
            back = ends - length
            ok = alive & (back >= 0)
            ok[ok] = tokens[back[ok]] == tokens[n - 1 - length]
            matched += ok
            alive = ok
            if not alive.any():
                break
        good = matched >= self.min_n
        if not good.any():
            return []
        best = matched[good].max()
        end = int(ends[good & (matched == best)][-1])  # the most recent of the longest matches
        return token_ids[end + 1 : end + 1 + k]
