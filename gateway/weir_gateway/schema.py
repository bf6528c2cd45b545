"""Request definitions as tables of fields: the gateway checks bodies against them and writes /openapi.json from
them, so the description cannot drift from the code. Each field says what Weir does with it: honoured, ignored
(accepted and dropped; a 400 under --strict) or refused (a 400 naming it, because dropping it would change the
result)."""

from __future__ import annotations

import enum
import functools
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from weir_gateway.validation import INT32_MAX, Fields

logger = logging.getLogger(__name__)

Reader = Callable[[Fields, str], Any]  # checks a present (non-null) field and returns its value, converted
TOKEN_ID_SCHEMA = {"type": "integer", "minimum": 0, "maximum": INT32_MAX}


class Use(enum.Enum):
    """What the gateway does with a field."""

    HONOURED = "honoured"
    IGNORED = "ignored"  # accepted and ignored: it changes nothing a client relies on (400 under --strict)
    REFUSED = "refused"  # a 400 naming the field: ignoring it would silently change the result


@dataclass(frozen=True)
class Field:
    """One field of a JSON object: its OpenAPI schema (of a non-null value), its reader, and its use."""

    name: str
    schema: Mapping[str, Any]
    read: Reader
    use: Use = Use.HONOURED
    doc: str = ""  # what Weir does with it, or why it is refused


def integer(
    name: str, lo: int | None = None, hi: int | None = None, *, doc: str = "", use: Use = Use.HONOURED
) -> Field:
    """An integer in [lo, hi] (1.0 reads as 1)."""
    return Field(name, _bounded({"type": "integer"}, lo, hi), lambda f, n: f.integer(n, lo=lo, hi=hi), use, doc)


def number(name: str, lo: float, hi: float, *, exclusive_lo: bool = False, doc: str = "") -> Field:
    """A finite number in [lo, hi], or (lo, hi] with `exclusive_lo`."""

    def read(fields: Fields, n: str) -> float | None:
        value = fields.number(n, lo=lo, hi=hi)
        if exclusive_lo and value == lo:
            raise fields.error(n, f"must be > {lo:g}")
        return value

    schema = _bounded({"type": "number"}, lo, hi) | ({"exclusiveMinimum": True} if exclusive_lo else {})
    return Field(name, schema, read, doc=doc)


def boolean(name: str, *, doc: str = "", use: Use = Use.HONOURED) -> Field:
    """true or false."""
    return Field(name, {"type": "boolean"}, lambda f, n: f.boolean(n), use, doc)


def string(name: str, choices: tuple[str, ...] = (), *, doc: str = "", use: Use = Use.HONOURED) -> Field:
    """A string, one of `choices` when they are given."""
    schema: dict[str, Any] = {"type": "string"} | ({"enum": list(choices)} if choices else {})
    return Field(name, schema, lambda f, n: f.string(n, choices=choices), use, doc)


def any_object(name: str, *, doc: str = "", use: Use = Use.HONOURED) -> Field:
    """An object of any keys and values, returned as a dict."""

    def read(fields: Fields, n: str) -> dict[str, Any]:
        nested = fields.object_fields(n)
        assert nested is not None  # readers only see present fields
        return dict(nested.body)

    return Field(name, {"type": "object"}, read, use, doc)


def nested(name: str, schema: ObjectSchema, *, doc: str = "", use: Use = Use.HONOURED) -> Field:
    """An object checked against its own table; its value is the nested Body."""

    def read(fields: Fields, n: str) -> Body:
        inner = fields.object_fields(n)
        assert inner is not None
        return schema.read(inner)

    return Field(name, schema.openapi(), read, use, doc)


def refused(name: str, reason: str) -> Field:
    """A field Weir knows and refuses by name when it is set (null counts as unset)."""

    def read(fields: Fields, n: str) -> None:
        raise fields.error(n, f"not supported by Weir ({reason})")

    return Field(name, {}, read, Use.REFUSED, reason)


def texts_or_token_ids(max_items: int) -> dict[str, Any]:
    """The schema of completions' `prompt` and embeddings' `input`: a string, strings, token ids or token-id
    lists, none empty."""
    token_ids = {"type": "array", "items": TOKEN_ID_SCHEMA, "minItems": 1}
    return {
        "oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": max_items},
            token_ids,
            {"type": "array", "items": token_ids, "minItems": 1, "maxItems": max_items},
        ]
    }


def _bounded(schema: dict[str, Any], lo: float | None, hi: float | None) -> dict[str, Any]:
    return schema | ({"minimum": lo} if lo is not None else {}) | ({"maximum": hi} if hi is not None else {})


class Body(Fields):
    """An object checked against its table: `value(name)` is a declared field's checked, converted value. Asking
    for a field the table does not declare is a programming error, so the table stays the one list of fields."""

    def __init__(self, fields: Fields, values: dict[str, Any], declared: frozenset[str]) -> None:
        super().__init__(fields.body, fields.prefix)
        self.values = values
        self.declared = declared

    def value(self, name: str, default: Any = None) -> Any:
        if name not in self.declared:
            raise KeyError(f"{name!r} is not declared in this request's schema")
        return self.values.get(name, default)

    def has(self, name: str) -> bool:
        return self.value(name) is not None


@dataclass(frozen=True)
class ObjectSchema:
    """The fields of one JSON object. `open`: keys it does not declare are vendor extras, ignored and logged once
    (a 400 under `strict`, which also refuses the fields marked ignored); a closed object refuses them always."""

    fields: tuple[Field, ...]
    required: tuple[str, ...] = ()
    open: bool = False
    strict: bool = False

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"fields declared twice: {sorted({n for n in names if names.count(n) > 1})}")

    @functools.cached_property
    def by_name(self) -> dict[str, Field]:
        return {f.name: f for f in self.fields}

    @functools.cached_property
    def declared(self) -> frozenset[str]:
        return frozenset(self.by_name)

    @functools.cached_property
    def accepted(self) -> frozenset[str]:
        """The fields a body may set: what /openapi.json lists."""
        return frozenset(f.name for f in self.fields if _accepted(f, self.strict))

    def read(self, fields: Fields, *, declared_only: bool = False) -> Body:
        """Check every field of `fields` in body order; return the checked values of the honoured ones. With
        `declared_only`, keys this table does not declare are left alone (another table reads them)."""
        values: dict[str, Any] = {}
        for name, value in fields.body.items():
            spec = self.by_name.get(name)
            if spec is None:
                if not declared_only:
                    self._extra(fields, name)
                continue
            if value is None:
                continue
            if spec.use is Use.IGNORED and self.strict:
                raise fields.error(name, "ignored by Weir, so refused under --strict")
            checked = spec.read(fields, name)
            if spec.use is Use.IGNORED:
                _log_ignored(_pattern(fields.param(name)))
            else:
                values[name] = checked
        for name in self.required:
            if name not in values:
                raise fields.error(name, "required")
        return Body(fields, values, self.declared)

    def _extra(self, fields: Fields, name: str) -> None:
        if not self.open or self.strict:
            raise fields.error(name, "unrecognized request argument")
        _log_ignored(_pattern(fields.param(name)))

    def openapi(self) -> dict[str, Any]:
        """This object as an OpenAPI 3.0 schema: optional fields may be null, which the gateway reads as absent."""
        properties = {}
        for f in self.fields:
            if not _accepted(f, self.strict):
                continue
            schema = dict(f.schema)
            if f.doc:
                schema["description"] = f.doc + (" (accepted and ignored)" if f.use is Use.IGNORED else "")
            properties[f.name] = schema if f.name in self.required else schema | {"nullable": True}
        document: dict[str, Any] = {"type": "object", "properties": properties}
        if self.required:
            document["required"] = list(self.required)
        document["additionalProperties"] = self.open and not self.strict
        refused_here = {f.name: f.doc for f in self.fields if not _accepted(f, self.strict)}
        if refused_here:
            document["x-weir-refused"] = refused_here  # named 400s, listed so readers know why
        return document


def _accepted(spec: Field, strict: bool) -> bool:
    return spec.use is Use.HONOURED or (spec.use is Use.IGNORED and not strict)


def _pattern(param: str) -> str:
    """messages[3].refusal -> messages[].refusal: one log line per field, whatever the index."""
    return re.sub(r"\[\d+\]", "[]", param)


@functools.lru_cache(maxsize=1024)  # once per field name and process, as vLLM logs them; bounded against junk keys
def _log_ignored(param: str) -> None:
    logger.debug("request field %r is accepted and ignored (weir gateway --strict refuses it)", param)
