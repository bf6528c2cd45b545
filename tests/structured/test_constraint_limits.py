"""Admission limits on constraints (Constraint.validate): bytes and JSON nesting, checked before any compile."""

from __future__ import annotations

import json
import time

import pytest
from structured_support import nested_schema

from weir_server.engine.types import (
    MAX_CONSTRAINT_BYTES,
    MAX_CONSTRAINT_DEPTH,
    STRUCTURAL_TAG_EXTRA_DEPTH,
    Constraint,
    ConstraintLimits,
    json_depth,
)
from weir_server.errors import InvalidRequestError

DEFAULT_LIMITS = ConstraintLimits()


def refusal(constraint: Constraint, limits: ConstraintLimits = DEFAULT_LIMITS) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as error:
        constraint.validate(limits)
    return error.value


@pytest.mark.parametrize("kind", ["json_schema", "regex", "grammar", "structural_tag"])
def test_a_constraint_over_the_byte_limit_is_refused_naming_its_kind_and_the_limit(kind: str) -> None:
    error = refusal(Constraint(kind, "x" * (MAX_CONSTRAINT_BYTES + 1)))
    assert error.field == kind
    assert error.description == (
        f"has {MAX_CONSTRAINT_BYTES + 1} bytes; the limit is {MAX_CONSTRAINT_BYTES} bytes (--max-constraint-bytes)"
    )


def test_choices_count_toward_the_byte_limit_together() -> None:
    half = "y" * (MAX_CONSTRAINT_BYTES // 2 + 1)
    Constraint("choice", (half,)).validate()
    error = refusal(Constraint("choice", (half, half)))
    assert error.field == "choice"
    assert error.description.startswith(f"the choices together have {2 * len(half)} bytes")


def test_the_byte_limit_counts_utf8_bytes_not_characters() -> None:
    text = "é" * (MAX_CONSTRAINT_BYTES // 2 + 1)  # two bytes each
    assert f"has {len(text.encode())} bytes" in refusal(Constraint("regex", text)).description


def test_a_twenty_megabyte_value_is_refused_at_once() -> None:
    start = time.perf_counter()
    assert "has 20000000 characters" in refusal(Constraint("grammar", "é" * 20_000_000)).description
    assert time.perf_counter() - start < 0.5


def test_a_schema_at_the_depth_limit_is_accepted_and_one_level_deeper_is_refused() -> None:
    at_limit = nested_schema((MAX_CONSTRAINT_DEPTH - 1) // 2)  # 2 levels of JSON a level, 1 for the leaf
    assert json_depth(at_limit) <= MAX_CONSTRAINT_DEPTH
    Constraint("json_schema", at_limit).validate()
    error = refusal(Constraint("json_schema", nested_schema(MAX_CONSTRAINT_DEPTH // 2)))
    assert error.field == "json_schema"
    assert f"the limit is {MAX_CONSTRAINT_DEPTH} (--max-constraint-depth)" in error.description


def test_a_schema_nested_deeper_than_any_parser_recurses_is_refused_before_it_is_parsed() -> None:
    error = refusal(Constraint("json_schema", "[" * 60_000 + "]" * 60_000))
    assert "60000 deep" in error.description


def test_brackets_inside_strings_do_not_count_toward_the_depth() -> None:
    schema = json.dumps({"type": "string", "pattern": "[[[[{{{{" * 100, "description": 'say "[" \\ ['})
    assert json_depth(schema) == 1
    Constraint("json_schema", schema).validate()


def test_a_tool_call_tag_may_nest_its_own_wrapping_past_the_schema_limit() -> None:
    limit = MAX_CONSTRAINT_DEPTH + STRUCTURAL_TAG_EXTRA_DEPTH
    Constraint("structural_tag", "[" * limit + "]" * limit).validate()
    error = refusal(Constraint("structural_tag", "[" * (limit + 1) + "]" * (limit + 1)))
    assert error.field == "structural_tag"
    assert f"{limit + 1} deep; the limit is {limit} (--max-constraint-depth, and" in error.description


def test_limits_of_the_servers_own_are_applied() -> None:
    limits = ConstraintLimits(max_bytes=14, max_depth=2)
    assert "the limit is 14 bytes" in refusal(Constraint("regex", "[a-z]{1,999999}"), limits).description
    assert "the limit is 2 " in refusal(Constraint("json_schema", '{"a":{"b":{}}}'), limits).description
    Constraint("json_object").validate(limits)
