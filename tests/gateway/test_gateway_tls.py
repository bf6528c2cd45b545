"""`weir gateway` serving HTTPS (--ssl-certfile/--ssl-keyfile, mutual TLS with --ssl-ca-certs) with keys read from
--api-key-file, as its own process over the fake backend; bad TLS or key files are one line and exit 2."""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from gateway_fakes import FakeServer
from tls_certs import SelfSigned, make_self_signed

KEY = "gateway-file-key-5be1"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> SelfSigned:
    return make_self_signed(tmp_path_factory.mktemp("gateway_certs"))


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("gateway_keys") / "keys.txt"
    path.write_text(f"# one key a line\n\n  {KEY}  \n")
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gateway(*args: str) -> list[str]:
    return [sys.executable, "-m", "weir_gateway", "--log-level", "warning", *args]


@contextmanager
def running_gateway(args: list[str], ready: httpx.Client, url: str) -> Iterator[subprocess.Popen[str]]:
    """A gateway process, once `ready` gets its /health."""
    process = subprocess.Popen(_gateway(*args), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.communicate()[1][-2000:]
            try:
                if ready.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the gateway never answered"
                time.sleep(0.1)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)


def _client(ca: str, cert: tuple[str, str] | None = None) -> httpx.Client:
    context = ssl.create_default_context(cafile=ca)
    if cert is not None:
        context.load_cert_chain(*cert)
    return httpx.Client(verify=context, timeout=30)


def test_gateway_serves_https_with_keys_from_a_file(fake: FakeServer, certs: SelfSigned, key_file: str) -> None:
    port = _free_port()
    url = f"https://127.0.0.1:{port}"
    args = ["--backend", fake.address, "--port", str(port), "--api-key-file", key_file,
            "--ssl-certfile", certs.cert, "--ssl-keyfile", certs.key]  # fmt: skip
    with _client(certs.cert) as client, running_gateway(args, client, url):
        assert client.get(f"{url}/v1/models").status_code == 401
        assert client.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        models = client.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert models.status_code == 200 and models.json()["data"]
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)  # plain HTTP is not served


def test_gateway_with_ssl_ca_certs_requires_a_client_certificate(fake: FakeServer, certs: SelfSigned) -> None:
    port = _free_port()
    url = f"https://127.0.0.1:{port}"
    # The weir serve spellings are accepted too; the self-signed certificate is its own CA, so it is a client
    # certificate the gateway trusts.
    args = ["--backend", fake.address, "--port", str(port),
            "--tls-cert", certs.cert, "--tls-key", certs.key, "--tls-client-ca", certs.cert]  # fmt: skip
    with _client(certs.cert, (certs.cert, certs.key)) as client, running_gateway(args, client, url):
        assert client.get(f"{url}/v1/models").status_code == 200
        with _client(certs.cert) as anonymous, pytest.raises(httpx.TransportError):
            anonymous.get(f"{url}/v1/models")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ssl-certfile", "{cert}", "--ssl-keyfile", "{other_key}"], "is not the key of the certificate"),
        (["--ssl-certfile", "{missing}", "--ssl-keyfile", "{key}"], "does not exist"),
        (["--ssl-keyfile", "{key}"], "--ssl-certfile and --ssl-keyfile go together"),
        (["--api-key-file", "{empty}"], "holds no API key"),
        (["--api-key-file", "{missing}"], "cannot read the API key file"),
    ],
)
def test_gateway_refuses_bad_tls_and_key_files(
    certs: SelfSigned, tmp_path: Path, flags: list[str], message: str
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    files = {"cert": certs.cert, "key": certs.key, "other_key": certs.other_key, "empty": str(empty),
             "missing": str(tmp_path / "missing.pem")}  # fmt: skip
    args = [flag.format(**files) for flag in flags]
    done = subprocess.run(_gateway("--port", str(_free_port()), *args), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid configuration: " in lines[0] and message in lines[0], done.stderr
