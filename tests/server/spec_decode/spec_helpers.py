"""Engines with and without speculation over one loaded model, and a workload whose outputs repeat its prompts."""

from __future__ import annotations

import dataclasses
import random

from engine_helpers import make_engine, prompt

from weir_server.engine.core import EngineCore
from weir_server.engine.spec_decode.config import SpeculativeConfig
from weir_server.engine.types import GenerationOutput
from weir_server.models.loader import LoadedModel

NGRAM = SpeculativeConfig("ngram", num_speculative_tokens=4, prompt_lookup_min=1, prompt_lookup_max=3)


def spec_engine(loaded: LoadedModel, spec: SpeculativeConfig | None, **kwargs: int | bool) -> EngineCore:
    """`make_engine(loaded, **kwargs)`, speculating with `spec` (None: without)."""
    base = make_engine(loaded, **kwargs)  # type: ignore[arg-type]
    if spec is None:
        return base
    return EngineCore(loaded, dataclasses.replace(base.config, speculative=spec))


def grounded_prompt(seed: int, length: int = 24) -> list[int]:
    """A prompt that repeats a random phrase: n-gram lookup has something to find, as in a rewrite task."""
    rng = random.Random(seed)
    phrase = prompt(seed, rng.randint(3, 8))
    out: list[int] = []
    while len(out) < length:
        out += phrase if rng.random() < 0.7 else prompt(seed + len(out), 2)
    return out[:length]


def summary(outputs: list[GenerationOutput]) -> tuple[list[int], str, object, object]:
    tokens = [t for o in outputs for t in o.token_ids]
    return tokens, "".join(o.text for o in outputs), outputs[-1].finish_reason, outputs[-1].stop_reason
