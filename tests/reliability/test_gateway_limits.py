"""The gateway process against hostile HTTP clients: heads sent a byte a second (slowloris), slow bodies, oversize
and too many headers, wrong API keys. Each is cut off or refused, a normal request is still answered promptly,
and neither the gateway's API key nor its backend key appears anywhere in its log."""

from __future__ import annotations

import json
import secrets
import select
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import pytest
from conftest import GatewayProcess, Tally
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from secret_scan import secret

from weir.v1 import inference_pb2 as pb
from weir.v1 import inference_pb2_grpc

GATEWAY_KEY = secret("sk-weir-gateway-" + secrets.token_hex(16))
BACKEND_KEY = secret("sk-weir-backend-" + secrets.token_hex(16))
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
MAX_HEADER_BYTES = 1024
MAX_HEADERS = 32
SLACK_S = 1.5  # scheduling on a shared 2-core machine
LIMIT_FLAGS = ("--header-timeout", str(HEADER_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S),
               "--max-header-bytes", str(MAX_HEADER_BYTES), "--max-headers", str(MAX_HEADERS))  # fmt: skip
KEY_FLAGS = ("--api-key", GATEWAY_KEY, "--backend-api-key", BACKEND_KEY)


class _Backend(inference_pb2_grpc.InferenceServiceServicer):
    """Just enough of a Weir server for the gateway to serve /v1/models; notes the key each call carried."""

    def __init__(self) -> None:
        self.authorizations: list[str | None] = []

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        self.authorizations.append(dict(context.invocation_metadata()).get("authorization"))
        model = pb.ModelInfo(id="fake", task=pb.MODEL_TASK_GENERATE, max_context_length=128, is_default=True)
        return pb.ListModelsResponse(models=[model])


@pytest.fixture(scope="module")
def backend() -> Iterator[tuple[str, _Backend]]:
    servicer = _Backend()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


@pytest.fixture
def gateway(backend: tuple[str, _Backend], spawn_gateway: Callable[..., GatewayProcess]) -> Iterator[GatewayProcess]:
    """A gateway with both keys, small limits and debug logging (the most it would ever write); after the test,
    its whole log is searched for the keys."""
    running = spawn_gateway([backend[0]], *KEY_FLAGS, *LIMIT_FLAGS, "--log-level", "debug")
    yield running
    _assert_no_secret_in(running.process.log)


def _assert_no_secret_in(log: str) -> None:
    assert log, "the gateway wrote no log at all"
    for key in (GATEWAY_KEY, BACKEND_KEY):
        # The random half too: a log line that truncates a key (as aiohttp's parser errors do) keeps its start.
        assert key not in log and key[-32:-16] not in log, f"a key leaked into the gateway log:\n{log[-3000:]}"


def _models(gateway: GatewayProcess, key: str | None = GATEWAY_KEY, timeout: float = 10) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    request = urllib.request.Request(f"{gateway.url}/v1/models", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status
    except urllib.error.HTTPError as e:
        return e.code


def _raw(gateway: GatewayProcess, head: bytes, timeout: float = 10) -> tuple[int, bytes]:
    """Send a request head as given; the status and body of the answer (the connection is closed after it)."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=timeout) as sock:
        try:
            sock.sendall(head)
        except OSError:  # the gateway may close before it has read everything sent
            pass
        answer = b""
        while chunk := _recv(sock):
            answer += chunk
    assert answer.startswith(b"HTTP/1."), f"no answer: {answer!r}"
    return int(answer.split()[1]), answer.partition(b"\r\n\r\n")[2]


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


def _head(*headers: str) -> bytes:
    lines = ["GET /v1/models HTTP/1.1", "Host: 127.0.0.1", *headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class SlowHeads:
    """Connections that send a request head one byte a second and never finish it, as a slowloris client does."""

    HEAD = _head(f"Authorization: Bearer {GATEWAY_KEY}", "X-Padding: " + "p" * 600)

    def __init__(self, port: int, count: int) -> None:
        self.sockets = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
        self.opened = time.monotonic()
        self.closed_after: dict[int, float] = {}  # socket index -> seconds from opening until the gateway closed it

    def trickle(self, give_up_s: float) -> None:
        """Send a byte a second on every open connection until the gateway has closed them all or `give_up_s`."""
        sent, next_byte = 0, self.opened
        while len(self.closed_after) < len(self.sockets) and time.monotonic() - self.opened < give_up_s:
            if time.monotonic() >= next_byte:
                for i, sock in self._open():
                    try:
                        sock.send(self.HEAD[sent : sent + 1])
                    except OSError:
                        self._closed(i)
                sent, next_byte = sent + 1, next_byte + 1.0
            readable, _, _ = select.select([s for _, s in self._open()], [], [], 0.05)
            for sock in readable:
                if not _recv(sock):
                    self._closed(self.sockets.index(sock))

    def _open(self) -> list[tuple[int, socket.socket]]:
        return [(i, s) for i, s in enumerate(self.sockets) if i not in self.closed_after]

    def _closed(self, index: int) -> None:
        self.closed_after.setdefault(index, time.monotonic() - self.opened)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def test_a_head_sent_a_byte_a_second_is_cut_off_within_the_header_timeout(gateway: GatewayProcess) -> None:
    slow = SlowHeads(gateway.port, 1)
    try:
        slow.trickle(give_up_s=HEADER_TIMEOUT_S * 5)
    finally:
        slow.close()
    Tally("slow-head", sent=1, disconnected=len(slow.closed_after)).report()
    assert slow.closed_after, f"still open after {HEADER_TIMEOUT_S * 5:.0f}s"
    assert HEADER_TIMEOUT_S - 0.5 <= slow.closed_after[0] <= HEADER_TIMEOUT_S + SLACK_S


def test_fifty_slow_heads_do_not_delay_a_normal_request(gateway: GatewayProcess) -> None:
    slow = SlowHeads(gateway.port, 50)
    trickling = threading.Thread(target=slow.trickle, args=(HEADER_TIMEOUT_S * 5,), daemon=True)
    trickling.start()
    try:
        time.sleep(HEADER_TIMEOUT_S / 2)  # every slow connection is open and has sent part of its head
        started = time.monotonic()
        status = _models(gateway)
        latency = time.monotonic() - started
        trickling.join(timeout=HEADER_TIMEOUT_S * 6)
    finally:
        slow.close()
    tally = Tally("slow-heads", sent=51, answered=int(status == 200), disconnected=len(slow.closed_after))
    tally.info["latency_s"] = f"{latency:.3f}"
    tally.report()
    assert status == 200 and latency < 1.0
    assert len(slow.closed_after) == 50
    assert max(slow.closed_after.values()) <= HEADER_TIMEOUT_S + SLACK_S


def test_a_body_sent_slowly_is_answered_408_within_the_body_timeout(gateway: GatewayProcess) -> None:
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {GATEWAY_KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{").encode()  # fmt: skip
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=BODY_TIMEOUT_S * 5) as sock:
        sock.sendall(head)
        started = time.monotonic()
        while not select.select([sock], [], [], 1.0)[0]:
            sock.send(b" ")  # a byte a second, never the whole body
        waited = time.monotonic() - started
        answer = b""
        while b'"}}' not in answer and (chunk := _recv(sock)):  # the end of an OpenAI error body
            answer += chunk
    Tally("slow-body", sent=1, refused=1).report()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "body_timeout"
    assert waited <= BODY_TIMEOUT_S + SLACK_S


@pytest.mark.parametrize(
    ("case", "headers"),
    [
        ("authorization over the limit", [f"Authorization: Bearer {GATEWAY_KEY}" + "x" * MAX_HEADER_BYTES]),
        (
            "other header over the limit",
            [f"Authorization: Bearer {GATEWAY_KEY}", "X-Big: " + "b" * (MAX_HEADER_BYTES + 1)],
        ),
        ("too many headers", [f"Authorization: Bearer {GATEWAY_KEY}"] + [f"X-H{i}: v" for i in range(MAX_HEADERS)]),
    ],
)
def test_an_oversize_head_is_refused_and_logged_without_its_values(
    gateway: GatewayProcess, case: str, headers: list[str]
) -> None:
    status, _ = _raw(gateway, _head(*headers))
    assert status == 400, case
    assert _models(gateway) == 200  # the gateway carries on
    time.sleep(0.2)  # let the log line reach the file
    assert "refused a request from 127.0.0.1" in gateway.process.log
    assert "Traceback" not in gateway.process.log
    Tally(f"oversize-head {case}", sent=2, answered=1, refused=1).report()


def test_wrong_keys_get_401_the_right_one_200_and_the_backend_gets_its_own(
    gateway: GatewayProcess, backend: tuple[str, _Backend]
) -> None:
    wrong = {
        "no key": None,
        "empty": "",
        "backend key": BACKEND_KEY,
        "one character short": secret(GATEWAY_KEY[:-1]),
        "one character more": secret(GATEWAY_KEY + "0"),
        "other case": secret(GATEWAY_KEY.upper()),
    }
    codes = {name: _models(gateway, key) for name, key in wrong.items()}
    assert codes == dict.fromkeys(wrong, 401)
    assert _models(gateway) == 200
    assert set(backend[1].authorizations) == {f"Bearer {BACKEND_KEY}"}
    Tally("api-keys", sent=len(wrong) + 1, answered=1, refused=len(wrong)).report()


def test_a_json_log_holds_no_key_either(
    backend: tuple[str, _Backend], spawn_gateway: Callable[..., GatewayProcess]
) -> None:
    running = spawn_gateway([backend[0]], *KEY_FLAGS, *LIMIT_FLAGS, "--log-level", "debug", "--log-format", "json")
    assert _raw(running, _head(f"Authorization: Bearer {GATEWAY_KEY}" + "x" * MAX_HEADER_BYTES))[0] == 400
    assert _models(running, "wrong") == 401 and _models(running) == 200
    time.sleep(0.2)
    lines = [json.loads(line) for line in running.process.log.splitlines() if line.startswith("{")]
    assert any(line["message"].startswith("refused a request from") for line in lines)
    _assert_no_secret_in(running.process.log)
