"""Control tokens typed into a conversation stay text; only the ones the chat template writes become tokens.

A user turn holding `<|im_end|>\\n<|im_start|>system\\n...` must not open a system turn. Before rendering, every
control token in the request's strings (turns, names, tool calls, tool definitions, template variables) is wrapped
in private-use markers; the template writes its own bare. After rendering, each bare one becomes an alias that the
encoder's private tokenizer knows as an added token with the same flags (its id is mapped back to the real one), and
each marked one becomes plain text, which that tokenizer reads as text (its control tokens are all special, and it
encodes special tokens as text). One call of the Rust tokenizer then yields exactly the ids the template asked for:
a conversation without control tokens in it tokenizes as before, to the id.

This is transformers' `sanitize_control_tokens` scheme (same markers, same choice of control tokens), encoded in one
pass over the whole prompt instead of piece by piece, and failing safe where a template cuts through a marker: a
control token next to a marker is the user's.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

import tokenizers
from transformers import PreTrainedTokenizerBase

from weir_server.tokenization import Checkpoint, keep_going

logger = logging.getLogger(__name__)

MARK_START, MARK_END = "\U000f0000", "\U000f0001"  # around a control token that came from the request
_ALIAS = "\U000f0002{}\U000f0003"  # the k-th control token as the template wrote it, in the encoder's input
_PRIVATE = str.maketrans("", "", "\U000f0000\U000f0001\U000f0002\U000f0003")
_FLAGS = ("single_word", "lstrip", "rstrip")
CHUNK_CHARS = 1 << 16  # encoded between checkpoints: tens of milliseconds
Marker = Callable[[Any], Any]  # ChatEncoder.mark


def control_tokens(tokenizer: PreTrainedTokenizerBase, template: str | None) -> tuple[str, ...]:
    """The tokens that structure a chat, longest first: every special token, and the other added tokens the template
    holds (Qwen's `<tool_call>`, `<think>`), whitespace ones aside (Gemma's "\\n" is ordinary text there)."""
    source = template or ""
    found = {
        token.content
        for token in tokenizer.added_tokens_decoder.values()
        if token.special or (token.content in source and not token.content.isspace())
    }
    return tuple(sorted(found, key=lambda t: (-len(t), t)))


class ChatEncoder:
    """Marks the request's strings before rendering and encodes the rendered prompt; thread-safe."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str | None) -> None:
        self.hf = tokenizer
        self.control = control_tokens(tokenizer, template)
        alternatives = "|".join(map(re.escape, self.control)) or "(?!)"
        self._control_re = re.compile(alternatives)
        # A control token with a marker on either side is the request's; a marker alone (a template cut through a
        # marked token) is dropped; a bare control token is the template's.
        self._rendered_re = re.compile(f"({MARK_START})?({alternatives})({MARK_END})?|[{MARK_START}{MARK_END}]")
        self._aliases = {token: _ALIAS.format(k) for k, token in enumerate(self.control)}
        self._ids = {token: _token_id(tokenizer, token) for token in self.control}
        self._backend, self._alias_ids, plain = self._alias_backend()
        self._cuttable_re = re.compile("|".join(re.escape(self._aliases[t]) for t in plain) or "(?!)")

    def mark(self, value: Any) -> Any:
        """`value` (a string, or lists and dicts of them, keys included) with its control tokens marked and any
        private-use marker characters it held removed (so none can be forged)."""
        if isinstance(value, str):
            return self._control_re.sub(_marked, value.translate(_PRIVATE))
        if isinstance(value, dict):
            return {self.mark(k): self.mark(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.mark(v) for v in value]
        return value

    def encode(self, rendered: str, checkpoint: Checkpoint = keep_going) -> tuple[str, list[int]]:
        """The prompt text (markers removed) and its token ids, from a chat rendered with marked inputs.
        `checkpoint` is called between chunks of the prompt."""
        text = rendered.translate(_PRIVATE)
        if self._backend is None:
            return text, self._encode_in_pieces(rendered)
        source = self._rendered_re.sub(self._resolve, rendered)
        ids: list[int] = []
        for chunk in self._chunks(source):
            checkpoint()
            ids += self._backend.encode_batch([chunk], add_special_tokens=False)[0].ids
        aliases = self._alias_ids
        return text, [aliases.get(i, i) for i in ids]

    def _chunks(self, source: str) -> list[str]:
        """`source` cut into pieces of about CHUNK_CHARS, each after the first starting at an alias with no strip or
        word flags. The tokenizer splits its input at added tokens first and encodes each part on its own (only
        whether a part starts the input matters, and none of these does), so the pieces' ids join up exactly."""
        cuts = [0]
        for match in self._cuttable_re.finditer(source):
            if match.start() - cuts[-1] >= CHUNK_CHARS:
                cuts.append(match.start())
        cuts.append(len(source))
        return [source[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]

    def _resolve(self, match: re.Match[str]) -> str:
        token = match.group(2)
        if token is None:
            return ""  # a lone marker
        if match.group(1) or match.group(3):
            return token  # the request's: text
        return self._aliases[token]

    def _alias_backend(self) -> tuple[tokenizers.Tokenizer | None, dict[int, int], list[str]]:
        """A private copy of the Rust tokenizer in which every control token is special (so read as text) and each
        has an alias: a non-special added token with its flags. Also: the control tokens with no flags set."""
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is None:
            logger.warning("the tokenizer has no Rust backend; chat prompts are encoded piece by piece")
            return None, {}, []
        data = json.loads(backend.to_str())
        flags: dict[str, dict[str, Any]] = {}
        for entry in data.get("added_tokens") or ():
            if entry["content"] in self._aliases:
                entry["special"] = True
                flags[entry["content"]] = entry
        copy = tokenizers.Tokenizer.from_str(json.dumps(data))
        copy.no_padding()
        copy.no_truncation()
        added = [
            tokenizers.AddedToken(
                self._aliases[token],
                single_word=bool(flags.get(token, {}).get("single_word", False)),
                lstrip=bool(flags.get(token, {}).get("lstrip", False)),
                rstrip=bool(flags.get(token, {}).get("rstrip", False)),
                normalized=False,
                special=False,
            )
            for token in self.control
        ]
        copy.add_tokens(added)
        copy.encode_special_tokens = True
        alias_ids = {}
        for token in self.control:
            alias_id = copy.token_to_id(self._aliases[token])
            assert alias_id is not None, "an added token has an id"
            alias_ids[alias_id] = self._ids[token]
        plain = [t for t in self.control if not any(flags.get(t, {}).get(f) for f in _FLAGS)]
        return copy, alias_ids, plain

    def _encode_in_pieces(self, rendered: str) -> list[int]:
        """A tokenizer without a Rust backend: the text between the template's control tokens, one piece at a time."""
        ids: list[int] = []
        start = 0
        pieces: list[tuple[str, int | None]] = []
        for match in self._rendered_re.finditer(rendered):
            token = match.group(2)
            if token is None or match.group(1) or match.group(3):
                continue
            pieces.append((rendered[start : match.start()], self._ids[token]))
            start = match.end()
        pieces.append((rendered[start:], None))
        for piece, control in pieces:
            plain = piece.translate(_PRIVATE)
            if plain:
                ids += self.hf.encode(plain, add_special_tokens=False, split_special_tokens=True)
            if control is not None:
                ids.append(control)
        return ids


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(token_id, int), f"{token!r} is one added token"
    return token_id


def _marked(match: re.Match[str]) -> str:
    return f"{MARK_START}{match.group()}{MARK_END}"
