"""A snapshot of the generation engine's load and cache state, for health, metrics and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    """Counts at one moment; the cumulative ones grow from engine start."""

    num_running: int  # sequences holding KV blocks
    num_waiting: int  # sequences queued (new or preempted)
    num_free_blocks: int  # includes cached blocks no sequence holds (evictable)
    num_total_blocks: int
    block_size: int
    num_preemptions: int  # cumulative
    prefix_cache_queried_tokens: int  # cumulative prompt tokens looked up in the prefix cache
    prefix_cache_hit_tokens: int  # cumulative tokens served from it
    num_steps: int  # cumulative
    num_generated_tokens: int  # cumulative
    # LoRA (empty when off): requests running and waiting per adapter name, and the adapters a step can hold.
    lora_running: tuple[tuple[str, int], ...] = ()
    lora_waiting: tuple[tuple[str, int], ...] = ()
    max_loras: int = 0
    # Speculative decoding, cumulative: sequence-steps verified, tokens proposed, proposed tokens accepted.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of blocks held by sequences."""
        return 1.0 - self.num_free_blocks / self.num_total_blocks if self.num_total_blocks else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.prefix_cache_queried_tokens
        return self.prefix_cache_hit_tokens / q if q else 0.0

    @property
    def spec_mean_acceptance_length(self) -> float:
        """Tokens per verified sequence-step (1 + accepted per proposal); 0 without speculation."""
        return 1.0 + self.spec_num_accepted_tokens / self.spec_num_drafts if self.spec_num_drafts else 0.0
