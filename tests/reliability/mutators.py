"""Mutations of encoded requests for the hostile-input fuzzer (test_hostile_fuzz.py): protobuf bytes truncated,
repeated, with a field's wire type changed, an unknown field or invalid UTF-8 in a string field; JSON bodies with a
value of the wrong type, a key given twice, a field dropped, cut short, nested deep or with invalid UTF-8.

Each takes a `random.Random`, so a run is one fixed sequence of cases for a given seed."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

# Invalid UTF-8: a stray byte, a bad continuation, a surrogate, an overlong '/', past U+10FFFF, a cut sequence.
BAD_UTF8 = (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\xe2\x82")
MAX_WALKED_FIELDS = 4096  # a message of a million turns is mutated at its first fields only
LEN = 2  # the wire type of strings, bytes, sub-messages and packed repeated fields


# ---- protobuf on the wire -------------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint (negative int32 values as their 64-bit two's complement, as protobuf does)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def len_field(number: int, payload: bytes) -> bytes:
    """One length-delimited field: a string, a sub-message or a packed repeated field."""
    return varint(number << 3 | LEN) + varint(len(payload)) + payload


def _read_varint(data: bytes, at: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while at < end and shift < 64:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at
    raise ValueError("not a varint")


def wire_fields(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int, int, int, int]]:
    """(number, wire type, tag start, tag end, payload start, payload end) of each field in data[start:end], until
    the bytes stop parsing or MAX_WALKED_FIELDS."""
    at, end = start, len(data) if end is None else end
    for _ in range(MAX_WALKED_FIELDS):
        if at >= end:
            return
        try:
            tag, tag_end = _read_varint(data, at, end)
            wire = tag & 7
            if wire == 0:
                _, payload_end = _read_varint(data, tag_end, end)
                payload_start = tag_end
            elif wire == LEN:
                length, payload_start = _read_varint(data, tag_end, end)
                payload_end = payload_start + length
            elif wire in (1, 5):
                payload_start, payload_end = tag_end, tag_end + (8 if wire == 1 else 4)
            else:
                return
        except ValueError:
            return
        if payload_end > end:
            return
        yield tag >> 3, wire, at, tag_end, payload_start, payload_end
        at = payload_end


def string_spans(data: bytes, descriptor: Descriptor, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Where the UTF-8 bytes of every string field lie, in sub-messages too."""
    spans: list[tuple[int, int]] = []
    for number, wire, _, _, lo, hi in wire_fields(data, start, end):
        field = descriptor.fields_by_number.get(number)
        if field is None or wire != LEN:
            continue
        if field.type == FieldDescriptor.TYPE_STRING:
            spans.append((lo, hi))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            spans += string_spans(data, field.message_type, lo, hi)
    return spans


def bad_utf8(data: bytes, descriptor: Descriptor, rng: random.Random) -> bytes | None:
    """`data` with invalid UTF-8 written over part of one string field (its length unchanged); None without one."""
    spans = [(lo, hi) for lo, hi in string_spans(data, descriptor) if hi > lo]
    if not spans:
        return None
    lo, hi = rng.choice(spans)
    at = rng.randrange(lo, hi)
    bad = rng.choice(BAD_UTF8)[: hi - at]
    return data[:at] + bad + data[at + len(bad) :]


def wrong_wire_type(data: bytes, rng: random.Random) -> bytes | None:
    """`data` with one field's tag saying another wire type (a string read as a number, a group, an invalid type)."""
    fields = list(wire_fields(data))
    if not fields:
        return None
    number, wire, tag_start, tag_end, _, _ = rng.choice(fields)
    other = rng.choice([w for w in range(8) if w != wire])
    return data[:tag_start] + varint(number << 3 | other) + data[tag_end:]


PROTOBUF_MUTATIONS: dict[str, Callable[[bytes, Descriptor, random.Random], bytes | None]] = {
    "truncated": lambda data, _, rng: data[: rng.randrange(1, len(data))] if len(data) > 1 else None,
    "repeated": lambda data, _, rng: data * rng.choice([2, 3]),  # repeated fields grow, the last scalar wins
    "wire-type": lambda data, _, rng: wrong_wire_type(data, rng),
    "bad-utf8": bad_utf8,
    "unknown-field": lambda data, _, rng: data + len_field(rng.choice([99, 536870911]), rng.randbytes(16)),
    "empty": lambda data, _, rng: b"",
}


# ---- JSON bodies ----------------------------------------------------------------------------------------------

WRONG_VALUES: tuple[Any, ...] = (None, True, 0, -1, 2**63, 1e308, -1e-308, "", "x", "\u0000", [], [None], {}, {"a": 1})


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value[:8]):
            yield from _paths(item, (*path, i))


def _replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replaced(value[head], rest, new)}
    return [_replaced(item, rest, new) if i == head else item for i, item in enumerate(value)]


def _some_path(body: dict[str, Any], rng: random.Random) -> tuple[Any, ...]:
    return rng.choice([p for p in _paths(body) if p] or [()])


def wrong_type(body: dict[str, Any], rng: random.Random) -> bytes:
    return json.dumps(_replaced(body, _some_path(body, rng), rng.choice(WRONG_VALUES))).encode()


def nested(body: dict[str, Any], rng: random.Random) -> bytes:
    """One value wrapped in arrays or objects thousands deep (past Python's recursion limit at the top)."""
    depth = rng.choice([64, 999, 1001, 20_000, 100_000])
    opener, closer = ('{"a":', "}") if rng.random() < 0.5 else ("[", "]")
    marker = "\u2603nested\u2603"
    text = json.dumps(_replaced(body, _some_path(body, rng), marker), ensure_ascii=False)
    return text.replace(json.dumps(marker, ensure_ascii=False), opener * depth + "1" + closer * depth, 1).encode()


def duplicate_key(body: dict[str, Any], rng: random.Random) -> bytes:
    """A top-level key given twice: once with its value, once with a wrong one (either may come last)."""
    if not body:
        return b"{}"
    key = rng.choice(list(body))
    wrong = json.dumps({key: rng.choice(WRONG_VALUES)})[1:-1]
    text = json.dumps(body)
    return ("{" + wrong + ", " + text[1:] if rng.random() < 0.5 else text[:-1] + ", " + wrong + "}").encode()


def dropped(body: dict[str, Any], rng: random.Random) -> bytes:
    key = rng.choice(list(body)) if body else None
    return json.dumps({k: v for k, v in body.items() if k != key}).encode()


def truncated(body: dict[str, Any], rng: random.Random) -> bytes:
    data = json.dumps(body).encode()
    return data[: rng.randrange(0, len(data))]


def _string_starts(data: bytes) -> list[int]:
    """Where the string values of a JSON text begin (just after their opening quote)."""
    return [match.end() for match in re.finditer(rb': "', data)]


def bad_utf8_json(body: dict[str, Any], rng: random.Random) -> bytes:
    """Invalid UTF-8 bytes inside a JSON string (just after the opening quote of a value)."""
    data = json.dumps(body, ensure_ascii=False).encode()
    at = rng.choice(_string_starts(data) or [len(data) // 2])
    return data[:at] + rng.choice(BAD_UTF8) + data[at:]


def lone_surrogate(body: dict[str, Any], rng: random.Random) -> bytes:
    """A `\\ud800` escape: valid JSON, but no UTF-8 string can hold it."""
    data = json.dumps(body).encode()
    at = rng.choice(_string_starts(data) or [1])
    return data[:at] + b"\\ud800" + data[at:]


JSON_MUTATIONS: dict[str, Callable[[dict[str, Any], random.Random], bytes]] = {
    "wrong-type": wrong_type,
    "nested": nested,
    "duplicate-key": duplicate_key,
    "dropped": dropped,
    "truncated": truncated,
    "bad-utf8": bad_utf8_json,
    "lone-surrogate": lone_surrogate,
}
