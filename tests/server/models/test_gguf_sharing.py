"""One parse of a GGUF file per load: the shared reader's arrays and the pages it holds."""

from __future__ import annotations

import numpy as np
import pytest

from weir_server.models.gguf_sharing import shared_gguf_readers
from weir_server.models.registry import resolve_source


@pytest.fixture(scope="module")
def gguf_path():
    source = resolve_source("smollm2-135m-instruct")
    return source.directory / str(source.gguf_file)


def test_a_shared_reader_is_parsed_once_and_holds_plain_arrays(gguf_path):
    import gguf

    with shared_gguf_readers():
        reader = gguf.GGUFReader(gguf_path)
        assert gguf.GGUFReader(gguf_path) is reader
        tokens = reader.fields["tokenizer.ggml.tokens"]
        assert type(tokens.parts[tokens.data[0]]) is np.ndarray  # not an np.memmap, each with a dict of its own
        assert type(reader.tensors[0].data) is np.ndarray
    plain = gguf.GGUFReader(gguf_path)
    assert plain.fields.keys() == reader.fields.keys()
    assert [t.name for t in plain.tensors] == [t.name for t in reader.tensors]
    assert np.array_equal(np.asarray(plain.tensors[5].data), reader.tensors[5].data)


def test_dropping_a_shared_readers_pages_keeps_its_tensors_readable(gguf_path):
    import gguf

    with shared_gguf_readers():
        reader = gguf.GGUFReader(gguf_path)
        before = np.array(reader.tensors[-1].data)
        reader.drop_pages()
        assert np.array_equal(reader.tensors[-1].data, before)  # faulted back in from the file
