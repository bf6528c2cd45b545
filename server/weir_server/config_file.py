"""`weir serve --config FILE`: a YAML mapping of long flag names (dashes or underscores) to values, read as the
command-line arguments it spells and put before the real ones, so the command line wins (as `vllm serve --config`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Keys a file may not hold: a file naming another file, or asking for help.
_NOT_IN_FILES = ("config", "help")


class ConfigFileError(ValueError):
    """A config file that cannot be read or names something `weir serve` does not take."""


@dataclass(frozen=True)
class FileArguments:
    """What a config file says: command-line tokens, and the model it names (kept apart, as the positional
    model of the command line overrides it)."""

    argv: list[str]
    model: str | None = None


def config_path(argv: Sequence[str]) -> str | None:
    """The --config FILE of `argv` (the last one when repeated), without parsing anything else."""
    path = None
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif token.startswith("--config="):
            path = token.partition("=")[2]
    return path


def read_config_file(path: str, parser: argparse.ArgumentParser) -> FileArguments:
    """The arguments the YAML file at `path` spells for `parser`; ConfigFileError names the file and the key."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as error:
        raise ConfigFileError(f"--config {path}: cannot read it: {error.strerror or error}") from error
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigFileError(f"--config {path}: not valid YAML{line}") from error
    if data is None:
        return FileArguments([])
    if not isinstance(data, dict):
        raise ConfigFileError(f"--config {path}: must be a mapping of flag names to values, not {type(data).__name__}")
    argv: list[str] = []
    model = None
    for key, value in data.items():
        name = str(key).strip().lstrip("-").replace("_", "-")
        if value is None:
            continue  # `key:` with nothing after it leaves the default
        if name == "model":
            if not isinstance(value, str):
                raise ConfigFileError(f"--config {path}: model must be a string, got {value!r}")
            model = value
            continue
        action = parser._option_string_actions.get(f"--{name}")  # noqa: SLF001 - argparse has no public lookup
        if action is None or name in _NOT_IN_FILES:
            raise ConfigFileError(f"--config {path}: unknown key {key!r} (keys are `weir serve` long flag names)")
        argv += _tokens(f"--{name}", value, action, path)
    return FileArguments(argv, model)


def _tokens(flag: str, value: Any, action: argparse.Action, path: str) -> list[str]:
    """The command-line tokens of `flag: value`; argparse then checks the value's type and choices."""
    if action.nargs == 0:  # a switch: true sets it; false (or --no-X for an on/off pair) leaves or clears it
        if not isinstance(value, bool):
            raise ConfigFileError(f"--config {path}: {flag.lstrip('-')} must be true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):  # --enable-X / --no-enable-X
            positive, negative = action.option_strings[:2]
            return [positive if value == (flag == positive) else negative]
        return [flag] if value else []
    if isinstance(action, argparse._AppendAction):  # noqa: SLF001 - repeatable flags (--api-key) take a list
        values = value if isinstance(value, list) else [value]
        return [token for item in values for token in (flag, _scalar(flag, item, path))]
    if action.nargs in ("+", "*"):  # several values after one flag (--lora-modules): a list, or one value
        values = value if isinstance(value, list) else [value]
        return [flag, *(_item(flag, item, path) for item in values)]
    return [flag, _scalar(flag, value, path)]


def _item(flag: str, value: Any, path: str) -> str:
    """One value of a many-valued flag; a mapping is passed as its JSON text (--lora-modules' JSON form)."""
    return json.dumps(value) if isinstance(value, dict) else _scalar(flag, value, path)


def _scalar(flag: str, value: Any, path: str) -> str:
    if isinstance(value, list | dict):
        raise ConfigFileError(f"--config {path}: {flag.lstrip('-')} takes one value, got {value!r}")
    if isinstance(value, bool):
        return "true" if value else "false"  # argparse then refuses it where a number is wanted
    return str(value)
