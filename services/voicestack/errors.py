"""One error type that crosses every boundary: engine -> NATS -> edge -> gRPC client."""

from __future__ import annotations

import grpc


class StageError(Exception):
    """A failure with a gRPC status code and a message that says what to fix."""

    def __init__(self, code: grpc.StatusCode, message: str, stage: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.stage = stage

    def __str__(self) -> str:
        return f"{self.stage}: {self.message}" if self.stage else self.message


def code_to_int(code: grpc.StatusCode) -> int:
    return code.value[0]


def code_from_int(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


def invalid(message: str) -> StageError:
    return StageError(grpc.StatusCode.INVALID_ARGUMENT, message)


def as_stage_error(exc: BaseException, stage: str = "") -> StageError:
    """Map anything raised by a handler to a status; ValueError means bad input."""
    if isinstance(exc, StageError):
        if stage and not exc.stage:
            exc.stage = stage
        return exc
    if isinstance(exc, ValueError):
        return StageError(grpc.StatusCode.INVALID_ARGUMENT, str(exc), stage)
    return StageError(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}", stage)
