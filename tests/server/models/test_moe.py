"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) match transformers' own classes, and the batched
expert computation matches a plain per-token loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from family_checks import (
    PROMPTS,
    TINY,
    assert_chunked_prefill_and_decode_match,
    assert_engine_greedy_matches,
    models_fixture,
)
from paged_runner import PagedRunner
from safetensors.torch import load_file
from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from weir_server.config import ModelConfig
from weir_server.distributed import parallel_state
from weir_server.layers.fused_moe import FusedMoE, fused_experts_torch, fused_moe, select_experts
from weir_server.models.loader import load_model

COMMON = TINY | dict(num_experts_per_tok=2)

CONFIGS = {
    "mixtral": lambda: MixtralConfig(**COMMON, intermediate_size=96, num_local_experts=8, tie_word_embeddings=False),
    # Layer 0 dense (off the sparse stride), layer 1 routed experts plus the gated shared expert.
    "qwen2-moe": lambda: Qwen2MoeConfig(
        **COMMON,
        intermediate_size=96,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=80,
        num_experts=6,
        decoder_sparse_step=2,
        norm_topk_prob=False,
        tie_word_embeddings=True,
    ),
    # Layer 0 dense by `mlp_only_layers`; q/k norm; renormalized top-k.
    "qwen3-moe": lambda: Qwen3MoeConfig(
        **COMMON,
        head_dim=24,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_experts=4,
        mlp_only_layers=[0],
        norm_topk_prob=True,
        tie_word_embeddings=False,
    ),
}


def naive_moe(hidden, w13, w2, router_logits, top_k: int, renormalize: bool) -> torch.Tensor:
    """One token at a time, one expert at a time: the definition."""
    out = torch.zeros_like(hidden, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        probs = torch.softmax(router_logits[t].double(), dim=-1)
        weights, experts = torch.topk(probs, top_k)
        if renormalize:
            weights = weights / weights.sum()
        for weight, e in zip(weights.tolist(), experts.tolist(), strict=True):
            gate, up = (w13[e].double() @ hidden[t].double()).chunk(2)
            out[t] += weight * (w2[e].double() @ (F.silu(gate) * up))
    return out


def random_moe(num_tokens: int, experts: int, hidden: int, inter: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(num_tokens, hidden, generator=g),
        torch.randn(experts, 2 * inter, hidden, generator=g) * 0.2,
        torch.randn(experts, hidden, inter, generator=g) * 0.2,
        torch.randn(num_tokens, experts, generator=g) * 2,
    )


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize(("num_tokens", "experts", "top_k"), [(1, 4, 2), (37, 8, 2), (5, 8, 1), (64, 6, 3)])
def test_batched_experts_match_a_per_token_loop(num_tokens, experts, top_k, renormalize):
    hidden, w13, w2, logits = random_moe(num_tokens, experts, 24, 16, seed=num_tokens + experts)
    got = fused_moe(hidden, w13, w2, logits, top_k, renormalize)
    want = naive_moe(hidden, w13, w2, logits, top_k, renormalize)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)  # float32 against float64


def test_experts_no_token_chose_are_skipped():
    hidden, w13, w2, _ = random_moe(6, 8, 16, 8, seed=3)
    ids = torch.tensor([[0, 5]] * 6)  # experts 1-4, 6, 7 get nothing
    weights = torch.full((6, 2), 0.5)
    got = fused_experts_torch(hidden, w13, w2, weights, ids)
    gate0, up0 = F.linear(hidden, w13[0]).chunk(2, -1)
    gate5, up5 = F.linear(hidden, w13[5]).chunk(2, -1)
    want = 0.5 * F.linear(F.silu(gate0) * up0, w2[0]) + 0.5 * F.linear(F.silu(gate5) * up5, w2[5])
    torch.testing.assert_close(got, want)


def test_routing_renormalizes_only_when_asked():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    kept, ids = select_experts(logits, 2, renormalize=False)
    normed, _ = select_experts(logits, 2, renormalize=True)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(kept, torch.softmax(logits, -1)[:, :2])
    torch.testing.assert_close(normed.sum(-1), torch.ones(1))


def test_tensor_parallel_expert_shards_sum_to_the_whole(monkeypatch):
    hidden, w13, w2, logits = random_moe(9, 4, 16, 12, seed=5)
    full = fused_moe(hidden, w13, w2, logits, 2, True)
    partial_sums = torch.zeros_like(full)
    for rank in range(2):
        with monkeypatch.context() as patch:
            patch.setattr(parallel_state, "_state", parallel_state.ParallelState(rank, 2))
            layer = FusedMoE(4, 2, 16, 12, renormalize=True)
        for e in range(4):  # the checkpoint's per-expert tensors, each rank taking its intermediate features
            gate, up = w13[e].split(12)
            layer.weight_loader(layer.w13_weight, gate, "w1", (e, "w1"))
            layer.weight_loader(layer.w13_weight, up, "w3", (e, "w3"))
            layer.weight_loader(layer.w2_weight, w2[e], "w2", (e, "w2"))
        assert layer.w13_weight.shape == (4, 12, 16) and layer.w2_weight.shape == (4, 16, 6)
        partial_sums += fused_moe(hidden, layer.w13_weight, layer.w2_weight, logits, 2, True)  # before all-reduce
    torch.testing.assert_close(partial_sums, full, atol=1e-5, rtol=1e-5)

    # save_pretrained writes per-expert tensors, as published checkpoints hold them


models = models_fixture(CONFIGS)


def test_loader_picks_the_family_class(models):
    hf_model, loaded = models
    assert loaded.architecture == hf_model.config.architectures[0]
    assert type(loaded.model).__name__ == hf_model.config.architectures[0]


def test_chunked_prefill_and_decode_logits_match_transformers(models):
    hf_model, loaded = models
    assert_chunked_prefill_and_decode_match(hf_model, loaded)


def test_engine_greedy_tokens_match_transformers_generate(models):
    hf_model, loaded = models
    # The last prompt repeats the third's first 12 tokens (three blocks) and arrives after it has run, so its first
    # blocks come from the prefix cache.
    late = PROMPTS[2][:12] + [7, 7]
    assert_engine_greedy_matches(hf_model, loaded, late)


def test_dummy_weights_fill_the_stacked_experts(models):
    _, loaded = models
    dummy = load_model(ModelConfig(loaded.model_id, load_format="dummy", seed=3, device="cpu"))
    experts = [m for m in dummy.model.modules() if isinstance(m, FusedMoE)]
    assert experts and all(e.w13_weight.std() > 0.05 for e in experts)
    logits = PagedRunner(dummy.model, dummy.hf_config).step([(0, PROMPTS[0])])[0]
    assert torch.isfinite(logits).all()


def test_a_missing_expert_is_reported(models):
    _, loaded = models
    checkpoint = load_file(f"{loaded.model_id}/model.safetensors")
    weights = [(name, t) for name, t in checkpoint.items() if ".experts.1." not in name]
    with pytest.raises(ValueError, match=r"missing .*experts\.w(13|2)_weight"):
        type(loaded.model)(loaded.hf_config).load_weights(weights)
