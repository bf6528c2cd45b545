"""`weir serve`'s chat options: --chat-template (file or text), --tool-call-parser and --reasoning-parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from weir_server.cli import build_parser, config_from_args


def config(*argv: str):  # type: ignore[no-untyped-def]
    return config_from_args(build_parser().parse_args(list(argv)))


def test_defaults_read_the_tool_format_from_the_template_and_split_no_reasoning() -> None:
    chat = config().chat
    assert (chat.chat_template, chat.tool_call_parser, chat.reasoning_parser) == (None, "auto", None)


def test_chat_template_from_a_file_or_inline(tmp_path: Path) -> None:
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    path = tmp_path / "template.jinja"
    path.write_text(template)
    assert config("--chat-template", str(path)).chat.chat_template == template
    assert config("--chat-template", template).chat.chat_template == template


def test_named_parsers_are_kept() -> None:
    chat = config("--tool-call-parser", "llama3_json", "--reasoning-parser", "deepseek_r1").chat
    assert (chat.tool_call_parser, chat.reasoning_parser) == ("llama3_json", "deepseek_r1")


@pytest.mark.parametrize(
    ("flag", "value"), [("--tool-call-parser", "nope"), ("--reasoning-parser", "nope"), ("--chat-template", " ")]
)
def test_unknown_parsers_and_empty_templates_are_refused(flag: str, value: str) -> None:
    with pytest.raises(ValueError):
        config(flag, value)


def test_constraint_limits_are_flags_of_the_generation_engine() -> None:
    structured = config(
        "--max-constraint-bytes",
        "4096",
        "--constraint-compile-timeout",
        "2.5",
        "--constraint-cache-mb",
        "64",
        "--max-compiled-constraint-mb",
        "32",
    ).generate.structured
    assert (structured.max_constraint_bytes, structured.compile_timeout_s) == (4096, 2.5)
    assert (structured.cache_memory_bytes, structured.max_compiled_bytes) == (64 << 20, 32 << 20)


def test_a_compiled_constraint_larger_than_the_cache_is_refused() -> None:
    with pytest.raises(ValueError):
        config("--constraint-cache-mb", "16", "--max-compiled-constraint-mb", "32")
