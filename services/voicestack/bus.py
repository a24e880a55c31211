"""Streams over NATS: the one stream layer between the edge and the stages.

A stage stream is opened, fed, drained and closed like a gRPC stream:

  open    the opener requests "vs.<stage>.open" (the stage's replicas share one
          queue group, so exactly one answers) or "vs.<stage>.open.<replica>"
          (affinity). The answer names the stream's private subject.
  data    opener -> "vs.<stage>.s.<replica>.<stream>"; stage -> the opener's
          reply subject. Payloads are the stage's own protobuf messages; the
          sequence number, the kind (absent on data, most of the traffic) and the
          W3C trace context (only while a span is current) travel in NATS headers.
  liveness both ends send a heartbeat when they have sent nothing for a while;
          a peer silent for `peer_timeout` seconds is dead.
  loss    core NATS is at-most-once: across a server restart or a cluster node loss
          messages can vanish. A gap in the sequence numbers fails the stream
          (UNAVAILABLE), which the opener treats like a dead replica: reopen and
          replay. A stream never goes on with a hole in its audio or its text.
  end     the opener's "end" closes the input; the stage's "end" closes the output.
  cancel  stops the stage's work at once (barge-in depends on it).
  failover when a replica dies mid-stream the opener reopens on another one, replays
          the inputs sent so far and skips the outputs it already has (stages are
          deterministic for the same input), so the caller sees a delay, not an error.
          A stage whose outputs are snapshots rather than deltas (STT: each transcript
          is the whole text so far, and how many interim ones come depends on timing)
          is opened with skip_delivered=False: its outputs are simply sent again.

A replica at capacity leaves the queue group until a stream ends, so opens go to
replicas that can take them; a late open is refused with RESOURCE_EXHAUSTED. When the
queue group is empty, the opener asks "vs.<stage>.overflow", where every live replica
listens whatever its load: a full one refuses (RESOURCE_EXHAUSTED: busy, retry), and
only silence there means no replica at all (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import grpc
import nats.errors
from nats.aio.client import Client as NatsClient
from opentelemetry import trace

from voicestack import telemetry
from voicestack.errors import StageError, as_stage_error, code_from_int, code_to_int
from voicestack.v1 import bus_pb2

log = logging.getLogger(__name__)

KIND, SEQ, CODE, MESSAGE = "Vs-Kind", "Vs-Seq", "Vs-Code", "Vs-Message"
DATA, END, CANCEL, HEARTBEAT, ERROR = "data", "end", "cancel", "hb", "error"
_DEAD = "dead"  # local only: the watchdog's verdict
_GAP = "gap"  # local only: a message of the peer's was lost on the bus
MAX_QUEUED_INPUTS = 2000  # ~40 s of 20 ms frames: a stage this far behind has failed


# Request/reply, TTS queue group: the voices a TTS replica speaks, as a JSON list
# (the edge checks a session's voice with it without opening a stream).
TTS_VOICES_SUBJECT = "vs.tts.voices"


def open_subject(stage: str, replica: str = "") -> str:
    return f"vs.{stage}.open.{replica}" if replica else f"vs.{stage}.open"


def queue_group(stage: str) -> str:
    return f"vs.{stage}"


def overflow_subject(stage: str) -> str:
    return f"vs.{stage}.overflow"


class _Peer:
    """One end of a stream: outgoing sequence numbers, incoming order, liveness."""

    def __init__(self, nc: NatsClient, out_subject: str, peer_timeout: float):
        self.nc = nc
        self.out_subject = out_subject
        self.peer_timeout = peer_timeout
        self.seq_out = 0
        self.seq_in = 0
        self.last_sent = self.last_heard = time.monotonic()
        self.closed = False

    async def publish(self, kind: str, payload: bytes = b"", extra: dict | None = None) -> None:
        if self.closed:
            return
        self.seq_out += 1
        # Data is most of the traffic (a frame every few tens of ms a session): it carries
        # only its sequence number, and a trace context only when a span is current.
        headers = {SEQ: str(self.seq_out)} if kind == DATA else {KIND: kind, SEQ: str(self.seq_out)}
        if extra:
            headers.update(extra)
        telemetry.inject(headers)
        self.last_sent = time.monotonic()
        await self.nc.publish(self.out_subject, payload, headers=headers)

    def accept(self, msg) -> str | None:
        """The message's kind, None for a duplicate or stale message, or _GAP when one
        before it never came."""
        headers = msg.headers or {}
        seq = int(headers.get(SEQ, "0"))
        if seq and seq <= self.seq_in:
            return None
        self.last_heard = time.monotonic()
        if seq:
            lost = seq > self.seq_in + 1
            self.seq_in = seq
            if lost:
                return _GAP
        return headers.get(KIND, DATA)

    def tick(self, now: float) -> tuple[bool, bool]:
        """(needs a heartbeat, peer is dead)."""
        return (
            now - self.last_sent > self.peer_timeout / 4,
            now - self.last_heard > self.peer_timeout,
        )


async def _ticker(nc: NatsClient, peers: Callable[[], list[_Peer]], on_dead, interval: float) -> None:
    """One task per process side: heartbeats out, dead peers found. While our own
    connection is down nobody can be heard, so nobody is declared dead; once it is back,
    every peer gets a fresh timeout."""
    was_connected = True
    while True:
        await asyncio.sleep(interval)
        now = time.monotonic()
        if not nc.is_connected:
            was_connected = False
            continue
        if not was_connected:
            was_connected = True
            for peer in peers():
                peer.last_heard = now
        for peer in peers():
            if peer.closed:
                continue
            needs_heartbeat, dead = peer.tick(now)
            if dead:
                await on_dead(peer)
            elif needs_heartbeat:
                with contextlib.suppress(Exception):
                    await peer.publish(HEARTBEAT)


# ---------------------------------------------------------------- stage side


@dataclass
class StreamContext:
    """What a stage handler may know about its stream (never the turn)."""

    stream_id: str
    session_id: str
    headers: dict = field(default_factory=dict)


Handler = Callable[[AsyncIterator, StreamContext], AsyncIterator]


class _ServerStream(_Peer):
    def __init__(self, nc, out_subject, peer_timeout, context: StreamContext):
        super().__init__(nc, out_subject, peer_timeout)
        self.context = context
        self.inputs: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.cancelled_by_peer = False
        self.lost_input = False

    async def requests(self) -> AsyncIterator:
        while True:
            item = await self.inputs.get()
            if item is END:
                return
            yield item


@dataclass
class EndpointStats:
    streams_served: int = 0
    streams_cancelled: int = 0
    opens_refused: int = 0
    errors: int = 0
    started_at: float = field(default_factory=time.time)


class StageEndpoint:
    """Serves one stage's streams on NATS by running `handler` for each."""

    def __init__(
        self,
        nc: NatsClient,
        stage: str,
        replica_id: str,
        capacity: int,
        handler: Handler,
        request_type,
        peer_timeout: float = 0.8,
        on_change: Callable[["StageEndpoint"], None] | None = None,
        stream_spans: bool = True,
        on_refused: Callable[[], None] | None = None,
    ):
        self.nc, self.stage, self.replica_id = nc, stage, replica_id
        self.capacity = capacity
        self.handler = handler
        self.request_type = request_type
        self.peer_timeout = peer_timeout
        self.on_change = on_change or (lambda endpoint: None)
        # One span per stream, child of the opener's span. Off for session-long streams
        # (VAD), which make their own short spans from each input's trace context.
        self.stream_spans = stream_spans
        self.on_refused = on_refused or (lambda: None)
        self.streams: dict[str, _ServerStream] = {}
        self.stats = EndpointStats()
        self.draining = False
        self._queue_sub = None
        self._subs = []
        self._ticker: asyncio.Task | None = None

    @property
    def active(self) -> int:
        return len(self.streams)

    async def start(self) -> None:
        self._subs.append(await self.nc.subscribe(open_subject(self.stage, self.replica_id), cb=self._on_open))
        self._subs.append(await self.nc.subscribe(overflow_subject(self.stage), queue=overflow_subject(self.stage),
                                                  cb=self._on_open))
        self._subs.append(await self.nc.subscribe(f"vs.{self.stage}.s.{self.replica_id}.*", cb=self._on_input))
        await self._update_queue_membership()
        self._ticker = asyncio.create_task(
            _ticker(self.nc, lambda: list(self.streams.values()), self._on_dead, self.peer_timeout / 8)
        )

    async def _update_queue_membership(self) -> None:
        """In the queue group only while this replica can take another stream."""
        want = not self.draining and self.active < self.capacity
        if want and self._queue_sub is None:
            self._queue_sub = await self.nc.subscribe(
                open_subject(self.stage), queue=queue_group(self.stage), cb=self._on_open
            )
        elif not want and self._queue_sub is not None:
            sub, self._queue_sub = self._queue_sub, None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self.on_change(self)

    async def _on_open(self, msg) -> None:
        request = bus_pb2.OpenStreamRequest.FromString(msg.data)
        if self.draining or self.active >= self.capacity:
            self.stats.opens_refused += 1
            self.on_refused()
            code = grpc.StatusCode.UNAVAILABLE if self.draining else grpc.StatusCode.RESOURCE_EXHAUSTED
            why = "draining" if self.draining else f"at capacity ({self.capacity} streams); retry in a few seconds"
            await msg.respond(
                bus_pb2.OpenStreamResponse(
                    replica_id=self.replica_id, error_code=code_to_int(code),
                    error_message=f"{self.stage} replica {self.replica_id} is {why}",
                ).SerializeToString()
            )
            self.on_change(self)
            return
        stream_id = uuid.uuid4().hex[:16]
        context = StreamContext(stream_id, request.session_id, dict(msg.headers or {}))
        timeout = request.peer_timeout_seconds or self.peer_timeout
        stream = _ServerStream(self.nc, request.reply_subject, timeout, context)
        self.streams[stream_id] = stream
        await self._update_queue_membership()
        await msg.respond(
            bus_pb2.OpenStreamResponse(
                stream_subject=f"vs.{self.stage}.s.{self.replica_id}.{stream_id}", replica_id=self.replica_id
            ).SerializeToString()
        )
        stream.task = asyncio.create_task(self._serve(stream_id, stream))

    async def _on_input(self, msg) -> None:
        stream = self.streams.get(msg.subject.rsplit(".", 1)[-1])
        if stream is None:
            return
        kind = stream.accept(msg)
        if kind == _GAP:
            # An input never came (a NATS fault): answering from what is left would be
            # wrong (a transcript with a hole); fail, and the opener replays it all.
            log.warning("%s stream %s: an input was lost on the bus; failing it for a replay",
                        self.stage, stream.context.stream_id)
            stream.lost_input = True
            if stream.task:
                stream.task.cancel()
        elif kind == DATA:
            stream.context.headers = msg.headers or {}  # the latest input's trace context
            if stream.inputs.qsize() >= MAX_QUEUED_INPUTS:
                stream.task.cancel()
                return
            try:
                stream.inputs.put_nowait(self.request_type.FromString(msg.data))
            except Exception:  # malformed protobuf: fail this stream only
                stream.inputs.put_nowait(ValueError(f"malformed {self.request_type.__name__} on the bus"))
        elif kind == END:
            stream.inputs.put_nowait(END)
        elif kind == CANCEL:
            stream.cancelled_by_peer = True
            stream.task.cancel()

    async def _on_dead(self, stream: _ServerStream) -> None:
        log.warning("%s stream %s: opener silent for %.1fs, cancelling", self.stage, stream.context.stream_id, stream.peer_timeout)
        stream.cancelled_by_peer = True
        stream.closed = True
        if stream.task:
            stream.task.cancel()

    async def _serve(self, stream_id: str, stream: _ServerStream) -> None:
        async def checked_requests():
            async for item in stream.requests():
                if isinstance(item, Exception):
                    raise item
                yield item

        span = None
        try:
            with telemetry.attach(stream.context.headers):
                if self.stream_spans:
                    span = telemetry.start_span(f"{self.stage}.stream", voicestack__stage=self.stage,
                                                voicestack__replica_id=self.replica_id)
                with telemetry.in_span(span):
                    async with contextlib.aclosing(self.handler(checked_requests(), stream.context)) as outputs:
                        async for output in outputs:
                            await stream.publish(DATA, output.SerializeToString())
            await stream.publish(END)
            self.stats.streams_served += 1
        except asyncio.CancelledError:
            self.stats.streams_cancelled += 1
            if span is not None:
                span.set_attribute("voicestack.cancelled", True)
            if not stream.cancelled_by_peer:  # we are shutting down, or lost input: the opener fails over
                why = "lost an input on the bus" if stream.lost_input else "stopped"
                with contextlib.suppress(Exception):
                    await stream.publish(ERROR, extra={CODE: str(code_to_int(grpc.StatusCode.UNAVAILABLE)),
                                                       MESSAGE: f"{self.stage} replica {why}"})
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status for the opener
            error = as_stage_error(exc, self.stage)
            self.stats.errors += 1
            if span is not None:
                span.set_status(trace.StatusCode.ERROR, error.message)
            if error.code == grpc.StatusCode.INTERNAL:
                log.exception("%s stream %s failed", self.stage, stream_id)
            with contextlib.suppress(Exception):
                await stream.publish(ERROR, extra={CODE: str(code_to_int(error.code)), MESSAGE: error.message[:500]})
        finally:
            telemetry.end_span(span)
            stream.closed = True
            self.streams.pop(stream_id, None)
            if not self.nc.is_closed:
                with contextlib.suppress(Exception):
                    await self._update_queue_membership()

    async def drain(self, deadline_seconds: float) -> None:
        """Take no new streams, let open ones finish until the deadline, then stop them."""
        self.draining = True
        await self._update_queue_membership()
        for sub in self._subs[:2]:  # the affinity and overflow subjects, too
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        end = time.monotonic() + deadline_seconds
        while self.streams and time.monotonic() < end:
            await asyncio.sleep(0.05)
        for stream in list(self.streams.values()):
            if stream.task:
                stream.task.cancel()
        while self.streams:
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        if self._ticker:
            self._ticker.cancel()
        for sub in self._subs[2:]:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


# ---------------------------------------------------------------- opener side


class StageClient:
    """Opens stage streams for one process (the edge). One inbox subscription for all."""

    def __init__(self, nc: NatsClient, peer_timeout: float = 0.8, open_timeout: float = 2.0):
        self.nc = nc
        self.peer_timeout = peer_timeout
        self.open_timeout = open_timeout
        self.streams: dict[str, StageStream] = {}
        self._prefix = ""
        self._sub = None
        self._ticker: asyncio.Task | None = None

    async def start(self) -> None:
        self._prefix = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self._prefix + ".*", cb=self._on_output)
        self._ticker = asyncio.create_task(
            _ticker(self.nc, lambda: [s._peer for s in self.streams.values() if s._peer], self._on_dead,
                    self.peer_timeout / 8)
        )

    async def close(self) -> None:
        if self._ticker:
            self._ticker.cancel()
        for stream in list(self.streams.values()):
            await stream.cancel()
        if self._sub:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def open(
        self, stage: str, response_type, first=None, *, session_id: str = "", replica: str = "", replay: bool = True,
        skip_delivered: bool = True,
    ) -> "StageStream":
        """Open a stream on `stage` (on `replica` if it still can, else any) and send `first`."""
        stream = StageStream(self, stage, response_type, session_id, replay, skip_delivered)
        await stream._open(replica)
        if first is not None:
            await stream.send(first)
        return stream

    async def _on_output(self, msg) -> None:
        stream = self.streams.get(msg.subject.rsplit(".", 1)[-1])
        if stream is not None:
            await stream._on_message(msg)

    async def _on_dead(self, peer: _Peer) -> None:
        peer.closed = True
        for stream in list(self.streams.values()):
            if stream._peer is peer:
                stream._outputs.put_nowait((_DEAD, None))


class StageStream:
    """The opener's end of one stage stream: send(), end(), cancel(), async-iterate outputs."""

    def __init__(self, client: StageClient, stage: str, response_type, session_id: str, replay: bool,
                 skip_delivered: bool = True):
        self.client, self.stage, self.response_type = client, stage, response_type
        self.session_id = session_id
        self.replay = replay
        self.skip_delivered = skip_delivered
        self.replica_id = ""
        self.failovers = 0
        self._inbox_id = ""
        self._peer: _Peer | None = None
        self._sent: list[bytes] = []
        self._ended = False
        self._done = False
        self._delivered = 0
        self._skip = 0
        self._cancelled = False
        self._outputs: asyncio.Queue = asyncio.Queue()
        # Clear while a failover reopens and replays: a send meanwhile would reach the new
        # replica ahead of the replay (audio out of order) and then again within it.
        self._switched = asyncio.Event()
        self._switched.set()

    async def _open(self, replica: str = "") -> None:
        nc = self.client.nc
        self._inbox_id = uuid.uuid4().hex[:16]
        reply_subject = f"{self.client._prefix}.{self._inbox_id}"
        request = bus_pb2.OpenStreamRequest(
            reply_subject=reply_subject, session_id=self.session_id, peer_timeout_seconds=self.client.peer_timeout
        ).SerializeToString()
        headers: dict = {}
        telemetry.inject(headers)
        subjects = [open_subject(self.stage, replica)] if replica else []
        subjects += [open_subject(self.stage)] * 3  # a refused open is retried: another replica may take it
        last_error = None
        for attempt, subject in enumerate(subjects):
            try:
                try:
                    reply = await nc.request(subject, request, timeout=self.client.open_timeout, headers=headers)
                except nats.errors.NoRespondersError:
                    if subject != open_subject(self.stage):
                        raise
                    # An empty queue group means every replica is full (or there are none):
                    # the overflow subject tells the two apart.
                    reply = await nc.request(overflow_subject(self.stage), request,
                                             timeout=self.client.open_timeout, headers=headers)
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                last_error = StageError(grpc.StatusCode.UNAVAILABLE, f"no {self.stage} replica is available", self.stage)
                if subject != open_subject(self.stage):
                    continue
                break
            answer = bus_pb2.OpenStreamResponse.FromString(reply.data)
            if answer.stream_subject:
                self.replica_id = answer.replica_id
                self._peer = _Peer(nc, answer.stream_subject, self.client.peer_timeout)
                self.client.streams[self._inbox_id] = self
                return
            last_error = StageError(code_from_int(answer.error_code), answer.error_message, self.stage)
            await asyncio.sleep(0.02 * (attempt + 1))
        raise last_error

    async def send(self, message) -> None:
        payload = message.SerializeToString()
        await self._switched.wait()
        if self.replay:
            self._sent.append(payload)
        await self._peer.publish(DATA, payload)

    async def end(self) -> None:
        await self._switched.wait()
        self._ended = True
        await self._peer.publish(END)

    async def cancel(self) -> None:
        """Stop the stage's work now; outputs already in flight are dropped."""
        if self._done:
            return
        self._cancelled = True
        with contextlib.suppress(Exception):
            await self._peer.publish(CANCEL)
        self._close()
        self._outputs.put_nowait((END, None))  # wakes a reader waiting on this stream

    def _close(self) -> None:
        self._done = True
        if self._peer:
            self._peer.closed = True
        self.client.streams.pop(self._inbox_id, None)

    async def _on_message(self, msg) -> None:
        kind = self._peer.accept(msg)
        if kind is None or kind == HEARTBEAT:
            return
        self._outputs.put_nowait((kind, msg))  # (_GAP: outputs are counted in order; past a lost one, fail over)

    def __aiter__(self):
        return self

    async def __anext__(self):
        while True:
            if self._cancelled or (self._done and self._outputs.empty()):
                raise StopAsyncIteration
            kind, msg = await self._outputs.get()
            if kind == DATA:
                if self._skip:
                    self._skip -= 1
                    continue
                self._delivered += 1
                return self.response_type.FromString(msg.data)
            if kind == END:
                self._close()
                raise StopAsyncIteration
            if kind == ERROR:
                code = code_from_int(int(msg.headers.get(CODE, "2")))
                error = StageError(code, msg.headers.get(MESSAGE, "stage failed"), self.stage)
            elif kind == _GAP:
                error = StageError(grpc.StatusCode.UNAVAILABLE,
                                   f"{self.stage} output lost on the bus (replica {self.replica_id})", self.stage)
            else:  # _DEAD
                error = StageError(grpc.StatusCode.UNAVAILABLE, f"{self.stage} replica {self.replica_id} stopped answering", self.stage)
            if error.code == grpc.StatusCode.UNAVAILABLE and self.replay and not self._done:
                await self._failover(error)
                continue
            if kind == _GAP:  # the replica is alive: stop its work
                with contextlib.suppress(Exception):
                    await self._peer.publish(CANCEL)
            self._close()
            raise error

    async def _failover(self, cause: StageError) -> None:
        """Reopen on another replica, replay the inputs, skip outputs already delivered."""
        log.warning("%s stream failing over from %s: %s", self.stage, self.replica_id, cause.message)
        with contextlib.suppress(Exception):  # a replica still alive (lost messages) stops its work
            await self._peer.publish(CANCEL)
        self.client.streams.pop(self._inbox_id, None)
        self.failovers += 1
        self._switched.clear()
        self._outputs = asyncio.Queue()  # anything left from the dead replica is stale
        try:
            try:
                await self._open()
            except StageError:
                self._close()
                raise
            self._skip = self._delivered if self.skip_delivered else 0
            for payload in self._sent:
                await self._peer.publish(DATA, payload)
            if self._ended:
                await self._peer.publish(END)
        finally:
            self._switched.set()
