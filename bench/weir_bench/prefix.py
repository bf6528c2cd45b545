"""The prefix-caching scenario: a cold long prompt, then one sharing its prefix; compare their TTFTs."""

from __future__ import annotations

import random
from dataclasses import dataclass

from weir_bench.load import Driver, RequestTiming, make_prompts

PromptPair = tuple[list[int], list[int]]  # (cold prompt, prompt sharing its prefix)


@dataclass(frozen=True)
class PrefixSpec:
    """A prompt of `prefix_tokens` shared tokens followed by `suffix_tokens` that differ between the two."""

    prefix_tokens: int = 1000
    suffix_tokens: int = 8
    output_tokens: int = 8
    repeats: int = 3


def make_pairs(spec: PrefixSpec, vocab_size: int, seed: int | None = None) -> list[PromptPair]:
    """`spec.repeats` (cold, cached) prompt pairs, each pair on its own prefix.

    With seed None the prefixes are fresh every run, so a server kept up between runs never has them cached.
    """
    rng = random.Random(seed)
    pairs = []
    for _ in range(spec.repeats):
        prefix, tail_a, tail_b = (
            make_prompts(1, n, vocab_size, rng.getrandbits(63))[0]
            for n in (spec.prefix_tokens, spec.suffix_tokens, spec.suffix_tokens)
        )
        pairs.append((prefix + tail_a, prefix + tail_b))
    return pairs


async def run_prefix_pairs(
    driver: Driver,
    spec: PrefixSpec,
    pairs: list[PromptPair],
    warmup_prompt: list[int],
) -> list[tuple[RequestTiming, RequestTiming]]:
    """One warm-up request, then each pair in turn, alone on the server: the cold prompt, then the cached one."""
    await driver.generate(warmup_prompt, spec.output_tokens)
    results = []
    for cold_prompt, warm_prompt in pairs:
        cold = await driver.generate(cold_prompt, spec.output_tokens)
        warm = await driver.generate(warm_prompt, spec.output_tokens)
        results.append((cold, warm))
    return results
