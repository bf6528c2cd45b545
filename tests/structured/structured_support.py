"""Shared data for the structured-output tests: SmolLM2 facts, 20 schemas with prompts, an arithmetic grammar, and
constraints that are costly to compile."""

from __future__ import annotations

import json
import re
from typing import Any

SMOLLM2_VOCAB_SIZE = 49152
SMOLLM2_EOS = 2  # <|im_end|>


def _obj(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
    } | extra


def _str(max_length: int = 16, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_length} | extra


# (what to ask for, schema): nested objects, arrays, enums, bounded numbers, required fields, refs, anyOf...
SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    (
        "a person with a name and an age",
        _obj({"name": _str(), "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    ),
    (
        "a point on a plane",
        _obj(
            {
                "x": {"type": "number", "minimum": -100, "maximum": 100},
                "y": {"type": "number", "minimum": -100, "maximum": 100},
            }
        ),
    ),
    ("your favourite primary colour", _obj({"color": {"enum": ["red", "green", "blue"]}})),
    (
        "a user account",
        _obj(
            {
                "user": _obj({"name": _str(), "id": {"type": "integer", "minimum": 1, "maximum": 9999}}),
                "active": {"type": "boolean"},
            }
        ),
    ),
    (
        "three test scores",
        _obj(
            {
                "scores": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 100},
                    "minItems": 1,
                    "maxItems": 4,
                }
            }
        ),
    ),
    (
        "a shopping cart",
        _obj(
            {
                "items": {
                    "type": "array",
                    "items": _obj({"sku": _str(8), "qty": {"type": "integer", "minimum": 1, "maximum": 9}}),
                    "maxItems": 2,
                }
            }
        ),
    ),
    (
        "a list of fruits",
        {"type": "array", "items": {"enum": ["apple", "banana", "cherry"]}, "minItems": 1, "maxItems": 3},
    ),
    ("whether it will rain tomorrow", {"enum": ["yes", "no", "maybe"]}),
    ("a task and whether it is done", _obj({"done": {"type": "boolean"}, "note": _str()}, required=["done"])),
    (
        "today's weather",
        _obj({"temperature": {"type": "number", "minimum": -50, "maximum": 50}, "unit": {"enum": ["C", "F"]}}),
    ),
    ("a software release", _obj({"version": {"const": 2}, "name": _str()})),
    ("a person's middle name, if any", _obj({"middle_name": {"anyOf": [_str(), {"type": "null"}]}})),
    ("a US postal code", _obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}})),
    (
        "a value that is a number or a word",
        _obj({"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999}, _str(10)]}}),
    ),
    (
        "a deeply nested counter",
        _obj({"a": _obj({"b": _obj({"c": {"type": "integer", "minimum": 0, "maximum": 50}})})}),
    ),
    (
        "a home address",
        {
            "$defs": {"address": _obj({"street": _str(), "city": _str()})},
            "type": "object",
            "properties": {"home": {"$ref": "#/$defs/address"}},
            "required": ["home"],
        },
    ),
    ("a movie rating from 1 to 5", _obj({"rating": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 6}})),
    ("two tags", _obj({"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 2}})),
    (
        "a book",
        _obj(
            {
                "title": _str(24),
                "pages": {"type": "integer", "minimum": 1, "maximum": 2000},
                "published": {"type": "boolean"},
            },
            additionalProperties=False,
        ),
    ),
    (
        "a three-letter airport code and a gate",
        _obj(
            {
                "code": {"type": "string", "minLength": 3, "maxLength": 3},
                "gate": {"type": "integer", "minimum": 1, "maximum": 99},
            }
        ),
    ),
]


def json_prompt(subject: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Reply in JSON with {subject}."}]


# Arithmetic expressions, bounded so every sentence fits in a few tokens.
ARITHMETIC = r"""
root ::= expr
expr ::= term (("+" | "-") term){0,2}
term ::= factor (("*" | "/") factor){0,1}
factor ::= number | "(" expr ")"
number ::= [0-9]{1,3}
"""


def is_arithmetic(text: str) -> bool:
    """Whether `text` is a sentence of ARITHMETIC (a recursive-descent check written from the grammar)."""
    pos = 0

    def number() -> bool:
        nonlocal pos
        match = re.compile(r"[0-9]{1,3}").match(text, pos)
        if match is None:
            return False
        pos = match.end()
        return True

    def factor() -> bool:
        nonlocal pos
        if text.startswith("(", pos):
            pos += 1
            if not expr() or not text.startswith(")", pos):
                return False
            pos += 1
            return True
        return number()

    def repeat(item: Any, operators: str, times: int) -> bool:
        nonlocal pos
        if not item():
            return False
        for _ in range(times):
            if pos < len(text) and text[pos] in operators:
                pos += 1
                if not item():
                    return False
        return True

    def term() -> bool:
        return repeat(factor, "*/", 1)

    def expr() -> bool:
        return repeat(term, "+-", 2)

    return expr() and pos == len(text)


def costly_regex(units: int, salt: int = 0) -> str:
    """A regex of 13 bytes a unit that xgrammar compiles for 0.2-0.5 s and about 3 MB a unit (SmolLM2, xgrammar
    0.2.9): small enough for every admission limit, so only the compile budget stops it. `salt` makes it new."""
    letters = "abcdefghijklmnopqrst"
    return "".join(f"[{letters[i % 20]}-z]{{1,{5000 + 1000 * salt + i}}}" for i in range(units))


def nested_schema(levels: int) -> str:
    """A JSON schema whose objects nest `levels` deep (each level two levels of JSON: the schema, its properties)."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return json.dumps(schema)
