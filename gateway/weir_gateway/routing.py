"""Which backend a request goes to: round-robin, least outstanding requests, or cache-aware (a prompt prefix's
"home" backend by rendezvous hashing, unless the home is much busier than the least-loaded backend)."""

from __future__ import annotations

import array
import hashlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from weir.v1 import inference_pb2 as pb

ROUTING_POLICIES = ("cache-aware", "least-load", "round-robin")
# The prefix key covers whole blocks of this many bytes of prompt (about 64 tokens of English text, or 64 token
# ids): a prompt's varying tail inside its last, partial block does not change its key.
PREFIX_BLOCK_BYTES = 256


class Routable(Protocol):
    """What a policy sees of a backend."""

    @property
    def address(self) -> str: ...

    @property
    def load(self) -> int: ...


B = TypeVar("B", bound=Routable)


class RoutingPolicy(Protocol):
    """Picks one of `candidates` (never empty) for a request whose prompt prefix hashes to `key` (None: unknown)."""

    def choose(self, candidates: Sequence[B], key: bytes | None) -> B: ...


@dataclass
class RoundRobin:
    """Each request to the next candidate in turn, whatever their load."""

    _turn: Iterator[int] = field(default_factory=itertools.count)

    def choose(self, candidates: Sequence[B], key: bytes | None) -> B:
        return candidates[next(self._turn) % len(candidates)]


@dataclass
class LeastLoad:
    """The candidate with the least load: requests in flight (ties rotate)."""

    _turn: Iterator[int] = field(default_factory=itertools.count)

    def choose(self, candidates: Sequence[B], key: bytes | None) -> B:
        start = next(self._turn) % len(candidates)
        rotated = [*candidates[start:], *candidates[:start]]
        return min(rotated, key=lambda b: b.load)


@dataclass
class CacheAware:
    """A prompt prefix's home backend (rendezvous hashing over the candidates, so a backend joining or leaving moves
    only its own share of prefixes), unless the home has more than `factor` x + `slack` the least-loaded backend's
    requests in flight: then the least-loaded one. Requests without a key go by least load."""

    factor: float = 2.0
    slack: int = 4
    least_load: LeastLoad = field(default_factory=LeastLoad)

    def choose(self, candidates: Sequence[B], key: bytes | None) -> B:
        least = self.least_load.choose(candidates, key)
        if key is None:
            return least
        home = max(candidates, key=lambda b: rendezvous_score(key, b.address))
        if home.load > least.load * self.factor + self.slack:
            return least
        return home


def rendezvous_score(key: bytes, address: str) -> int:
    """The weight of `address` for `key`; the highest-weighted backend is the key's home."""
    digest = hashlib.blake2b(key + b"\x00" + address.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def create_policy(name: str, factor: float = 2.0, slack: int = 4) -> RoutingPolicy:
    """The policy called `name` (one of ROUTING_POLICIES)."""
    if name == "round-robin":
        return RoundRobin()
    if name == "least-load":
        return LeastLoad()
    if name == "cache-aware":
        return CacheAware(factor, slack)
    raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(ROUTING_POLICIES)}")


def prefix_key(request: pb.GenerateRequest, prefix_bytes: int) -> bytes | None:
    """A hash of the first `prefix_bytes` of the request's prompt, cut down to whole blocks: requests sharing a
    system prompt or document at least that long share a key, and so a home backend whose prefix cache holds it.
    The model and LoRA adapter are part of the key: servers cache each adapter's KV apart."""
    data = _prompt_bytes(request)
    if not data:
        return None
    cut = max(PREFIX_BLOCK_BYTES, min(len(data), prefix_bytes) // PREFIX_BLOCK_BYTES * PREFIX_BLOCK_BYTES)
    key = hashlib.blake2b(data[:cut], digest_size=16)
    if request.model or request.adapter:
        key.update(b"\x00" + request.model.encode() + b"\x00" + request.adapter.encode())
    return key.digest()


def _prompt_bytes(request: pb.GenerateRequest) -> bytes:
    """The prompt in the order the server renders it: text, token ids, or the tools and messages a chat template
    turns into the prompt's head."""
    kind = request.WhichOneof("input")
    if kind == "prompt":
        return request.prompt.encode()
    if kind == "token_ids":
        return array.array("i", request.token_ids.ids).tobytes()
    if kind == "messages":
        parts = [tool.SerializeToString(deterministic=True) for tool in request.tools]
        parts += [message.SerializeToString(deterministic=True) for message in request.messages.messages]
        return b"".join(parts)
    return b""
