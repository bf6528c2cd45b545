"""The API layer's view of a Hugging Face tokenizer: tokenize with offsets, token text and bytes (chat templates
are chat/template.py's)."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

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


class Tokenizer:
    """Wraps a Hugging Face tokenizer with the operations the API needs; errors are InvalidRequestError."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.hf = tokenizer
        self._special_ids = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        self._byte_level = self._is_byte_level(tokenizer)
        self._byte_decoder = _byte_decoder() if self._byte_level else {}
        self._bytes_cache: dict[int, bytes] = {}

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
        megabytes takes seconds, and the server would stall meanwhile."""
        self.check_chars(len(text), field, max_tokens)

    def check_chars(self, chars: int, field: str, max_tokens: int) -> None:
        """check_text_length for input of `chars` characters in all (a conversation's turns, say)."""
        if chars > 2 * max_tokens * self.max_chars_per_token:
            raise InvalidRequestError(
                field, f"is {chars} characters long; far more than the model's {max_tokens}-token context holds"
            )

    def encode(self, text: str, add_special_tokens: bool = True, max_length: int | None = None) -> list[int]:
        """Token ids of one text; with `max_length`, truncated to it (special tokens kept)."""
        truncation = max_length is not None
        if max_length is not None:
            text = text[: 2 * max_length * self.max_chars_per_token]  # the cut-off tail would be dropped anyway
        ids = self.hf.encode(text, add_special_tokens=add_special_tokens, truncation=truncation, max_length=max_length)
        return list(ids)

    def tokenize(self, text: str, add_special_tokens: bool = True, return_offsets: bool = False) -> TextTokens:
        """Token ids, token texts and (when asked) character offsets of one text."""
        try:
            encoding = self.hf(text, add_special_tokens=add_special_tokens, return_offsets_mapping=return_offsets)
        except NotImplementedError as e:
            raise InvalidRequestError("return_offsets", "this model's tokenizer cannot return offsets") from e
        ids = list(encoding["input_ids"])
        offsets = [(int(s), int(e)) for s, e in encoding["offset_mapping"]] if return_offsets else None
        return TextTokens(ids, [self.token_text(t) for t in ids], offsets)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of a token id sequence."""
        return str(self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def check_ids(self, token_ids: Sequence[int], field: str, limit: int | None = None) -> None:
        """Raise InvalidRequestError on `field` unless every id is in [0, limit or vocab size)."""
        limit = self.vocab_size if limit is None else limit
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

