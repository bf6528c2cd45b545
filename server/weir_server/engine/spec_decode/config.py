"""`--speculative-config`: vLLM's JSON keys, checked into a frozen SpeculativeConfig before any model loads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16  # more is never verified profitably, and bounds a step's extra tokens per sequence
# Above this many running sequences a step proposes nothing. vLLM's default is never; ours backs off because a large
# batch already keeps the device busy, so verifying 1 + K rows a sequence (and a draft's K steps) costs more than the
# accepted tokens save, and because a backed-off engine runs ahead on CUDA again. 16 keeps the 1- and 8-stream cases
# speculating; where it sits best per model and device is for the GPU bench to tell.
DEFAULT_DISABLE_BY_BATCH_SIZE = 16
_KEYS = (
    "method",
    "num_speculative_tokens",
    "prompt_lookup_min",
    "prompt_lookup_max",
    "model",
    "disable_by_batch_size",
    "adaptive",
)


@dataclass(frozen=True)
class SpeculativeConfig:
    """How tokens are proposed each step and how many: n-gram prompt lookup, or a small draft model."""

    method: str  # "ngram" | "draft_model"
    num_speculative_tokens: int
    prompt_lookup_min: int = 2  # ngram: the shortest suffix of the context looked up earlier in it
    prompt_lookup_max: int = 5  # ngram: the longest, tried first
    model: str | None = None  # draft_model: packaged short name, directory, .gguf file or hub id
    # Steps with more running sequences than this propose nothing; None: never back off (JSON null).
    disable_by_batch_size: int | None = DEFAULT_DISABLE_BY_BATCH_SIZE
    # Weir's key: propose only in steps where speculation is measured to pay (spec_decode/policy.py); false:
    # whenever the batch is at most disable_by_batch_size, as vLLM does. None: on for a draft model, whose K forward
    # passes a step are worth measuring against; off for n-gram lookup, which costs nothing to propose and proposes
    # only where the text repeats (measured per step, its gains and losses follow the text too closely to track:
    # on the rewrite workload it kept throughput but not the inter-token latency of speculating every step).
    adaptive: bool | None = None

    @property
    def measures(self) -> bool:
        """Whether the policy chooses which steps propose (`adaptive`, or its default for the method)."""
        return self.adaptive if self.adaptive is not None else not self.use_ngram

    def backs_off(self, num_running: int) -> bool:
        """Whether a step of `num_running` sequences decodes without proposals."""
        return self.disable_by_batch_size is not None and num_running > self.disable_by_batch_size

    @property
    def use_ngram(self) -> bool:
        return self.method == "ngram"


def parse_speculative_config(text: str) -> SpeculativeConfig:
    """The config a `--speculative-config` JSON object describes; ValueError names the first bad key or value."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--speculative-config is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError('--speculative-config must be a JSON object, e.g. \'{"method": "ngram", ...}\'')
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ValueError(f"--speculative-config: unknown key {unknown[0]!r} (known: {', '.join(_KEYS)})")
    model = raw.get("model")
    method = raw.get("method", "draft_model" if model is not None else None)
    if method not in METHODS:
        hint = "" if method is not None else ' (or name a draft "model")'
        raise ValueError(f"--speculative-config: method must be one of {', '.join(METHODS)}{hint}, got {method!r}")
    k = _int(raw, "num_speculative_tokens", None)
    if not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(
            f"--speculative-config: num_speculative_tokens must be in 1..{MAX_SPECULATIVE_TOKENS}, got {k}"
        )
    back_off: int | None = DEFAULT_DISABLE_BY_BATCH_SIZE
    if "disable_by_batch_size" in raw:
        back_off = None if raw["disable_by_batch_size"] is None else _int(raw, "disable_by_batch_size", None)
        if back_off is not None and back_off < 1:
            raise ValueError(
                f"--speculative-config: disable_by_batch_size must be at least 1 (or null: never), got {back_off}"
            )
    adaptive = raw.get("adaptive")
    if adaptive is not None and not isinstance(adaptive, bool):
        raise ValueError(f"--speculative-config: adaptive must be true or false, got {adaptive!r}")
    if method == "draft_model":
        if not isinstance(model, str) or not model:
            raise ValueError('--speculative-config: method draft_model needs "model": a path or name')
        for key in ("prompt_lookup_min", "prompt_lookup_max"):
            if key in raw:
                raise ValueError(f"--speculative-config: {key} is for method ngram, not draft_model")
        return SpeculativeConfig(method, k, model=model, disable_by_batch_size=back_off, adaptive=adaptive)
    if model is not None:
        raise ValueError('--speculative-config: method ngram takes no "model"')
    # One bound given: the other defaults around it (shortest 2, longest 5) without crossing it.
    lo = _int(raw, "prompt_lookup_min", 0)
    hi = _int(raw, "prompt_lookup_max", max(5, lo))
    if "prompt_lookup_min" not in raw:
        lo = min(2, hi)
    if lo < 1:
        raise ValueError(f"--speculative-config: prompt_lookup_min must be at least 1, got {lo}")
    if hi < lo:
        raise ValueError(f"--speculative-config: prompt_lookup_max ({hi}) must be at least prompt_lookup_min ({lo})")
    return SpeculativeConfig(
        method, k, prompt_lookup_min=lo, prompt_lookup_max=hi, disable_by_batch_size=back_off, adaptive=adaptive
    )


def _int(raw: dict[str, Any], key: str, default: Any) -> int:
    value = raw.get(key, default)
    if value is None:
        raise ValueError(f"--speculative-config: {key} is required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"--speculative-config: {key} must be an integer, got {value!r}")
    return value
