"""Request body checking: parse JSON strictly and read typed fields, naming the offending `param` on error."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from aiohttp import web

from weir_gateway.errors import ApiError, bad_request
from weir_gateway.http_limits import read_body

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT32_MAX = 2**32 - 1


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; invalid UTF-8, invalid JSON, NaN or a non-object is a 400."""
    raw = await read_body(request)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(None, f"request body is not valid UTF-8: {e.reason} at byte {e.start}") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise bad_request(None, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request(None, f"request body must be a JSON object, got {_kind(body)}")
    try:  # a lone \udXXX escape decodes to a surrogate that no protobuf string can hold
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(None, "request body contains an unpaired UTF-16 surrogate escape") from None
    return body


def _kind(value: Any) -> str:
    """The JSON name of a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


class Fields:
    """Typed, checked access to a JSON object's fields; `null` counts as absent, as in the OpenAI API."""

    def __init__(self, body: Mapping[str, Any], prefix: str = "") -> None:
        self.body = body
        self.prefix = prefix

    def param(self, name: str) -> str:
        """The field's full name for error messages (messages[2].content)."""
        return f"{self.prefix}{name}"

    def error(self, name: str, message: str) -> ApiError:
        return bad_request(self.param(name), f"{self.param(name)}: {message}")

    def reject_unknown(self, known: frozenset[str], unsupported: Mapping[str, str] | None = None) -> None:
        """400 for a field Weir does not support yet (with why) or does not know at all."""
        for name, value in self.body.items():
            if name in known:
                continue
            if unsupported and name in unsupported:
                if value is None:
                    continue
                raise self.error(name, f"not supported by Weir yet ({unsupported[name]})")
            raise self.error(name, "unrecognized request argument")

    def present(self, name: str) -> bool:
        return self.body.get(name) is not None

    def raw(self, name: str) -> Any:
        return self.body.get(name)

    def integer(
        self, name: str, default: int | None = None, lo: int | None = None, hi: int | None = None
    ) -> int | None:
        """An integer field (1.0 is accepted as 1), checked against [lo, hi]."""
        value = self.body.get(name)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"expected an integer, got {_kind(value)}")
        self._check_range(name, value, lo, hi)
        return value

    def number(
        self, name: str, default: float | None = None, lo: float | None = None, hi: float | None = None
    ) -> float | None:
        """A finite number field, checked against [lo, hi]."""
        value = self.body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(name, f"expected a number, got {_kind(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise self.error(name, "must be a finite number")
        self._check_range(name, value, lo, hi)
        return value

    def _check_range(self, name: str, value: float, lo: float | None, hi: float | None) -> None:
        if lo is not None and value < lo:
            raise self.error(name, f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise self.error(name, f"must be <= {hi}, got {value}")

    def boolean(self, name: str, default: bool | None = None) -> bool | None:
        value = self.body.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(name, f"expected a boolean, got {_kind(value)}")
        return value

    def string(self, name: str, default: str | None = None, choices: tuple[str, ...] = ()) -> str | None:
        value = self.body.get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {_kind(value)}")
        if choices and value not in choices:
            raise self.error(name, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    def object_fields(self, name: str) -> Fields | None:
        """A nested object's fields, or None when absent."""
        value = self.body.get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(name, f"expected an object, got {_kind(value)}")
        return Fields(value, prefix=f"{self.param(name)}.")

    def objects(self, name: str, items: Iterable[Any], what: str) -> Iterator[Fields]:
        """Each element of the array `items` (field `name`'s value) as Fields named `name[i].`; an element that is
        not an object is a 400 saying it should be `what` ("a tool object")."""
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise self.error(f"{name}[{i}]", f"expected {what}")
            yield Fields(item, prefix=f"{self.param(name)}[{i}].")

    def array(self, name: str) -> list[Any] | None:
        value = self.body.get(name)
        if value is None:
            return None
        if not isinstance(value, list):
            raise self.error(name, f"expected an array, got {_kind(value)}")
        return value

    def strings(self, name: str, max_items: int) -> list[str]:
        """A string or an array of strings (e.g. `stop`); empty strings are refused."""
        value = self.body.get(name)
        if value is None:
            return []
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise self.error(name, "expected a string or an array of strings")
        if len(items) > max_items:
            raise self.error(name, f"at most {max_items} items, got {len(items)}")
        if any(not s for s in items):
            raise self.error(name, "must not contain empty strings")
        return items

    def token_ids(self, name: str, value: Any = None, max_items: int | None = None) -> list[int]:
        """An array of token ids (non-negative int32)."""
        value = self.body.get(name) if value is None else value
        if not isinstance(value, list) or not all(is_token_id(t) for t in value):
            raise self.error(name, f"expected an array of token ids (integers in [0, {INT32_MAX}])")
        if max_items is not None and len(value) > max_items:
            raise self.error(name, f"at most {max_items} items, got {len(value)}")
        return value


def is_token_id(value: Any) -> bool:
    """A JSON value usable as a token id."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= INT32_MAX
