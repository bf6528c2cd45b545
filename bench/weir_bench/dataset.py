"""Prompts from a ShareGPT-style dataset file: first human turn as the prompt, the answer's length as the output
length, filtered and sampled as vLLM's benchmark_serving does."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DATASETS = ("random", "sharegpt", "rewrite")  # rewrite: passages to copy with edits (weir_bench.rewrite)
# vLLM's bounds: drop prompts or answers under 4 tokens, prompts over 1024 and pairs over 2048 tokens.
MIN_TOKENS = 4
MAX_PROMPT_TOKENS = 1024
MAX_TOTAL_TOKENS = 2048

# Texts in, token ids out (one list per text): the first target's tokenizer.
Tokenize = Callable[[Sequence[str], bool], Awaitable[list[list[int]]]]


class DatasetError(ValueError):
    """The dataset file is missing, is not ShareGPT-shaped, or leaves no usable conversation."""


@dataclass(frozen=True)
class Conversation:
    """The first (human prompt, model answer) turn pair of one dataset entry."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class SampledRequest:
    """One benchmark request drawn from the dataset: its prompt ids and the output length to ask for."""

    prompt: list[int]
    output_tokens: int


def load_sharegpt(path: Path) -> list[Conversation]:
    """The first human/gpt turn pair of every entry of a ShareGPT JSON list; entries without one are skipped."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise DatasetError(f"--dataset-path {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(f"--dataset-path {path}: not JSON ({exc})") from exc
    if not isinstance(data, list):
        raise DatasetError(f"--dataset-path {path}: expected a JSON list of {{'conversations': [...]}} entries")
    pairs = [pair for entry in data if (pair := _first_turns(entry)) is not None]
    if not pairs:
        raise DatasetError(f"--dataset-path {path}: no entry has a human turn followed by a gpt turn")
    return pairs


def _first_turns(entry: object) -> Conversation | None:
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    first, second = turns[0], turns[1]
    if not (isinstance(first, dict) and isinstance(second, dict)):
        return None
    prompt, completion = first.get("value"), second.get("value")
    # Some ShareGPT dumps start with the model's turn; like vLLM, take the first two turns as they come but
    # insist they are text.
    if not (isinstance(prompt, str) and isinstance(completion, str)):
        return None
    return Conversation(prompt, completion)


def keep(prompt_len: int, output_len: int, fixed_output: bool) -> bool:
    """Whether a (prompt, answer) pair of these token lengths is in vLLM's bounds; a fixed output length
    is not checked against the minimum."""
    if prompt_len < MIN_TOKENS or (not fixed_output and output_len < MIN_TOKENS):
        return False
    return prompt_len <= MAX_PROMPT_TOKENS and prompt_len + output_len <= MAX_TOTAL_TOKENS


async def tokenize_conversations(
    conversations: Sequence[Conversation], tokenize: Tokenize, output_len: int | None
) -> list[SampledRequest]:
    """Token ids of every prompt and the output length of each (its answer's token count, or `output_len`),
    keeping only the pairs `keep` accepts."""
    prompts = await tokenize([c.prompt for c in conversations], True)
    answers = [[]] * len(conversations) if output_len else await tokenize([c.completion for c in conversations], False)
    requests = []
    for prompt, answer in zip(prompts, answers, strict=True):
        length = output_len or len(answer)
        if keep(len(prompt), length, fixed_output=output_len is not None):
            requests.append(SampledRequest(prompt, length))
    if not requests:
        raise DatasetError(
            f"no dataset conversation is between {MIN_TOKENS} and {MAX_PROMPT_TOKENS} prompt tokens "
            f"(and {MAX_TOTAL_TOKENS} with its answer)"
        )
    logger.info("dataset: %d of %d conversations within bounds", len(requests), len(conversations))
    return requests


def sample(requests: Sequence[SampledRequest], count: int, seed: int) -> list[SampledRequest]:
    """`count` requests in a seeded shuffled order; a dataset smaller than `count` is drawn from again
    (shuffled anew each pass), so small files still fill a run."""
    rng = random.Random(seed)
    out: list[SampledRequest] = []
    while len(out) < count:
        batch = list(requests)
        rng.shuffle(batch)
        out.extend(batch[: count - len(out)])
    return out


class DatasetPrompts:
    """A dataset's requests, tokenized once by the first target that can (so every target gets the same ids)."""

    def __init__(self, conversations: Sequence[Conversation], output_len: int | None) -> None:
        self.conversations = list(conversations)
        self.output_len = output_len
        self._requests: list[SampledRequest] | None = None

    async def resolve(self, driver: object) -> list[SampledRequest]:
        if self._requests is None:
            tokenize = getattr(driver, "tokenize", None)
            if tokenize is None:
                name = getattr(driver, "name", "this target")
                raise DatasetError(
                    f"{name} cannot tokenize the dataset; list a target that can (grpc, or a server with "
                    "vLLM's POST /tokenize) first"
                )
            self._requests = await tokenize_conversations(self.conversations, tokenize, self.output_len)
        return self._requests
