"""Weir's own exception types. The API layer maps each to a gRPC status; nothing below it knows gRPC."""

from __future__ import annotations


class WeirError(Exception):
    """Base of every error Weir raises on purpose."""


class InvalidRequestError(WeirError):
    """A request parameter is out of range or inconsistent; `field` names it (dotted path)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.description = message


class ModelNotFoundError(WeirError):
    """The request names a model this server has not loaded."""


class NotFoundError(WeirError):
    """The request names something this server does not hold, such as an unknown LoRA adapter (NOT_FOUND)."""


class QueueFullError(WeirError):
    """The engine's waiting queue is full; the caller may retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineUnavailableError(WeirError):
    """The engine is loading, draining or stopped."""


class EngineStepError(WeirError):
    """A model step failed; only the requests in that step are failed with this."""


class ModelLoadError(WeirError):
    """The model could not be resolved or loaded."""
