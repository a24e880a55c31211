"""A Converse client: streams audio like a live microphone and collects what comes
back. `voicestack talk`, the tests and the load generator all use it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from voicestack.audio import PIPELINE_RATE, float_to_pcm16
from voicestack.v1 import audio_pb2, edge_pb2, edge_pb2_grpc

FRAME_MS = 20


@dataclass
class TurnResult:
    index: int
    transcript: str = ""
    interim: list[str] = field(default_factory=list)
    reply_text: str = ""
    audio: bytearray = field(default_factory=bytearray)
    metrics: edge_pb2.TurnMetrics | None = None
    interrupted: edge_pb2.Interrupted | None = None
    trace: edge_pb2.TurnTrace | None = None
    ended: bool = False


@dataclass
class Conversation:
    session_id: str = ""
    output_rate: int = 24000
    turns: dict[int, TurnResult] = field(default_factory=dict)
    events: list[edge_pb2.ConverseResponse] = field(default_factory=list)
    errors: list[edge_pb2.Error] = field(default_factory=list)
    status: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""

    def turn(self, index: int) -> TurnResult:
        return self.turns.setdefault(index, TurnResult(index))

    @property
    def replies(self) -> list[TurnResult]:
        """The user's turns and the agent's answers (turn 0, the agent speaking first, is `opening`)."""
        return [self.turns[i] for i in sorted(self.turns) if i > 0]

    @property
    def opening(self) -> TurnResult | None:
        return self.turns.get(0)

    def record(self, event: edge_pb2.ConverseResponse) -> None:
        self.events.append(event)
        kind = event.WhichOneof("kind")
        body = getattr(event, kind)
        if kind == "session_started":
            self.session_id, self.output_rate = body.session_id, body.output_sample_rate_hz
        elif kind == "transcript":
            turn = self.turn(body.turn_index)
            if body.is_final:
                turn.transcript = body.text
            else:
                turn.interim.append(body.text)
        elif kind == "agent_text":
            self.turn(body.turn_index).reply_text += body.text_delta
        elif kind == "agent_audio":
            self.turn(body.turn_index).audio += body.audio.pcm
        elif kind == "agent_turn_ended":
            self.turn(body.turn_index).ended = True
        elif kind == "turn_metrics":
            self.turn(body.turn_index).metrics = body
        elif kind == "turn_trace":
            self.turn(body.turn_index).trace = body
        elif kind == "interrupted":
            self.turn(body.turn_index).interrupted = body
        elif kind == "error":
            self.errors.append(body)


def frames(audio: np.ndarray, frame_ms: int = FRAME_MS) -> list[bytes]:
    """Float audio at 16 kHz as PCM16 frames of frame_ms."""
    step = PIPELINE_RATE * frame_ms // 1000
    pcm = float_to_pcm16(audio)
    return [pcm[i * 2: (i + step) * 2] for i in range(0, len(audio), step)]


def silence(ms: int) -> np.ndarray:
    return np.zeros(PIPELINE_RATE * ms // 1000, dtype=np.float32)


async def converse(
    address: str,
    audio: np.ndarray,
    *,
    config: edge_pb2.SessionConfig | None = None,
    speed: float = 1.0,
    expect_turns: int = 1,
    timeout: float = 60.0,
    metadata=None,
    credentials: grpc.ChannelCredentials | None = None,
    on_event=None,
) -> Conversation:
    """Stream `audio` (float32, 16 kHz) at `speed` x real time, then silence like an
    open microphone until `expect_turns` replies have ended (or `timeout`)."""
    conversation = Conversation()
    done = asyncio.Event()
    config = config or edge_pb2.SessionConfig()
    if not config.input_format.sample_rate_hz:
        config.input_format.sample_rate_hz = PIPELINE_RATE
        config.input_format.encoding = audio_pb2.AUDIO_ENCODING_PCM16
    frame_seconds = FRAME_MS / 1000 / speed

    async def requests():
        yield edge_pb2.ConverseRequest(config=config)
        start = time.monotonic()
        sent = 0
        for pcm in frames(audio):
            yield edge_pb2.ConverseRequest(audio=edge_pb2.AudioFrame(pcm=pcm))
            sent += 1
            await asyncio.sleep(max(0.0, start + sent * frame_seconds - time.monotonic()))
        quiet = frames(silence(FRAME_MS))[0]
        while not done.is_set():
            yield edge_pb2.ConverseRequest(audio=edge_pb2.AudioFrame(pcm=quiet))
            sent += 1
            await asyncio.sleep(max(0.0, start + sent * frame_seconds - time.monotonic()))

    if credentials:
        channel = grpc.aio.secure_channel(address, credentials)
    else:
        channel = grpc.aio.insecure_channel(address)
    async with channel:
        call = edge_pb2_grpc.EdgeServiceStub(channel).Converse(requests(), metadata=metadata, timeout=timeout)
        try:
            async for event in call:
                conversation.record(event)
                if on_event:
                    on_event(event)
                ended = [t for t in conversation.replies if t.ended or t.interrupted]
                if len(ended) >= expect_turns:
                    done.set()
                    break
        except grpc.aio.AioRpcError as error:
            conversation.status, conversation.details = error.code(), error.details()
        finally:
            done.set()
            call.cancel()
    return conversation
