"""LoRA adapters over weir.v1 against real servers (a tiny random Llama, adapters made with peft): loaded at start
with --lora-modules or by LoadAdapter, listed by ListAdapters and ListModels (their base model as parent), used by
`adapter` or by naming them as `model`, unloaded; each bad input is a clear status naming the problem, after which the
server keeps serving; a server without --enable-lora says how to turn it on."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from lora_adapters import make_adapter
from prometheus_client.parser import text_string_to_metric_families
from tiny_models import make_tiny_model

from weir_client import WeirClient, WeirClientError
from weir_server.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, ObservabilityConfig, ServerConfig

pytestmark = pytest.mark.timeout(300)

BASE = "tiny-llama"
GREEDY: dict[str, Any] = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, packaged_model_paths: Any) -> dict[str, Path]:
    """The base model and the adapters of these tests: two good ones, one above the rank limit, one of another
    model's shape, and folders missing their files."""
    root = tmp_path_factory.mktemp("lora")
    base = make_tiny_model(root / "base", packaged_model_paths.minilm_dir)
    found = {
        "base": base,
        "start": make_adapter(base, root / "start", rank=8, seed=1),
        "extra": make_adapter(base, root / "extra", rank=4, seed=2, targets=("q_proj", "v_proj", "down_proj")),
        "high_rank": make_adapter(base, root / "high_rank", rank=32, seed=3),
        "misshapen": make_adapter(base, root / "misshapen", seed=4, config_overrides={"hidden_size": 128}),
        "no_weights": root / "no_weights",
        "no_config": root / "no_config",
    }
    found["no_weights"].mkdir()
    shutil.copy(found["start"] / "adapter_config.json", found["no_weights"])
    found["no_config"].mkdir()
    shutil.copy(found["start"] / "adapter_model.safetensors", found["no_config"])
    return found


def _config(base: Path, lora: LoRAConfig | None, metrics: bool = False) -> ServerConfig:
    generate = EngineConfig(
        ModelConfig(str(base), served_name=BASE, load_format="dummy", dtype="float32", max_model_len=256),
        cache=CacheConfig(num_blocks=128),
        lora=lora,
    )
    observability = ObservabilityConfig(metrics_port=0 if metrics else None)
    return ServerConfig(host="127.0.0.1", port=0, generate=generate, embed=None, observability=observability)


@pytest.fixture(scope="module")
def server(start_server: Any, folders: dict[str, Path]) -> Any:
    lora = LoRAConfig(max_lora_rank=16, max_loras=2, lora_modules=(("start", str(folders["start"])),))
    return start_server(_config(folders["base"], lora, metrics=True))


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[WeirClient]:
    with WeirClient(server.target, timeout=60) as weir:
        yield weir


@pytest.fixture(scope="module")
def client_without_lora(start_server: Any, folders: dict[str, Path]) -> Iterator[WeirClient]:
    server = start_server(_config(folders["base"], None))
    with WeirClient(server.target, timeout=60) as weir:
        yield weir


def tokens(client: WeirClient, **keywords: Any) -> list[int]:
    return client.complete(PROMPT, **GREEDY, **keywords).choices[0].token_ids


def status(call: Any) -> WeirClientError:
    with pytest.raises(WeirClientError) as raised:
        call()
    return raised.value


def test_an_adapter_loaded_at_start_is_listed_with_its_base_model_as_parent(
    client: WeirClient, folders: dict[str, Path]
) -> None:
    (adapter,) = [a for a in client.list_adapters() if a.name == "start"]
    assert (adapter.base_model, adapter.rank, adapter.alpha) == (BASE, 8, 16.0)
    assert adapter.path == str(folders["start"])
    assert set(adapter.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    models = {m.id: m for m in client.list_models()}
    assert models["start"].parent == BASE and models["start"].root == str(folders["start"])
    assert models["start"].task == "generate" and not models["start"].is_default
    assert models[BASE].parent == "" and models[BASE].is_default


def test_an_adapter_named_as_adapter_or_as_model_changes_the_output_alike(client: WeirClient) -> None:
    base = tokens(client)
    by_field = tokens(client, adapter="start")
    by_model = tokens(client, model="start")
    assert by_field == by_model != base
    assert client.complete(PROMPT, model="start", **GREEDY).model == "start"  # as vLLM: the name asked for


def test_load_use_and_unload_while_serving(client: WeirClient, folders: dict[str, Path]) -> None:
    base = tokens(client)
    info = client.load_adapter("extra", str(folders["extra"]))
    assert (info.name, info.base_model, info.rank) == ("extra", BASE, 4)
    assert "extra" in {a.name for a in client.list_adapters(BASE)}
    with_extra = tokens(client, model="extra")
    assert with_extra != base and with_extra != tokens(client, adapter="start")
    assert tokens(client, model="extra") == with_extra  # the same again
    client.unload_adapter("extra")
    assert "extra" not in {m.id for m in client.list_models()}
    error = status(lambda: tokens(client, model="extra"))
    assert error.code == grpc.StatusCode.NOT_FOUND and "extra" in error.message
    assert tokens(client) == base


def test_unknown_adapters_are_not_found_naming_them(client: WeirClient) -> None:
    error = status(lambda: tokens(client, adapter="nope"))
    assert error.code == grpc.StatusCode.NOT_FOUND and "'nope'" in error.message and error.field == "adapter"
    assert "start" in error.message  # the loaded ones are listed
    error = status(lambda: tokens(client, model="nope"))
    assert error.code == grpc.StatusCode.NOT_FOUND and "'nope'" in error.message
    error = status(lambda: client.unload_adapter("nope"))
    assert error.code == grpc.StatusCode.NOT_FOUND and "'nope'" in error.message and error.field == "name"


@pytest.mark.parametrize(
    ("folder", "problem"),
    [
        ("high_rank", "rank"),
        ("misshapen", "shape"),
        ("no_weights", "adapter_model"),
        ("no_config", "adapter_config.json"),
        ("missing", "no such directory"),
    ],
)
def test_a_bad_adapter_folder_is_invalid_argument_naming_the_problem(
    client: WeirClient, folders: dict[str, Path], folder: str, problem: str
) -> None:
    path = folders.get(folder, folders["base"].parent / "missing")
    error = status(lambda: client.load_adapter("bad", str(path)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert problem in error.message.lower(), error.message
    assert "bad" not in {a.name for a in client.list_adapters()}
    assert tokens(client, adapter="start")  # still serving


def test_a_taken_name_is_already_exists(client: WeirClient, folders: dict[str, Path]) -> None:
    for name in ("start", BASE):
        error = status(lambda name=name: client.load_adapter(name, str(folders["extra"])))
        assert error.code == grpc.StatusCode.ALREADY_EXISTS and repr(name) in error.message and error.field == "name"


@pytest.mark.parametrize(("name", "path"), [("", "/x"), ("a b", "/x"), ("a,b", "/x"), ("ok", "")])
def test_names_and_paths_are_checked(client: WeirClient, name: str, path: str) -> None:
    error = status(lambda: client.load_adapter(name, path))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.field == ("path" if name == "ok" else "name")


def test_an_adapter_and_a_different_adapter_as_model_are_refused(client: WeirClient) -> None:
    error = status(lambda: tokens(client, model="start", adapter="other"))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.field == "adapter"


def test_without_enable_lora_adapter_calls_say_how_to_turn_it_on(
    client_without_lora: WeirClient, folders: dict[str, Path]
) -> None:
    for call in (
        lambda: client_without_lora.load_adapter("a", str(folders["start"])),
        lambda: client_without_lora.unload_adapter("a"),
        lambda: tokens(client_without_lora, adapter="a"),
    ):
        error = status(call)
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION and "--enable-lora" in error.message
    assert client_without_lora.list_adapters() == []
    assert all(m.parent == "" for m in client_without_lora.list_models())


def scrape(server: Any) -> dict[str, Any]:
    text = server.server.observability.metrics.exposition().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_metrics_name_the_adapters_with_running_requests(server: Any, client: WeirClient) -> None:
    """vllm:lora_requests_info as the Gateway API Inference Extension reads it, and Weir's per-adapter gauges."""
    idle = scrape(server)
    (info,) = idle["vllm:lora_requests_info"].samples
    assert (info.labels["max_lora"], info.labels["running_lora_adapters"]) == ("2", "")
    running_seen, per_adapter_seen = False, False
    for _ in client.generate(PROMPT, adapter="start", max_tokens=200, temperature=0.0, ignore_eos=True):
        families = scrape(server)
        (info,) = families["vllm:lora_requests_info"].samples
        running_seen |= info.labels["running_lora_adapters"] == "start"
        gauges = {s.labels["adapter"]: s.value for s in families["weir_lora_requests_running"].samples}
        per_adapter_seen |= gauges.get("start", 0) >= 1
        if running_seen and per_adapter_seen:
            break
    assert running_seen and per_adapter_seen


def test_an_adapters_name_tokenizes_with_its_base_models_tokenizer(client: WeirClient) -> None:
    assert client.tokenize(PROMPT, model="start") == client.tokenize(PROMPT, model=BASE)
