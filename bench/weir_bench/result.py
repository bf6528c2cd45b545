"""`--save-result`: one run as a JSON document (config, per-target per-point metrics, versions) and back."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weir_bench.report import Row, row_from_dict, row_to_dict

SCHEMA = "weir-bench-result/1"
VERSIONED = ("weir-bench", "weir-client", "grpcio", "protobuf", "aiohttp")


class ResultError(ValueError):
    """A saved-result file that cannot be read back."""


@dataclass(frozen=True)
class SavedResult:
    """A run read back from its JSON: what was asked, where it ran, and its rows in saved order."""

    config: dict[str, Any]
    machine: dict[str, Any]
    versions: dict[str, str | None]
    rows: list[Row]

    @property
    def mode(self) -> str:
        return str(self.config.get("mode") or (self.rows[0].mode if self.rows else "closed"))


def versions() -> dict[str, str | None]:
    """Python's and the benchmark's packages' versions (None for one not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _iso(seconds: float) -> str | None:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat() if seconds else None


def result_document(
    rows: Sequence[Row], config: Mapping[str, Any], argv: Sequence[str], machine: Mapping[str, Any]
) -> dict[str, Any]:
    """The saved-result document: rows grouped per target in run order, each point with its metrics."""
    targets: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        targets.setdefault(row.target, []).append(row_to_dict(row))
    started = min((r.started_at for r in rows if r.started_at), default=0.0)
    ended = max((r.ended_at for r in rows), default=0.0)
    return {
        "schema": SCHEMA,
        "command": ["weir", "bench", *argv],
        "config": _json_safe(dict(config)),
        "machine": _json_safe(dict(machine)),
        "versions": versions(),
        "started_at": _iso(started),
        "ended_at": _iso(ended),
        "targets": [{"name": name, "points": points} for name, points in targets.items()],
    }


def save_result(path: Path, document: Mapping[str, Any]) -> None:
    """Write the document as indented strict JSON (no NaN or Infinity literals)."""
    Path(path).write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def load_result(path: Path) -> SavedResult:
    """Read a document `save_result` wrote."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ResultError(f"{path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ResultError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ResultError(f"{path}: not a `weir bench --save-result` file (schema {SCHEMA!r} expected)")
    try:
        rows = [row_from_dict({**p, "target": t["name"]}) for t in doc["targets"] for p in t["points"]]
    except (KeyError, TypeError) as exc:
        raise ResultError(f"{path}: malformed targets/points ({exc!r})") from exc
    return SavedResult(doc.get("config") or {}, doc.get("machine") or {}, doc.get("versions") or {}, rows)
