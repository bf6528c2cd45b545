"""Incremental detokenization that never splits a character, and stop strings that never leak into the output."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from weir_server.engine.types import SamplingParams

# Prompt tokens decoded as context, so the first output token gets its leading space right (SentencePiece).
_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


def _rust_decoder(tokenizer: Any) -> Any | None:
    """The `tokenizers` object behind a fast tokenizer whose decode adds nothing to it, else None.

    Called directly it costs about a sixth of transformers' decode wrapper, and the engine decodes every
    sampled token twice; with clean-up off the wrapper returns exactly its result.
    """
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # other transformers versions: keep the wrapper
        return None
    if isinstance(tokenizer, TokenizersBackend) and type(tokenizer)._decode is TokenizersBackend._decode:
        return tokenizer.backend_tokenizer
    return None


class IncrementalDetokenizer:
    """Turns one choice's output tokens into text deltas; finds stop strings even when they span tokens."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        backend = _rust_decoder(tokenizer)
        skip = params.skip_special_tokens
        # Bound once: this runs twice per sampled token of every sequence.
        self._decode: Callable[[list[int]], str] = (
            functools.partial(backend.decode, skip_special_tokens=skip)
            if backend is not None
            else functools.partial(tokenizer.decode, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        )
        self.skip_special_tokens = skip
        self.stops = params.stop
        self.include_stop = params.include_stop_str_in_output
        # A stop string may still be completing at the end of the text: hold back that much.
        self.hold_back = max((len(s) for s in self.stops), default=1) - 1
        self.tokens = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.text = ""  # all output text decoded so far
        self.emitted = 0  # characters of `text` already handed out

    def _decode_pending(self, final: bool) -> str:
        """Text of the tokens after read_offset, unless it would end inside a character (and not final)."""
        if self.read_offset >= len(self.tokens):
            return ""
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.tokens[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or (full_text.endswith(_REPLACEMENT_CHAR) and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return full_text[len(prefix_text) :]

    def add(self, token_ids: list[int], finished: bool = False, check_stop: bool = True) -> tuple[str, str | None]:
        """Append tokens; return (new text safe to emit, the stop string matched or None).

        After a stop string matches the choice must end; `finished` flushes everything held back;
        `check_stop=False` (before min_tokens) skips the stop search for this text.
        """
        if not self.stops:  # nothing to search or hold back: the new tokens are decoded in one go
            self.tokens += token_ids
            new = self._decode_pending(final=finished)
            if new:
                self.text += new
                self.emitted = len(self.text)
            return new, None
        # Text before min_tokens is never searched; a stop may still start in the held-back tail.
        search_from = max(0, len(self.text) - self.hold_back)
        for token_id in token_ids:
            self.tokens.append(token_id)
            self.text += self._decode_pending(final=False)
        if finished:
            self.text += self._decode_pending(final=True)
        if check_stop and self.stops:
            match = self._find_stop(search_from)
            if match is not None:
                index, stop = match
                self.text = self.text[: index + len(stop) if self.include_stop else index]
                return self._emit(len(self.text)), stop
        upto = len(self.text) if finished else len(self.text) - self.hold_back
        return self._emit(upto), None

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self.stops:
            index = self.text.find(stop, start)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta
