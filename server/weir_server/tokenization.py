"""The API layer's view of a Hugging Face tokenizer: tokenize with offsets, token text and bytes (chat templates
are chat/template.py's). Special-token strings in request text stay text unless asked; calls are thread-safe and
release the GIL, so the servicer runs them on worker threads."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import tokenizers
from transformers import PreTrainedTokenizerBase

from weir_server.errors import InvalidRequestError

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SENTENCEPIECE_SPACE = "\u2581"
# WordPiece turns a word of up to 100 characters it cannot split into one [UNK]; no common scheme covers more.
_MIN_CHARS_PER_TOKEN_BOUND = 128


@dataclass(frozen=True)
class TextTokens:
    """The tokens of one text; `offsets` holds (start, end) character spans when asked for."""

    token_ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]] | None = None


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-printable-character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


Checkpoint = Callable[[], None]  # raises when the request's work should stop (deadline passed, caller gone)
_TOKENS_PER_CHECKPOINT = 1 << 16


def keep_going() -> None:
    """The checkpoint of work that nothing will stop."""


def backend_copy(tokenizer: PreTrainedTokenizerBase, encode_special_tokens: bool) -> tokenizers.Tokenizer | None:
    """A private copy of a fast tokenizer's Rust backend with its special-token mode fixed, or None (a slow one).

    Each mode gets its own copy because the mode is state on the tokenizer object: transformers sets it on every call
    (`split_special_tokens`), which races between threads. Without padding or truncation: callers truncate."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    copy = tokenizers.Tokenizer.from_str(backend.to_str())
    copy.no_padding()
    copy.no_truncation()
    copy.encode_special_tokens = encode_special_tokens
    return copy


class Tokenizer:
    """Wraps a Hugging Face tokenizer with the operations the API needs; errors are InvalidRequestError.

    Safe to call from several threads at once. Special-token strings in text are text unless `parse_special` is
    set; encoding and decoding go through the Rust backend's batch calls, which release the GIL while they work."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.hf = tokenizer
        self._special_ids = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        self._byte_level = self._is_byte_level(tokenizer)
        self._byte_decoder = _byte_decoder() if self._byte_level else {}
        self._bytes_cache: dict[int, bytes] = {}
        self._parsing = backend_copy(tokenizer, encode_special_tokens=False)
        self._as_text = backend_copy(tokenizer, encode_special_tokens=True)

    @staticmethod
    def _is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        return decoder is not None and "ByteLevel" in repr(decoder)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows (added tokens included)."""
        return len(self.hf)

    @functools.cached_property
    def max_chars_per_token(self) -> int:
        """An upper bound on the characters one token stands for (the longest vocabulary entry, or more)."""
        longest = max((len(piece) for piece in self.hf.get_vocab()), default=1)
        return max(longest, _MIN_CHARS_PER_TOKEN_BOUND)

    def check_text_length(self, text: str, field: str, max_tokens: int) -> None:
        """Refuse, before tokenizing it, a text far longer than `max_tokens` tokens could hold: tokenizing
        megabytes takes seconds."""
        self.check_chars(len(text), field, max_tokens)

    def check_chars(self, chars: int, field: str, max_tokens: int) -> None:
        """check_text_length for input of `chars` characters in all (a conversation's turns, say)."""
        if chars > 2 * max_tokens * self.max_chars_per_token:
            raise InvalidRequestError(
                field, f"is {chars} characters long; far more than the model's {max_tokens}-token context holds"
            )

    def encode(
        self,
        text: str,
        add_special_tokens: bool = True,
        max_length: int | None = None,
        parse_special: bool = False,
    ) -> list[int]:
        """Token ids of one text; with `max_length`, truncated to it (special tokens kept)."""
        if max_length is not None:
            text = text[: 2 * max_length * self.max_chars_per_token]  # the cut-off tail would be dropped anyway
        ids, _ = self._encode(text, add_special_tokens, parse_special, max_length)
        return ids

    def tokenize(
        self,
        text: str,
        add_special_tokens: bool = True,
        return_offsets: bool = False,
        parse_special: bool = False,
        checkpoint: Checkpoint = keep_going,
    ) -> TextTokens:
        """Token ids, token texts and (when asked) character offsets of one text."""
        ids, offsets = self._encode(text, add_special_tokens, parse_special, offsets=return_offsets)
        tokens: list[str] = []
        for start in range(0, len(ids), _TOKENS_PER_CHECKPOINT):
            checkpoint()
            tokens.extend(self.token_text(t) for t in ids[start : start + _TOKENS_PER_CHECKPOINT])
        return TextTokens(ids, tokens, offsets)

    def _encode(
        self,
        text: str,
        add_special_tokens: bool,
        parse_special: bool,
        max_length: int | None = None,
        offsets: bool = False,
    ) -> tuple[list[int], list[tuple[int, int]] | None]:
        backend = self._parsing if parse_special else self._as_text
        if backend is None:
            return self._encode_slow(text, add_special_tokens, parse_special, max_length, offsets)
        encoding = backend.encode_batch([text], add_special_tokens=False)[0]
        if max_length is not None:
            added = backend.post_processor.num_special_tokens_to_add(False) if backend.post_processor else 0
            encoding.truncate(max(max_length - added, 0) if add_special_tokens else max_length)
        if add_special_tokens:
            encoding = backend.post_process(encoding, None, True)
        return list(encoding.ids), [(int(s), int(e)) for s, e in encoding.offsets] if offsets else None

    def _encode_slow(
        self, text: str, add_special_tokens: bool, parse_special: bool, max_length: int | None, offsets: bool
    ) -> tuple[list[int], list[tuple[int, int]] | None]:
        """A tokenizer without a Rust backend: transformers' Python one (it holds the GIL, but yields it often)."""
        try:
            encoding = self.hf(
                text,
                add_special_tokens=add_special_tokens,
                split_special_tokens=not parse_special,
                truncation=max_length is not None,
                max_length=max_length,
                return_offsets_mapping=offsets,
            )
        except NotImplementedError as e:
            raise InvalidRequestError("return_offsets", "this model's tokenizer cannot return offsets") from e
        spans = [(int(s), int(e)) for s, e in encoding["offset_mapping"]] if offsets else None
        return list(encoding["input_ids"]), spans

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of a token id sequence."""
        if self._parsing is not None and not getattr(self.hf, "clean_up_tokenization_spaces", False):
            return str(self._parsing.decode_batch([list(token_ids)], skip_special_tokens=skip_special_tokens)[0])
        return str(self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def check_ids(self, token_ids: Sequence[int], field: str, limit: int | None = None) -> None:
        """Raise InvalidRequestError on `field` unless every id is in [0, limit or vocab size)."""
        limit = self.vocab_size if limit is None else limit
        if not token_ids or (0 <= min(token_ids) and max(token_ids) < limit):
            return
        bad = [t for t in token_ids if not 0 <= t < limit]
        if bad:
            raise InvalidRequestError(field, f"token ids out of range [0, {limit}): {bad[:5]}")

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes a token stands for (a token may hold part of a character)."""
        cached = self._bytes_cache.get(token_id)
        if cached is None:
            cached = self._bytes_cache[token_id] = self._compute_token_bytes(token_id)
        return cached

    def token_text(self, token_id: int) -> str:
        """The token's text; bytes that are not whole characters show as U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def _compute_token_bytes(self, token_id: int) -> bytes:
        piece = self.hf.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if token_id in self._special_ids:
            return piece.encode()
        match = _BYTE_TOKEN.fullmatch(piece)
        if match:  # sentencepiece byte fallback
            return bytes([int(match.group(1), 16)])
        if self._byte_level and all(c in self._byte_decoder for c in piece):
            return bytes(self._byte_decoder[c] for c in piece)
        if _SENTENCEPIECE_SPACE in piece:
            return piece.replace(_SENTENCEPIECE_SPACE, " ").encode()
        return self.decode([token_id], skip_special_tokens=False).encode()
