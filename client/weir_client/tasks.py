"""weir.v1's ModelTask as the words the client, the gateway's model cards and the server's model table use
("generate", "embed"). Derived from the enum's names, so a task added to the proto needs no table edited."""

from __future__ import annotations

from weir.v1 import inference_pb2 as pb

UNKNOWN = "unknown"
_PREFIX = "MODEL_TASK_"


def task_name(task: int) -> str:
    """The word of a ModelTask value; "unknown" for UNSPECIFIED or a value this build does not know."""
    if task == pb.MODEL_TASK_UNSPECIFIED or task not in pb.ModelTask.values():
        return UNKNOWN
    return pb.ModelTask.Name(task).removeprefix(_PREFIX).lower()


def task_value(name: str) -> int:
    """The ModelTask of a word ("generate" -> MODEL_TASK_GENERATE); ValueError for one the proto does not have."""
    return pb.ModelTask.Value(_PREFIX + name.upper())
