"""Model tasks as words, derived from weir.v1's ModelTask enum (the one map the client and the gateway use)."""

from __future__ import annotations

import pytest

from weir.v1 import inference_pb2 as pb
from weir_client.tasks import task_name, task_value


def test_every_task_of_the_proto_has_a_word_that_maps_back() -> None:
    for value in pb.ModelTask.values():
        if value != pb.MODEL_TASK_UNSPECIFIED:
            assert task_value(task_name(value)) == value
    assert (task_name(pb.MODEL_TASK_GENERATE), task_name(pb.MODEL_TASK_EMBED)) == ("generate", "embed")


@pytest.mark.parametrize("value", [pb.MODEL_TASK_UNSPECIFIED, 99])
def test_unspecified_or_unknown_task_is_unknown(value: int) -> None:
    assert task_name(value) == "unknown"


def test_a_word_the_proto_lacks_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        task_value("dance")
