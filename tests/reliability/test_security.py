"""TLS, mutual TLS and API keys on the gRPC port (server, client, CLI, gateway backend link); no key in any log;
loopback by default; chat templates and prompts cannot run code, read files or stall the server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import Certs, GatewayProcess, Launcher, ServerProcess, Tally, tiny_smollm2_models
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from secret_scan import random_key

from weir.v1 import inference_pb2 as pb
from weir.v1 import inference_pb2_grpc
from weir_client import TlsOptions, WeirClient, WeirClientError

NO_MODELS = ("--model", "none", "--embed-model", "none")
KEY = random_key("sk-test")
OTHER_KEY = random_key("sk-test-other")
WRONG_KEY = random_key("sk-wrong")  # a client's wrong key may be its key elsewhere: never logged either


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except WeirClientError as e:
        return e.code
    return grpc.StatusCode.OK


def test_tls_server_answers_clients_that_trust_its_ca_and_no_one_else(
    spawn_server: Callable[..., ServerProcess], certs: Certs
) -> None:
    tally = Tally("tls")
    server = spawn_server("--tls-cert", certs.pem("server"), "--tls-key", certs.key("server"), model_args=NO_MODELS)
    assert "(TLS)" in server.process.log
    outcomes = {
        "trusted": WeirClient(server.target, timeout=10, tls=TlsOptions(ca_file=certs.pem("ca"))),
        "plaintext": WeirClient(server.target, timeout=5, max_attempts=1),
        "system roots": WeirClient(server.target, timeout=5, max_attempts=1, tls=True),
        "other ca": WeirClient(server.target, timeout=5, max_attempts=1, tls=TlsOptions(ca_file=certs.pem("rogue_ca"))),
    }
    codes = {}
    for name, client in outcomes.items():
        with client:
            tally.sent += 1
            codes[name] = _code(client.list_models)
            if codes[name] == grpc.StatusCode.OK:
                tally.answered += 1
            else:
                tally.refused += 1
    tally.report()
    assert codes == {
        "trusted": grpc.StatusCode.OK,
        "plaintext": grpc.StatusCode.UNAVAILABLE,
        "system roots": grpc.StatusCode.UNAVAILABLE,
        "other ca": grpc.StatusCode.UNAVAILABLE,
    }


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory, certs: Certs, tiny_smollm2: Path) -> Iterator[ServerProcess]:
    """Mutual TLS and an API key, serving the tiny random Llama over SmolLM2's tokenizer; one for the module's tests
    (none of them changes it)."""
    launcher = Launcher(tmp_path_factory.mktemp("mtls"))
    try:
        yield launcher.server(
            "--tls-cert", certs.pem("server"), "--tls-key", certs.key("server"), "--tls-client-ca", certs.pem("ca"),
            "--api-key", KEY, "--api-key", OTHER_KEY,
            model_args=tiny_smollm2_models(tiny_smollm2, "--max-model-len", "512", "--embed-model", "none"),
        )  # fmt: skip
    finally:
        launcher.close()


def _mtls(certs: Certs, client: str = "client") -> TlsOptions:
    return TlsOptions(ca_file=certs.pem("ca"), cert_file=certs.pem(client), key_file=certs.key(client))


def test_mutual_tls_refuses_missing_and_foreign_client_certificates(mtls_server: ServerProcess, certs: Certs) -> None:
    tally = Tally("mtls")
    cases = {
        "signed client cert": _mtls(certs),
        "no client cert": TlsOptions(ca_file=certs.pem("ca")),
        "cert from another ca": _mtls(certs, "rogue_client"),
    }
    codes = {}
    for name, tls in cases.items():
        with WeirClient(mtls_server.target, timeout=10, max_attempts=1, tls=tls, api_key=KEY) as client:
            tally.sent += 1
            codes[name] = _code(lambda c=client: c.complete("Hi", max_tokens=2))  # type: ignore[misc]
            tally.answered += codes[name] == grpc.StatusCode.OK
            tally.refused += codes[name] != grpc.StatusCode.OK
    tally.report()
    assert codes == {
        "signed client cert": grpc.StatusCode.OK,
        "no client cert": grpc.StatusCode.UNAVAILABLE,
        "cert from another ca": grpc.StatusCode.UNAVAILABLE,
    }


def test_api_key_guards_inference_but_not_health_or_reflection(mtls_server: ServerProcess, certs: Certs) -> None:
    tally = Tally("api-key")
    codes = {}
    for name, key in {"right key": KEY, "second key": OTHER_KEY, "wrong key": WRONG_KEY, "no key": None}.items():
        with WeirClient(mtls_server.target, timeout=10, max_attempts=1, tls=_mtls(certs), api_key=key) as client:
            tally.sent += 2
            codes[name] = (_code(client.list_models), _code(lambda c=client: c.complete("Hi", max_tokens=2)))
            tally.answered += sum(code == grpc.StatusCode.OK for code in codes[name])
            tally.refused += sum(code == grpc.StatusCode.UNAUTHENTICATED for code in codes[name])
            if key is None:
                assert client.health() == "SERVING"
    ok, denied = grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED
    assert codes == {
        "right key": (ok, ok), "second key": (ok, ok), "wrong key": (denied, denied), "no key": (denied, denied)
    }  # fmt: skip
    with grpc.secure_channel(mtls_server.target, _mtls(certs).credentials()) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = stub.ServerReflectionInfo(iter([ask]), timeout=10)
        services = {s.name for reply in replies for s in reply.list_services_response.service}
    assert "weir.v1.InferenceService" in services
    tally.report()
    assert KEY not in mtls_server.process.log and OTHER_KEY not in mtls_server.process.log
    assert WRONG_KEY not in mtls_server.process.log


def test_weir_generate_cli_speaks_mutual_tls_with_an_api_key(mtls_server: ServerProcess, certs: Certs) -> None:
    base = [sys.executable, "-m", "weir_client.cli", "generate", "--target", mtls_server.target, "Hello",
            "--max-tokens", "3", "--tls-ca", certs.pem("ca"), "--tls-cert", certs.pem("client"),
            "--tls-key", certs.key("client"), "--timeout", "60"]  # fmt: skip
    ok = subprocess.run([*base, "--api-key", KEY], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    denied = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
    Tally("cli-mtls", sent=2, answered=1, refused=1).report()


def test_gateway_reaches_an_mtls_backend_with_its_api_key(
    mtls_server: ServerProcess, certs: Certs, spawn_gateway: Callable[..., GatewayProcess]
) -> None:
    gateway_key = random_key("gw-key")
    gateway = spawn_gateway(
        [mtls_server.target], "--backend-tls-ca", certs.pem("ca"), "--backend-tls-cert", certs.pem("client"),
        "--backend-tls-key", certs.key("client"), "--backend-api-key", KEY, "--api-key", gateway_key,
    )  # fmt: skip
    body = json.dumps({"prompt": "Hello", "max_tokens": 3}).encode()
    request = urllib.request.Request(
        f"{gateway.url}/v1/completions", body,
        {"Content-Type": "application/json", "Authorization": f"Bearer {gateway_key}"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as reply:
        completion = json.load(reply)
    assert completion["usage"]["completion_tokens"] == 3
    Tally("gateway-mtls", sent=1, answered=1).report()
    time.sleep(0.2)
    for log in (gateway.process.log, mtls_server.process.log):
        assert KEY not in log and gateway_key not in log


def test_server_listens_on_loopback_unless_told_otherwise() -> None:
    from weir_server.cli import build_parser, config_from_args
    from weir_server.config import ServerConfig

    assert ServerConfig().host == "127.0.0.1"
    config = config_from_args(build_parser().parse_args([]))
    assert config.host == "127.0.0.1" and config.tls is None and config.api_keys == ()


def test_server_refuses_half_a_tls_configuration(tmp_path) -> None:
    from weir_server.cli import main

    assert main(["--tls-cert", str(tmp_path / "cert.pem"), "--model", "none", "--embed-model", "none"]) == 2


# ---- chat templates and prompts ------------------------------------------------------------------------------

HOSTILE_TEMPLATES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ self.__init__.__globals__.__builtins__ }}",
    "{{ messages[0].content.__class__.__base__.__subclasses__() }}",
    "{% set x = messages.append('x') %}{{ messages|length }}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}{{ os }}",
    "{% extends '/etc/hostname' %}",
    "{{ range(10**9)|list|length }}",
]


@pytest.fixture(scope="module")
def smollm_tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_chat_template_cannot_reach_python_internals_or_files(smollm_tokenizer, template: str) -> None:
    from weir_server.chat.messages import ChatMessage
    from weir_server.chat.template import ChatTemplate
    from weir_server.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as refused:
        ChatTemplate(smollm_tokenizer, override=template).render([ChatMessage("user", "hi")])
    assert refused.value.field == "messages"
    assert "root:" not in str(refused.value)  # nothing of /etc/passwd leaks into the message


def test_message_content_is_data_never_template_code(small_server) -> None:
    hostile = "{{ 7*7 }} {% include '/etc/passwd' %} {{ ''.__class__.__mro__ }}"
    with grpc.insecure_channel(small_server.target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = pb.GenerateRequest(sampling_params=pb.SamplingParams(max_tokens=1))
        request.messages.messages.add(role="user", content=hostile)
        replies = list(stub.Generate(request, timeout=60))
    prompt = small_server.engine.tokenizer.decode(list(replies[0].prompt_token_ids))
    assert hostile in prompt and "49" not in prompt


def test_huge_prompt_is_refused_without_stalling_the_server(small_server) -> None:
    """A 40 MB prompt would take ~20 s to tokenize on the event loop; it is refused before that."""
    huge = "hello world, this is a prompt. " * (40_000_000 // 31)
    with WeirClient(small_server.target, timeout=30, max_attempts=1) as client:
        started = time.monotonic()
        with pytest.raises(WeirClientError) as refused:
            client.complete(huge, max_tokens=1)
        elapsed = time.monotonic() - started
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and refused.value.field == "prompt"
    assert elapsed < 5, elapsed
