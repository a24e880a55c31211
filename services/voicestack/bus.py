"""Streams over NATS: the one stream layer between the edge and the stages.

A stage stream is opened, fed, drained and closed like a gRPC stream:

  open    the opener requests "vs.<stage>.open" (the stage's replicas share one
          queue group, so exactly one answers) or "vs.<stage>.open.<replica>"
          (affinity). The answer names the stream's private subject. The stage
          counts the stream once that answer is sent and its task runs, so an open
          nobody can be answered (no reply inbox, a malformed request) holds nothing.
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
          A message that does not parse (anyone on the bus can publish anywhere)
          fails the stream the same way, on either side: the bus is at fault, not
          the client, so never INVALID_ARGUMENT.
  end     the opener's "end" closes the input; the stage's "end" closes the output.
  cancel  stops the stage's work at once (barge-in depends on it).
  failover each stage declares in its CONTRACT how its streams survive the death of
          their replica (Failover): REPLAY reopens on another replica, replays the
          inputs sent so far and skips the outputs already delivered (stages are
          deterministic for the same input), so the caller sees a delay, not an
          error; RESEND does the same but takes every output again (STT: each
          transcript is the whole text so far, and how many interim ones come
          depends on timing); OPENER raises UNAVAILABLE to the opener, which
          recovers what it needs itself. A stream fails over MAX_FAILOVERS times at
          most (a replica whose model server is down fails every stream it takes).

A replica at capacity leaves the queue group until a stream ends, so opens go to
replicas that can take them; a late open is refused with RESOURCE_EXHAUSTED. When the
queue group is empty, the opener asks "vs.<stage>.overflow", where every live replica
listens whatever its load: a full one refuses (RESOURCE_EXHAUSTED: busy, retry), and
only silence there means no replica at all (UNAVAILABLE). The capacity is the
replica's: its streams over NATS and over its own gRPC API count together.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import grpc
import nats.errors
from google.protobuf.message import DecodeError
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
_MALFORMED = "malformed"  # local only: a message on the stream's subject did not parse
MAX_QUEUED_INPUTS = 2000  # ~40 s of 20 ms frames: a stage this far behind has failed
MAX_FAILOVERS = 2  # reopens a stream may take; past them the opener gets UNAVAILABLE
# The peer timeout an opener may ask for: shorter would kill streams on a busy loop's
# hiccup, longer would hold a dead opener's capacity for minutes.
PEER_TIMEOUT_RANGE = (0.2, 10.0)
STOP_SECONDS = 5.0
NAMED_OPEN_SECONDS = 0.5  # how long an open waits for the replica it named before asking the group  # how long cancelled streams get to unwind when a drain ends


class Failover(enum.Enum):
    """How a stage's stream survives the death of the replica serving it (declared by
    the stage, in its package's CONTRACT; the opener follows it)."""

    REPLAY = "replay"  # reopen elsewhere, replay the inputs, skip outputs already delivered (deltas: LLM)
    RESEND = "resend"  # reopen elsewhere, replay the inputs, take every output again (snapshots: STT)
    OPENER = "opener"  # fail the stream (UNAVAILABLE): the opener recovers what it needs itself
    #                    (VAD: a new stream hears the utterance again; TTS: resumes at the first clause
    #                    whose audio was not fully delivered)


@dataclass(frozen=True)
class StageContract:
    """What an opener must know of a stage: its messages and its failover rule."""

    name: str
    request_type: type
    response_type: type
    failover: Failover


# Request/reply, TTS queue group: the voices a TTS replica speaks, as a JSON list
# (the edge checks a session's voice with it without opening a stream).
TTS_VOICES_SUBJECT = "vs.tts.voices"


def open_subject(stage: str, replica: str = "") -> str:
    return f"vs.{stage}.open.{replica}" if replica else f"vs.{stage}.open"


def queue_group(stage: str) -> str:
    return f"vs.{stage}"


def overflow_subject(stage: str) -> str:
    return f"vs.{stage}.overflow"


def stream_subject(stage: str, replica: str, stream_id: str) -> str:
    return f"vs.{stage}.s.{replica}.{stream_id}"


def peer_timeout(asked: float, default: float) -> float:
    """The peer timeout for a stream whose opener asked for `asked` seconds (0: unset)."""
    if not asked or math.isnan(asked):
        return default
    low, high = PEER_TIMEOUT_RANGE
    return min(max(asked, low), high)


def _publishable(subject: str) -> bool:
    """A subject we may publish to: wildcards or whitespace would break or widen it."""
    return bool(subject) and not any(c in subject for c in "*> \t\r\n")


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
        """The message's kind, None for a duplicate or stale message, _GAP when one
        before it never came, or _MALFORMED when its sequence number is not one."""
        headers = msg.headers or {}
        try:
            seq = int(headers.get(SEQ, "0"))
        except ValueError:
            return _MALFORMED
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
        self.failure = ""  # why this side stopped the stream (the bus failed it), told to the opener

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
    """Serves one stage's streams on NATS by running `handler` for each.

    `in_flight` is the replica's whole load (the stage's own gRPC calls too, see
    stage.py); without it, this endpoint's streams alone count against `capacity`.
    `ready` says whether the replica can serve at all (the LLM stage: its model server
    answers /health); while it cannot, the replica stays out of the queue group and
    refuses opens with UNAVAILABLE. `takes_named` says whether an open asked of this replica
    by name (a session's affinity) starts at once; when not, it is refused and the opener
    asks the group (an engine that runs one generation at a time queues it otherwise,
    which costs more than a warm cache saves). Whoever changes the load or the readiness
    elsewhere calls update_queue_membership()."""

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
        in_flight: Callable[[], int] | None = None,
        ready: Callable[[], bool] | None = None,
        takes_named: Callable[[], bool] | None = None,
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
        self.in_flight = in_flight or (lambda: self.active)
        self.ready = ready or (lambda: True)
        self.takes_named = takes_named or (lambda: True)
        self.streams: dict[str, _ServerStream] = {}
        self.stats = EndpointStats()
        self.draining = False
        self._opening = 0  # opens being answered: counted, not yet in `streams`
        self._queue_sub = None
        self._membership = asyncio.Lock()  # one join or leave at a time
        self._open_subs = []  # affinity and overflow: taken even when the queue group is left
        self._input_sub = None
        self._ticker: asyncio.Task | None = None

    @property
    def active(self) -> int:
        return len(self.streams) + self._opening

    def _full(self) -> bool:
        return self.in_flight() >= self.capacity

    async def start(self) -> None:
        self._open_subs = [
            await self.nc.subscribe(open_subject(self.stage, self.replica_id), cb=self._on_open),
            await self.nc.subscribe(overflow_subject(self.stage), queue=overflow_subject(self.stage),
                                    cb=self._on_open),
        ]
        self._input_sub = await self.nc.subscribe(stream_subject(self.stage, self.replica_id, "*"),
                                                  cb=self._on_input)
        await self.update_queue_membership()
        self._ticker = asyncio.create_task(
            _ticker(self.nc, lambda: list(self.streams.values()), self._on_dead, self.peer_timeout / 8)
        )

    async def update_queue_membership(self) -> None:
        """In the queue group only while this replica can take another stream."""
        # Shielded: leaving the group cancels the task of its subscription, which may be
        # the caller's own (an open it just took); a half-done unsubscribe would leave the
        # server routing opens to a subscription that no longer reads them.
        await asyncio.shield(self._update_queue_membership())

    async def _update_queue_membership(self) -> None:
        async with self._membership:
            want = not self.draining and self.ready() and not self._full()
            if want and self._queue_sub is None:
                self._queue_sub = await self.nc.subscribe(
                    open_subject(self.stage), queue=queue_group(self.stage), cb=self._on_open
                )
            elif not want and self._queue_sub is not None:
                sub, self._queue_sub = self._queue_sub, None
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        self.on_change(self)

    async def _refuse(self, msg, busy: bool = False) -> None:
        if busy:  # (not counted as refused: the opener asks the group next, at once)
            await msg.respond(bus_pb2.OpenStreamResponse(
                replica_id=self.replica_id, error_code=code_to_int(grpc.StatusCode.RESOURCE_EXHAUSTED),
                error_message=f"{self.stage} replica {self.replica_id} is busy; ask the group").SerializeToString())
            return
        self.stats.opens_refused += 1
        self.on_refused()
        if self.draining or not self.ready():
            code = grpc.StatusCode.UNAVAILABLE
            why = "draining" if self.draining else "not ready (its model server is down)"
        else:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            why = f"at capacity ({self.capacity} streams); retry in a few seconds"
        await msg.respond(
            bus_pb2.OpenStreamResponse(
                replica_id=self.replica_id, error_code=code_to_int(code),
                error_message=f"{self.stage} replica {self.replica_id} is {why}",
            ).SerializeToString()
        )
        self.on_change(self)

    async def _on_open(self, msg) -> None:
        # Anyone on the bus can publish here: what cannot be answered is dropped before
        # it is counted, so no stray message holds a slot.
        if not msg.reply:
            log.warning("%s: an open on %s without a reply inbox; dropped", self.stage, msg.subject)
            return
        try:
            request = bus_pb2.OpenStreamRequest.FromString(msg.data)
        except DecodeError:
            log.warning("%s: a malformed open on %s (%d bytes); ignored", self.stage, msg.subject, len(msg.data))
            return
        if not _publishable(request.reply_subject):
            log.warning("%s: an open on %s without a usable reply subject (%r); dropped",
                        self.stage, msg.subject, request.reply_subject[:100])
            return
        if self.draining or not self.ready() or self._full():
            await self._refuse(msg)
            return
        if msg.subject == open_subject(self.stage, self.replica_id) and not self.takes_named():
            await self._refuse(msg, busy=True)
            return
        stream_id = uuid.uuid4().hex[:16]
        context = StreamContext(stream_id, request.session_id, dict(msg.headers or {}))
        stream = _ServerStream(self.nc, request.reply_subject,
                               peer_timeout(request.peer_timeout_seconds, self.peer_timeout), context)
        answer = bus_pb2.OpenStreamResponse(
            stream_subject=stream_subject(self.stage, self.replica_id, stream_id), replica_id=self.replica_id
        ).SerializeToString()
        # The slot is held while the answer goes out; the stream counts once its task
        # exists. (Nothing else awaits in between: this callback may be cancelled at any
        # await, e.g. when the replica leaves the queue group it is running for.)
        self._opening += 1
        answered = False
        try:
            await msg.respond(answer)
            answered = True
        except Exception as exc:  # noqa: BLE001 - e.g. the connection is closing: nobody has the stream
            log.warning("%s: could not answer an open (%s); dropped", self.stage, exc)
        finally:
            self._opening -= 1
        if answered:
            stream.task = asyncio.create_task(self._serve(stream_id, stream))
            self.streams[stream_id] = stream
        await self.update_queue_membership()

    def _fail(self, stream: _ServerStream, why: str) -> None:
        """Stop a stream the bus broke; the opener hears UNAVAILABLE and fails over."""
        if stream.failure:
            return
        log.warning("%s stream %s: %s; failing it (UNAVAILABLE)", self.stage, stream.context.stream_id, why)
        stream.failure = why
        stream.task.cancel()

    async def _on_input(self, msg) -> None:
        stream = self.streams.get(msg.subject.rsplit(".", 1)[-1])
        if stream is None or stream.failure:
            return
        kind = stream.accept(msg)
        if kind == _GAP:
            # An input never came (a NATS fault): answering from what is left would be
            # wrong (a transcript with a hole); fail, and the opener replays it all.
            self._fail(stream, "lost an input on the bus")
        elif kind == _MALFORMED:
            self._fail(stream, "got a message with a malformed sequence number from the bus")
        elif kind == DATA:
            stream.context.headers = msg.headers or {}  # the latest input's trace context
            if stream.inputs.qsize() >= MAX_QUEUED_INPUTS:
                self._fail(stream, f"is {MAX_QUEUED_INPUTS} inputs behind")
                return
            try:
                request = self.request_type.FromString(msg.data)
            except DecodeError:
                # Not the client's fault (the opener sent a parsed message): someone else
                # wrote on this subject, or the bus mangled it. UNAVAILABLE, not INVALID_ARGUMENT.
                self._fail(stream, f"got a malformed {self.request_type.__name__} from the bus")
                return
            stream.inputs.put_nowait(request)
        elif kind == END:
            stream.inputs.put_nowait(END)
        elif kind == CANCEL:
            stream.cancelled_by_peer = True
            stream.task.cancel()

    async def _on_dead(self, stream: _ServerStream) -> None:
        log.warning("%s stream %s: opener silent for %.1fs, cancelling", self.stage, stream.context.stream_id, stream.peer_timeout)
        stream.cancelled_by_peer = True
        stream.closed = True
        stream.task.cancel()

    async def _serve(self, stream_id: str, stream: _ServerStream) -> None:
        span = None
        try:
            with telemetry.attach(stream.context.headers):
                if self.stream_spans:
                    span = telemetry.start_span(f"{self.stage}.stream", voicestack__stage=self.stage,
                                                voicestack__replica_id=self.replica_id)
                with telemetry.in_span(span):
                    async with contextlib.aclosing(self.handler(stream.requests(), stream.context)) as outputs:
                        async for output in outputs:
                            await stream.publish(DATA, output.SerializeToString())
            await stream.publish(END)
            self.stats.streams_served += 1
        except asyncio.CancelledError:
            if stream.failure:
                self.stats.errors += 1
            else:
                self.stats.streams_cancelled += 1
            if span is not None:
                span.set_attribute("voicestack.cancelled", True)
            if not stream.cancelled_by_peer:  # we are shutting down, or the bus failed it: the opener fails over
                why = stream.failure or "stopped"
                with contextlib.suppress(Exception):
                    await stream.publish(ERROR, extra={CODE: str(code_to_int(grpc.StatusCode.UNAVAILABLE)),
                                                       MESSAGE: f"{self.stage} replica {self.replica_id} {why}"})
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
                    await self.update_queue_membership()

    async def drain(self, deadline_seconds: float) -> None:
        """Take no new streams, let open ones finish until the deadline, then stop them."""
        self.draining = True
        await self.update_queue_membership()
        for sub in self._open_subs:  # the affinity and overflow subjects, too
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._open_subs = []
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_seconds
        # (A loop: an open answered just before the drain began may register meanwhile.)
        while self.streams and (left := end - loop.time()) > 0:
            await asyncio.wait([stream.task for stream in self.streams.values()], timeout=left)
        await self._stop_streams()

    async def _stop_streams(self) -> None:
        tasks = [stream.task for stream in self.streams.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=STOP_SECONDS)
            if stuck:
                log.warning("%s: %d streams did not stop within %.0fs of their cancel", self.stage, len(stuck), STOP_SECONDS)

    async def close(self) -> None:
        """Leave the bus (after drain(), or instead of it: streams still open are stopped)."""
        self.draining = True
        if self._ticker:
            self._ticker.cancel()
        subs = [*self._open_subs, self._input_sub, self._queue_sub]
        self._open_subs, self._input_sub, self._queue_sub = [], None, None
        for sub in subs:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        await self._stop_streams()


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

    async def open(self, contract: StageContract, first=None, *, session_id: str = "",
                   replica: str = "") -> "StageStream":
        """Open a stream on `contract`'s stage (on `replica` if it still can, else any)
        and send `first`. Its outputs are `contract.response_type`; it survives the death
        of its replica as `contract.failover` says."""
        stream = StageStream(self, contract, session_id)
        await stream._open(replica)
        if first is not None:
            try:
                await stream.send(first)
            except BaseException:
                await stream.cancel()
                raise
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
    """The opener's end of one stage stream: send(), end(), cancel(), async-iterate
    outputs; `async with` cancels it on the way out unless it has ended."""

    def __init__(self, client: StageClient, contract: StageContract, session_id: str):
        self.client, self.contract = client, contract
        self.stage = contract.name
        self.session_id = session_id
        self.failovers = 0
        self._replay = contract.failover is not Failover.OPENER
        self._skip_delivered = contract.failover is Failover.REPLAY
        self._replica_id = ""
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

    @property
    def replica_id(self) -> str:
        """The replica serving the stream now (it changes on a failover)."""
        return self._replica_id

    async def __aenter__(self) -> "StageStream":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.cancel()

    async def _open(self, replica: str = "", avoid: str = "") -> None:
        """Open on `replica` if it takes it, else on the queue group; a failover passes
        `avoid`, the replica that just failed, which is given back while tries remain."""
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
            named = subject != open_subject(self.stage)
            try:
                try:
                    # A replica asked for by name (affinity) that does not answer at once is passed over.
                    timeout = min(self.client.open_timeout, NAMED_OPEN_SECONDS) if named else self.client.open_timeout
                    reply = await nc.request(subject, request, timeout=timeout, headers=headers)
                except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    if subject != open_subject(self.stage):
                        raise
                    # An empty queue group means every replica is full (or there are none);
                    # an open lost as a full replica left the group goes unanswered. The
                    # overflow subject tells those apart from no replica at all.
                    reply = await nc.request(overflow_subject(self.stage), request,
                                             timeout=self.client.open_timeout, headers=headers)
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                last_error = StageError(grpc.StatusCode.UNAVAILABLE, f"no {self.stage} replica is available", self.stage)
                if subject != open_subject(self.stage):
                    continue
                break
            try:
                answer = bus_pb2.OpenStreamResponse.FromString(reply.data)
            except DecodeError:
                log.warning("%s: a malformed answer to an open on %s; trying again", self.stage, subject)
                last_error = StageError(grpc.StatusCode.UNAVAILABLE, f"malformed {self.stage} open answer", self.stage)
                continue
            if answer.stream_subject and avoid and answer.replica_id == avoid and attempt < len(subjects) - 1:
                # The replica that just failed took it again: give it back, ask the group again.
                with contextlib.suppress(Exception):
                    await _Peer(nc, answer.stream_subject, self.client.peer_timeout).publish(CANCEL)
                continue
            if answer.stream_subject:
                self._replica_id = answer.replica_id
                self._peer = _Peer(nc, answer.stream_subject, self.client.peer_timeout)
                self.client.streams[self._inbox_id] = self
                return
            last_error = StageError(code_from_int(answer.error_code), answer.error_message, self.stage)
            if not named:  # (the group is asked at once when the named replica is full)
                await asyncio.sleep(0.02 * (attempt + 1))
        raise last_error

    async def send(self, message) -> None:
        payload = message.SerializeToString()
        await self._switched.wait()
        if self._replay:
            self._sent.append(payload)
        await self._publish(DATA, payload)

    async def end(self) -> None:
        await self._switched.wait()
        self._ended = True
        await self._publish(END)

    async def _publish(self, kind: str, payload: bytes = b"") -> None:
        # A message the bus refuses (over its max_payload, a closed connection) fails this
        # stream, and so the turn, not the session.
        try:
            await self._peer.publish(kind, payload)
        except nats.errors.Error as error:
            raise StageError(grpc.StatusCode.INTERNAL, f"could not send to the {self.stage} stage over the bus: "
                             f"{type(error).__name__}", self.stage) from None

    async def cancel(self) -> None:
        """Stop the stage's work now; outputs already in flight are dropped. Idempotent."""
        if self._done or self._cancelled:
            return
        self._cancelled = True
        if self._peer:
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
                try:
                    output = self.contract.response_type.FromString(msg.data)
                except DecodeError:
                    # Someone else wrote on our inbox, or the bus mangled it: the stream's
                    # outputs can no longer be trusted in order. Fail it like a lost one.
                    log.warning("%s stream on %s: a malformed %s from the bus (%d bytes)", self.stage,
                                self._replica_id, self.contract.response_type.__name__, len(msg.data))
                    kind = _MALFORMED
                else:
                    if self._skip:
                        self._skip -= 1
                        continue
                    self._delivered += 1
                    return output
            if kind == END:
                self._close()
                raise StopAsyncIteration
            error = self._error(kind, msg)
            gave_up = False
            if error.code == grpc.StatusCode.UNAVAILABLE and self._replay and not self._done:
                if self.failovers < MAX_FAILOVERS:
                    await self._failover(error)
                    continue
                gave_up = True
                error = StageError(error.code, f"{error.message} (after {self.failovers} failovers)", self.stage)
            if kind in (_GAP, _MALFORMED) or gave_up:  # the replica may be alive: stop its work
                with contextlib.suppress(Exception):
                    await self._peer.publish(CANCEL)
            self._close()
            raise error

    def _error(self, kind: str, msg) -> StageError:
        """The status a failed stream ends with."""
        if kind == ERROR:
            try:
                code = code_from_int(int(msg.headers.get(CODE, "2")))
            except ValueError:
                code = grpc.StatusCode.UNKNOWN
            return StageError(code, msg.headers.get(MESSAGE, "stage failed"), self.stage)
        if kind == _GAP:
            why = f"output lost on the bus (replica {self._replica_id})"
        elif kind == _MALFORMED:
            why = f"malformed {self.contract.response_type.__name__} from the bus (replica {self._replica_id})"
        elif kind == _DEAD:
            why = f"replica {self._replica_id} stopped answering"
        else:
            why = f"unknown message kind {kind[:20]!r} from replica {self._replica_id}"
        return StageError(grpc.StatusCode.UNAVAILABLE, why, self.stage)

    async def _failover(self, cause: StageError) -> None:
        """Reopen on another replica, replay the inputs, skip outputs already delivered."""
        log.warning("%s stream failing over from %s (%d of %d): %s", self.stage, self._replica_id,
                    self.failovers + 1, MAX_FAILOVERS, cause.message)
        with contextlib.suppress(Exception):  # a replica still alive (lost messages) stops its work
            await self._peer.publish(CANCEL)
        self.client.streams.pop(self._inbox_id, None)
        self.failovers += 1
        self._switched.clear()
        self._outputs = asyncio.Queue()  # anything left from the dead replica is stale
        try:
            try:
                await self._open(avoid=self._replica_id)
            except StageError:
                self._close()
                raise
            if self._cancelled:  # cancelled while it reopened: the new replica stops at once
                with contextlib.suppress(Exception):
                    await self._peer.publish(CANCEL)
                self._close()
                return
            self._skip = self._delivered if self._skip_delivered else 0
            for payload in self._sent:
                await self._peer.publish(DATA, payload)
            if self._ended:
                await self._peer.publish(END)
        finally:
            self._switched.set()
