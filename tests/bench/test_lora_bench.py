"""`weir bench --scenario lora`: the adapters it writes are PEFT's format for the model's shape, its rows and verdict,
its options, and one small run against a real server of a tiny random model."""

from __future__ import annotations

import asyncio
import json
import math
from types import SimpleNamespace

import pytest

from weir_bench.cli import build_parser, main
from weir_bench.load import RequestTiming
from weir_bench.lora import (
    LoRARow,
    ModelShape,
    adapter_tensors,
    combine_rounds,
    format_lora_table,
    read_model_shape,
    shape_of,
    spec_from_args,
    summarize_count,
    target_verdict,
    with_relative,
    write_adapter,
)


def test_shape_of_a_grouped_query_config_sizes_every_projection():
    config = SimpleNamespace(
        num_hidden_layers=3, hidden_size=64, intermediate_size=160, num_attention_heads=8, num_key_value_heads=2,
        head_dim=16,
    )  # fmt: skip
    shape = shape_of(config)
    assert shape == ModelShape(num_layers=3, hidden_size=64, intermediate_size=160, q_size=128, kv_size=32)
    assert shape.projection("q_proj") == (64, 128)
    assert shape.projection("k_proj") == shape.projection("v_proj") == (64, 32)
    assert shape.projection("o_proj") == (128, 64)
    assert shape.projection("gate_proj") == shape.projection("up_proj") == (64, 160)
    assert shape.projection("down_proj") == (160, 64)


def test_adapter_tensors_are_peft_named_non_zero_and_seeded():
    shape = ModelShape(num_layers=2, hidden_size=8, intermediate_size=16, q_size=8, kv_size=4)
    tensors = adapter_tensors(shape, rank=4, targets=["k_proj", "down_proj"], seed=3)
    assert sorted(tensors) == sorted(
        f"base_model.model.model.layers.{i}.{parent}.{module}.lora_{ab}.weight"
        for i in range(2)
        for parent, module in (("self_attn", "k_proj"), ("mlp", "down_proj"))
        for ab in "AB"
    )
    k = "base_model.model.model.layers.1.self_attn.k_proj"
    assert tensors[f"{k}.lora_A.weight"].shape == (4, 8) and tensors[f"{k}.lora_B.weight"].shape == (4, 4)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 16)
    assert all((t != 0).all() for t in tensors.values())
    again = adapter_tensors(shape, rank=4, targets=["k_proj", "down_proj"], seed=3)
    assert all((again[name] == t).all() for name, t in tensors.items())
    assert (adapter_tensors(shape, 4, ["k_proj"], seed=4)[f"{k}.lora_B.weight"] != tensors[f"{k}.lora_B.weight"]).any()


def test_written_adapter_loads_into_peft_with_every_matrix(tiny_model, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter = write_adapter(tmp_path / "a0", read_model_shape(str(tiny_model)), 4, targets, seed=1)
    written = load_file(str(adapter / "adapter_model.safetensors"))
    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model))  # its config alone: random
    model = peft.PeftModel.from_pretrained(base, adapter)
    assert model.peft_config["default"].r == 4
    assert sorted(model.peft_config["default"].target_modules) == sorted(targets)
    loaded = {name.replace(".default", ""): p for name, p in model.named_parameters() if "lora_" in name}
    assert sorted(loaded) == sorted(written)  # every matrix PEFT expects is in the file, and nothing else
    for name, tensor in written.items():
        assert torch.equal(loaded[name].detach(), torch.from_numpy(tensor)), name


def _timing(start: float, arrivals: list[float], error: str | None = None) -> RequestTiming:
    timing = RequestTiming(start=start, events=[(t, 1) for t in arrivals], end=arrivals[-1] if arrivals else start)
    timing.error = error
    return timing


def test_a_row_counts_failures_and_takes_medians_of_the_successful_requests():
    timings = [_timing(0.0, [0.1, 0.2, 0.3]), _timing(0.0, [0.3, 0.32, 0.34]), _timing(0.0, [], error="boom")]
    row = summarize_count(4, timings, duration_s=2.0)
    assert (row.adapters, row.requests, row.errors) == (4, 3, 1)
    assert row.output_tok_per_s == pytest.approx(3.0)  # 6 tokens of the two good requests over 2 s
    assert row.ttft_p50_ms == pytest.approx(200.0)
    assert row.itl_p50_ms == pytest.approx(60.0)  # gaps 100, 100, 20, 20 ms
    assert math.isnan(row.relative)


def test_throughput_is_relative_to_the_base_row_and_nan_without_one():
    rows = with_relative([LoRARow(0, output_tok_per_s=200.0), LoRARow(16, output_tok_per_s=170.0)])
    assert [r.relative for r in rows] == [1.0, pytest.approx(0.85)]
    assert math.isnan(with_relative([LoRARow(4, output_tok_per_s=10.0)])[0].relative)


def test_table_has_a_line_per_count_and_names_the_base_row():
    table = format_lora_table(with_relative([LoRARow(0, 8, 0, 100.0, 12.0, 3.0), LoRARow(4, 8, 1, 90.0)]))
    lines = table.splitlines()
    assert len(lines) == 4 and "vs base" in lines[0]
    assert lines[2].startswith("| 0 (base)") and "100%" in lines[2]
    assert lines[3].startswith("| 4 ") and "90%" in lines[3] and " - " in lines[3]  # no TTFT measured: a dash


def test_rounds_combine_into_the_median_round_and_the_median_ratio_with_its_range():
    rounds = [
        with_relative([LoRARow(0, 4, 0, 100.0), LoRARow(16, 4, 0, 90.0)]),  # 90%
        with_relative([LoRARow(0, 4, 0, 80.0), LoRARow(16, 4, 1, 56.0)]),  # 70%
        with_relative([LoRARow(0, 4, 0, 120.0), LoRARow(16, 4, 0, 102.0)]),  # 85%
    ]
    base, sixteen = combine_rounds(rounds)
    assert (base.output_tok_per_s, base.relative, base.requests) == (100.0, 1.0, 12)
    assert sixteen.output_tok_per_s == 90.0 and sixteen.errors == 1 and sixteen.requests == 12
    assert (sixteen.relative, sixteen.relative_low, sixteen.relative_high) == pytest.approx((0.85, 0.7, 0.9))
    table = format_lora_table([base, sixteen])
    assert "vs base, rounds" in table.splitlines()[0] and "70%-90%" in table.splitlines()[3]
    two = combine_rounds(rounds[:2])
    assert two[1].relative == pytest.approx(0.8)  # an even count: the mean of the middle two
    assert combine_rounds(rounds[:1]) == rounds[0] and "rounds" not in format_lora_table(rounds[0])


def test_target_verdict_reads_the_16_adapter_row_against_the_bar():
    met = with_relative([LoRARow(0, output_tok_per_s=100.0), LoRARow(16, output_tok_per_s=80.0)])
    assert target_verdict(met).startswith("GPU target (issue 17): met: 16 adapters at 80%")
    missed = with_relative([LoRARow(0, output_tok_per_s=100.0), LoRARow(16, output_tok_per_s=79.0)])
    assert "missed" in target_verdict(missed)
    failed = with_relative([LoRARow(0, output_tok_per_s=100.0), LoRARow(16, errors=2, output_tok_per_s=95.0)])
    assert "missed" in target_verdict(failed) and "2 failed requests" in target_verdict(failed)
    assert target_verdict(with_relative([LoRARow(0, output_tok_per_s=1.0), LoRARow(4, output_tok_per_s=1.0)])) == ""


def test_options_default_to_the_issues_bench_and_take_short_target_names():
    parser = build_parser()
    spec = spec_from_args(parser, parser.parse_args(["--scenario", "lora"]))
    assert (spec.counts, spec.rank, spec.requests, spec.concurrency) == ((0, 1, 4, 16), 8, 256, 256)
    assert spec.targets == ("q_proj", "k_proj", "v_proj", "o_proj") and spec.model == "smollm2-135m-instruct"
    args = parser.parse_args(["--scenario", "lora", "--lora-targets", "q,down_proj,gate", "--concurrency", "8"])
    spec = spec_from_args(parser, args)
    assert spec.targets == ("q_proj", "down_proj", "gate_proj") and spec.concurrency == spec.warmup == 8
    assert spec.rounds == 1 and spec_from_args(parser, parser.parse_args(["--lora-rounds", "3"])).rounds == 3


@pytest.mark.parametrize(
    "bad",
    [
        ["--lora-counts", "0,-1"],
        ["--lora-counts", "4,4"],
        ["--lora-targets", "lm_head"],
        ["--lora-rank", "0"],
        ["--lora-rounds", "0"],
        ["--concurrency", "1,2"],
        ["--request-rate", "2"],
    ],
)
def test_bad_options_are_usage_errors(bad):
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_info:
        spec_from_args(parser, parser.parse_args(["--scenario", "lora", *bad]))
    assert exit_info.value.code == 2


def test_grpc_driver_with_models_names_them_in_turn():
    from weir_bench.grpc_driver import GrpcDriver

    async def names() -> list[str]:
        driver = GrpcDriver("127.0.0.1:1", models=["a0", "a1", "a2"])
        try:
            return [driver._request([5], 1).model for _ in range(7)]
        finally:
            await driver.close()

    assert asyncio.run(names()) == ["a0", "a1", "a2", "a0", "a1", "a2", "a0"]


def test_scenario_runs_every_count_against_one_server_with_adapters(tiny_model, capsys):
    argv = ["--scenario", "lora", "--model", str(tiny_model), "--lora-counts", "0,2", "--lora-rank", "4",
            "--requests", "8", "--concurrency", "4", "--warmup", "2", "--prompt-tokens", "8", "--output-tokens", "4",
            "--server-args", "--load-format dummy --dtype float32", "--json", "--log-level", "warning"]  # fmt: skip
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    doc = json.loads(out)
    assert [(r["adapters"], r["requests"], r["errors"]) for r in doc["rows"]] == [(0, 8, 0), (2, 8, 0)]
    assert doc["rows"][0]["relative"] == 1.0 and doc["rows"][1]["output_tok_per_s"] > 0
    assert doc["spec"]["rank"] == 4 and doc["target"] == ""  # no 16-adapter row: no verdict
