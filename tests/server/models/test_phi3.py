"""Phi-3 / Phi-4-mini (fused q/k/v and gate/up in the checkpoint, LongRoPE, partial rotary, sliding window),
loaded by our loader from safetensors and from GGUF, matches transformers."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from family_checks import engine_greedy, hf_greedy
from paged_runner import PagedRunner, save_tiny_tokenizer
from transformers import AutoModelForCausalLM, Phi3Config
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from weir_server.config import ModelConfig
from weir_server.layers.rotary import get_rope
from weir_server.models.loader import load_model
from weir_server.models.phi3 import Phi3ForCausalLM

VOCAB = 160
ORIGINAL_MAX = 32  # LongRoPE's pretraining length; the parity prompts stay below it
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def longrope_config() -> Phi3Config:
    """Phi-4-mini's shape in small: 3/4 of each 16-wide head rotates (6 frequencies), LongRoPE, tied embeddings."""
    return Phi3Config(
        **COMMON,
        partial_rotary_factor=0.75,
        original_max_position_embeddings=ORIGINAL_MAX,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0],
            "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
        },
        tie_word_embeddings=True,
    )


CONFIGS = {
    "phi4-mini-longrope-partial-rotary-tied": longrope_config,
    "phi3-sliding-window": lambda: Phi3Config(**COMMON, sliding_window=6, tie_word_embeddings=False),
}

PROMPTS = [
    [5, 17, 33, 9, 100],
    [40, 41, 42, 7, 8, 9, 120, 3, 77, 150, 11],
    [12, 99, 23, 54, 65, 76, 87, 98, 109, 110, 121, 132, 143, 154, 4, 15, 26],
]


def random_hf_model(hf_config: Phi3Config, seed: int = 0):
    torch.manual_seed(seed)
    hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():  # norm scales start at 1; random ones show a scale applied to the wrong features
        for name, param in hf_model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return hf_model


@pytest.fixture(params=sorted(CONFIGS), scope="module")
def models(request, tmp_path_factory):
    """(transformers model, our LoadedModel) with the same random weights, via save_pretrained."""
    hf_model = random_hf_model(CONFIGS[request.param]())
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory)
    save_tiny_tokenizer(directory, VOCAB)
    loaded = load_model(ModelConfig(str(directory), device="cpu", dtype="float32"))  # parity is checked in fp32
    return hf_model, loaded


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()


def assert_chunked_prefill_and_decode_match(hf_model, loaded) -> None:
    runner = PagedRunner(loaded.model, loaded.hf_config, block_size=4)
    seqs = [list(p) for p in PROMPTS]
    steps = [
        [(0, seqs[0]), (1, seqs[1]), (2, seqs[2][:7])],
        [(0, [61]), (1, [62]), (2, seqs[2][7:])],
        [(0, [63]), (1, [64]), (2, [65])],
    ]
    history: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for chunks in steps:
        ours = runner.step(chunks)
        for (seq_id, tokens), logits in zip(chunks, ours, strict=True):
            history[seq_id] += tokens
            expected = hf_logits(hf_model, history[seq_id])[-len(tokens) :]
            torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)


def test_loader_builds_phi3_for_its_architecture(models):
    _, loaded = models
    assert loaded.architecture == "Phi3ForCausalLM"
    assert isinstance(loaded.model, Phi3ForCausalLM)
    assert loaded.task == "generate"
    assert loaded.vocab_size == VOCAB
    assert 2 in loaded.eos_token_ids


def test_chunked_prefill_and_decode_logits_match_transformers(models):
    hf_model, loaded = models
    assert_chunked_prefill_and_decode_match(hf_model, loaded)


def test_engine_greedy_tokens_match_transformers_with_prefix_caching(models):
    hf_model, loaded = models
    # The last prompt shares its first 8 tokens (two blocks) with the second and arrives after it has run.
    late = PROMPTS[1][:8] + [90, 91, 92]
    ours = engine_greedy(loaded, {0: PROMPTS, 2: [late]}, max_tokens=8)
    for prompt, tokens in zip([*PROMPTS, late], ours, strict=True):
        expected = hf_greedy(hf_model, prompt, 8)
        assert tokens[: len(expected)] == expected  # transformers stops early at EOS


def test_longrope_uses_short_factors_below_the_pretraining_length_and_long_ones_past_it():
    config = longrope_config()
    hf_rope = Phi3RotaryEmbedding(config)
    ours = get_rope(config, head_dim=16)
    assert ours.rotary_dim == 12
    x = torch.zeros(1, dtype=torch.float32)
    for length in (ORIGINAL_MAX, 2 * ORIGINAL_MAX):  # transformers picks the factors by the sequence length
        positions = torch.arange(length)
        hf_cos, hf_sin = hf_rope(x, positions[None])
        cos, sin = ours(positions, torch.float32)
        compared = slice(0, length) if length <= ORIGINAL_MAX else slice(ORIGINAL_MAX, length)
        torch.testing.assert_close(cos[compared, 0], hf_cos[0, compared, :6])
        torch.testing.assert_close(sin[compared, 0], hf_sin[0, compared, :6])


def test_longrope_position_table_for_the_fused_kernel_matches_the_torch_path():
    ours = get_rope(longrope_config(), head_dim=16)
    table = ours.cos_sin_cache(torch.device("cpu"))
    cos, sin = ours(torch.arange(table.shape[0]), torch.float32)
    torch.testing.assert_close(table, torch.cat((cos[:, 0], sin[:, 0]), dim=-1))


GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_up_proj": "ffn_up",  # gate and up, fused like the safetensors checkpoint
    "mlp.down_proj": "ffn_down",
}


def write_phi3_gguf(hf_model, path) -> None:
    """The model as an fp32 GGUF of llama.cpp's `phi3` layout (metadata transformers maps to a Phi3Config)."""
    config = hf_model.config
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_embedding_length(config.hidden_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)  # else transformers assumes Phi-3's 32000, outside this vocabulary
    names = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
    for i in range(config.num_hidden_layers):
        names |= {f"model.layers.{i}.{hf}.weight": f"blk.{i}.{ours}" for hf, ours in GGUF_NAMES.items()}
    state = hf_model.state_dict()
    for hf_name, gguf_name in names.items():
        writer.add_tensor(f"{gguf_name}.weight", state[hf_name].numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_logits_and_greedy_tokens_match_transformers_loading_the_same_file(tmp_path):
    hf_model = random_hf_model(Phi3Config(**COMMON, tie_word_embeddings=False), seed=1)
    write_phi3_gguf(hf_model, tmp_path / "tiny-phi3.gguf")
    tokenizer_dir = tmp_path / "tokenizer"
    save_tiny_tokenizer(tokenizer_dir, VOCAB)
    loaded = load_model(
        ModelConfig(str(tmp_path / "tiny-phi3.gguf"), device="cpu", dtype="float32", tokenizer=str(tokenizer_dir))
    )
    assert loaded.architecture == "Phi3ForCausalLM"
    hf_gguf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny-phi3.gguf", dtype=torch.float32)
    assert_chunked_prefill_and_decode_match(hf_gguf.eval(), loaded)
    ours = PagedRunner(loaded.model, loaded.hf_config, block_size=4).greedy(PROMPTS, max_new_tokens=8)
    for prompt, tokens in zip(PROMPTS, ours, strict=True):
        expected = hf_greedy(hf_gguf, prompt, 8)
        assert tokens[: len(expected)] == expected


def test_two_tensor_parallel_ranks_cut_the_fused_checkpoint_tensors_per_rank(tmp_path):
    """Each rank reads its own heads out of the fused q/k/v rows and its own columns out of the fused gate/up
    rows; with one KV head both ranks hold the same k and v."""
    from weir_server.config import CacheConfig, EngineConfig, ExecutorConfig, ParallelConfig, SchedulerConfig
    from weir_server.engine.core import EngineCore
    from weir_server.engine.types import GenerationRequest, SamplingParams
    from weir_server.executor.tp_executor import launch

    hf_config = longrope_config()
    hf_config.num_key_value_heads = 1
    hf_model = random_hf_model(hf_config, seed=2)
    hf_model.save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path, VOCAB)
    config = EngineConfig(
        model=ModelConfig(str(tmp_path), dtype="float32", device="cpu"),
        cache=CacheConfig(block_size=4, num_blocks=64),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16),
        executor=ExecutorConfig(num_threads=1),
        parallel=ParallelConfig(tensor_parallel_size=2, collective_timeout_s=60),
    )
    executor = launch(config, on_worker_death=lambda reason: None)
    assert executor is not None
    try:
        engine = EngineCore(load_model(config.model), config, publisher=executor)
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(GenerationRequest(str(i), prompt, params))
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
    finally:
        executor.shutdown()
    for i, prompt in enumerate(PROMPTS):
        expected = hf_greedy(hf_model, prompt, 6)
        assert tokens[str(i)][: len(expected)] == expected
