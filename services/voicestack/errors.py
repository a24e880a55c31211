"""The error types that cross every boundary: engine -> NATS -> edge -> gRPC client.

  ServiceError  a gRPC status and a message that says what to fix: bad input, a
                refused call (auth, limits, a slow client, a draining edge).
  StageError    a stage stream failed (at its open, mid-stream, by going silent):
                it names the stage. The edge ends the turn with one `Error` for it
                and the call goes on; a ServiceError of the edge's own ends the call.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """A failure with a gRPC status code and a message that says what to fix."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


class StageError(ServiceError):
    """A stage stream failed; `stage` names it ("vad", "stt", "llm", "tts")."""

    def __init__(self, code: grpc.StatusCode, message: str, stage: str = ""):
        super().__init__(code, message)
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


def invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def unavailable(message: str) -> ServiceError:
    """What is behind this service went away (a model server, a replica): try another."""
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message)


def stalled(stage: str, seconds: float) -> StageError:
    """A stage that is alive (its heartbeats come) but produces nothing."""
    return StageError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{stage} produced nothing for {seconds:g} s", stage)


def as_stage_error(exc: BaseException, stage: str = "") -> StageError:
    """Map anything raised by a stage's handler to a status; ValueError means bad input."""
    if isinstance(exc, StageError):
        if stage and not exc.stage:
            exc.stage = stage
        return exc
    if isinstance(exc, ServiceError):
        return StageError(exc.code, exc.message, stage)
    if isinstance(exc, ValueError):
        return StageError(grpc.StatusCode.INVALID_ARGUMENT, str(exc), stage)
    return StageError(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}", stage)
