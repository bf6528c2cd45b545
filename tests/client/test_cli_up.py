"""`weir up`: one command line for the gRPC server and the gateway. API keys and TLS given once protect both, a
`--gateway-NAME` option reaches the gateway, and a bad configuration is one line and exit 2 before anything starts.

One `weir up` (keys and TLS together) serves the end-to-end tests of this module. It serves the tiny random Llama
(the options and their wiring are under test, not the text): the packaged models would cost half a minute to load.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from tls_certs import SelfSigned, make_self_signed

from weir_client import TlsOptions, WeirClient, WeirClientError

FLAG_KEY = "up-flag-key-3f9c2a"
FILE_KEY = "up-file-key-81d7e0"
GATEWAY_MAX_TOKENS = 8  # passed as --gateway-max-tokens: a larger request is the gateway's 400
# The tiny model's tokenizer (MiniLM's) has no chat template of its own.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> SelfSigned:
    return make_self_signed(tmp_path_factory.mktemp("up_certs"))


def _weir_up(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weir_client.cli", "up", *args], capture_output=True, text=True, timeout=120
    )


def _one_line_exit_2(done: subprocess.CompletedProcess[str], message: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("weir up: "), done.stderr[-2000:]
    assert message in lines[0]


# ---- bad configurations: refused before the server starts --------------------------------------------------


def test_up_refuses_a_key_that_is_not_the_certificates(certs: SelfSigned) -> None:
    done = _weir_up("--ssl-certfile", certs.cert, "--ssl-keyfile", certs.other_key)
    _one_line_exit_2(done, f"the TLS key {certs.other_key} is not the key of the certificate {certs.cert}")


def test_up_refuses_a_missing_certificate_file(certs: SelfSigned, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    _one_line_exit_2(_weir_up("--ssl-certfile", missing, "--ssl-keyfile", certs.key), f"{missing} does not exist")


def test_up_refuses_a_certificate_without_its_key(certs: SelfSigned) -> None:
    _one_line_exit_2(_weir_up("--ssl-certfile", certs.cert), "--ssl-certfile and --ssl-keyfile go together")


def test_up_refuses_a_key_file_without_keys(tmp_path: Path) -> None:
    empty = tmp_path / "keys.txt"
    empty.write_text("# no key yet\n\n")
    _one_line_exit_2(_weir_up("--api-key-file", str(empty)), "holds no API key")


def test_up_refuses_a_bad_gateway_option_before_starting() -> None:
    _one_line_exit_2(_weir_up("--gateway-max-n", "0"), "max_n must be at least 1")
    _one_line_exit_2(_weir_up("--gateway-max-n", "many"), "argument --gateway-max-n: invalid int value")
    _one_line_exit_2(_weir_up("--gateway-no-such-option"), "--gateway-no-such-option is not a gateway option")


def test_up_refuses_mutual_tls_without_a_client_certificate_for_the_gateway(certs: SelfSigned) -> None:
    done = _weir_up("--ssl-certfile", certs.cert, "--ssl-keyfile", certs.key, "--ssl-ca-certs", certs.cert)
    _one_line_exit_2(done, "--gateway-backend-tls-cert")


# ---- one weir up with keys and TLS ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Up:
    """A running `weir up`: its process, its combined output, and where its two ports are."""

    process: subprocess.Popen[bytes]
    log: Path
    grpc_target: str
    base_url: str  # https://127.0.0.1:PORT/v1
    ca: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def up(certs: SelfSigned, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Up]:
    directory = tmp_path_factory.mktemp("up")
    key_file = directory / "keys.txt"
    key_file.write_text(f"# the file's key\n\n{FILE_KEY}\n")
    grpc_port, http_port = _free_port(), _free_port()
    command = [
        sys.executable, "-m", "weir_client.cli", "up",
        "--port", str(grpc_port),
        "--api-key", FLAG_KEY, "--api-key-file", str(key_file),
        "--ssl-certfile", certs.cert, "--ssl-keyfile", certs.key,
        "--gateway-port", str(http_port), "--gateway-max-tokens", str(GATEWAY_MAX_TOKENS),
        "--model", str(tiny_model), "--served-model-name", "tiny-llama", "--load-format", "dummy",
        "--chat-template", CHAT_TEMPLATE, "--embed-model", "none",
        "--max-model-len", "512", "--drain-timeout", "1", "--gateway-drain-timeout", "1",
    ]  # fmt: skip
    log = directory / "up.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )  # fmt: skip
    target = f"127.0.0.1:{grpc_port}"
    try:
        with WeirClient(target, tls=TlsOptions(ca_file=certs.cert)) as client:
            client.wait_until_ready(timeout=300)
        assert _wait_for_port(http_port, timeout=60), log.read_text()[-3000:]
        yield Up(process, log, target, f"https://127.0.0.1:{http_port}/v1", certs.cert)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _openai(up: Up, api_key: str) -> openai.OpenAI:
    http = httpx.Client(verify=ssl.create_default_context(cafile=up.ca))
    return openai.OpenAI(base_url=up.base_url, api_key=api_key, http_client=http, max_retries=0)


@pytest.mark.slow
def test_gateway_over_https_refuses_calls_without_a_valid_key(up: Up) -> None:
    keyless = httpx.get(f"{up.base_url}/models", verify=ssl.create_default_context(cafile=up.ca), timeout=30)
    assert keyless.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        _openai(up, "not-a-key").models.list()


@pytest.mark.slow
def test_gateway_over_https_answers_either_key(up: Up) -> None:
    model = next(m.id for m in _openai(up, FLAG_KEY).models.list() if "minilm" not in m.id.lower())
    reply = _openai(up, FILE_KEY).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4
    )
    assert reply.choices[0].message.content


@pytest.mark.slow
def test_gateway_option_given_to_up_reaches_the_gateway(up: Up) -> None:
    client = _openai(up, FLAG_KEY)
    model = next(m.id for m in client.models.list() if "minilm" not in m.id.lower())
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=model, prompt="Hello", max_tokens=GATEWAY_MAX_TOKENS + 1)
    assert client.completions.create(model=model, prompt="Hello", max_tokens=GATEWAY_MAX_TOKENS).choices


@pytest.mark.slow
def test_grpc_server_over_tls_refuses_a_keyless_call_and_serves_a_keyed_one(up: Up) -> None:
    tls = TlsOptions(ca_file=up.ca)
    with WeirClient(up.grpc_target, tls=tls, max_attempts=1) as keyless:
        with pytest.raises(WeirClientError) as refused:
            keyless.list_models(timeout=30)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    with WeirClient(up.grpc_target, tls=tls, api_key=FILE_KEY) as client:
        assert client.complete("Hello", max_tokens=3, timeout=60).text


@pytest.mark.slow
def test_grpc_server_refuses_plaintext(up: Up) -> None:
    with WeirClient(up.grpc_target, max_attempts=1) as plaintext:
        with pytest.raises(WeirClientError):
            plaintext.list_models(timeout=5)


@pytest.mark.slow
def test_up_stops_both_on_sigterm_and_never_prints_a_key(up: Up) -> None:
    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(timeout=90) == 0
    output = up.log.read_text()
    assert "https://" in output  # the gateway served HTTPS
    assert FLAG_KEY not in output and FILE_KEY not in output
