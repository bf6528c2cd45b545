"""`weir bench`'s subcommands (gpu, tp, kernels, host-profile, structured): dispatch, options, help, the tables
they print, and the commands bench/RESULTS.md documents. CPU only: the GPU verbs are not run here."""

from __future__ import annotations

import importlib
import json
import math
import re
import shlex
from pathlib import Path

import pytest

from weir_bench import cli, gpu_cli, sampling, tp
from weir_bench.floor import Floor, ModelCost, gpu_peak, row_floor
from weir_bench.gpu import LLAMA_32_1B, save_report
from weir_bench.report import Row

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "RESULTS.md"
HELP = [["gpu"], ["gpu", "run"], ["gpu", "reference"], ["gpu", "greedy"], ["gpu", "sampling"], ["gpu", "tokenizer"],
        ["tp"], ["kernels"], ["host-profile"], ["cpu-steps"], ["structured"], ["plot"]]  # fmt: skip


@pytest.mark.parametrize("words", HELP, ids=" ".join)
def test_every_subcommand_answers_help_under_its_own_name(words, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*words, "--help"])
    assert exc.value.code == 0
    assert f"usage: weir bench {' '.join(words)}" in capsys.readouterr().out


def test_the_weir_command_hands_bench_subcommands_through(capsys):
    from weir_client.cli import main as weir

    with pytest.raises(SystemExit) as exc:
        weir(["bench", "tp", "--help"])
    assert exc.value.code == 0 and "usage: weir bench tp" in capsys.readouterr().out


def test_bench_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert f"\n  {name} " in out


def test_every_subcommand_module_has_a_main_and_a_parser():
    for module_name, _ in cli.SUBCOMMANDS.values():
        module = importlib.import_module(module_name)
        assert callable(module.main) and callable(module.build_parser)


def test_gpu_run_defaults_are_the_results_workload():
    args = gpu_cli.build_parser().parse_args(["run", "--tokenizer", "tok"])
    assert args.shapes == ["SmolLM2-135M", "Llama-3.2-1B"]
    assert (args.num_requests, args.concurrency, args.prompt_tokens, args.output_tokens) == (512, 512, 128, 128)
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.max_model_len) == (512, 8192, 4096)
    assert args.gpu_memory_utilization == 0.35 and args.engine_cores == ["process", "thread"]
    assert args.client_processes == 4 and args.out_dir is None and args.tokenizer == Path("tok")


@pytest.mark.parametrize("argv", [
    ["run"],  # --tokenizer is required
    ["run", "--tokenizer", "t", "--shapes", "Llama-70B"],
    ["run", "--tokenizer", "t", "--engine-cores", "fiber"],
    ["greedy", "--model", "m.gguf"],  # no --reference
    ["run", "--tokenizer", "t", "--py-spy", "/usr/bin/py-spy"],  # profiles need --out-dir
    ["nope"],
    [],
])  # fmt: skip
def test_bad_gpu_options_exit_with_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_cli.main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_host_profile_defaults_to_512_decoding_sequences():
    args = importlib.import_module("weir_bench.host_profile").build_parser().parse_args(["--tokenizer", "t"])
    assert (args.seqs, args.prompt_tokens, args.output_tokens, args.vocab_size) == (512, 128, 64, 2048)
    assert not (args.profile or args.run_ahead or args.no_detokenize or args.no_gc_freeze)


def test_gpu_verbs_without_cuda_exit_2_and_say_why(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["gpu", "run", "--tokenizer", "t"]) == 2
    assert cli.main(["kernels"]) == 2
    err = capsys.readouterr().err
    assert "weir bench gpu run needs a CUDA device" in err and "weir bench kernels needs a CUDA device" in err


def test_tp_with_fewer_than_two_gpus_exits_2_with_nvlink_multicast_off(monkeypatch, capsys):
    import torch

    for name in tp.NO_MULTICAST:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.main(["tp"]) == 2
    assert "needs 2 GPUs, found 1" in capsys.readouterr().err
    import os

    assert {name: os.environ[name] for name in tp.NO_MULTICAST} == tp.NO_MULTICAST


def _row(target: str, tok_s: float, concurrency: int = 512) -> Row:
    return Row(target, concurrency, 512, 0, 128, 128, 1.0, tok_s, 4.0, 203.25, 279.2, 11.574, 26.85, 0)


def test_gpu_table_keeps_the_results_columns_and_adds_the_floor():
    floor = Floor(output_tokens_per_s=74590.8, itl_ms=3.456)
    text = gpu_cli.table([("SmolLM2-135M", _row("weir in-process", 37295.4), 25566.2, floor)])
    head, rule, line = text.splitlines()
    assert head.startswith("| shape | target | conc. | ok/err | output tok/s | floor tok/s (reached) |")
    assert rule.startswith("|---|")
    assert line == (
        "| SmolLM2-135M | weir in-process | 512 | 512/0 | 37,295 | 74,591 (50%) | 203.2 / 279.2 | 11.57 / 26.85 | "
        "3.46 | 25,566 |"
    )
    unknown = gpu_cli.table([("S", _row("weir in-process", 1.0), None, None)]).splitlines()[-1]
    assert unknown == "| S | weir in-process | 512 | 512/0 | 1 |  | 203.2 / 279.2 | 11.57 / 26.85 |  |  |"


def test_the_floor_of_the_1b_shape_on_an_h100_is_the_issues_arithmetic():
    """Issue 20: at batch 1 the 1B shape's weight read is about 0.75 ms; at 512 sequences of about 190 tokens a step
    reads about 2.5 GB of weights and 3.1 GB of KV, about 2 ms, about 250k tok/s."""
    h100 = gpu_peak("NVIDIA H100 80GB HBM3")
    assert h100 is not None and h100.bytes_per_s == 3.35e12 and gpu_peak("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert gpu_peak("Tesla T4") is None
    cost = ModelCost.of(LLAMA_32_1B.config)
    assert 2.4e9 < cost.weight_bytes < 2.5e9 and cost.kv_bytes_per_token == 32768
    assert 0.72e-3 < cost.decode_step_s(1, 200, h100) < 0.76e-3
    step = cost.decode_step_s(512, 190, h100)
    assert 1.6e-3 < step < 1.8e-3 and 280e3 < 512 / step < 310e3
    # The row also prefills its 512 x 128 prompt tokens at 2.5 GFLOP each, 0.16 s beside 128 steps of about 1.7 ms.
    floor = row_floor(cost, h100, 512, 128, 128)
    assert 165e3 < floor.output_tokens_per_s < 180e3 and 1.6 < floor.itl_ms < 1.8
    assert row_floor(cost, h100, 1, 128, 128).itl_ms < 0.76


def test_gpu_ratios_compare_grpc_with_hf_static_and_in_process():
    rows = [
        ("S", _row("weir in-process", 40000.0), None, None),
        ("S", _row("weir gRPC (512 streams, engine process)", 60000.0), None, None),
        ("S", _row("weir gRPC batch 1 (engine process)", 850.0, 1), None, None),
        ("S", _row("HF generate batch 1", 21.25, 1), None, None),
        ("S", _row("HF generate static batch 256", 6000.0, 256), None, None),
    ]
    assert gpu_cli.ratios(rows) == [
        "S, weir gRPC (512 streams, engine process): gRPC / HF static-256 = 10.0x, gRPC / in-process = 150%",
        "S: batch-1 Weir / HF = 40.0x",
    ]


def test_tp_table_pairs_one_gpu_with_two():
    rows = [
        {"model": "llama-3.2-1b", "tp": 1, "batch": 1, "out_tok_s": 507.0, "itl_ms": 1.91},
        {"model": "llama-3.2-1b", "tp": 2, "batch": 1, "out_tok_s": 547.0, "itl_ms": 1.69},
        {"model": "llama-3.2-1b", "bf16_agreement": "32/32 identical"},
    ]
    text = tp.table(rows, "2x H100")
    assert "| llama-3.2-1b | 1 | 507 | 547 | 1.08x | 1.91 | 1.69 |" in text
    assert text.endswith("tp 1 vs 2: llama-3.2-1b: 32/32 identical.")


def test_sampling_table_has_one_row_per_mode():
    text = sampling.table([(name, 1234.4) for name, _ in sampling.sampling_modes()])
    assert text.splitlines() == [
        "| sampling | tok/s |",
        "|---|---:|",
        "| greedy | 1,234 |",
        "| temperature 0.8 | 1,234 |",
        "| temperature 0.8, top_p 0.95 | 1,234 |",
        "| temperature 0.8, top_k 50, seeded | 1,234 |",
    ]


def test_reports_are_written_only_when_asked_with_nan_as_null(tmp_path):
    save_report(None, "gpu", "# nothing")  # no folder: nothing written, no error
    save_report(tmp_path / "out", "gpu", "# report", [{"target": "x", "itl_p50_ms": math.nan}])
    assert (tmp_path / "out" / "gpu.md").read_text() == "# report\n"
    assert json.loads((tmp_path / "out" / "gpu.json").read_text()) == [{"target": "x", "itl_p50_ms": None}]


def _documented_commands() -> list[list[str]]:
    """Every `weir bench ...` / `python3 -m weir_bench ...` line in RESULTS.md's code blocks, as argv after it."""
    blocks = re.findall(r"```\n(.*?)```", RESULTS.read_text(), flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        line = line.split("  #")[0].split(" # ")[0]
        match = re.search(r"(?:^|\s)(?:weir bench|-m weir_bench)(\s.*)?$", line)
        if match and "..." not in line:
            commands.append(shlex.split(match.group(1) or ""))
    return commands


def test_results_md_names_no_deleted_script():
    assert not re.search(r"python3? scripts/(?!gen_proto)", RESULTS.read_text())


@pytest.mark.parametrize("argv", _documented_commands(), ids=" ".join)
def test_every_command_results_md_documents_parses(argv):
    if argv and argv[0] in cli.SUBCOMMANDS:
        module = importlib.import_module(cli.SUBCOMMANDS[argv[0]][0])
        module.build_parser().parse_args([a.replace("$OUT", "out") for a in argv[1:]])
    else:
        parser = cli.build_parser()
        cli._validate(parser, parser.parse_args(argv))
