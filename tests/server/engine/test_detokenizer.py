"""Incremental detokenization with the real SmolLM2 tokenizer (byte-level BPE) and stop strings."""

from __future__ import annotations

import pytest

from weir_server.engine.detokenizer import IncrementalDetokenizer
from weir_server.engine.types import SamplingParams


def _stream(tokenizer, text: str, prompt: str = "Say:", **params) -> tuple[list[str], str | None, list[int]]:
    """Feed `text`'s tokens one at a time; return the deltas, the matched stop and the ids fed."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(
        tokenizer, tokenizer.encode(prompt, add_special_tokens=False), SamplingParams(**params)
    )
    deltas: list[str] = []
    for i, token_id in enumerate(ids):
        delta, stop = detok.add([token_id], finished=i == len(ids) - 1)
        deltas.append(delta)
        if stop is not None:
            return deltas, stop, ids[: i + 1]
    return deltas, None, ids


@pytest.mark.parametrize(
    "text", ["Hello world, how are you?", " leading space and  two", "naïve café 😀🎉 终于 日本語 ok"]
)
def test_streamed_text_equals_full_decode(smollm_tokenizer, text):
    deltas, _, ids = _stream(smollm_tokenizer, text)
    assert "".join(deltas) == smollm_tokenizer.decode(ids) == text


def test_multibyte_characters_never_come_out_broken(smollm_tokenizer):
    text = "😀🎉🚀 终于完成了 한국어"
    ids = smollm_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # some characters span several byte tokens
    deltas, _, _ = _stream(smollm_tokenizer, text)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


@pytest.mark.parametrize("chunk", [2, 3, 5])
def test_tokens_arriving_several_at_a_time_give_the_same_text(smollm_tokenizer, chunk):
    """Outputs merged while a consumer was behind are decoded together (`OutputText`)."""
    text = "naïve café 😀🎉🚀 终于完成了 한국어 and the end"
    ids = smollm_tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm_tokenizer, [], SamplingParams())
    deltas = []
    for start in range(0, len(ids), chunk):
        piece = ids[start : start + chunk]
        delta, stop = detok.add(piece, finished=start + chunk >= len(ids))
        assert stop is None and "\ufffd" not in delta
        deltas.append(delta)
    assert "".join(deltas) == text


def test_stop_string_spanning_tokens_is_not_emitted(smollm_tokenizer):
    deltas, stop, _ = _stream(smollm_tokenizer, "The answer is 42. END OF STORY and more", stop=("END OF STORY",))
    assert stop == "END OF STORY"
    assert "".join(deltas) == "The answer is 42. "
    assert not any("END" in d for d in deltas)


def test_stop_string_inside_a_token_cuts_the_text(smollm_tokenizer):
    deltas, stop, _ = _stream(smollm_tokenizer, "abcdefghij", stop=("def",))
    assert stop == "def" and "".join(deltas) == "abc"


def test_include_stop_str_in_output_keeps_the_stop_string(smollm_tokenizer):
    deltas, stop, _ = _stream(
        smollm_tokenizer, "one two three four", stop=("three", "four"), include_stop_str_in_output=True
    )
    assert stop == "three" and "".join(deltas) == "one two three"


def test_earliest_of_several_stop_strings_wins(smollm_tokenizer):
    deltas, stop, _ = _stream(smollm_tokenizer, "alpha beta gamma", stop=("gamma", "beta"))
    assert stop == "beta" and "".join(deltas) == "alpha "


def test_text_is_held_back_only_as_long_as_the_longest_stop_string_minus_one(smollm_tokenizer):
    deltas, stop, ids = _stream(smollm_tokenizer, "hello there world", stop=("xyz!",))
    assert stop is None and "".join(deltas) == "hello there world"
    for i in range(len(ids) - 1):
        decoded = smollm_tokenizer.decode(ids[: i + 1])
        assert "".join(deltas[: i + 1]) == decoded[: len(decoded) - 3]


def test_skip_special_tokens(smollm_tokenizer):
    end = smollm_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = smollm_tokenizer.encode("Hi", add_special_tokens=False) + [end]
    for skip, expected in ((True, "Hi"), (False, "Hi<|im_end|>")):
        detok = IncrementalDetokenizer(smollm_tokenizer, [5], SamplingParams(skip_special_tokens=skip))
        text = "".join(detok.add([t])[0] for t in ids) + detok.add([], finished=True)[0]
        assert text == expected


def test_sentencepiece_style_leading_spaces_survive(smollm_tokenizer):
    # Decoding each token on its own would lose or double spaces; the prompt context keeps them right.
    deltas, _, _ = _stream(smollm_tokenizer, " world", prompt="Hello")
    assert "".join(deltas) == " world"


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """A Llama-style tokenizer: Metaspace pieces, byte fallback, and the Strip decoder of a leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["▁Hello", "▁world", "▁the", "▁end", "▁", "!", ","] + list("abcdefghijklmnopqrstuvwxyzHW")
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    vocab += [(f"<0x{b:02X}>", -20.0) for b in range(256)]
    vocab += [(p, -1.0 - len(pieces) + len(p)) for p in pieces]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("text", ["Hello world, the end!", "Hello 😀 world 终于", "a  b"])
def test_sentencepiece_tokenizer_streams_exact_text(sentencepiece_tokenizer, text):
    deltas, _, ids = _stream(sentencepiece_tokenizer, text, prompt="Hello")
    assert all("\ufffd" not in d for d in deltas)
    # The piece "▁Hello" starts the output, so it decodes with its space after the prompt.
    assert "".join(deltas) == " " + sentencepiece_tokenizer.decode(ids)


def test_sentencepiece_stop_string_spanning_byte_tokens(sentencepiece_tokenizer):
    deltas, stop, _ = _stream(sentencepiece_tokenizer, "Hello 😀 world", prompt="Hello", stop=("😀",))
    assert stop == "😀" and "".join(deltas) == " Hello "
