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
# Silence streamed after the audio before it counts as all sent: longer than the
# default end-of-turn silence (600 ms), so speech at the very end is heard as ended.
TRAILING_SILENCE_MS = 1000


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
    no_speech: bool = False  # converse() gave up: all audio sent and no SpeechStarted came

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
    # The last frame is padded with silence: the edge refuses frames under 5 ms.
    audio = np.concatenate([audio, np.zeros(-len(audio) % step, dtype=np.float32)])
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
    no_speech_grace: float | None = None,
) -> Conversation:
    """Stream `audio` (float32, 16 kHz) at `speed` x real time, then silence like an
    open microphone until `expect_turns` replies have ended (or `timeout`).

    With `no_speech_grace` (seconds): once the audio and TRAILING_SILENCE_MS of silence
    are sent, wait at most that long for a SpeechStarted; if none comes, end the call
    with `no_speech` set (the status stays OK) instead of waiting for the timeout.
    """
    conversation = Conversation()
    done = asyncio.Event()
    audio_sent = asyncio.Event()
    speech_heard = asyncio.Event()
    config = config or edge_pb2.SessionConfig()
    if not config.input_format.sample_rate_hz:
        config.input_format.sample_rate_hz = PIPELINE_RATE
        config.input_format.encoding = audio_pb2.AUDIO_ENCODING_PCM16
    frame_seconds = FRAME_MS / 1000 / speed
    # A session that asks for a longer end-of-turn silence needs more of it after the audio.
    trailing_frames = max(TRAILING_SILENCE_MS, config.endpointing.silence_ms + 400) // FRAME_MS

    async def requests():
        yield edge_pb2.ConverseRequest(config=config)
        start = time.monotonic()
        sent = 0
        for pcm in frames(audio):
            yield edge_pb2.ConverseRequest(audio=edge_pb2.AudioFrame(pcm=pcm))
            sent += 1
            await asyncio.sleep(max(0.0, start + sent * frame_seconds - time.monotonic()))
        quiet = frames(silence(FRAME_MS))[0]
        trailing = 0
        while not done.is_set():
            yield edge_pb2.ConverseRequest(audio=edge_pb2.AudioFrame(pcm=quiet))
            sent += 1
            trailing += 1
            if trailing == trailing_frames:
                audio_sent.set()
            await asyncio.sleep(max(0.0, start + sent * frame_seconds - time.monotonic()))

    async def read(call):
        try:
            async for event in call:
                conversation.record(event)
                if event.WhichOneof("kind") == "speech_started":
                    speech_heard.set()
                if on_event:
                    on_event(event)
                ended = [t for t in conversation.replies if t.ended or t.interrupted]
                if len(ended) >= expect_turns:
                    return
        except grpc.aio.AioRpcError as error:
            conversation.status, conversation.details = error.code(), error.details()

    async def give_up_without_speech():
        await audio_sent.wait()
        try:
            await asyncio.wait_for(speech_heard.wait(), no_speech_grace)
        except asyncio.TimeoutError:
            conversation.no_speech = True
            return
        await asyncio.Future()  # speech came: the replies (or the timeout) end the call

    if credentials:
        channel = grpc.aio.secure_channel(address, credentials)
    else:
        channel = grpc.aio.insecure_channel(address)
    async with channel:
        call = edge_pb2_grpc.EdgeServiceStub(channel).Converse(requests(), metadata=metadata, timeout=timeout)
        tasks = [asyncio.create_task(read(call))]
        if no_speech_grace is not None:
            tasks.append(asyncio.create_task(give_up_without_speech()))
        try:
            finished, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                task.result()  # an on_event callback's exception is the caller's
        finally:
            done.set()
            call.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return conversation
