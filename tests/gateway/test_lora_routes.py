"""LoRA adapters through the gateway, as vLLM's OpenAI server offers them: POST /v1/load_lora_adapter and
/v1/unload_lora_adapter (behind the API key, applied on every backend, a failing backend named), /v1/models listing
adapters with their base model as `parent`, the official openai SDK using an adapter as `model`, and 404s in
OpenAI's shape for unknown adapters. Real Weir servers: a tiny random Llama (and, marked slow, the packaged SmolLM2)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from gateway_support import RunningGateway, http
from lora_adapters import make_adapter
from tiny_models import make_tiny_model

from weir_client import WeirClient
from weir_gateway.config import GatewayConfig
from weir_server.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, ServerConfig

pytestmark = pytest.mark.timeout(300)

BASE = "tiny-llama"
KEY = "lora-test-key"
GREEDY: dict[str, Any] = {"max_tokens": 8, "temperature": 0.0}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, packaged_model_paths: Any) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-routes")
    base = make_tiny_model(root / "base", packaged_model_paths.minilm_dir)
    return {
        "base": base,
        "start": make_adapter(base, root / "start", seed=21),
        "extra": make_adapter(base, root / "extra", rank=4, seed=22),
    }


def _server(start_server: Any, folders: dict[str, Path], lora: bool) -> str:
    modules = (("start", str(folders["start"])),)
    generate = EngineConfig(
        ModelConfig(str(folders["base"]), served_name=BASE, load_format="dummy", dtype="float32", max_model_len=256),
        cache=CacheConfig(num_blocks=128),
        lora=LoRAConfig(max_lora_rank=16, lora_modules=modules) if lora else None,
    )
    return start_server(ServerConfig(host="127.0.0.1", port=0, generate=generate, embed=None)).target


@pytest.fixture(scope="module")
def backends(start_server: Any, folders: dict[str, Path]) -> list[str]:
    """Two servers with LoRA on, the adapter `start` loaded on both."""
    return [_server(start_server, folders, lora=True) for _ in range(2)]


@pytest.fixture
def gateway(make_gateway: Callable[..., RunningGateway], backends: list[str]) -> RunningGateway:
    return make_gateway(GatewayConfig(backends=tuple(backends), api_keys=(KEY,)))


@pytest.fixture
def sdk(gateway: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def post(gateway: RunningGateway, path: str, body: dict[str, Any], key: str | None = KEY) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return http("POST", gateway.url + path, body, headers)


def complete(sdk: openai.OpenAI, model: str) -> str:
    return sdk.completions.create(model=model, prompt="Once upon a time", **GREEDY).choices[0].text


def test_models_list_adapters_with_their_base_model_as_parent(sdk: openai.OpenAI, folders: dict[str, Path]) -> None:
    models = {m.id: m for m in sdk.models.list()}
    assert models["start"].model_extra is not None
    assert models["start"].model_extra["parent"] == BASE and models["start"].model_extra["root"] == str(
        folders["start"]
    )
    assert models[BASE].model_extra is not None and models[BASE].model_extra["parent"] is None
    assert sdk.models.retrieve("start").model_extra["parent"] == BASE  # type: ignore[index]


def test_the_openai_sdk_uses_an_adapter_named_as_model(sdk: openai.OpenAI, backends: list[str]) -> None:
    completion = sdk.completions.create(model="start", prompt="Once upon a time", **GREEDY)
    assert completion.model == "start"
    with WeirClient(backends[0]) as weir:  # the same tokens as the server gives the adapter directly
        direct = weir.complete("Once upon a time", adapter="start", **GREEDY)
    assert completion.choices[0].text == direct.choices[0].text != complete(sdk, BASE)
    stream = sdk.completions.create(model="start", prompt="Once upon a time", stream=True, **GREEDY)
    chunks = list(stream)
    assert {c.model for c in chunks} == {"start"}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text


def test_load_use_and_unload_on_every_backend(
    gateway: RunningGateway, sdk: openai.OpenAI, folders: dict[str, Path], backends: list[str]
) -> None:
    reply = post(gateway, "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": str(folders["extra"])})
    assert reply.status == 200, reply.body
    assert b"extra" in reply.body
    for target in backends:
        with WeirClient(target) as weir:
            assert "extra" in {a.name for a in weir.list_adapters()}
    assert "extra" in {m.id for m in sdk.models.list()}
    assert complete(sdk, "extra") != complete(sdk, BASE)
    reply = post(gateway, "/v1/unload_lora_adapter", {"lora_name": "extra"})
    assert reply.status == 200, reply.body
    assert "extra" not in {m.id for m in sdk.models.list()}
    with pytest.raises(openai.NotFoundError) as raised:
        complete(sdk, "extra")
    assert "extra" in raised.value.message


def test_an_adapter_loaded_on_the_servers_directly_is_found(
    sdk: openai.OpenAI, folders: dict[str, Path], backends: list[str]
) -> None:
    for target in backends:
        with WeirClient(target) as weir:
            weir.load_adapter("direct", str(folders["extra"]))
    try:
        assert complete(sdk, "direct") != complete(sdk, BASE)
    finally:
        for target in backends:
            with WeirClient(target) as weir:
                weir.unload_adapter("direct")


def test_unknown_adapters_and_models_are_openai_404s(gateway: RunningGateway, sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        complete(sdk, "no-such-adapter")
    assert raised.value.code == "model_not_found"
    reply = post(gateway, "/v1/unload_lora_adapter", {"lora_name": "no-such-adapter"})
    error = reply.json()["error"]
    assert reply.status == 404 and "no-such-adapter" in error["message"] and error["type"] == "not_found_error"
    for address in (b for b in gateway.pool.backends):
        assert address.address in error["message"]  # each backend's failure is named


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"lora_name": "x", "lora_path": "/no/such/adapter"}, 400, "no such directory"),
        ({"lora_name": "start", "lora_path": "/tmp"}, 409, "already loaded"),
        ({"lora_path": "/tmp"}, 400, "lora_name"),
        ({"lora_name": 3, "lora_path": "/tmp"}, 400, "lora_name"),
    ],
)
def test_bad_loads_are_openai_errors(gateway: RunningGateway, body: dict[str, Any], status: int, words: str) -> None:
    reply = post(gateway, "/v1/load_lora_adapter", body)
    assert reply.status == status, reply.body
    assert words in reply.json()["error"]["message"]


def test_the_routes_need_the_api_key(gateway: RunningGateway, folders: dict[str, Path]) -> None:
    body = {"lora_name": "extra", "lora_path": str(folders["extra"])}
    assert post(gateway, "/v1/load_lora_adapter", body, key=None).status == 401
    assert post(gateway, "/v1/unload_lora_adapter", {"lora_name": "start"}, key="wrong").status == 401


def test_a_backend_without_lora_is_named_with_its_reason(
    make_gateway: Callable[..., RunningGateway], start_server: Any, backends: list[str], folders: dict[str, Path]
) -> None:
    plain = _server(start_server, folders, lora=False)
    gateway = make_gateway(GatewayConfig(backends=(backends[0], plain)))
    reply = http(
        "POST", gateway.url + "/v1/load_lora_adapter", {"lora_name": "half", "lora_path": str(folders["extra"])}
    )
    message = reply.json()["error"]["message"]
    assert reply.status == 400 and f"backend {plain}" in message and "--enable-lora" in message
    assert f"loaded LoRA adapter 'half' on {backends[0]}" in message
    with WeirClient(backends[0]) as weir:
        weir.unload_adapter("half")


@pytest.mark.slow
def test_a_smollm2_adapter_through_the_gateway_with_the_openai_sdk(
    start_server: Any,
    make_gateway: Callable[..., RunningGateway],
    packaged_model_paths: Any,
    tmp_path: Path,
) -> None:
    """The one real model: the packaged SmolLM2 with an adapter made for its shape, chat through the SDK."""
    adapter = make_adapter(
        packaged_model_paths.smollm2_dir, tmp_path / "smol", rank=8, seed=5, gguf_file=packaged_model_paths.smollm2_gguf
    )
    generate = EngineConfig(
        ModelConfig("smollm2-135m-instruct", max_model_len=512),
        # Without the prefix cache the direct request prefills its whole prompt as the gateway's did; with it, its
        # last prompt tokens would run in a step of a few rows (other kernels, other roundings) and a near-tie of
        # this random adapter's output could go either way.
        cache=CacheConfig(kv_cache_memory_gb=0.1, enable_prefix_caching=False),
        lora=LoRAConfig(max_lora_rank=8),
    )
    target = start_server(ServerConfig(host="127.0.0.1", port=0, generate=generate, embed=None)).target
    gateway = make_gateway(GatewayConfig(backends=(target,)))
    reply = http("POST", gateway.url + "/v1/load_lora_adapter", {"lora_name": "smol", "lora_path": str(adapter)})
    assert reply.status == 200, reply.body
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    messages: Any = [{"role": "user", "content": "What is the capital of France?"}]
    tuned = sdk.chat.completions.create(model="smol", messages=messages, max_tokens=12, temperature=0)
    base = sdk.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=12, temperature=0)
    assert tuned.model == "smol" and tuned.choices[0].message.content != base.choices[0].message.content
    with WeirClient(target) as weir:
        direct = weir.complete(messages=messages, adapter="smol", max_tokens=12, temperature=0.0)
    assert tuned.choices[0].message.content == direct.choices[0].text
