"""ShareGPT-style datasets: loading, vLLM's length filter, seeded sampling, and the errors users see."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from weir_bench.cli import _validate, build_parser
from weir_bench.dataset import (
    DatasetError,
    DatasetPrompts,
    keep,
    load_sharegpt,
    sample,
    tokenize_conversations,
)

SAMPLE = Path(__file__).parent / "data" / "sharegpt_sample.json"
session_loop = pytest.mark.asyncio(loop_scope="session")


async def words(texts, add_special_tokens):
    """A stand-in tokenizer: one id per whitespace-separated word (plus a BOS id when asked)."""
    return [([1] if add_special_tokens else []) + [hash(w) % 1000 for w in t.split()] for t in texts]


class _Tokenizes:
    name = "tokenizes"
    tokenize = staticmethod(words)


def test_the_first_human_and_gpt_turns_of_each_entry_are_loaded():
    conversations = load_sharegpt(SAMPLE)
    assert len(conversations) == 9  # 11 entries; one has a single turn, one no conversations
    assert conversations[0].prompt.startswith("Explain in two sentences")
    assert conversations[0].completion.startswith("It stores the keys")


@session_loop
async def test_too_short_and_too_long_pairs_are_filtered_as_vllm_does():
    requests = await tokenize_conversations(load_sharegpt(SAMPLE), words, output_len=None)
    assert len(requests) == 6  # the short prompt, the short answer and the 1,400-word prompt are dropped
    assert all(4 <= len(r.prompt) <= 1024 and r.output_tokens >= 4 for r in requests)
    # The output length is the answer's token count: the haiku is 16 words (its two slashes included).
    assert 16 in [r.output_tokens for r in requests]


@session_loop
async def test_a_fixed_output_length_replaces_the_answers_and_skips_their_minimum():
    requests = await tokenize_conversations(load_sharegpt(SAMPLE), words, output_len=2)
    assert len(requests) == 7  # the 1-word answer no longer matters
    assert {r.output_tokens for r in requests} == {2}


@pytest.mark.parametrize(
    "prompt_len,output_len,fixed,kept",
    [
        (3, 10, False, False),
        (4, 3, False, False),
        (4, 3, True, True),
        (1025, 4, False, False),
        (1024, 1025, False, False),
        (1024, 1024, False, True),
    ],
)
def test_length_bounds(prompt_len, output_len, fixed, kept):
    assert keep(prompt_len, output_len, fixed_output=fixed) is kept


@session_loop
async def test_sampling_is_seeded_and_draws_again_from_a_small_dataset():
    requests = await DatasetPrompts(load_sharegpt(SAMPLE), None).resolve(_Tokenizes())
    a = sample(requests, 20, seed=5)
    assert a == sample(requests, 20, seed=5) and a != sample(requests, 20, seed=6)
    assert len(a) == 20 and set(map(id, a)) == set(map(id, requests))  # every one used, some twice


@session_loop
async def test_a_target_that_cannot_tokenize_is_a_clear_error():
    class NoTokenizer:
        name = "llama-server"

    with pytest.raises(DatasetError, match="cannot tokenize"):
        await DatasetPrompts(load_sharegpt(SAMPLE), None).resolve(NoTokenizer())


@pytest.mark.parametrize(
    "content,message",
    [
        ("not json", "not JSON"),
        ('{"conversations": []}', "JSON list"),
        ('[{"conversations": [{"value": "x"}]}]', "no entry"),
    ],
)
def test_malformed_files_are_refused(tmp_path, content, message):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_sharegpt(path)


def _parse(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    return args


def test_cli_reads_the_dataset_before_any_load_and_leaves_output_length_to_the_answers():
    args = _parse(["--dataset-name", "sharegpt", "--dataset-path", str(SAMPLE)])
    assert len(args.dataset) == 9 and args.output_tokens is None
    assert _parse(["--dataset-name", "sharegpt", "--dataset-path", str(SAMPLE), "--output-len", "8"]).output_tokens == 8


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dataset-name", "sharegpt"], "needs --dataset-path"),
        (["--dataset-name", "sharegpt", "--dataset-path", "/nonexistent/x.json"], "/nonexistent/x.json"),
        (["--dataset-path", str(SAMPLE)], "needs --dataset-name sharegpt"),
    ],
)
def test_bad_dataset_options_are_one_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_sample_file_is_sharegpt_shaped():
    data = json.loads(SAMPLE.read_text())
    assert all({"from", "value"} <= set(turn) for entry in data for turn in entry.get("conversations", []))
