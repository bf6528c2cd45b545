"""weir_server.engine.structured with the real SmolLM2 tokenizer: masks, matcher progress, completion, errors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from structured_support import SMOLLM2_EOS, SMOLLM2_VOCAB_SIZE

from weir_server.engine import grammar_compiler
from weir_server.engine.structured import GrammarState, StructuredOutputs, allowed_row, choice_grammar, fill_mask
from weir_server.engine.types import Constraint
from weir_server.errors import InvalidRequestError

SPECIAL_IDS = set(range(17))  # SmolLM2's added special tokens


def allowed_ids(compiler: Any, state: GrammarState) -> set[int]:
    mask = fill_mask([state], SMOLLM2_VOCAB_SIZE, compiler.allowed)
    logits = torch.zeros(1, SMOLLM2_VOCAB_SIZE)
    mask.apply(logits)
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


def vocab(compiler: Any) -> list[bytes]:
    return list(compiler.info.decoded_vocab)


def accept_text(tokenizer: Any, state: GrammarState, text: str) -> None:
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        assert state.accept(token_id), f"token {token_id} of {text!r} rejected"


def test_choice_mask_allows_exactly_the_tokens_that_start_a_choice(compiler: Any) -> None:
    state = compiler.new_state(Constraint("choice", ("yes", "no way")))
    expected = {
        i
        for i, piece in enumerate(vocab(compiler))
        if piece and i not in SPECIAL_IDS and (b"yes".startswith(piece) or b"no way".startswith(piece))
    }
    assert allowed_ids(compiler, state) == expected


def test_regex_mask_after_a_prefix_allows_only_digit_tokens(compiler: Any, smollm2_tokenizer: Any) -> None:
    state = compiler.new_state(Constraint("regex", r"id-[0-9]{2}"))
    accept_text(smollm2_tokenizer, state, "id-")
    allowed = allowed_ids(compiler, state)
    expected = {i for i, p in enumerate(vocab(compiler)) if p and len(p) <= 2 and p.isdigit()}
    assert allowed == expected


def test_complete_json_allows_only_the_stop_token_and_terminates_on_it(compiler: Any, smollm2_tokenizer: Any) -> None:
    schema = (
        '{"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}'
    )
    state = compiler.new_state(Constraint("json_schema", schema))
    accept_text(smollm2_tokenizer, state, '{"n": 7}')
    assert not state.is_terminated
    assert allowed_ids(compiler, state) == {SMOLLM2_EOS}
    assert state.accept(SMOLLM2_EOS)
    assert state.is_terminated


def test_matcher_rejects_a_token_outside_the_grammar(compiler: Any, smollm2_tokenizer: Any) -> None:
    state = compiler.new_state(Constraint("json_object"))
    (brace,) = smollm2_tokenizer.encode("[", add_special_tokens=False)
    assert not state.accept(brace)


def test_special_tokens_are_never_allowed_inside_json_strings(compiler: Any, smollm2_tokenizer: Any) -> None:
    state = compiler.new_state(Constraint("json_object"))
    accept_text(smollm2_tokenizer, state, '{"k": "')
    allowed = allowed_ids(compiler, state)
    assert not allowed & SPECIAL_IDS
    assert len(allowed) > 40_000


def test_grammar_constraint_follows_the_ebnf(compiler: Any, smollm2_tokenizer: Any) -> None:
    grammar = 'root ::= expr\nexpr ::= term ("+" term)*\nterm ::= [0-9]+'
    state = compiler.new_state(Constraint("grammar", grammar))
    accept_text(smollm2_tokenizer, state, "12+3")
    (plus,) = smollm2_tokenizer.encode("+", add_special_tokens=False)
    assert state.accept(plus)
    assert SMOLLM2_EOS not in allowed_ids(compiler, state)  # "12+3+" is not a sentence yet


def test_choice_grammar_escapes_quotes_backslashes_and_unicode(compiler: Any) -> None:
    choices = ('say "hi"', "back\\slash", "😀", "")
    assert choice_grammar(choices).startswith("root ::= ")
    for choice in choices:
        state = compiler.new_state(Constraint("choice", choices))
        assert state.matcher.accept_string(choice)
        assert state.matcher.is_completed()


def test_each_constraint_is_compiled_once(compiler: Any) -> None:
    constraint = Constraint("regex", "[a-c]+")
    assert compiler.compile(constraint) is compiler.compile(Constraint("regex", "[a-c]+"))


@pytest.mark.parametrize(
    ("constraint", "words"),
    [
        (Constraint("json_schema", '{"type": "nope"}'), 'Unsupported type "nope"'),
        (Constraint("json_schema", "{not json"), "is not valid JSON"),
        (Constraint("json_schema", '{"type": "integer", "minimum": 5, "maximum": 1}'), "minimum greater than maximum"),
        (Constraint("regex", "(ab"), "parenthesis is not closed"),
        (Constraint("grammar", 'root ::= "a" |'), "EBNF parser error"),
        (Constraint("grammar", 'expr ::= "a"'), 'root rule with name "root" is not found'),
        # Valid, but no token of SmolLM2's vocabulary can spell it (found by the protobuf fuzzer).
        (Constraint("regex", "\U00040000"), "no token of this model's vocabulary can begin"),
    ],
)
def test_invalid_constraints_raise_invalid_request_naming_the_kind(
    compiler: Any, constraint: Constraint, words: str
) -> None:
    with pytest.raises(InvalidRequestError) as error:
        compiler.compile(constraint)
    assert error.value.field == constraint.kind
    assert words in error.value.description
    assert not error.value.description.startswith("[")  # no C++ log prefix


def test_mask_is_filled_off_thread_and_leaves_unconstrained_rows_alone(smollm2_tokenizer: Any) -> None:
    structured = StructuredOutputs(smollm2_tokenizer, SMOLLM2_VOCAB_SIZE, (SMOLLM2_EOS,), torch.device("cpu"))
    state = structured.new_state(Constraint("choice", ("a", "b")))
    future = structured.submit([None, state, None])
    assert future is not None
    logits = torch.randn(3, SMOLLM2_VOCAB_SIZE)
    before = logits.clone()
    future.result().apply(logits)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert int(torch.isfinite(logits[1]).sum()) == 2
    assert structured.submit([None, None]) is None
    structured.shutdown()


def test_a_model_without_tokenizer_refuses_constraints() -> None:
    structured = StructuredOutputs(None, 100, (1,), torch.device("cpu"))
    with pytest.raises(InvalidRequestError) as error:
        structured.validate(Constraint("regex", "a"))
    assert error.value.field == "constraint"


def test_concurrent_requests_for_a_new_constraint_compile_it_once(
    compiler: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Constraint] = []
    compile_once = grammar_compiler.compile_constraint

    def counting(xgr_compiler: Any, constraint: Constraint) -> Any:
        calls.append(constraint)
        return compile_once(xgr_compiler, constraint)

    monkeypatch.setattr(grammar_compiler, "compile_constraint", counting)
    constraint = Constraint(
        "json_schema", '{"type": "object", "properties": {"q": {"type": "string", "maxLength": 9}}}'
    )
    with ThreadPoolExecutor(8) as pool:
        compiled = list(pool.map(lambda _: compiler.compile(constraint), range(8)))
    assert len(calls) == 1
    assert all(c is compiled[0] for c in compiled)


def test_allowed_row_clears_exactly_the_forbidden_bits_including_the_sign_bit() -> None:
    forbidden = {0, 5, 31, 32, 63, 99}
    row = allowed_row(100, forbidden)
    bits = ((row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:100]
    assert {i for i in range(100) if not bits[i]} == forbidden
