"""`weir serve --speculative-config`: vLLM's keys, and one clear line with exit code 2 for a bad one."""

from __future__ import annotations

import pytest

from weir_server.cli import config_from_args, main, parse_args
from weir_server.engine.spec_decode.config import (
    DEFAULT_DISABLE_BY_BATCH_SIZE,
    SpeculativeConfig,
    parse_speculative_config,
)


def test_ngram_keys_give_a_frozen_config_in_the_engine_config():
    args = parse_args(
        ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}']
    )
    generate = config_from_args(args).generate
    assert generate is not None
    assert generate.speculative == SpeculativeConfig("ngram", 4, prompt_lookup_min=2, prompt_lookup_max=3)


def test_a_model_key_means_a_draft_model():
    assert parse_speculative_config('{"model": "tiny", "num_speculative_tokens": 3}') == SpeculativeConfig(
        "draft_model", 3, model="tiny"
    )


def test_one_lookup_bound_given_keeps_the_other_on_its_side():
    assert parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 1}') == (
        SpeculativeConfig("ngram", 2, prompt_lookup_min=1, prompt_lookup_max=1)
    )
    config = parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 7}')
    assert (config.prompt_lookup_min, config.prompt_lookup_max) == (7, 7)


def test_speculation_backs_off_above_a_batch_size_which_null_turns_off():
    ngram = '{"method": "ngram", "num_speculative_tokens": 2'
    assert parse_speculative_config(ngram + "}").disable_by_batch_size == DEFAULT_DISABLE_BY_BATCH_SIZE
    config = parse_speculative_config('{"model": "tiny", "num_speculative_tokens": 3, "disable_by_batch_size": 4}')
    assert config.disable_by_batch_size == 4 and not config.backs_off(4) and config.backs_off(5)
    never = parse_speculative_config(ngram + ', "disable_by_batch_size": null}')
    assert never.disable_by_batch_size is None and not never.backs_off(10_000)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{nope", "not valid JSON"),
        ("[1]", "must be a JSON object"),
        ('{"method": "eagle", "num_speculative_tokens": 2}', "method must be one of ngram, draft_model"),
        ('{"num_speculative_tokens": 2}', "method must be one of"),
        ('{"method": "ngram"}', "num_speculative_tokens is required"),
        ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens must be in 1..16"),
        ('{"method": "ngram", "num_speculative_tokens": 99}', "num_speculative_tokens must be in 1..16"),
        ('{"method": "ngram", "num_speculative_tokens": "4"}', "num_speculative_tokens must be an integer"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "k": 1}', "unknown key 'k'"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}', "prompt_lookup_min must be"),
        (
            '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}',
            "prompt_lookup_max (2) must be at least prompt_lookup_min (4)",
        ),
        ('{"method": "ngram", "num_speculative_tokens": 2, "model": "x"}', "ngram takes no"),
        ('{"method": "draft_model", "num_speculative_tokens": 2}', 'needs "model"'),
        ('{"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0}', "disable_by_batch_size must"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 1.5}', "must be an integer"),
    ],
)
def test_a_bad_speculative_config_is_one_line_and_exit_code_2(capsys, value, message):
    assert main(["--speculative-config", value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("weir serve: error: --speculative-config")


def test_adaptive_defaults_to_measuring_a_draft_model_and_not_n_gram_lookup():
    draft = parse_speculative_config('{"model": "tiny", "num_speculative_tokens": 3}')
    ngram = parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 3}')
    assert draft.adaptive is None and draft.measures and not ngram.measures
    assert parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 3, "adaptive": true}').measures
    fixed = parse_speculative_config('{"model": "tiny", "num_speculative_tokens": 3, "adaptive": false}')
    assert not fixed.measures
    with pytest.raises(ValueError, match="adaptive must be true or false"):
        parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 3, "adaptive": "yes"}')
