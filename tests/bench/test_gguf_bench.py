"""`weir bench gguf`: the CPU verb measures a tiny random GGUF written by the bench's own writer, packed and
dequantized; the GPU verb refuses cleanly without CUDA. No timings are checked, only that the rows come out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from weir_bench import cli, gguf
from weir_bench.gguf_files import GGUFShape, write_random_moe_q4_k_m, write_random_q4_k_m

TINY = GGUFShape("tiny", hidden=256, ffn=512, layers=2, heads=4, kv_heads=2, vocab=512, context=512, rope_base=1e4)
TINY_MOE = GGUFShape("tiny-moe", 256, 256, 2, 4, 2, 512, 512, 1e4, experts=4, experts_used=2, head_dim=64)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_q4_k_m(tmp_path_factory.mktemp("gguf") / "tiny-Q4_K_M.gguf", TINY)


@pytest.fixture(scope="module")
def tiny_moe_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_moe_q4_k_m(tmp_path_factory.mktemp("gguf") / "tiny-moe.gguf", TINY_MOE)


@pytest.mark.parametrize("packed", [False, True], ids=["dequantized", "packed"])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_cpu_verb_prints_one_row_for_a_random_q4_k_m_file(tiny_gguf, tiny_moe_gguf, packed, moe):
    model = tiny_moe_gguf if moe else tiny_gguf
    argv = [sys.executable, "-m", "weir_bench", "gguf", "cpu", str(model), "--steps", "2", "--repeats", "1"]
    done = subprocess.run(argv + (["--keep-quantized"] if packed else []), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-3].startswith("| model | weights | dtype | file MiB |")
    row = lines[-1].split(" | ")
    assert row[0] == f"| {model.name}" and row[1] == ("packed" if packed else "dequantized at load")
    assert float(row[8].replace(",", "")) > 0  # decode tok/s


def test_gpu_verb_without_cuda_exits_2_with_one_line(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["gguf", "gpu"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "weir bench gguf gpu needs a CUDA device; none is visible here\n"


@pytest.mark.parametrize("argv", [
    ["cpu"],  # neither MODEL nor --write-q4km
    ["cpu", "m.gguf", "--write-q4km", "other.gguf"],
    ["cpu", "--write-q4km", "a.gguf", "--write-moe", "b.gguf"],
    ["cpu", "m.gguf", "--steps", "0"],
    ["gpu", "--repeats", "2"],  # the gpu verb has no repeats
    [],
])  # fmt: skip
def test_bad_gguf_options_exit_with_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        gguf.main(argv)
    assert exc.value.code == 2 and "error" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["cpu", "gpu"])
def test_each_verb_answers_help_under_its_own_name(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["gguf", verb, "--help"])
    assert exc.value.code == 0 and f"usage: weir bench gguf {verb}" in capsys.readouterr().out


def test_the_gguf_writer_writes_the_q4_k_m_mix(tiny_gguf):
    import gguf as gguf_package

    reader = gguf_package.GGUFReader(tiny_gguf)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q6_K" and types["blk.0.ffn_down.weight"] == "Q6_K"
    assert types["blk.1.ffn_down.weight"] == "Q4_K" and types["blk.0.attn_q.weight"] == "Q4_K"
    assert (tiny_gguf.parent / "tokenizer.json").exists()


def test_gpu_decode_table_has_one_row_per_mode_and_batch_then_its_notes():
    rows = [
        dict(model="Q4_K_M packed", weights_gib=0.79, mode=mode, batch=batch, tok_s=59.2, ms_per_step=16.9)
        for mode in ("eager", "CUDA graphs")
        for batch in (1, 32)
    ]
    text = gguf.decode_table(rows, ["Q4_K_M packed: greedy under CUDA graphs = eager for 4/4 prompts"], 32)
    lines = text.splitlines()
    assert lines[1] == "| model | weights GiB | mode | batch | tok/s | ms/step |"
    assert lines[3] == "| Q4_K_M packed | 0.79 | eager | 1 | 59.2 | 16.9 |"
    assert len(lines) == 1 + 2 + 4 + 1 and lines[-1].endswith("4/4 prompts")
