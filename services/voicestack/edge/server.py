"""The session edge: the `Converse` gRPC stream that clients talk to, and the NATS
client that opens stage streams for every session."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import grpc
import nats.errors

from voicestack.audio import SUPPORTED_RATES
from voicestack.bus import TTS_VOICES_SUBJECT, StageClient
from voicestack.config import Settings
from voicestack.edge.admission import Admission
from voicestack.edge.session import Session
from voicestack.errors import StageError, invalid
from voicestack.v1 import audio_pb2, edge_pb2, edge_pb2_grpc

log = logging.getLogger(__name__)

TTS_SAMPLE_RATE = 24000
MAX_SYSTEM_PROMPT_CHARS = 4000
MAX_FRAME_MS = 100
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
    e = config.endpointing
    for name, value, low, high in (("silence_ms", e.silence_ms, 100, 5000),
                                   ("min_speech_ms", e.min_speech_ms, 0, 2000),
                                   ("max_utterance_ms", e.max_utterance_ms, 1000, 60000)):
        if value and not low <= value <= high:
            raise invalid(f"endpointing.{name} {value} is out of range {low}-{high} (0 = default)")
    if not 0 <= config.max_reply_tokens <= 1024:
        raise invalid("max_reply_tokens must be 0-1024")


def validate_frame(pcm: bytes, sample_rate: int) -> None:
    if not pcm:
        raise invalid("empty audio frame; send 20-100 ms of PCM16 per frame")
    if len(pcm) % 2:
        raise invalid(f"audio frame has an odd byte count ({len(pcm)}); PCM16 samples are 2 bytes each")
    frame_ms = len(pcm) / 2 / sample_rate * 1000
    if frame_ms > MAX_FRAME_MS:
        raise invalid(f"audio frame of {frame_ms:.0f} ms is over {MAX_FRAME_MS} ms; send 20-100 ms frames")


class EdgeService:
    name = "edge"
    grpc_service_names = [edge_pb2.DESCRIPTOR.services_by_name["EdgeService"].full_name]

    def __init__(self, settings: Settings):
        self.settings = settings
        self.capacity = settings.capacity
        self.admission = Admission(settings.api_keys_file)
        self.sessions: dict[str, Session] = {}
        self.starting = 0  # calls admitted whose session is not in `sessions` yet
        self.stages: StageClient | None = None
        self.meters = None
        self.draining = False
        self.served = self.refused = self.errors = 0
        self._voices: set[str] = set()
        self._voices_at = -1e9
        self.started_at = time.time()

    @property
    def active(self) -> int:
        return len(self.sessions) + self.starting

    def describe(self) -> dict:
        return {"model": "-", "device": "cpu"}

    def snapshot(self) -> dict:
        return {
            "stage": "edge", "replica_id": self.settings.replica_id, **self.describe(),
            "active": self.active, "capacity": self.capacity, "served": self.served, "cancelled": 0,
            "refused": self.refused, "errors": self.errors, "started_at": self.started_at, "draining": self.draining,
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
        self.stages = StageClient(nc, peer_timeout=self.settings.peer_timeout_seconds)
        await self.stages.start()

    async def drain(self, deadline_seconds: float) -> None:
        """Tell every client to move (GoAway), let sessions end until the deadline."""
        self.draining = True
        for session in list(self.sessions.values()):
            session.emit(go_away=edge_pb2.GoAway(reason="edge replica is shutting down; reconnect",
                                                 deadline_ms=int(deadline_seconds * 1000)))
        end = asyncio.get_running_loop().time() + deadline_seconds
        while self.sessions and asyncio.get_running_loop().time() < end:
            await asyncio.sleep(0.1)
        if self.stages:
            await self.stages.close()

    async def check_voice(self, voice: str) -> None:
        """Refuse an unknown voice at session start, not at the first reply. The TTS
        replicas answer "vs.tts.voices" (a queue group); the list is kept for a minute."""
        if not voice:
            return
        now = time.monotonic()
        if now - self._voices_at > 60:
            try:
                reply = await self.stages.nc.request(TTS_VOICES_SUBJECT, b"", timeout=2.0)
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                raise StageError(grpc.StatusCode.UNAVAILABLE, "no tts replica is available", "tts") from None
            self._voices, self._voices_at = set(json.loads(reply.data)), now
        if voice not in self._voices:
            raise invalid(f"unknown voice {voice!r}; available: {', '.join(sorted(self._voices))}")


class EdgeServicer(edge_pb2_grpc.EdgeServiceServicer):
    def __init__(self, edge: EdgeService):
        self.edge = edge

    async def Converse(self, request_iterator, context: grpc.aio.ServicerContext):
        edge = self.edge
        session = reader = key = None
        admitted = starting = False

        async def release() -> None:
            nonlocal session, reader, admitted, starting
            if starting:
                edge.starting -= 1
                starting = False
            if reader:
                reader.cancel()
                reader = None
            if session:
                edge.sessions.pop(session.id, None)
                ending, session = session, None
                await ending.close()
            if admitted:
                edge.admission.release(key)
                admitted = False

        try:
            # Read the first message before refusing anything: a call refused while its
            # first message is still on the way reaches the client as INTERNAL, not as
            # the status we chose.
            try:
                first = await asyncio.wait_for(anext(aiter(request_iterator), None), FIRST_MESSAGE_SECONDS)
            except asyncio.TimeoutError:
                raise invalid(f"no SessionConfig within {FIRST_MESSAGE_SECONDS:.0f} s of the call's start") from None
            key = edge.admission.authenticate(context.invocation_metadata())
            if edge.draining:
                raise StageError(grpc.StatusCode.UNAVAILABLE, "edge is draining; reconnect to another replica")
            if edge.active >= edge.capacity:
                raise StageError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"edge is at its session limit ({edge.capacity}); retry in a few seconds")
            edge.admission.admit(key)
            admitted = True
            # The place is taken now, before the awaits below: calls arriving together
            # must not all pass the check above.
            edge.starting += 1
            starting = True
            if isinstance(first, Malformed):
                raise invalid("malformed ConverseRequest: not a valid protobuf (check the message type and UTF-8 strings)")
            if first is None or first.WhichOneof("kind") != "config":
                raise invalid("the first message must be a SessionConfig; send it before any audio")
            validate_config(first.config)
            await edge.check_voice(first.config.voice)
            session = Session(uuid.uuid4().hex, edge.stages, first.config, edge.settings, edge.meters)
            edge.sessions[session.id] = session
            edge.starting -= 1
            starting = False
            await session.start()
            await self._write(context, edge_pb2.ConverseResponse(session_started=edge_pb2.SessionStarted(
                session_id=session.id, output_sample_rate_hz=TTS_SAMPLE_RATE)))
            reader = asyncio.create_task(self._read_client(request_iterator, session))
            while (event := await session.events.get()) is not None and session.failure is None:
                await self._write(context, event)
            if session.failure:
                raise session.failure
            edge.served += 1
        except StageError as error:
            if session is None:
                edge.refused += 1
            else:
                edge.errors += 1
            # Free the session first: to a client that stopped reading, the status is
            # queued behind the audio it has not read, and abort() waits until it reads
            # (or goes away); meanwhile it must hold no stage streams and no places.
            await release()
            await context.abort(error.code, str(error))
        finally:
            await release()

    async def _write(self, context, event) -> None:
        # A client that stops reading fills gRPC's window and then this wait: end its
        # session rather than hold its audio in memory without bound.
        try:
            await asyncio.wait_for(context.write(event), SLOW_CLIENT_SECONDS)
        except asyncio.TimeoutError:
            raise StageError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"client read nothing for {SLOW_CLIENT_SECONDS:.0f} s; session ended") from None

    async def _read_client(self, request_iterator, session: Session) -> None:
        try:
            async for request in request_iterator:
                kind = request.WhichOneof("kind")
                if kind == "audio":
                    validate_frame(request.audio.pcm, session.input_rate)
                    await session.on_audio(request.audio.pcm)
                elif kind == "playback":
                    session.on_playback(request.playback)
                elif kind == "config":
                    raise invalid("SessionConfig was already sent; send it once, first")
                elif kind == "malformed":
                    raise invalid("malformed ConverseRequest: not a valid protobuf (check the message type and UTF-8 strings)")
                else:
                    raise invalid("empty ConverseRequest; set config, audio or playback")
            await session.finish_input()
        except StageError as error:
            session.fail(error)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - a broken client stream ends its session, not the server
            log.warning("session %s: client stream failed: %s", session.id, error)
            session.fail(StageError(grpc.StatusCode.CANCELLED, "client stream ended"))
