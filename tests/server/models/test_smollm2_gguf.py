"""The packaged SmolLM2 GGUF through our loader and paged model against transformers loading the same file."""

from __future__ import annotations

import pytest
import torch
from paged_runner import PagedRunner
from transformers import AutoModelForCausalLM

from weir_server.config import ModelConfig
from weir_server.models.loader import load_model
from weir_server.models.registry import resolve_source

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    loaded = load_model(ModelConfig("smollm2-135m-instruct", device="cpu", dtype="float32"))  # fp32 parity
    source = resolve_source("smollm2-135m-instruct")
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(source.directory), gguf_file=source.gguf_file, dtype=torch.float32
    ).eval()
    prompt = loaded.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    if not isinstance(prompt, list):
        prompt = prompt["input_ids"]
    return loaded, hf_model, list(prompt)


def test_packaged_model_metadata(smollm2):
    loaded, _, _ = smollm2
    assert loaded.architecture == "LlamaForCausalLM"
    assert loaded.task == "generate"
    assert loaded.max_model_len == 8192
    assert loaded.vocab_size == 49152
    assert loaded.tokenizer.convert_tokens_to_ids("<|im_end|>") in loaded.eos_token_ids


def test_prompt_logits_match_transformers(smollm2):
    loaded, hf_model, prompt = smollm2
    ours = PagedRunner(loaded.model, loaded.hf_config, block_size=16, num_blocks=64).step([(0, prompt)])[0]
    with torch.no_grad():
        expected = hf_model(torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(ours, expected, atol=2e-3, rtol=1e-3)


def test_greedy_answer_matches_transformers_and_names_paris(smollm2):
    loaded, hf_model, prompt = smollm2
    runner = PagedRunner(loaded.model, loaded.hf_config, block_size=16, num_blocks=64)
    ours = runner.greedy([prompt], max_new_tokens=12)[0]
    # transformers' greedy choice at each step, teacher-forced on our tokens: if every choice equals ours,
    # generate() would produce exactly our tokens, and this costs one forward instead of twelve.
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + ours[:-1]])).logits[0]
    expected = logits[len(prompt) - 1 :].argmax(-1).tolist()
    assert ours == expected
    assert "Paris" in loaded.tokenizer.decode(ours, skip_special_tokens=True)


def _packed_bf16_smollm2():
    from weir_server.kernels.cpu_ops import cpu_ops
    from weir_server.layers.cpu_linear import pack_linear_layers

    model = load_model(ModelConfig("smollm2-135m-instruct", device="cpu", dtype="bfloat16")).model
    if cpu_ops() is None or pack_linear_layers(model) == 0:
        pytest.skip("no oneDNN packing or C++ ops in this torch build")
    return model


def test_bf16_cpu_layers_read_the_files_blocks_for_steps_of_a_few_rows():
    """A bf16 CPU load keeps the file's blocks beside the packed bf16 copies: every projection's Q4_1 rows and the
    head's (the tied embedding's) Q8_0 rows, in the C++ ops' layouts, for steps of a few rows; those agree with the
    bf16 copies (larger steps) to bf16's rounding and give the same argmax."""
    from weir_server.layers.cpu_linear import PackedGateUpSilu, PackedLinear, PackedLMHead
    from weir_server.layers.gguf_weights import INT4_MAX_ROWS, INT8_OP_MAX_ROWS, Int4Rows, Int8BlockRows

    model = _packed_bf16_smollm2()
    assert model.prepare_cpu_decode()  # the decode layers run in one C++ call
    layer = model.model.layers[0]
    for module in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert type(module) in (PackedLinear, PackedGateUpSilu)
        (part,) = module.parts
        assert isinstance(part, Int4Rows) and part.qtype.name == "Q4_1" and part.packed is not None
    head = model.lm_head
    assert isinstance(head, PackedLMHead)
    (part,) = head.parts
    assert isinstance(part, Int8BlockRows) and part.qtype.name == "Q8_0" and part.packed is not None
    generator = torch.Generator().manual_seed(0)
    for module, rows, cols in ((head, INT8_OP_MAX_ROWS, 576), (layer.mlp.down_proj, INT4_MAX_ROWS, 1536)):
        hidden = torch.randn(rows + 1, cols, generator=generator).bfloat16()
        run = module.compute_logits if module is head else module
        batched = run(hidden).float()  # more rows than the blocks take: the packed bf16 weight
        for i in range(rows):
            one = run(hidden[i : i + 1]).float()[0]  # one row: the file's blocks
            torch.testing.assert_close(one, batched[i], atol=0.1, rtol=2**-6)
            if module is head:
                assert one.argmax() == batched[i].argmax()


def test_bf16_cpu_tied_embedding_looks_its_rows_up_in_the_heads_int8_layout_bit_for_bit():
    """The tied embedding holds no bf16 matrix: its rows come from the head's copy of the file's Q8_0 rows, equal
    to the file's values rounded to bf16 for every token, in any order and with repeats."""
    from weir_server.kernels.gguf_dequant import dequantize
    from weir_server.models.checkpoint_checks import open_gguf
    from weir_server.models.gguf_tensors import int8_head_rows

    model = _packed_bf16_smollm2()
    source = resolve_source("smollm2-135m-instruct")
    raw, qtype = int8_head_rows(open_gguf(source.directory / str(source.gguf_file)), tied=True)
    weight = dequantize(raw, qtype).bfloat16()
    embedding = model.model.embed_tokens
    assert embedding.parts is model.lm_head.parts  # one copy of the matrix
    ids = torch.cat([torch.arange(weight.shape[0]).flip(0), torch.tensor([7, 7, 0, 49151])]).view(2, -1)
    assert torch.equal(embedding(ids), weight[ids])
