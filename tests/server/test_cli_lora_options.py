"""`weir serve`'s LoRA options (vLLM's names): --enable-lora, --lora-modules in both of vLLM's forms, the limits, the
same keys in a --config file, and bad values refused with one line on stderr and exit code 2 before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from weir_server.cli import config_from_args, main, parse_args
from weir_server.config import LoRAConfig, ServerConfig
from weir_server.preflight import check_config


def config(*argv: str) -> ServerConfig:
    return config_from_args(parse_args(list(argv)))


def lora_of(c: ServerConfig) -> LoRAConfig | None:
    assert c.generate is not None
    return c.generate.lora


def adapter_dir(tmp_path: Path, name: str = "adapter") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    return folder


def test_lora_is_off_unless_enabled() -> None:
    assert lora_of(config()) is None


def test_enable_lora_takes_vllms_defaults() -> None:
    assert lora_of(config("--enable-lora")) == LoRAConfig(max_lora_rank=64, max_loras=4, max_cpu_loras=None)


def test_lora_modules_take_name_equals_path_and_vllms_json_form(tmp_path: Path) -> None:
    spec = json.dumps({"name": "sql", "path": "/adapters/sql", "base_model_name": "smollm2-135m-instruct"})
    lora = lora_of(config("--enable-lora", "--lora-modules", "chat=/adapters/chat", spec, "--max-lora-rank", "16"))
    assert lora is not None
    assert lora.lora_modules == (("chat", "/adapters/chat"), ("sql", "/adapters/sql"))
    assert lora.max_lora_rank == 16


def test_config_file_gives_lora_modules_as_a_list_of_strings_or_mappings(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(
        "enable_lora: true\nmax_loras: 2\nmax-cpu-loras: 8\n"
        "lora_modules:\n  - chat=/adapters/chat\n  - {name: sql, path: /adapters/sql}\n"
    )
    lora = lora_of(config("--config", str(path)))
    assert lora == LoRAConfig(
        max_loras=2, max_cpu_loras=8, lora_modules=(("chat", "/adapters/chat"), ("sql", "/adapters/sql"))
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lora-modules", "a=/x"], "--lora-modules needs --enable-lora"),
        (["--enable-lora", "--lora-modules", "a"], "expected NAME=PATH"),
        (["--enable-lora", "--lora-modules", "{bad"], "not valid JSON"),
        (["--enable-lora", "--lora-modules", '{"name": "a"}'], '{"name": "...", "path": "..."}'),
        (["--enable-lora", "--lora-modules", '{"name": "a", "path": "/x", "base_model_name": "other"}'], "other"),
        (["--enable-lora", "--lora-modules", "a,b=/x"], "without spaces or commas"),
        (["--enable-lora", "--lora-modules", "a=/x", "a=/y"], "names a more than once"),
        (["--enable-lora", "--lora-modules", "smollm2-135m-instruct=/x"], "the generation model's id"),
        (["--enable-lora", "--max-lora-rank", "0"], "--max-lora-rank must be at least 1"),
        (["--enable-lora", "--max-loras", "0"], "--max-loras must be at least 1"),
        (["--enable-lora", "--max-loras", "4", "--max-cpu-loras", "2"], "--max-cpu-loras (2) must be at least"),
        (["--enable-lora", "--model", "none"], "--enable-lora needs a generation model"),
        (["--enable-lora", "--lora-modules", "a=/no/such/adapter"], "a=/no/such/adapter: no such directory"),
    ],
)
def test_bad_lora_options_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--log-level", "error"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_an_adapter_folder_needs_its_config(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no adapter_config.json there"):
        check_config(config("--enable-lora", "--lora-modules", f"a={empty}"))
    check_config(config("--enable-lora", "--lora-modules", f"a={adapter_dir(tmp_path)}"))
