"""On a GPU: the multi-LoRA Triton kernels against their torch reference, and an engine whose decode steps replay
CUDA graphs with the LoRA kernels inside, mixing the base model and adapters, against transformers + peft."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from lora_helpers import PROMPTS, lora_engine_config, run_requests, save_model, tiny_llama, write_adapter

from weir_server.config import ExecutorConfig, LoRAConfig, ModelConfig
from weir_server.engine.core import EngineCore
from weir_server.models.loader import load_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("kernel", ["bgmv", "sgmv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("num_tokens", "slices", "rank"), [(1, (96,), 8), (37, (64, 32, 32), 16), (300, (128, 128), 64)]
)
def test_kernel_matches_reference(kernel, dtype, num_tokens, slices, rank):
    from weir_server.kernels.lora import lora_apply, lora_apply_sgmv, lora_ref

    torch.manual_seed(num_tokens)
    device, k, loras = "cuda", 256, 4
    x = torch.randn(num_tokens, k, device=device, dtype=dtype)
    lora_a = torch.randn(loras, len(slices) * rank, k, device=device, dtype=dtype) * 0.1
    lora_b = torch.randn(loras, sum(slices), rank, device=device, dtype=dtype) * 0.1
    slots = torch.randint(-1, loras, (num_tokens,), device=device)
    row_offset = torch.cat([torch.full((n,), i * rank, dtype=torch.int32) for i, n in enumerate(slices)]).to(device)
    base = torch.randn(num_tokens, sum(slices), device=device, dtype=dtype)
    expected = lora_ref(x.double(), base.double().clone(), lora_a.double(), lora_b.double(), slots, row_offset)
    if kernel == "sgmv":
        got = lora_apply_sgmv(x, base.clone(), lora_a, lora_b, slots, row_offset, 32)
    else:
        got = lora_apply(x, base.clone(), lora_a, lora_b, slots, row_offset)
    error = (got.double() - expected).norm() / expected.norm()
    assert error < (1e-5 if dtype == torch.float32 else 1e-2), error
    untouched = slots < 0
    assert torch.equal(got[untouched], base[untouched])  # base-model rows are left exactly alone


@pytest.mark.parametrize("sgmv", [False, True])
def test_cuda_graph_decode_with_adapters_matches_eager_and_the_cpu(sgmv, tmp_path, monkeypatch):
    """peft is not needed here: the CPU path is held to peft by the other tests, and this one holds the GPU to it.
    Both kernels run under the graphs: per token (BGMV) and grouped by adapter (SGMV)."""
    import weir_server.layers.lora

    monkeypatch.setattr(weir_server.layers.lora, "USE_SGMV", sgmv)
    hf_model = tiny_llama()
    save_model(hf_model, tmp_path / "base")
    write_adapter(hf_model.config, tmp_path / "a", rank=8, seed=40)
    write_adapter(hf_model.config, tmp_path / "b", rank=4, use_rslora=True, seed=41)
    config = lora_engine_config(tmp_path / "base", LoRAConfig(max_lora_rank=16, max_loras=2))
    requests = [(PROMPTS[0], None), (PROMPTS[1], "a"), (PROMPTS[2], "b"), (PROMPTS[3], "a"), (PROMPTS[1], None)]
    results = {}
    for device, eager in (("cuda", False), ("cuda", True), ("cpu", True)):
        run_config = dataclasses.replace(
            config,
            model=ModelConfig(str(tmp_path / "base"), device=device, dtype="float32"),
            executor=ExecutorConfig(enforce_eager=eager, cuda_graph_max_batch=8),
        )
        core = EngineCore(load_model(run_config.model), run_config)
        assert (core.runner.graphs is None) == (eager or device == "cpu")
        for name in ("a", "b"):
            core.add_adapter(core.read_adapter(name, str(tmp_path / name)))
        results[device, eager] = run_requests(core, requests, max_tokens=10)
        del core
    assert results["cuda", False] == results["cuda", True] == results["cpu", True]
    assert results["cpu", True][1] != results["cpu", True][4]  # adapter a changes the answer of the same prompt
