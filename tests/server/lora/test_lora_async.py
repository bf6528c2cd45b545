"""LoRA through the AsyncEngine, with the core on a thread and in its own process: load, list, generate, unload
with requests in flight, and errors that reach the caller as Weir's own exceptions."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from lora_helpers import (
    PROMPTS,
    greedy_params,
    lora_engine_config,
    make_peft_model,
    reference_greedy,
    save_model,
    tiny_llama,
)

from weir_server.config import ExecutorConfig, LoRAConfig
from weir_server.engine.async_engine import AsyncEngine
from weir_server.engine.factory import create_engine, load_engine
from weir_server.engine.types import AdapterInfo, GenerationRequest
from weir_server.errors import InvalidRequestError, NotFoundError
from weir_server.models.loader import load_model

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-async")
    hf_model = tiny_llama()
    save_model(hf_model, root / "base")
    folders = {name: root / name for name in ("a", "b")}
    peft_models = {
        name: make_peft_model(hf_model, folders[name], rank=4, seed=20 + i) for i, name in enumerate(folders)
    }
    return hf_model, root / "base", peft_models, folders


def _config(base, core: str, lora: LoRAConfig | None = None):
    config = lora_engine_config(base, lora or LoRAConfig(max_lora_rank=8, max_loras=2))
    return dataclasses.replace(config, executor=ExecutorConfig(num_threads=1, engine_core=core, enforce_eager=True))


async def _engine(config) -> AsyncEngine:
    if config.executor.engine_core == "process":
        engine = create_engine(load_model(config.model, "generate", weights=False), config)
    else:
        engine = await asyncio.to_thread(load_engine, config)
    await engine.start()
    return engine


async def _tokens(engine: AsyncEngine, request_id: str, prompt, adapter, max_tokens: int) -> list[int]:
    tokens: list[int] = []
    async for output in engine.generate(
        GenerationRequest(request_id, prompt, greedy_params(max_tokens), adapter=adapter)
    ):
        assert output.error is None, output.error
        tokens += output.token_ids
    return tokens


@pytest.mark.parametrize("core", ["thread", "process"])
async def test_load_generate_and_unload_with_requests_in_flight(family, core):
    hf_model, base, peft_models, folders = family
    lora = LoRAConfig(max_lora_rank=8, max_loras=2, lora_modules=(("a", str(folders["a"])),))
    engine = await _engine(_config(base, core, lora))
    try:
        assert [info.name for info in engine.list_adapters()] == ["a"]
        info = await engine.load_adapter("b", str(folders["b"]))
        assert info == AdapterInfo(
            "b",
            str(folders["b"]),
            4,
            16.0,
            ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            engine.model_id,
        )
        assert [i.name for i in engine.list_adapters()] == ["a", "b"]
        # 16 streams over the base model and both adapters, with b unloaded while they run.
        jobs = [
            asyncio.create_task(_tokens(engine, f"r{i}", PROMPTS[i % 4], (None, "a", "b")[i % 3], 12))
            for i in range(16)
        ]
        await asyncio.sleep(0)
        await engine.unload_adapter("b")
        with pytest.raises(NotFoundError, match="'b' is not loaded"):
            engine.generate(GenerationRequest("late", PROMPTS[0], greedy_params(2), adapter="b"))
        results = await asyncio.gather(*jobs)
        for i, tokens in enumerate(results):
            adapter = (None, "a", "b")[i % 3]
            reference = hf_model if adapter is None else peft_models[adapter]
            assert tokens == reference_greedy(reference, PROMPTS[i % 4], 12), (i, adapter)
        assert [i.name for i in engine.list_adapters()] == ["a"]
        assert engine.stats().max_loras == 2
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("core", ["thread", "process"])
async def test_errors_reach_the_caller_and_the_engine_keeps_serving(family, core, tmp_path):
    hf_model, base, peft_models, folders = family
    engine = await _engine(_config(base, core))
    try:
        with pytest.raises(InvalidRequestError, match="adapter_config.json is missing") as error:
            await engine.load_adapter("x", str(tmp_path / "nowhere"))
        assert error.value.field == "path"
        make_peft_model(hf_model, tmp_path / "big", rank=16)
        with pytest.raises(InvalidRequestError, match="exceeds --max-lora-rank 8"):
            await engine.load_adapter("big", str(tmp_path / "big"))
        await engine.load_adapter("a", str(folders["a"]))
        with pytest.raises(InvalidRequestError, match="already loaded"):
            await engine.load_adapter("a", str(folders["b"]))
        with pytest.raises(NotFoundError):
            await engine.unload_adapter("nope")
        with pytest.raises(NotFoundError, match="'nope' is not loaded"):
            engine.generate(GenerationRequest("x", PROMPTS[0], greedy_params(2), adapter="nope"))
        assert await _tokens(engine, "ok", PROMPTS[1], "a", 5) == reference_greedy(peft_models["a"], PROMPTS[1], 5)
    finally:
        await engine.shutdown()


async def test_lora_off_refuses_adapters(family):
    _, base, _, folders = family
    config = dataclasses.replace(_config(base, "thread"), lora=None)
    engine = await _engine(config)
    try:
        assert not engine.lora_enabled and engine.list_adapters() == []
        with pytest.raises(InvalidRequestError, match="not enabled"):
            await engine.load_adapter("a", str(folders["a"]))
        with pytest.raises(NotFoundError, match="not enabled"):
            engine.generate(GenerationRequest("x", PROMPTS[0], greedy_params(2), adapter="a"))
        assert engine.stats().lora_running == () and engine.stats().max_loras == 0
    finally:
        await engine.shutdown()
