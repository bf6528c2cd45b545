"""weir.v1.ControlService against real servers: Abort ends a request wherever it is (thread and process engine cores)
and its KV blocks return to the pool within a step; GetLoad reports the engine's own numbers; GetServerInfo
describes the models; WatchKvEvents replays to the block manager's cache; grpcurl reaches each RPC through
reflection; API keys and drain apply as to inference."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from weir.v1 import inference_pb2, inference_pb2_grpc
from weir_client import WeirClient, WeirClientError
from weir_client.control import AllBlocksCleared, BlockRemoved, BlockStored
from weir_server.config import CacheConfig, EngineConfig, ExecutorConfig, ModelConfig, SchedulerConfig, ServerConfig

pytestmark = pytest.mark.timeout(300)

GRPCURL = Path(sys.executable).parent / "grpcurl"
LONG = {"max_tokens": 900, "temperature": 0.0, "ignore_eos": True}


class Stream:
    """A Generate call consumed on a thread: its chunks so far, and how it ended."""

    def __init__(
        self,
        client: WeirClient,
        request_id: str,
        prompt: str | None = "Tell me a very long story.",
        messages: list[dict[str, str]] | None = None,
    ) -> None:
        self.request_id = request_id
        self._input: dict[str, Any] = {"messages": messages} if messages is not None else {"prompt": prompt}
        self.chunks = 0
        self.started = threading.Event()
        self.error: WeirClientError | None = None
        self.finish_reasons: list[str | None] = []
        self._thread = threading.Thread(target=self._consume, args=(client,), daemon=True)
        self._thread.start()

    def _consume(self, client: WeirClient) -> None:
        try:
            for chunk in client.generate(request_id=self.request_id, timeout=240, **self._input, **LONG):
                self.chunks += 1
                self.finish_reasons.append(chunk.finish_reason)
                self.started.set()
        except WeirClientError as e:
            self.error = e
        finally:
            self.started.set()

    def join(self) -> None:
        self._thread.join(timeout=120)
        assert not self._thread.is_alive(), "the stream did not end"


def wait_for(predicate, what: str, limit_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def wait_idle(client: WeirClient) -> None:
    """No sequence holds a KV block (every block is free or cached-and-evictable)."""
    wait_for(lambda: _idle(client), "an idle engine")


def _idle(client: WeirClient) -> bool:
    load = client.get_load().models[0]
    return load.running == 0 and load.waiting == 0 and load.kv_blocks_used == 0


@pytest.fixture(scope="module")
def client(weir_target: str) -> Iterator[WeirClient]:
    with WeirClient(weir_target, timeout=120) as client:
        yield client


# ---- Abort ------------------------------------------------------------------------------------------------------


def test_abort_ends_a_running_generation_and_frees_its_blocks_within_a_step(
    client: WeirClient, weir_server: Any
) -> None:
    wait_idle(client)
    stream = Stream(client, f"long-{uuid.uuid4().hex[:6]}")
    assert stream.started.wait(120) and stream.error is None
    assert client.get_load().models[0].kv_blocks_used > 0
    steps_before = weir_server.generate_engine.stats().num_steps
    assert client.abort([stream.request_id, "never-seen"]) == [stream.request_id]
    stream.join()
    assert stream.error is not None and stream.error.code == grpc.StatusCode.CANCELLED
    assert "aborted" in stream.error.message
    wait_idle(client)
    # The abort is taken at the top of the core's next iteration: the step running then is the last (the stats read
    # before the abort may lag one step behind).
    assert weir_server.generate_engine.stats().num_steps - steps_before <= 2
    assert stream.chunks < LONG["max_tokens"]


def test_abort_is_idempotent_and_unknown_ids_are_not_an_error(client: WeirClient) -> None:
    stream = Stream(client, f"twice-{uuid.uuid4().hex[:6]}")
    assert stream.started.wait(120)
    assert client.abort(stream.request_id) == [stream.request_id]
    assert client.abort(stream.request_id) == []
    stream.join()
    assert stream.error is not None and stream.error.code == grpc.StatusCode.CANCELLED
    assert client.abort([]) == []


def test_abort_reaches_every_call_sharing_a_caller_id(client: WeirClient) -> None:
    # The engine gets suffixed ids (a caller may reuse theirs): Abort maps the caller's id to every one of them.
    request_id = f"shared-{uuid.uuid4().hex[:6]}"
    streams = [Stream(client, request_id), Stream(client, request_id)]
    for stream in streams:
        assert stream.started.wait(120)
    assert client.abort(request_id) == [request_id]
    for stream in streams:
        stream.join()
        assert stream.error is not None and stream.error.code == grpc.StatusCode.CANCELLED
    wait_idle(client)


def test_abort_takes_ten_thousand_ids_and_refuses_more_naming_the_field(client: WeirClient) -> None:
    ids = [f"unknown-{i}" for i in range(10_000)]
    assert client.abort(ids) == []
    with pytest.raises(WeirClientError) as refused:
        client.abort([*ids, "one-too-many"])
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and refused.value.field == "request_ids"


def test_a_finished_request_is_not_aborted(client: WeirClient) -> None:
    request_id = f"done-{uuid.uuid4().hex[:6]}"
    client.complete("Hi", request_id=request_id, max_tokens=2)
    assert client.abort(request_id) == []


def test_abort_ends_a_chat_still_waiting_for_a_worker_to_prepare_its_prompt(
    client: WeirClient, weir_server: Any
) -> None:
    # Chats are rendered and tokenized on the server's worker threads; with every worker held, this one's preparation
    # waits in the pool's queue, where Abort must still reach it: it never gets to an engine.
    workers = weir_server.server.servicer.workers
    gate, holding = threading.Event(), threading.Semaphore(0)

    def hold(checkpoint: Any) -> None:
        holding.release()
        gate.wait(120)

    held = [asyncio.run_coroutine_threadsafe(workers.run(hold), weir_server.loop) for _ in range(workers.threads)]
    request_id = f"preparing-{uuid.uuid4().hex[:6]}"
    try:
        for _ in held:
            assert holding.acquire(timeout=60)
        steps_before = weir_server.generate_engine.stats().num_steps
        document = "A long document the user pastes into the chat before a question about it. " * 60
        stream = Stream(client, request_id, messages=[{"role": "user", "content": document + "Summarize it."}])
        wait_for(lambda: client.abort([request_id]) == [request_id], "Abort to find the call being prepared")
        stream.join()
    finally:
        gate.set()
        for future in held:
            future.result(60)
    assert stream.error is not None and stream.error.code == grpc.StatusCode.CANCELLED, stream.error
    assert "aborted" in stream.error.message and stream.chunks == 0
    workers_done = asyncio.run_coroutine_threadsafe(workers.run(lambda checkpoint: None), weir_server.loop)
    workers_done.result(60)  # the pool is FIFO: had the chat's work still been queued, it would have run by now
    assert client.abort([request_id]) == []
    wait_idle(client)
    assert weir_server.generate_engine.stats().num_steps == steps_before  # the engine never saw it


# ---- GetLoad -----------------------------------------------------------------------------------------------------


def test_get_load_equals_the_engines_stats(client: WeirClient, weir_server: Any) -> None:
    client.complete("Say hello.", max_tokens=4)
    wait_idle(client)
    load = client.get_load()
    stats = weir_server.generate_engine.stats()
    assert not load.draining and [m.model for m in load.models] == ["smollm2-135m-instruct"]
    model = load.models[0]
    assert (model.running, model.waiting) == (stats.num_running, stats.num_waiting)
    assert model.kv_blocks_used == stats.num_total_blocks - stats.num_free_blocks
    assert (model.kv_blocks_total, model.block_size) == (stats.num_total_blocks, stats.block_size)
    assert model.num_preemptions == stats.num_preemptions
    named = client.get_load("smollm2-135m-instruct").models
    assert [(m.model, m.kv_blocks_total) for m in named] == [(model.model, model.kv_blocks_total)]


def test_get_load_rates_cover_the_recent_window(client: WeirClient) -> None:
    prompt = "You are a careful assistant. " * 12 + "Answer briefly."
    client.get_load()  # a sample the window starts from
    client.complete(prompt, max_tokens=8, temperature=0.0)
    client.complete(prompt, max_tokens=8, temperature=0.0)  # its prompt's full blocks come from the cache
    model = client.get_load().models[0]
    assert model.window_seconds > 0
    assert model.generation_tokens_per_second > 0
    assert 0 < model.prefix_cache_hit_rate <= 1


def test_get_load_names_a_missing_or_embedding_model_clearly(client: WeirClient) -> None:
    with pytest.raises(WeirClientError) as missing:
        client.get_load("no-such-model")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(WeirClientError) as embedder:
        client.get_load("all-minilm-l6-v2")
    assert embedder.value.code == grpc.StatusCode.INVALID_ARGUMENT and embedder.value.field == "model"


# ---- GetServerInfo -----------------------------------------------------------------------------------------------


def test_server_info_describes_each_model_with_its_tokenizer_digest(client: WeirClient, weir_server: Any) -> None:
    info = client.server_info()
    assert info.version == importlib.metadata.version("weir-server")
    models = {m.id: m for m in info.models}
    generator, embedder = models["smollm2-135m-instruct"], models["all-minilm-l6-v2"]
    engine = weir_server.generate_engine
    assert (generator.task, generator.max_model_len, generator.device) == ("generate", 1024, "cpu")
    assert generator.block_size == engine.config.cache.block_size and generator.tensor_parallel_size == 1
    assert generator.dtype == str(engine.loaded.dtype).removeprefix("torch.")
    tokenizer_json = engine.loaded.tokenizer.backend_tokenizer.to_str()
    assert generator.tokenizer_digest == "sha256:" + hashlib.sha256(tokenizer_json.encode()).hexdigest()
    assert (embedder.task, embedder.block_size) == ("embed", 0)
    assert embedder.tokenizer_digest.startswith("sha256:") and embedder.tokenizer_digest != generator.tokenizer_digest


# ---- grpcurl -----------------------------------------------------------------------------------------------------


def _grpcurl(*args: str) -> str:
    if not GRPCURL.exists():
        pytest.skip("grpcurl is not installed in the virtual environment")
    done = subprocess.run([str(GRPCURL), "-plaintext", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_grpcurl_lists_and_calls_every_control_rpc_without_proto_files(weir_target: str) -> None:
    assert "weir.v1.ControlService" in _grpcurl(weir_target, "list").split()
    methods = _grpcurl(weir_target, "list", "weir.v1.ControlService").split()
    assert set(methods) == {
        f"weir.v1.ControlService.{m}" for m in ("Abort", "GetLoad", "GetServerInfo", "WatchKvEvents")
    }
    load = json.loads(_grpcurl("-d", "{}", weir_target, "weir.v1.ControlService/GetLoad"))
    model = load["models"][0]
    blocks = model.get("kv_blocks_total", model.get("kvBlocksTotal"))  # grpcurl prints proto names, or JSON ones
    assert model["model"] == "smollm2-135m-instruct" and int(blocks) > 0
    info = json.loads(_grpcurl("-d", "{}", weir_target, "weir.v1.ControlService/GetServerInfo"))
    assert {m["id"] for m in info["models"]} == {"smollm2-135m-instruct", "all-minilm-l6-v2"}
    aborted = json.loads(_grpcurl("-d", '{"request_ids": ["nothing"]}', weir_target, "weir.v1.ControlService/Abort"))
    assert aborted == {}


def test_get_load_flooded_at_a_kilohertz_leaves_greedy_streams_and_health_as_they_were(
    client: WeirClient, weir_target: str
) -> None:
    prompts = ["Count from one to ten:", "Name three colours:", "Say hello in French:"]
    greedy = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
    alone = [client.complete(prompt, **greedy).text for prompt in prompts]  # type: ignore[arg-type]
    stop = threading.Event()
    answered = [0] * 4
    failures: list[BaseException] = []

    def poll(caller: int) -> None:
        with WeirClient(weir_target, timeout=30) as poller:
            while not stop.is_set():
                try:
                    poller.get_load()
                except WeirClientError as e:
                    failures.append(e)
                    return
                answered[caller] += 1
                time.sleep(0.004)  # about 250 Hz per caller, 1 kHz together

    pollers = [threading.Thread(target=poll, args=(i,), daemon=True) for i in range(len(answered))]
    for poller in pollers:
        poller.start()
    try:
        wait_for(lambda: all(answered), "every poller to be answered")
        flooded = [client.complete(prompt, **greedy).text for prompt in prompts]  # type: ignore[arg-type]
        health = client.health()
    finally:
        stop.set()
        for poller in pollers:
            poller.join(timeout=30)
    assert not failures
    assert flooded == alone
    assert health == "SERVING"


# ---- the port's API keys and drain -------------------------------------------------------------------------------


def test_control_rpcs_need_the_api_key_and_keep_answering_while_draining(start_server: Callable[..., Any]) -> None:
    running = start_server(ServerConfig(host="127.0.0.1", port=0, generate=None, embed=None, api_keys=("k1",)))
    with WeirClient(running.target, timeout=30) as anonymous:
        with pytest.raises(WeirClientError) as refused:
            anonymous.get_load()
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(WeirClientError) as refused:
            anonymous.abort("x")
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    with WeirClient(running.target, timeout=30, api_key="k1") as client:
        assert client.get_load().draining is False
        running.server.drain.begin()
        assert client.get_load().draining is True  # a router sees the drain instead of a refusal
        with pytest.raises(WeirClientError) as drained:
            client.list_models()
        assert drained.value.code == grpc.StatusCode.UNAVAILABLE


# ---- the process engine core ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def process_server(start_server: Callable[..., Any], tiny_smollm2: Path) -> Any:
    """An engine-core process, one sequence at a time, so a second request waits. Its model is the tiny random Llama
    over SmolLM2's tokenizer: the packaged GGUF would cost the core process half a minute to read."""
    generate = EngineConfig(
        ModelConfig(str(tiny_smollm2), load_format="dummy", max_model_len=1024),
        cache=CacheConfig(kv_cache_memory_gb=0.25),
        scheduler=SchedulerConfig(max_num_seqs=1),
        executor=ExecutorConfig(num_threads=1, engine_core="process"),
    )
    return start_server(ServerConfig(host="127.0.0.1", port=0, generate=generate, embed=None))


def test_abort_reaches_running_and_waiting_requests_in_a_core_process(process_server: Any) -> None:
    from weir_server.engine.core_client import ProcessClient

    assert isinstance(process_server.generate_engine.client, ProcessClient)
    with WeirClient(process_server.target, timeout=120) as client:
        wait_idle(client)
        running = Stream(client, "proc-running")
        assert running.started.wait(120) and running.error is None
        waiting = Stream(client, "proc-waiting", prompt="Another long story, please.")
        wait_for(lambda: client.get_load().models[0].waiting == 1, "the second request to wait")
        assert client.abort(["proc-waiting"]) == ["proc-waiting"]
        waiting.join()
        assert waiting.error is not None and waiting.error.code == grpc.StatusCode.CANCELLED and waiting.chunks == 0
        wait_for(lambda: client.get_load().models[0].waiting == 0, "the waiting request to leave the queue")
        assert client.abort(["proc-running"]) == ["proc-running"]
        running.join()
        assert running.error is not None and running.error.code == grpc.StatusCode.CANCELLED
        wait_idle(client)  # the core process sends its stats after an abort even though it made no outputs


# ---- WatchKvEvents -----------------------------------------------------------------------------------------------


class Watcher:
    """A WatchKvEvents stream read on a thread, replayed into the set of cached block hashes."""

    def __init__(self, target: str) -> None:
        self.cached: set[int] = set()
        self.sequences: list[int] = []
        self.snapshot = threading.Event()
        self._client = WeirClient(target)
        self._stream = self._client.watch_kv_events()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(WeirClientError):  # CANCELLED when closed
            for batch in self._stream:
                for event in batch.events:
                    if isinstance(event, AllBlocksCleared):
                        self.cached.clear()
                    elif isinstance(event, BlockStored):
                        self.cached.update(event.block_hashes)
                    elif isinstance(event, BlockRemoved):
                        self.cached.difference_update(event.block_hashes)
                self.sequences.append(batch.sequence)
                self.snapshot.set()

    def close(self) -> None:
        self._client.close()
        self._thread.join(timeout=30)


def test_watch_kv_events_replays_match_the_block_managers_cache(client: WeirClient, weir_server: Any) -> None:
    block_manager = weir_server.generate_engine.client.core.block_manager
    watcher = Watcher(weir_server.target)
    try:
        assert watcher.snapshot.wait(60)
        wait_idle(client)
        assert watcher.cached == set(block_manager.hash_to_block)  # the snapshot is the cache as it is
        system = "You are a terse assistant who answers in one word. " * 4
        for question in ("Sky colour?", "Grass colour?", "Snow colour?"):
            client.complete(system + question, max_tokens=20, temperature=0.0)
        wait_idle(client)
        wait_for(lambda: watcher.cached == set(block_manager.hash_to_block), "the replay to catch up")
        assert len(watcher.cached) > 0
        numbers = watcher.sequences
        assert numbers[1:] == list(range(numbers[0] + 1, numbers[0] + len(numbers)))  # no gap after the snapshot
    finally:
        watcher.close()


def test_kv_events_cross_from_a_core_process(process_server: Any) -> None:
    watcher = Watcher(process_server.target)
    try:
        assert watcher.snapshot.wait(60)
        with WeirClient(process_server.target, timeout=120) as client:
            client.complete("Cached blocks, please. " * 12, max_tokens=4, temperature=0.0)
            wait_idle(client)
        wait_for(lambda: len(watcher.cached) > 0, "events from the core process")
        late = Watcher(process_server.target)  # its snapshot is the server's mirror of the core's cache
        try:
            assert late.snapshot.wait(60)
            assert late.cached == watcher.cached
        finally:
            late.close()
    finally:
        watcher.close()


def test_a_kv_events_subscriber_that_never_reads_is_ended_with_resource_exhausted(
    client: WeirClient, weir_server: Any
) -> None:
    log = weir_server.generate_engine.kv_events
    limit = log.max_pending
    # A subscription takes the bound when it is made: a small one overflows within a few dozen steps, not a thousand.
    log.max_pending = 8
    # A small HTTP/2 window, so the transport's buffers fill after a few messages and the server's writes wait.
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    with grpc.insecure_channel(weir_server.target, options=options) as channel:
        stub = inference_pb2_grpc.ControlServiceStub(channel)
        try:
            call = stub.WatchKvEvents(inference_pb2.WatchKvEventsRequest(), timeout=240)
            next(call)  # the snapshot: the subscription exists; from here on nobody reads
        finally:
            log.max_pending = limit
        published_before, subscribed = log.sequence, log.num_subscribers
        for i in range(200):  # each prompt stores fresh blocks (and evicts old ones): a batch of events per step
            client.complete(f"Fresh blocks number {i}, please. " * 8, max_tokens=1, temperature=0.0)
            if log.num_subscribers < subscribed:  # the server ended the stream
                break
        received = 1
        with pytest.raises(grpc.RpcError) as ended:
            for _ in call:
                received += 1
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ended.value
    assert "subscribe again" in ended.value.details()
    assert received < log.sequence - published_before  # batches were dropped, not buffered without bound
    # inference goes on (a token, not necessarily text: the model may end at once)
    assert client.complete("Still serving?", max_tokens=4).choices[0].usage.completion_tokens >= 1
