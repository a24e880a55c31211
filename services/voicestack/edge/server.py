"""The session edge: the `Converse` gRPC stream that clients talk to, and the NATS
client that opens stage streams for every session."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid

import grpc
import nats.errors

from voicestack import processors, recordings
from voicestack.audio import SUPPORTED_RATES
from voicestack.bus import TTS_VOICES_SUBJECT, StageClient
from voicestack.config import Settings
from voicestack.edge.admission import Admission
from voicestack.edge.processing import NO_PROCESSORS, ProcessorChain
from voicestack.edge.session import Session
from voicestack.edge.tools import ServerTools, SessionTools
from voicestack.errors import ServiceError, StageError, invalid
from voicestack.runtime import end_call
from voicestack.v1 import audio_pb2, edge_pb2, edge_pb2_grpc

log = logging.getLogger(__name__)

TTS_SAMPLE_RATE = 24000
MAX_SYSTEM_PROMPT_CHARS = 4000
MAX_GREETING_CHARS = 1000  # spoken before anything else: a paragraph, not a document
MAX_FRAME_MS = 100
MAX_TOOL_RESULT_CHARS = 16000  # what an LLM can use of one result in a voice turn
MIN_FRAME_MS = 5  # shorter frames lose samples to resampling
SLOW_CLIENT_SECONDS = 10.0
# A call that sends no SessionConfig holds a session place (and its key's) for nothing.
FIRST_MESSAGE_SECONDS = 10.0


class Malformed:
    """Stands in for a request that did not parse."""

    def __init__(self, error: Exception):
        self.error = error

    def WhichOneof(self, _) -> str:
        return "malformed"


def parse_request(data: bytes):
    try:
        return edge_pb2.ConverseRequest.FromString(data)
    except Exception as error:  # noqa: BLE001 - any parse failure is the client's to fix
        return Malformed(error)


def validate_config(config: edge_pb2.SessionConfig) -> None:
    """Every way a SessionConfig can be wrong, each with what to fix."""
    fmt = config.input_format
    if fmt.encoding not in (audio_pb2.AUDIO_ENCODING_UNSPECIFIED, audio_pb2.AUDIO_ENCODING_PCM16):
        raise invalid(f"input_format.encoding {fmt.encoding} is not supported; send AUDIO_ENCODING_PCM16")
    if fmt.sample_rate_hz and fmt.sample_rate_hz not in SUPPORTED_RATES:
        raise invalid(f"input_format.sample_rate_hz {fmt.sample_rate_hz} is not supported; use one of {SUPPORTED_RATES}")
    if fmt.channels not in (0, 1):
        raise invalid(f"input_format.channels {fmt.channels}: send mono audio (1 channel)")
    if len(config.system_prompt) > MAX_SYSTEM_PROMPT_CHARS:
        raise invalid(f"system_prompt is over {MAX_SYSTEM_PROMPT_CHARS} characters")
    if len(config.voice) > 64:
        raise invalid("voice name is over 64 characters")
    if len(config.greeting) > MAX_GREETING_CHARS:
        raise invalid(f"greeting is {len(config.greeting)} characters, over {MAX_GREETING_CHARS}; keep it to a few sentences")
    e = config.endpointing
    for name, value, low, high in (("silence_ms", e.silence_ms, 100, 5000),
                                   ("min_speech_ms", e.min_speech_ms, 0, 2000),
                                   ("max_utterance_ms", e.max_utterance_ms, 1000, 60000),
                                   ("speculative_pause_ms", e.speculative_pause_ms, 100, 2000),
                                   ("turn_pause_ms", e.turn_pause_ms, 100, 2000),
                                   ("max_wait_ms", e.max_wait_ms, 500, 10000)):
        if value and not low <= value <= high:
            raise invalid(f"endpointing.{name} {value} is out of range {low}-{high} (0 = default)")
    if not 0.0 <= e.turn_threshold <= 1.0:
        raise invalid(f"endpointing.turn_threshold {e.turn_threshold} is out of range 0-1 (0 = default)")
    if e.mode not in edge_pb2.EndpointingMode.values():
        raise invalid(f"endpointing.mode {e.mode} is unknown; use SILENCE or MODEL")
    if not 0 <= config.interruption.min_speech_ms <= 5000:
        raise invalid(f"interruption.min_speech_ms {config.interruption.min_speech_ms} is out of range 0-5000 (0 = default)")
    if not 0 <= config.interruption.backchannel_max_ms <= 10000:
        raise invalid(f"interruption.backchannel_max_ms {config.interruption.backchannel_max_ms} is out of range "
                      "0-10000 (0 = default)")
    if not 0 <= config.max_reply_tokens <= 1024:
        raise invalid("max_reply_tokens must be 0-1024")


def wants_tools(config: edge_pb2.SessionConfig) -> bool:
    t = config.tools
    return bool(t.client_tools or t.server_tools or t.end_call)


DTMF_KEYS = frozenset("0123456789*#ABCD")
MAX_DTMF_DIGITS = 32


def validate_dtmf(dtmf: edge_pb2.Dtmf) -> None:
    digits = dtmf.digits.upper()
    if not digits or len(digits) > MAX_DTMF_DIGITS or not set(digits) <= DTMF_KEYS:
        raise invalid(f"dtmf.digits must be 1-{MAX_DTMF_DIGITS} of 0-9, *, #, A-D; got {dtmf.digits[:40]!r}")


def validate_tool_result(result: edge_pb2.ToolResult) -> None:
    if not result.call_id:
        raise invalid("tool_result.call_id is empty; answer a ToolCall with its id")
    if len(result.content) + len(result.error) > MAX_TOOL_RESULT_CHARS:
        raise invalid(f"tool_result for call {result.call_id} is over {MAX_TOOL_RESULT_CHARS} characters; "
                      "return a summary the agent can speak")


def validate_frame(pcm: bytes, sample_rate: int) -> None:
    if not pcm:
        raise invalid("empty audio frame; send 20-100 ms of PCM16 per frame")
    if len(pcm) % 2:
        raise invalid(f"audio frame has an odd byte count ({len(pcm)}); PCM16 samples are 2 bytes each")
    frame_ms = len(pcm) / 2 / sample_rate * 1000
    if frame_ms > MAX_FRAME_MS:
        raise invalid(f"audio frame of {frame_ms:.2f} ms is over {MAX_FRAME_MS} ms; send 20-100 ms frames")
    if frame_ms < MIN_FRAME_MS:
        raise invalid(f"audio frame of {frame_ms:.2f} ms is under {MIN_FRAME_MS} ms; send 20-100 ms frames")


class EdgeService:
    name = "edge"
    grpc_service_names = [edge_pb2.DESCRIPTOR.services_by_name["EdgeService"].full_name]

    def __init__(self, settings: Settings):
        if settings.endpointing_mode not in ("silence", "model"):
            raise ValueError(f"endpointing_mode must be \"silence\" or \"model\", not {settings.endpointing_mode!r}")
        if settings.llm_routing not in ("auto", "fast"):
            raise ValueError(f"llm_routing must be \"auto\" or \"fast\", not {settings.llm_routing!r}")
        if settings.recording and not settings.recording_store:
            raise ValueError("recording is on but recording_store is empty: set recording_store "
                             "(a path, file:///path, or s3://bucket with recording_s3_endpoint)")
        self.settings = settings
        # (a store that cannot be built, an s3:// one without its endpoint say, stops the edge here)
        self.recording_store = recordings.open_store(settings) if settings.recording else None
        self.processors = NO_PROCESSORS
        self.capacity = settings.capacity
        self.admission = Admission(settings.api_keys_file)
        self.sessions: dict[str, Session] = {}
        self._call_started: dict[str, float] = {}  # session id -> monotonic start
        self._ended_call_seconds = 0.0
        self.calls = 0  # calls holding a place: admitted, starting or talking
        self._no_calls = asyncio.Event()
        self._no_calls.set()
        self.stages: StageClient | None = None
        self.server_tools: ServerTools | None = None
        self.meters = None
        self.draining = False
        self.served = self.refused = self.errors = 0
        self._voices: set[str] = set()
        self._voices_at = -1e9
        self.started_at = time.time()

    @property
    def active(self) -> int:
        return self.calls

    @contextlib.contextmanager
    def place(self):
        self.calls += 1
        self._no_calls.clear()
        try:
            yield
        finally:
            self.calls -= 1
            if not self.calls:
                self._no_calls.set()

    @contextlib.contextmanager
    def listed(self, session: Session):
        """In `sessions` (for GoAway on drain) while the call lasts."""
        self.sessions[session.id] = session
        self._call_started[session.id] = time.monotonic()
        try:
            yield
        finally:
            self.sessions.pop(session.id, None)
            self._ended_call_seconds += time.monotonic() - self._call_started.pop(session.id)

    @property
    def conversation_seconds(self) -> float:
        """Seconds of calls since start, those still talking included: what the stages'
        compute seconds are divided by for a conversation-minute's cost."""
        now = time.monotonic()
        return self._ended_call_seconds + sum(now - started for started in self._call_started.values())

    def describe(self) -> dict:
        return {"model": "-", "device": "cpu"}

    def snapshot(self) -> dict:
        return {
            "stage": "edge", "replica_id": self.settings.replica_id, **self.describe(),
            "active": self.active, "capacity": self.capacity, "served": self.served, "cancelled": 0,
            "refused": self.refused, "errors": self.errors, "started_at": self.started_at, "draining": self.draining,
            "conversation_seconds": round(self.conversation_seconds, 3),
        }

    def add_to_grpc(self, server) -> None:
        # Registered by hand, not with the generated helper, so that bytes that do not
        # parse (or strings that are not UTF-8) reach the servicer and get INVALID_ARGUMENT
        # instead of grpc's INTERNAL.
        handler = grpc.stream_stream_rpc_method_handler(
            EdgeServicer(self).Converse,
            request_deserializer=parse_request,
            response_serializer=edge_pb2.ConverseResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            self.grpc_service_names[0], {"Converse": handler}),))

    async def start(self, nc, meters) -> None:
        self.meters = meters
        if meters:
            meters.observe_conversation(lambda: self.conversation_seconds)
        self.stages = StageClient(nc, peer_timeout=self.settings.peer_timeout_seconds)
        await self.stages.start()
        # HTTP tools and MCP servers are checked and listed once, here: a bad tools file
        # stops the edge at start, not in a caller's turn.
        self.server_tools = await ServerTools.start(self.settings)
        # Processors load once (the PII redactor's model takes seconds); one not installed stops the edge.
        self.processors = ProcessorChain(await asyncio.to_thread(processors.load, self.processor_names(), self.settings),
                                         meters)

    def processor_names(self) -> str:
        """`processors`, and the PII redactor when text is traced or recorded (redact_records)."""
        names = [n.strip() for n in self.settings.processors.split(",") if n.strip()]
        if self.settings.redact_records and (self.settings.recording or self.settings.trace_text) and "pii" not in names:
            names.insert(0, "pii")
        return ",".join(names)

    async def drain(self, deadline_seconds: float) -> None:
        """Tell every client to move (GoAway), let sessions end until the deadline."""
        self.draining = True
        for session in list(self.sessions.values()):
            session.output.send(go_away=edge_pb2.GoAway(reason="edge replica is shutting down; reconnect",
                                                        deadline_ms=int(deadline_seconds * 1000)))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._no_calls.wait(), deadline_seconds)
        # Calls still open at the deadline end here with UNAVAILABLE, a status the client
        # can act on; left to the gRPC server's stop, they end as CANCELLED or INTERNAL.
        for session in list(self.sessions.values()):
            session.output.close(ServiceError(grpc.StatusCode.UNAVAILABLE,
                                              "edge replica shut down at its drain deadline; reconnect"))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._no_calls.wait(), 2.0)
        if self.stages:
            await self.stages.close()
        if self.server_tools:
            await self.server_tools.aclose()

    async def check_voice(self, voice: str) -> None:
        """Refuse an unknown voice at session start, not at the first reply. The TTS
        replicas answer "vs.tts.voices" (a queue group); the list is kept for a minute,
        and a busy replica that answers late leaves the last list in use."""
        if not voice:
            return
        now = time.monotonic()
        if now - self._voices_at > 60:
            for attempt in range(2):
                try:
                    reply = await self.stages.nc.request(TTS_VOICES_SUBJECT, b"", timeout=2.0)
                except nats.errors.NoRespondersError:
                    raise StageError(grpc.StatusCode.UNAVAILABLE, "no tts replica is available", "tts") from None
                except nats.errors.TimeoutError:
                    continue
                self._voices, self._voices_at = set(json.loads(reply.data)), now
                break
            else:
                if not self._voices:
                    raise StageError(grpc.StatusCode.UNAVAILABLE, "no tts replica answered; retry shortly", "tts")
        if voice not in self._voices:
            raise invalid(f"unknown voice {voice!r}; available: {', '.join(sorted(self._voices))}")


class EdgeServicer(edge_pb2_grpc.EdgeServiceServicer):
    def __init__(self, edge: EdgeService):
        self.edge = edge

    async def Converse(self, request_iterator, context: grpc.aio.ServicerContext):
        edge = self.edge
        session = None
        async with contextlib.AsyncExitStack() as held:
            try:
                # Read the first message before refusing anything: a call refused while its
                # first message is still on the way reaches the client as INTERNAL.
                try:
                    first = await asyncio.wait_for(anext(aiter(request_iterator), None), FIRST_MESSAGE_SECONDS)
                except asyncio.TimeoutError:
                    raise invalid(f"no SessionConfig within {FIRST_MESSAGE_SECONDS:.0f} s of the call's start") from None
                key = edge.admission.authenticate(context.invocation_metadata())
                if edge.draining:
                    raise ServiceError(grpc.StatusCode.UNAVAILABLE, "edge is draining; reconnect to another replica")
                if edge.active >= edge.capacity:
                    raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       f"edge is at its session limit ({edge.capacity}); retry in a few seconds")
                held.enter_context(edge.admission.admitted(key))
                # The place is taken now, before the awaits below: calls arriving together
                # must not all pass the check above.
                held.enter_context(edge.place())
                if isinstance(first, Malformed):
                    raise invalid("malformed ConverseRequest: not a valid protobuf (check the message type and UTF-8 strings)")
                if first is None or first.WhichOneof("kind") != "config":
                    raise invalid("the first message must be a SessionConfig; send it before any audio")
                validate_config(first.config)
                tools = SessionTools.from_config(first.config.tools, edge.server_tools) if wants_tools(first.config) else None
                await edge.check_voice(first.config.voice)
                session = await held.enter_async_context(
                    Session(uuid.uuid4().hex, edge.stages, first.config, edge.settings, edge.meters, tools=tools,
                            processors=edge.processors, recording_store=edge.recording_store))
                held.enter_context(edge.listed(session))
                await self._write(context, edge_pb2.ConverseResponse(session_started=edge_pb2.SessionStarted(
                    session_id=session.id, output_sample_rate_hz=TTS_SAMPLE_RATE)))
                reader = asyncio.create_task(self._read_client(request_iterator, session))
                held.callback(reader.cancel)
                while (event := await session.output.next()) is not None:
                    await self._write(context, event)
                if session.output.failure:
                    raise session.output.failure
                edge.served += 1
            except ServiceError as error:
                if session is None:
                    edge.refused += 1
                else:
                    edge.errors += 1
                # Free the session first: to a client that stopped reading, the status is
                # queued behind the audio it has not read; meanwhile it must hold no stage
                # streams and no places.
                await held.aclose()
                await end_call(context, request_iterator, error.code, str(error))
            except asyncio.CancelledError:
                if session is not None and session.output.failure is None:
                    edge.served += 1  # the client hung up: a call that ended normally from its side
                raise

    async def _write(self, context, event) -> None:
        # A client that stops reading fills gRPC's window and then this wait: end its
        # session rather than hold its audio in memory without bound.
        try:
            await asyncio.wait_for(context.write(event), SLOW_CLIENT_SECONDS)
        except asyncio.TimeoutError:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"client read nothing for {SLOW_CLIENT_SECONDS:.0f} s; session ended") from None

    async def _read_client(self, request_iterator, session: Session) -> None:
        idle = self.edge.settings.idle_timeout_seconds
        requests = aiter(request_iterator)
        try:
            while True:
                try:
                    request = await asyncio.wait_for(anext(requests, None), idle)
                except asyncio.TimeoutError:
                    raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                       f"no audio for {idle:.0f} s; a live microphone sends frames "
                                       "(silence too) all the time; reconnect to talk again") from None
                if request is None:
                    break
                kind = request.WhichOneof("kind")
                if kind == "audio":
                    validate_frame(request.audio.pcm, session.input_rate)
                    await session.on_audio(request.audio.pcm)
                elif kind == "playback":
                    session.on_playback(request.playback)
                elif kind == "tool_result":
                    validate_tool_result(request.tool_result)
                    session.on_tool_result(request.tool_result)
                elif kind == "dtmf":
                    validate_dtmf(request.dtmf)
                    session.on_dtmf(request.dtmf.digits)
                elif kind == "config":
                    raise invalid("SessionConfig was already sent; send it once, first")
                elif kind == "malformed":
                    raise invalid("malformed ConverseRequest: not a valid protobuf (check the message type and UTF-8 strings)")
                else:
                    raise invalid("empty ConverseRequest; set config, audio, playback, tool_result or dtmf")
            session.finish_input()
        except ServiceError as error:
            session.fail(error)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - a broken client stream ends its session, not the server
            log.warning("session %s: client stream failed: %s", session.id, error)
            session.fail(ServiceError(grpc.StatusCode.CANCELLED, "client stream ended"))
