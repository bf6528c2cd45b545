"""The engine surface the GPU harnesses reach past gRPC (weir_bench.engines, the engine-loop row, the host
profile, tp's scheduler-and-runner loop), exercised on the CPU with a one-layer model, so that a change in
weir_server.engine or weir_server.executor breaks CI here rather than a run on the GPU machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from weir_bench import cli, engines
from weir_bench.gpu_cli import build_parser
from weir_bench.gpu_targets import engine_loop
from weir_bench.host_profile import tiny_model_dir
from weir_bench.load import make_prompts

VOCAB = 512


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A three-word tokenizer: dummy weights need none of the full vocabulary (other ids decode to nothing)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tokenizer")
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tokenizer_dir, tmp_path_factory.mktemp("model"), VOCAB)


@pytest.fixture(scope="module")
def tiny_core(model_dir: Path):
    from weir_server.config import CacheConfig, EngineConfig, ExecutorConfig, ModelConfig, SchedulerConfig
    from weir_server.models.loader import load_model

    model = ModelConfig(str(model_dir), load_format="dummy", dtype="float32", device="cpu", max_model_len=256)
    config = EngineConfig(model, CacheConfig(num_blocks=64), SchedulerConfig(max_num_seqs=8), ExecutorConfig())
    return engines.engine_core(load_model(model, "generate"), config)


def test_run_to_completion_gives_every_request_its_tokens(tiny_core):
    from weir_server.engine.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    seen: list[str] = []
    tokens = engines.run_to_completion(
        tiny_core,
        [GenerationRequest(f"r{i}", [3 + i] * 6, params) for i in range(3)],
        lambda o: seen.append(o.request_id),
    )
    assert {k: len(v) for k, v in tokens.items()} == {"r0": 5, "r1": 5, "r2": 5}
    assert set(seen) == {"r0", "r1", "r2"}


def test_engine_loop_row_times_the_parts_of_a_step(tiny_core, capsys):
    args = build_parser().parse_args(["run", "--tokenizer", "t", "--num-requests", "4", "--output-tokens", "3"])
    row = engine_loop(tiny_core, args, make_prompts(4, 8, VOCAB, seed=0))
    assert (row.target, row.requests, row.errors) == ("weir engine loop (no asyncio)", 4, 0)
    assert "read back (waits for GPU)" in capsys.readouterr().out


def test_host_profile_runs_its_decode_steps_on_the_cpu(tokenizer_dir, capsys):
    threads = torch.get_num_threads()  # the profile pins one thread; give the other tests theirs back
    try:
        argv = ["--tokenizer", str(tokenizer_dir), "--seqs", "4", "--prompt-tokens", "8", "--output-tokens", "3"]
        assert cli.main(["host-profile", *argv, "--vocab-size", str(VOCAB), "--no-gc-freeze"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "decode steps at 4 seqs" in out and "read back + append" in out


async def test_in_process_driver_streams_and_its_core_stays_reachable_after_close(model_dir):
    from weir_bench.inprocess import InProcessDriver

    argv = ["--model", str(model_dir), "--load-format", "dummy", "--max-model-len", "256", "--embed-model", "none",
            "--kv-cache-memory-gb", "0.05"]  # fmt: skip
    driver = await InProcessDriver.start(argv)
    try:
        timing = await driver.generate([3, 4, 5, 6], 4)
    finally:
        await driver.close()
    assert timing.ok and timing.num_output_tokens == 4
    assert not engines.core_of(driver.engine).has_unfinished()  # the engine-loop row steps it from here


def test_tp_generate_steps_the_scheduler_and_model_runner_on_the_cpu(model_dir):
    from weir_bench.tp import generate
    from weir_server.config import CacheConfig, EngineConfig, ExecutorConfig, ModelConfig, SchedulerConfig
    from weir_server.executor.model_runner import ModelRunner
    from weir_server.models.loader import load_model

    model = ModelConfig(str(model_dir), load_format="dummy", dtype="float32", device="cpu", max_model_len=256)
    config = EngineConfig(model, CacheConfig(num_blocks=64), SchedulerConfig(max_num_seqs=8), ExecutorConfig())
    run = generate(ModelRunner(load_model(model, "generate"), config), [[3, 4, 5], [6, 7, 8, 9]], 3)
    assert [len(t) for t in run.tokens] == [3, 3] and run.seconds > 0 and run.itl_ms > 0
