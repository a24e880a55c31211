"""What the four stages share: a stage is a streaming function
`stream(requests, context) -> responses`, served both on NATS (StageEndpoint) and
as its own gRPC API, with one count of streams in flight against one capacity.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator

import grpc

from voicestack import discovery, telemetry
from voicestack.bus import StageEndpoint, StreamContext
from voicestack.config import Settings
from voicestack.errors import ServiceError, as_stage_error, invalid
from voicestack.runtime import end_call


async def first_message(requests: AsyncIterator, kind: str, what: str):
    """The stream's first request, which must carry `kind` (its config)."""
    async for request in requests:
        if request.WhichOneof("kind") != kind:
            raise invalid(f"the first message must be {what}; send it before any other message")
        return getattr(request, kind)
    raise invalid(f"stream closed before {what} was sent")


async def one_request(request) -> AsyncIterator:
    yield request




class Stage:
    name = ""
    request_type = None
    grpc_service_names: list[str] = []
    stream_spans = True  # a span per stream (VAD's streams last a session: it spans events instead)

    def __init__(self, settings: Settings):
        self.settings = settings
        self.capacity = settings.capacity
        self.endpoint: StageEndpoint | None = None
        self.meters = None
        self._grpc_active = 0
        self.compute_seconds = 0.0  # since start: what a conversation-minute costs (`voicestack status`)

    # subclass supplies
    async def stream(self, requests: AsyncIterator, context: StreamContext) -> AsyncIterator:
        raise NotImplementedError
        yield

    def describe(self) -> dict:
        return {}

    @property
    def parallel(self) -> int:
        """Streams this replica works on at the same time (its capacity, unless its engine
        runs fewer at once and queues the rest)."""
        return self.capacity

    def takes_named(self) -> bool:
        """Whether a stream asked of this replica by name (a session's affinity) is taken: when
        it starts at once. An engine that works on one stream at a time keeps the session's
        prefix warm for any session anyway (they share the system prompt; load/affinity.py),
        and sticking to it only queues the session behind another: it sends them to the group."""
        return self.parallel > 1 and self.active < self.parallel

    @property
    def ready(self) -> bool:
        """Able to serve at all (the LLM stage: while its model server is up)."""
        return True

    # Called with the new readiness when `ready` changes (runtime: gRPC health follows it).
    async def on_readiness(self, ready: bool) -> None:
        return None

    @property
    def active(self) -> int:
        """Streams in flight, over NATS and over the gRPC API: one count, one capacity."""
        return self._grpc_active + (self.endpoint.active if self.endpoint else 0)

    async def start(self, nc, meters) -> None:
        self.meters = meters
        self.endpoint = StageEndpoint(
            nc, self.name, self.settings.replica_id, self.capacity, self._counted, self.request_type,
            peer_timeout=self.settings.peer_timeout_seconds, stream_spans=self.stream_spans,
            on_refused=self._refused, in_flight=lambda: self.active, ready=lambda: self.ready,
            takes_named=self.takes_named,
        )
        await self.endpoint.start()

    async def drain(self, deadline_seconds: float) -> None:
        if self.endpoint:
            await self.endpoint.drain(deadline_seconds)
            await self.endpoint.close()

    def snapshot(self) -> dict:
        """This replica's state, as `voicestack status` shows it."""
        stats = self.endpoint.stats if self.endpoint else None
        return {
            "stage": self.name, "replica_id": self.settings.replica_id, **self.describe(),
            "active": self.active, "capacity": self.capacity,
            "served": stats.streams_served if stats else 0, "cancelled": stats.streams_cancelled if stats else 0,
            "refused": stats.opens_refused if stats else 0, "errors": stats.errors if stats else 0,
            "started_at": stats.started_at if stats else 0.0, "compute_seconds": round(self.compute_seconds, 3),
            "draining": bool(self.endpoint and self.endpoint.draining),
        }

    def _refused(self) -> None:
        if self.meters:
            self.meters.opens_refused.add(1, {"stage": self.name})

    def add_compute(self, seconds: float) -> None:
        """Time this replica spent on a model's work (a decode, a clause, a frame, a reply)."""
        self.compute_seconds += seconds
        if self.meters:
            self.meters.compute_seconds.add(seconds, {"stage": self.name})

    def record(self, kind: str, seconds: float) -> None:
        discovery.observe_latency(seconds, kind)
        if self.meters:
            self.meters.stage_latency.record(seconds, {"stage": self.name, "kind": kind})

    async def _counted(self, requests, context):
        try:
            async for response in self.stream(requests, context):
                yield response
        except ServiceError as exc:
            if self.meters:
                self.meters.errors.add(1, {"stage": self.name, "code": exc.code.name})
            raise
        except (asyncio.CancelledError, GeneratorExit):  # cancelled mid-stream by its opener
            if self.meters:
                self.meters.streams_cancelled.add(1, {"stage": self.name})
            raise

    async def serve_grpc(self, requests: AsyncIterator, context: grpc.aio.ServicerContext) -> AsyncIterator:
        """A gRPC call of the stage's own API: same function, same capacity."""
        if self.endpoint and self.endpoint.draining:
            await end_call(context, requests, grpc.StatusCode.UNAVAILABLE,
                           f"{self.name} replica {self.settings.replica_id} is draining; call another")
            return
        if not self.ready:
            await end_call(context, requests, grpc.StatusCode.UNAVAILABLE,
                           f"{self.name} replica {self.settings.replica_id} is not ready (its model server is down)")
            return
        if self.active >= self.capacity:
            self._refused()
            await end_call(context, requests, grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"{self.name} is at capacity ({self.capacity} streams); retry shortly")
            return
        self._grpc_active += 1
        await self._load_changed()
        stream_context = StreamContext(f"grpc-{time.monotonic_ns()}", "", dict(context.invocation_metadata() or ()))
        span = None
        try:
            with telemetry.attach(stream_context.headers):  # W3C traceparent in gRPC metadata
                if self.stream_spans:
                    span = telemetry.start_span(f"{self.name}.stream", voicestack__stage=self.name,
                                                voicestack__replica_id=self.settings.replica_id, rpc__system="grpc")
                with telemetry.in_span(span):
                    async with contextlib.aclosing(self._counted(requests, stream_context)) as responses:
                        async for response in responses:
                            yield response
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            error = as_stage_error(exc, self.name)
            await end_call(context, requests, error.code, error.message)
        finally:
            telemetry.end_span(span)
            self._grpc_active -= 1
            await self._load_changed()

    async def _load_changed(self) -> None:
        """A gRPC call began or ended: the NATS endpoint joins or leaves its queue group."""
        if self.endpoint:
            with contextlib.suppress(Exception):
                await self.endpoint.update_queue_membership()


