"""A choice's outputs, and the one home of their text: incremental detokenizers fed each choice's sampled tokens.

The core makes the text of the choices it detokenizes (`make_text`, a step after their tokens were sampled, while
the model runs). A core that makes only the text of choices with stop strings (which must end in the core the
moment one appears) leaves the rest to the front end in the server process, which makes it as each stream reads
(`OutputText`), in parallel with the core's next steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from weir_server.engine.detokenizer import IncrementalDetokenizer
from weir_server.engine.sequence import Sequence
from weir_server.engine.types import (
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    RequestTiming,
    TokenLogprob,
    Usage,
)


def core_makes_text(request: GenerationRequest, detokenize_all: bool) -> bool:
    """Whether the core makes a request's text: all of it, or only that of choices with stop strings."""
    return detokenize_all or bool(request.params.stop)


# ---- in the core --------------------------------------------------------------------------------------


@dataclass(slots=True)
class PendingText:
    """A sampled token of a choice whose text and output are made later."""

    seq: Sequence
    token_ids: list[int]  # what the detokenizer gets: empty for a stop token whose text is dropped
    finished: bool
    can_stop: bool  # min_tokens reached: stop strings count


def make_text(item: PendingText) -> str:
    """The text a sampled token adds to its choice ('' where the core makes none); a stop string found in it ends
    the choice (STOP_SEQUENCE), and the text stops before it (or after it, when asked)."""
    seq = item.seq
    detokenizer = seq.detokenizer
    if detokenizer is None:
        return ""
    text, stop_str = detokenizer.add(item.token_ids, item.finished, check_stop=item.can_stop)
    if stop_str is not None:
        seq.finish(FinishReason.STOP_SEQUENCE, stop_str)
    return text


def choice_output(seq: Sequence, text: str) -> GenerationOutput:
    """A choice's output since its previous one: a bare delta while it runs, with its end once it has ended."""
    if seq.is_finished:
        return final_output(seq, text)
    # The common case: a plain delta, no usage or timing yet.
    out = GenerationOutput(
        seq.request_id,
        seq.index,
        text,
        seq.pending_token_ids,
        seq.pending_logprobs if seq.params.logprobs is not None else None,
        _take_prompt_logprobs(seq),
    )
    seq.pending_token_ids, seq.pending_logprobs = [], []
    return out


def final_output(seq: Sequence, text: str = "") -> GenerationOutput:
    """The last output of a choice that has ended: with its finish, usage and timing."""
    assert seq.is_finished
    out = GenerationOutput(
        request_id=seq.request_id,
        index=seq.index,
        text=text,
        token_ids=seq.pending_token_ids,
        logprobs=seq.pending_logprobs if seq.params.logprobs is not None else None,
        prompt_logprobs=_take_prompt_logprobs(seq),
        finish_reason=seq.finish_reason,
        stop_reason=seq.stop_reason,
        usage=Usage(seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached_tokens),
        error=seq.error,
        timing=RequestTiming(seq.arrival_time, seq.first_scheduled_time, seq.first_token_time, time.time()),
    )
    seq.pending_token_ids, seq.pending_logprobs = [], []
    return out


def _take_prompt_logprobs(seq: Sequence) -> list[TokenLogprob] | None:
    """The prompt logprobs on a choice's first output only."""
    if seq.prompt_logprobs is None or seq.prompt_logprobs_sent:
        return None
    seq.prompt_logprobs_sent = True
    return seq.prompt_logprobs


# ---- in front of the core ------------------------------------------------------------------------------


class OutputText:
    """One incremental detokenizer per choice of each open request whose text the core does not make.

    All on the event loop: `add_request` before the request goes to the core, `fill` as its consumer reads each
    output (so the deltas merged while a consumer was behind are decoded in one go), `forget` when it ends.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._choices: dict[str, list[IncrementalDetokenizer]] = {}

    def add_request(self, request: GenerationRequest) -> None:
        if self.tokenizer is None or core_makes_text(request, detokenize_all=False):
            return
        params, prompt = request.params, request.prompt_token_ids
        self._choices[request.request_id] = [
            IncrementalDetokenizer(self.tokenizer, prompt, params) for _ in range(params.n)
        ]

    def forget(self, request_id: str) -> None:
        self._choices.pop(request_id, None)

    def fill(self, output: GenerationOutput) -> None:
        """Set the text of an output (in place) if its choice is detokenized here; each output once, in order."""
        detokenizers = self._choices.get(output.request_id)
        if detokenizers is None:
            return
        detokenizer = detokenizers[output.index]
        token_ids = output.token_ids
        # A stop token ends the answer without being part of it, as in the core.
        if output.finish_reason is FinishReason.STOP and not detokenizer.include_stop:
            token_ids = token_ids[:-1]
        output.text, _ = detokenizer.add(token_ids, output.finished, check_stop=False)
