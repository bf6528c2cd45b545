"""A seeded mutational fuzzer over issue 23's hostile inputs (hostile_corpus.py), against a real `weir serve` with
small limits and API keys, and a real gateway in front of it (keyed too, slow heads trickling in the background).

The corpus is sent first as the issue gives it, then each mutation (mutators.py) of each seed once, then random
mutations: sizes around each limit, nesting depth, fields repeated, wrong wire and JSON types, invalid UTF-8,
truncated bytes sent raw through a generic gRPC call, wrong and oversize keys. For every case the answer is a
success or a clean refusal (gRPC INVALID_ARGUMENT naming the field, RESOURCE_EXHAUSTED, UNAUTHENTICATED for a wrong
key; HTTP 400/401/408/413/429 as OpenAI error JSON), never UNKNOWN/INTERNAL/5xx or a hang; a health check polled
every 50 ms never waits a second; afterwards the process is SERVING and answers a normal request, and its memory
stayed within a budget.

WEIR_FUZZ_EXAMPLES sets the number of random cases per transport (default 100: with the sweep before them they reach
every seed, mutation and key kind, and more seed-mutation pairs than 400 random cases did; e.g. 5000 for a longer
hunt) and WEIR_FUZZ_SEED the seed (default 23)."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from conftest import (
    HEALTH_BOUND_S,
    GatewayProcess,
    HealthProbe,
    Launcher,
    ServerProcess,
    Tally,
    keyed_channel,
    tiny_smollm2_models,
)
from hostile_corpus import GRPC_SEEDS, HTTP_SEEDS, LIMITS, SPECIAL, GrpcSeed, HttpSeed
from mutators import JSON_MUTATIONS, PROTOBUF_MUTATIONS
from secret_scan import SCAN, random_key

from weir.v1 import inference_pb2 as pb

SEED = int(os.environ.get("WEIR_FUZZ_SEED", "23"))
EXAMPLES = int(os.environ.get("WEIR_FUZZ_EXAMPLES", "100"))
# With tiny_smollm2_models: SmolLM2's tokenizer (the corpus's special tokens are its own) over the tiny random Llama.
MODELS = ("--embed-model", "all-minilm-l6-v2")
SERVER_RSS_BUDGET = 2 << 30  # dummy SmolLM2 + MiniLM took about 1 GiB; the hostile inputs may not double it
GATEWAY_RSS_BUDGET = 512 << 20
CALL_TIMEOUT_S = 60.0
SERVER_KEY = random_key("fuzz-server")
SECOND_KEY = random_key("fuzz-server-2")  # on the command line; SERVER_KEY comes from --api-key-file
GATEWAY_KEY = random_key("fuzz-gateway")
WRONG_KEY = random_key("fuzz-wrong")
BIG_MESSAGES = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 64 << 20)]
# "texts: ...", "messages[3].content: ...", "sampling_params.max_tokens: ..."
FIELD_NAMED = re.compile(r"^[a-z_]+(\[\d+\])?(\.[a-z_]+(\[\d+\])?)*: \S")
UNDECODABLE = "the request does not decode as "
SPECIAL_IDS = [1, 2]  # SmolLM2's <|im_start|> and <|im_end|>


def _mostly(rng: random.Random, percent: int) -> bool:
    return rng.randrange(100) < percent


# ---- the processes under test ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    running = Launcher(tmp_path_factory.mktemp("fuzz"))
    yield running
    running.close()


@pytest.fixture(scope="module")
def server(launcher: Launcher, tiny_smollm2: Path) -> ServerProcess:
    key_file = launcher.directory / "server-keys.txt"
    key_file.write_text(f"{SERVER_KEY}\n")
    flags = (*LIMITS.server_flags(), "--frontend-threads", "2", "--max-num-seqs", "4", "--max-waiting", "8",
             "--api-key-file", str(key_file), "--api-key", SECOND_KEY, "--log-level", "debug")  # fmt: skip
    return launcher.server(*flags, model_args=tiny_smollm2_models(tiny_smollm2, *MODELS))


@pytest.fixture(scope="module")
def gateway(launcher: Launcher, server: ServerProcess) -> GatewayProcess:
    flags = (*LIMITS.gateway_flags(), "--api-key", GATEWAY_KEY, "--backend-api-key", SECOND_KEY, "--header-timeout",
             "1", "--body-timeout", "3", "--request-timeout", "60", "--log-level", "debug")  # fmt: skip
    return launcher.gateway([server.target], *flags)


# ---- gRPC cases -----------------------------------------------------------------------------------------------

AUTH_KINDS = ["key"] * 16 + ["second-key", "wrong-key", "no-key", "not-bearer", "oversize"]


@dataclass(frozen=True)
class GrpcCase:
    label: str
    seed: GrpcSeed
    bodies: list[bytes]
    auth: str
    metadata: tuple[tuple[str, str], ...]
    over_limit: bool  # unmutated, and past the seed's limit: a refusal must name the seed's field


def _auth(kind: str, rng: random.Random) -> tuple[tuple[str, str], ...]:
    value = {
        "key": f"Bearer {SERVER_KEY}",
        "second-key": f"Bearer {SECOND_KEY}",
        "wrong-key": f"Bearer {WRONG_KEY}",
        "not-bearer": f"Basic {SERVER_KEY}",
        "oversize": f"Bearer {SERVER_KEY}" + "x" * rng.choice([7000, 9000, 20_000]),
    }.get(kind)
    return () if value is None else (("authorization", value),)


def grpc_cases(rng: random.Random, examples: int) -> Iterator[GrpcCase]:
    """The corpus at the issue's sizes and just past each limit, each mutation of each seed, then `examples` random
    mutations of it."""
    for seed in GRPC_SEEDS:
        for size in (seed.issue_size, seed.limit + 1):
            yield GrpcCase(f"{seed.name} size={size}", seed, seed.build(size, rng), "key", _auth("key", rng),
                           over_limit=True)  # fmt: skip
    for seed in GRPC_SEEDS:
        for mutation, mutate in PROTOBUF_MUTATIONS.items():
            size = rng.choice(seed.sizes())
            bodies = seed.build(size, rng)
            if sum(map(len, bodies)) < 8 << 20:
                bodies = [mutate(b, seed.request_type.DESCRIPTOR, rng) or b for b in bodies]
            label = f"{seed.name} size={size} mutation={mutation} auth=key x{len(bodies)}"
            yield GrpcCase(label, seed, bodies, "key", _auth("key", rng), over_limit=False)
    key_in_text = pb.TokenizeRequest(texts=[f"my key is {SERVER_KEY} ok"]).SerializeToString()
    for i in range(examples):
        seed = rng.choice(GRPC_SEEDS)
        size = rng.choice(seed.sizes())
        bodies = seed.build(size, rng)
        mutation = rng.choice(list(PROTOBUF_MUTATIONS)) if _mostly(rng, 50) else "none"
        if i % 25 == 0:  # a key inside a request that does not decode: the refusal must not quote it
            seed, bodies, mutation = GRPC_SEEDS[0], [key_in_text], "bad-utf8"
        if mutation != "none" and sum(map(len, bodies)) < 8 << 20:
            bodies = [PROTOBUF_MUTATIONS[mutation](b, seed.request_type.DESCRIPTOR, rng) or b for b in bodies]
        auth = rng.choice(AUTH_KINDS)
        label = f"{seed.name} size={size} mutation={mutation} auth={auth} x{len(bodies)}"
        over = mutation == "none" and size > seed.limit and len(bodies) == 1
        yield GrpcCase(label, seed, bodies, auth, _auth(auth, rng), over)


def _send(channel: grpc.Channel, rpc: str, body: bytes, metadata: tuple[tuple[str, str], ...]) -> grpc.RpcError | None:
    """One raw call; its error, or None for a success (a Generate stream's first reply, then cancelled)."""
    method = f"/weir.v1.InferenceService/{rpc}"
    try:
        if rpc == "Generate":
            call = channel.unary_stream(method)(body, metadata=metadata, timeout=CALL_TIMEOUT_S)
            try:
                next(iter(call), None)
            finally:
                call.cancel()
        else:
            channel.unary_unary(method)(body, metadata=metadata, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as e:
        return e
    return None


def grpc_problem(case: GrpcCase, error: grpc.RpcError | None) -> str | None:
    """What is wrong with an answer, or None for a success or a clean refusal."""
    if error is None:
        return "served a wrong key" if case.auth not in ("key", "second-key") else None
    code, details = error.code(), error.details() or ""
    keyed = case.auth in ("key", "second-key")
    if SERVER_KEY in details or SERVER_KEY[:8] in details:
        return f"{code.name}: the reply quotes the key"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return None if not keyed else "a right key refused"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None if details else "RESOURCE_EXHAUSTED without details"
    if code == grpc.StatusCode.NOT_FOUND and details.startswith("model "):
        return None  # a mutation wrote bytes into the `model` field
    if code != grpc.StatusCode.INVALID_ARGUMENT:
        return f"{code.name}: {details[:200]}"
    if not (FIELD_NAMED.match(details) or details.startswith(UNDECODABLE)):
        return f"INVALID_ARGUMENT naming no field: {details[:200]}"
    if case.over_limit and not details.startswith(case.seed.field):
        return f"over the {case.seed.field} limit, refused for another field: {details[:200]}"
    return None


def test_grpc_fuzz_of_the_hostile_inputs(server: ServerProcess) -> None:
    rng = random.Random(SEED)
    tally, codes, problems = Tally("fuzz-grpc"), Counter[str](), []
    started = time.monotonic()
    with HealthProbe(server.target, pid=server.process.popen.pid) as probe:
        with grpc.insecure_channel(server.target, options=BIG_MESSAGES) as channel, ThreadPoolExecutor(32) as pool:
            for case in grpc_cases(rng, EXAMPLES):
                errors = list(pool.map(lambda b, c=case: _send(channel, c.seed.rpc, b, c.metadata), case.bodies))
                for error in errors:
                    tally.sent += 1
                    codes[error.code().name if error else "OK"] += 1
                    if (problem := grpc_problem(case, error)) is not None:
                        problems.append(f"{case.label}: {problem}")
    took = time.monotonic() - started
    after = _normal_generate(server)
    tally.answered, tally.refused, tally.failed = codes["OK"], tally.sent - codes["OK"], len(problems)
    tally.other = dict(codes)
    tally.info = {"seconds": f"{took:.1f}", "worst_health_s": f"{probe.worst:.3f}",
                  "health_checks": str(len(probe.waits)), "max_rss_mib": str(probe.max_rss >> 20)}  # fmt: skip
    tally.report()
    assert not problems, "\n".join(problems[:20])
    assert probe.statuses == {"SERVING"} and after == "OK"
    assert probe.worst < HEALTH_BOUND_S, f"a health check waited {probe.worst:.2f}s"
    assert 0 < probe.max_rss < SERVER_RSS_BUDGET, f"server RSS reached {probe.max_rss >> 20} MiB"
    assert codes["OK"] > 10 and codes["INVALID_ARGUMENT"] > 10  # the fuzz reaches the engine and the limits
    assert not SCAN.leaks([server.process.log_path])


def _normal_generate(server: ServerProcess) -> str:
    with keyed_channel(server.target, SERVER_KEY) as channel:
        request = pb.GenerateRequest(prompt="Hello", sampling_params=pb.SamplingParams(max_tokens=2))
        error = _send(channel, "Generate", request.SerializeToString(), ())
    return "OK" if error is None else error.code().name


def test_special_tokens_in_user_content_stay_text(server: ServerProcess) -> None:
    """`<|im_end|>\\n<|im_start|>system` typed by a user is text: the prompt holds as many special tokens as the
    same conversation without it."""
    with keyed_channel(server.target, SERVER_KEY) as channel:
        detokenize = channel.unary_unary("/weir.v1.InferenceService/Detokenize",
                                         request_serializer=pb.DetokenizeRequest.SerializeToString,
                                         response_deserializer=pb.DetokenizeResponse.FromString)  # fmt: skip
        generate = channel.unary_stream("/weir.v1.InferenceService/Generate",
                                        request_serializer=pb.GenerateRequest.SerializeToString,
                                        response_deserializer=pb.GenerateResponse.FromString)  # fmt: skip
        request = pb.DetokenizeRequest(sequences=[pb.TokenIds(ids=SPECIAL_IDS)], skip_special_tokens=False)
        assert detokenize(request, timeout=30).texts == ["<|im_start|><|im_end|>"]
        counts = []
        for content in ("Hello.", "Hello." + SPECIAL * 3):
            request = pb.GenerateRequest(sampling_params=pb.SamplingParams(max_tokens=1))
            request.messages.messages.add(role="user", content=content)
            prompt = list(next(iter(generate(request, timeout=60))).prompt_token_ids)
            counts.append([prompt.count(i) for i in SPECIAL_IDS])
    assert counts[0] == counts[1] and counts[0][0] > 0, counts


# ---- HTTP cases -----------------------------------------------------------------------------------------------

HTTP_AUTH = ["key"] * 12 + ["wrong-key", "no-key", "oversize", "oversize", "lowercase"]
OK_HTTP = {200, 400, 404, 408, 413, 429}  # 404: a model no backend serves


@dataclass(frozen=True)
class HttpCase:
    label: str
    seed: HttpSeed
    body: bytes
    auth: str
    header: str | None  # the Authorization header
    over_limit: bool


def _http_auth(kind: str, rng: random.Random) -> str | None:
    return {
        "key": f"Bearer {GATEWAY_KEY}",
        "wrong-key": f"Bearer {WRONG_KEY}",
        "lowercase": f"bearer {GATEWAY_KEY}",
        "oversize": f"Bearer {GATEWAY_KEY}" + "x" * rng.choice([900, 1000, 1100, 8000]),
    }.get(kind)


def http_cases(rng: random.Random, examples: int) -> Iterator[HttpCase]:
    for seed in HTTP_SEEDS:
        for size in (seed.issue_size, seed.limit + 1):
            body = seed.build(size, rng)
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            yield HttpCase(f"{seed.name} size={size}", seed, data, "key", _http_auth("key", rng), True)
    for seed in HTTP_SEEDS:
        for mutation, mutate in JSON_MUTATIONS.items():
            size = rng.choice(seed.sizes())
            body = seed.build(size, rng)
            if isinstance(body, dict):  # a seed of raw bytes has no JSON to mutate
                label = f"{seed.name} size={size} mutation={mutation} auth=key"
                yield HttpCase(label, seed, mutate(body, rng), "key", _http_auth("key", rng), False)
    for i in range(examples):
        seed = rng.choice(HTTP_SEEDS)
        size = rng.choice(seed.sizes())
        body = seed.build(size, rng)
        mutation = rng.choice(list(JSON_MUTATIONS)) if _mostly(rng, 50) and isinstance(body, dict) else "none"
        if i % 25 == 0:  # the key inside a body that is not UTF-8: neither the answer nor a log may quote it
            body, mutation = {"prompt": f"my key is {GATEWAY_KEY} ok", "max_tokens": 1}, "bad-utf8"
        if isinstance(body, dict):
            body = json.dumps(body).encode() if mutation == "none" else JSON_MUTATIONS[mutation](body, rng)
        auth = rng.choice(HTTP_AUTH)
        label = f"{seed.name} size={size} mutation={mutation} auth={auth}"
        yield HttpCase(label, seed, body, auth, _http_auth(auth, rng), mutation == "none" and size > seed.limit)


def http_post(port: int, path: str, body: bytes, authorization: str | None) -> tuple[int, bytes]:
    """POST `body` over a fresh connection; the status (0 when the connection closed without one) and the body."""
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close"]  # fmt: skip
    if authorization is not None:
        head.append(f"Authorization: {authorization}")
    with socket.create_connection(("127.0.0.1", port), timeout=CALL_TIMEOUT_S) as sock:
        try:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        except OSError:  # the gateway answered before it read everything (413) and closed
            pass
        answer = b""
        try:
            while chunk := sock.recv(1 << 16):
                answer += chunk
        except ConnectionResetError:
            pass
    if not answer.startswith(b"HTTP/1."):
        return 0, answer
    head_bytes, _, payload = answer.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head_bytes.lower():
        payload = _unchunk(payload)
    return int(answer.split()[1]), payload


def _unchunk(data: bytes) -> bytes:
    out, at = b"", 0
    while (end := data.find(b"\r\n", at)) >= 0 and (size := int(data[at:end].split(b";")[0] or b"0", 16)):
        out += data[end + 2 : end + 2 + size]
        at = end + 4 + size
    return out


def parser_refusal(case: HttpCase, status: int, payload: bytes) -> bool:
    """aiohttp's own plain-text 400 for a header over --max-header-bytes. It quotes the header's first 100 bytes,
    an Authorization key included, back to the client that sent it (aiohttp builds it; the gateway's log of it
    quotes nothing): the one answer allowed to hold the key."""
    return status == 400 and case.auth == "oversize" and payload.startswith(b"Got more than ")


def http_problem(case: HttpCase, status: int, payload: bytes) -> str | None:
    keyed = case.auth in ("key", "lowercase")
    if parser_refusal(case, status, payload):
        return None
    if GATEWAY_KEY.encode() in payload or GATEWAY_KEY[:8].encode() in payload:
        return f"{status}: the answer quotes the key"
    if status == 401:
        return None if not keyed else "a right key refused"
    if status not in OK_HTTP:
        return f"status {status}: {payload[:200]!r}"
    if status == 200:
        return None if keyed else "served a wrong key"
    try:
        error = json.loads(payload)["error"]
    except (ValueError, KeyError, TypeError):
        return f"{status} without an OpenAI error body: {payload[:200]!r}"
    if not error.get("message"):
        return f"{status} without a message"
    named = f"{error.get('param')} {error['message']}"
    # A body too deep to parse at all is refused as a whole, before any field.
    if case.over_limit and status == 400 and case.seed.param not in named and "body is not valid JSON" not in named:
        return f"over the {case.seed.param} limit, refused for another reason: {error['message'][:200]}"
    return None


@dataclass
class HttpHealthProbe(HealthProbe):
    """The gateway's GET /health every 50 ms."""

    url: str = ""

    def _poll(self) -> None:
        def check() -> str:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=10) as reply:
                    return "SERVING" if reply.status == 200 else str(reply.status)
            except OSError as e:
                return type(e).__name__

        self._loop(check)


@dataclass
class SlowHeads:
    """Connections that send a keyed request head a byte every 100 ms, as a slowloris client does; each is cut off
    by the gateway's header timeout and opened again."""

    port: int
    count: int
    cut_off: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        head = f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {GATEWAY_KEY}\r\n".encode()
        sockets: dict[socket.socket, int] = {}
        while not self._stop.is_set():
            while len(sockets) < self.count:
                sockets[socket.create_connection(("127.0.0.1", self.port), timeout=5)] = 0
            for sock, sent in list(sockets.items()):
                try:
                    sock.send(head[sent % len(head) : sent % len(head) + 1])
                    sockets[sock] = sent + 1
                except OSError:
                    self.cut_off += 1
                    sock.close()
                    del sockets[sock]
            self._stop.wait(0.1)
        for sock in sockets:
            sock.close()

    def __enter__(self) -> SlowHeads:
        self._thread = threading.Thread(target=self.run, name="slow-heads", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_http_fuzz_of_the_hostile_inputs(server: ServerProcess, gateway: GatewayProcess) -> None:
    rng = random.Random(SEED + 1)
    tally, statuses, problems, echoed = Tally("fuzz-http"), Counter[str](), [], 0
    started = time.monotonic()
    probe = HttpHealthProbe(server.target, pid=gateway.process.popen.pid, url=gateway.url)
    with probe, HealthProbe(server.target) as server_probe, SlowHeads(gateway.port, 8) as slow:
        for case in http_cases(rng, EXAMPLES):
            status, payload = http_post(gateway.port, case.seed.path, case.body, case.header)
            tally.sent += 1
            statuses[str(status)] += 1
            echoed += parser_refusal(case, status, payload) and GATEWAY_KEY.encode() in payload
            if (problem := http_problem(case, status, payload)) is not None:
                problems.append(f"{case.label}: {problem}")
    took = time.monotonic() - started
    hello = b'{"prompt": "Hello", "max_tokens": 2}'
    normal = http_post(gateway.port, "/v1/completions", hello, f"Bearer {GATEWAY_KEY}")
    tally.answered, tally.failed, tally.disconnected = statuses["200"], len(problems), slow.cut_off
    tally.refused = tally.sent - tally.answered
    tally.other = dict(statuses)
    tally.info = {"seconds": f"{took:.1f}", "worst_gateway_health_s": f"{probe.worst:.3f}",
                  "worst_server_health_s": f"{server_probe.worst:.3f}", "max_gateway_rss_mib": str(probe.max_rss >> 20),
                  "parser_400s_echoing_the_key": str(echoed)}  # fmt: skip
    tally.report()
    assert not problems, "\n".join(problems[:20])
    assert normal[0] == 200, normal
    assert probe.statuses == {"SERVING"} and server_probe.statuses == {"SERVING"}
    assert max(probe.worst, server_probe.worst) < HEALTH_BOUND_S, (probe.worst, server_probe.worst)
    assert 0 < probe.max_rss < GATEWAY_RSS_BUDGET, f"gateway RSS reached {probe.max_rss >> 20} MiB"
    assert slow.cut_off > 0  # the slow heads were cut off and came back, throughout the run
    assert statuses["200"] > 5 and statuses["400"] > 5
    assert not SCAN.leaks([gateway.process.log_path, server.process.log_path])
