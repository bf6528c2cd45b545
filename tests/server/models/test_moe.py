"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) match transformers' own classes, and the batched
expert computation matches a plain per-token loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from family_checks import (
    PROMPTS,
    TINY,
    VOCAB,
    assert_chunked_prefill_and_decode_match,
    assert_engine_greedy_matches,
    assert_greedy_matches,
    finish_gguf,
    gguf_writer,
    hf_logits,
    models_fixture,
    random_causal_lm,
)
from paged_runner import PagedRunner, save_tiny_tokenizer
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


# --- GGUF: Qwen2-MoE and Qwen3-MoE files written here with the `gguf` package, experts stacked as llama.cpp stores them
# ([E, I, H] gate and up, [E, H, I] down), at expert sizes other than the config classes' defaults, which only the
# file's metadata carries (transformers' own GGUF reader drops those keys and refuses such a file, so the reference
# is the model the file was written from).

GGUF_CONFIGS = {
    "qwen2moe": lambda: Qwen2MoeConfig(
        **COMMON, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=80, num_experts=4,
        decoder_sparse_step=1, norm_topk_prob=False, tie_word_embeddings=False,
    ),
    # llama.cpp renormalizes Qwen3-MoE's routing weights, as its checkpoints ask.
    "qwen3moe": lambda: Qwen3MoeConfig(
        **COMMON, head_dim=24, intermediate_size=96, moe_intermediate_size=32, num_experts=4, norm_topk_prob=True,
        tie_word_embeddings=False,
    ),
}  # fmt: skip


def _round_trip(tensor: torch.Tensor, qtype) -> tuple[np.ndarray, torch.Tensor]:
    """(the bytes to write, the weights they hold): float32 as it is, or quantized to `qtype` along the last dim."""
    from gguf import GGMLQuantizationType, quants

    values = tensor.float().contiguous().numpy()
    if qtype == GGMLQuantizationType.F32:
        return values, tensor.float()
    packed = quants.quantize(values, qtype)
    return packed, torch.from_numpy(quants.dequantize(packed, qtype).reshape(values.shape).copy())


def write_moe_gguf(hf_model, path: Path, expert_type, up_type=None, expert_count: int | None = None) -> None:
    """The model under llama.cpp's names, its experts (and only they) in `expert_type` (the up matrices in `up_type`
    where given); the model's experts are set to the values the file holds, so the model stays the reference.
    `expert_count` overrides the metadata's (a file that contradicts its own tensors)."""
    import gguf

    config = hf_model.config
    arch = gguf.MODEL_ARCH.QWEN3MOE if config.model_type == "qwen3_moe" else gguf.MODEL_ARCH.QWEN2MOE
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    head_dim = config.head_dim if arch == gguf.MODEL_ARCH.QWEN3MOE else None
    writer = gguf_writer(path, gguf.MODEL_ARCH_NAMES[arch], config, head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_expert_count(expert_count or config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if arch == gguf.MODEL_ARCH.QWEN2MOE:
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    with torch.no_grad():
        for hf_name, tensor in hf_model.state_dict().items():
            block = hf_name.split(".")[2] if ".layers." in hf_name else None
            if hf_name.endswith("experts.gate_up_proj"):
                inter = tensor.shape[1] // 2
                gate, held_gate = _round_trip(tensor[:, :inter], expert_type)
                up, held_up = _round_trip(tensor[:, inter:], up_type or expert_type)
                tensor.copy_(torch.cat((held_gate, held_up), dim=1))
                writer.add_tensor(f"blk.{block}.ffn_gate_exps.weight", gate, raw_dtype=expert_type)
                writer.add_tensor(f"blk.{block}.ffn_up_exps.weight", up, raw_dtype=up_type or expert_type)
            elif hf_name.endswith("experts.down_proj"):
                down, held = _round_trip(tensor, expert_type)
                tensor.copy_(held)
                writer.add_tensor(f"blk.{block}.ffn_down_exps.weight", down, raw_dtype=expert_type)
            else:
                name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                assert name is not None, hf_name
                data = tensor.float().numpy()
                writer.add_tensor(name, data.reshape(-1) if name.endswith("ffn_gate_inp_shexp.weight") else data)
    finish_gguf(writer)


@pytest.mark.parametrize("expert_type", ["F32", "Q8_0", "Q4_0", "Q4_0+Q8_0"])  # the last: gate/down Q4_0, up Q8_0
@pytest.mark.parametrize("name", sorted(GGUF_CONFIGS))
@pytest.mark.parametrize("keep_quantized", [False, True], ids=["dequantized", "packed"])
def test_gguf_moe_logits_and_greedy_tokens_match_the_model_it_was_written_from(
    name, expert_type, keep_quantized, tmp_path
):
    from gguf import GGMLQuantizationType

    hf_model = random_causal_lm(GGUF_CONFIGS[name]())
    types = [GGMLQuantizationType[t] for t in expert_type.split("+")]
    write_moe_gguf(hf_model, tmp_path / "tiny.gguf", types[0], types[-1])
    save_tiny_tokenizer(tmp_path / "tokenizer", VOCAB)
    config = ModelConfig(
        str(tmp_path / "tiny.gguf"), tokenizer=str(tmp_path / "tokenizer"), device="cpu", dtype="float32",
        keep_quantized=keep_quantized,
    )  # fmt: skip
    loaded = load_model(config)
    assert loaded.architecture == type(hf_model).__name__
    ours = PagedRunner(loaded.model, loaded.hf_config, block_size=4).step([(0, PROMPTS[2])])[0]
    torch.testing.assert_close(ours, hf_logits(hf_model, PROMPTS[2]), atol=2e-4, rtol=1e-4)
    generated = PagedRunner(loaded.model, loaded.hf_config, block_size=4).greedy(PROMPTS, max_new_tokens=6)
    assert_greedy_matches(hf_model, PROMPTS, generated, 6)
    experts = [m for m in loaded.model.modules() if isinstance(m, FusedMoE)]
    packed = keep_quantized and expert_type != "F32"  # float experts have no packed form
    assert experts and all((getattr(m, "gate_up", None) is not None) == packed for m in experts)


_CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
)


@pytest.mark.parametrize("device", ["cpu", _CUDA])
@pytest.mark.parametrize("expert_type", ["Q8_0", "Q4_0"])
def test_packed_bf16_experts_stay_close_to_dequantized_ones_and_hold_fewer_bytes(expert_type, device, tmp_path):
    """The serving dtype against the same file dequantized to bf16: on a CPU the C++ integer-dot ops on each
    expert's packed rows (activations split into two int8 levels: far under bf16's own rounding), on CUDA the fused
    kernel on the layer's planes."""
    from gguf import GGMLQuantizationType

    hf_model = random_causal_lm(GGUF_CONFIGS["qwen3moe"]())
    write_moe_gguf(hf_model, tmp_path / "tiny.gguf", GGMLQuantizationType[expert_type])
    save_tiny_tokenizer(tmp_path / "tokenizer", VOCAB)
    logits, held = {}, {}
    form = "planes" if device == "cuda" else "gate_up"
    for packed in (False, True):
        config = ModelConfig(
            str(tmp_path / "tiny.gguf"), tokenizer=str(tmp_path / "tokenizer"), device=device, dtype="bfloat16",
            keep_quantized=packed,
        )  # fmt: skip
        loaded = load_model(config)
        experts = [m for m in loaded.model.modules() if isinstance(m, FusedMoE)]
        assert all((getattr(m, form, None) is not None) == packed for m in experts)
        held[packed] = sum(t.numel() * t.element_size() for m in experts for t in (*m.parameters(), *m.buffers()))
        logits[packed] = PagedRunner(loaded.model, loaded.hf_config, block_size=4).step([(0, PROMPTS[2])])[0]
    error = (logits[True].float() - logits[False].float()).norm() / logits[False].float().norm()
    assert error < 2e-2, error
    assert held[True] < held[False] * (0.7 if expert_type == "Q8_0" else 0.45), held


@pytest.mark.parametrize("keep_quantized", [False, True], ids=["dequantized", "packed"])
def test_a_gguf_whose_experts_contradict_its_metadata_fails_at_load_naming_them(keep_quantized, tmp_path):
    from gguf import GGMLQuantizationType

    from weir_server.errors import ModelLoadError

    hf_model = random_causal_lm(GGUF_CONFIGS["qwen3moe"]())
    write_moe_gguf(hf_model, tmp_path / "tiny.gguf", GGMLQuantizationType.Q8_0, expert_count=6)  # the file holds 4
    save_tiny_tokenizer(tmp_path / "tokenizer", VOCAB)
    config = ModelConfig(
        str(tmp_path / "tiny.gguf"), tokenizer=str(tmp_path / "tokenizer"), device="cpu", keep_quantized=keep_quantized
    )
    with pytest.raises(
        ModelLoadError, match=r"tiny\.gguf: tensor 'blk\.0\.[\w.]+' has shape \(4, 64\), but .* is \(6, 64\)"
    ) as exc:
        load_model(config)
    assert "\n" not in str(exc.value)
