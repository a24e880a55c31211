"""Recognition: the user's audio in, the VAD's decisions and the STT's transcripts out.

It keeps the recent audio, feeds the session-long VAD stream (and reopens it when its
replica dies), and feeds one STT stream per utterance. It decides nothing: every VAD
event and transcript goes to the session through `RecognitionHooks`, and the session
tells it when an utterance starts, ends or is dropped.

Only the session's one task calls its methods; its own tasks (the VAD reader, one STT
reader per utterance) only call hooks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol

import grpc

from voicestack import telemetry, stt, vad
from voicestack.audio import PIPELINE_RATE, VAD_WINDOW_SAMPLES
from voicestack.errors import StageError, stalled
from voicestack.v1 import audio_pb2, stt_pb2, vad_pb2

log = logging.getLogger(__name__)

PRE_ROLL_MS = 500  # audio before the VAD's speech start: its start is late on soft onsets ("wh", "f"), by ~300 ms measured
RING_MS = 2000  # audio kept while nobody speaks (and audio younger than this, by the clock)
TRIM_STEP_BYTES = PIPELINE_RATE * 2  # trimmed a second at a time, not a 64 kB move a frame
VAD_CHUNK_BYTES = PIPELINE_RATE // 10 * 2  # 100 ms: what a replay sends the VAD at a time
STT_CHUNK_MS = 500  # what a backlog sends the STT at a time
STT_MAX_UTTERANCE_MS = 60000  # the STT stage refuses longer utterances
VAD_EVENT = vad_pb2.VadEventType


class RecognitionHooks(Protocol):
    def on_start_of_speech(self, offset_ms: int) -> None: ...
    def on_speech_paused(self, offset_ms: int) -> None: ...
    def on_speech_resumed(self, offset_ms: int) -> None: ...
    def on_end_of_speech(self, offset_ms: int, turn_score: float | None = None) -> None: ...
    def on_transcript(self, utterance: "Utterance", text: str, is_final: bool) -> None: ...
    def on_utterance_transcribed(self, utterance: "Utterance", text: str, error: StageError | None) -> None: ...
    def on_recognition_ended(self, error: StageError | None) -> None: ...


class AudioBuffer:
    """16 kHz PCM16 since `base_ms`, and when each part of it arrived."""

    def __init__(self) -> None:
        self.pcm = bytearray()
        self.base_ms = 0
        self.arrivals: deque = deque(maxlen=4000)  # (audio end ms, monotonic arrival)

    @property
    def end_ms(self) -> int:
        return self.base_ms + len(self.pcm) // 2 * 1000 // PIPELINE_RATE

    def append(self, pcm: bytes) -> None:
        self.pcm += pcm
        self.arrivals.append((self.end_ms, time.monotonic()))

    def between(self, start_ms: int, end_ms: int | None = None) -> bytes:
        def index(ms: int) -> int:
            return max(0, (ms - self.base_ms) * PIPELINE_RATE // 1000 * 2)
        return bytes(self.pcm[index(start_ms): None if end_ms is None else index(end_ms)])

    def wall_time_at(self, offset_ms: int) -> float:
        """When the audio at `offset_ms` arrived."""
        for end_ms, wall in self.arrivals:
            if end_ms >= offset_ms:
                return wall
        return time.monotonic()

    def trim(self, keep_ms: int = RING_MS) -> None:
        """Forget audio older than `keep_ms`, both in the audio and by the clock: a burst
        that arrives at once after a network stall stays until the VAD has decided on it."""
        if (self.end_ms - keep_ms - self.base_ms) * PIPELINE_RATE // 1000 * 2 < TRIM_STEP_BYTES:
            return
        now = time.monotonic()
        arrived_long_ago = self.base_ms  # audio up to here arrived over keep_ms ago
        for end_ms, wall in self.arrivals:
            if now - wall < keep_ms / 1000:
                break
            arrived_long_ago = end_ms
        cutoff = min(self.end_ms - keep_ms, arrived_long_ago)
        excess = (cutoff - self.base_ms) * PIPELINE_RATE // 1000 * 2
        if excess >= TRIM_STEP_BYTES:
            del self.pcm[:excess]
            self.base_ms = cutoff
            while self.arrivals and self.arrivals[0][0] <= cutoff:
                self.arrivals.popleft()


@dataclass
class Utterance:
    """One stretch of the user's speech, and the STT stream hearing it."""

    index: int  # the user turn it belongs to
    start_ms: int  # first audio sent to the STT (speech start less the pre-roll)
    speech_ms: int  # where the VAD heard speech start
    speech_wall: float  # when that audio arrived
    stt: object = None
    sent_ms: int = 0  # audio sent to the STT up to here
    ended: bool = False  # no more audio for it
    ended_at: float = 0.0
    dropped: bool = False  # its transcript is not wanted
    speech_end_ms: int = 0  # where the VAD heard speech end
    language: str = ""  # the final transcript's language, and the STT's probability for it
    language_probability: float = 0.0


class Recognition:
    def __init__(self, session_id: str, stages, hooks: RecognitionHooks, spawn: Callable,
                 vad_config: vad_pb2.VadConfig, vad_batch_bytes: int = VAD_WINDOW_SAMPLES * 2,
                 stt_batch_ms: int = 60, stall_seconds: float = 30.0):
        self.session_id = session_id
        self.stages = stages
        self.hooks = hooks
        self.spawn = spawn
        self.vad_config = vad_config
        self.vad_batch_bytes = max(2, vad_batch_bytes)
        self.stt_batch_ms = stt_batch_ms
        self.stall_seconds = stall_seconds
        self.audio = AudioBuffer()
        self.utterance: Utterance | None = None  # the one being spoken (fed live audio)
        self._vad = None
        self._vad_base_ms = 0
        self._vad_pending = bytearray()  # audio short of a whole VAD batch
        self._input_finished = False

    @property
    def audio_ms(self) -> int:
        return self.audio.end_ms

    # ------------------------------------------------------------ VAD

    async def start(self) -> None:
        """Open the VAD stream (a failure here fails the call: StageError)."""
        await self._open_vad()
        self.spawn(self._read_vad())

    async def _open_vad(self) -> None:
        """A VAD stream from here on: offsets count from the audio received so far, or, when
        it replaces a lost one mid-utterance, from the utterance's start (a stream that
        missed the start of the speech in progress would never hear it end)."""
        self._vad = None
        stream = await self.stages.open(vad.CONTRACT, vad_pb2.DetectRequest(config=self.vad_config),
                                        session_id=self.session_id)
        start = self.utterance.start_ms if self.utterance else self.audio_ms
        sent = start
        while sent < self.audio_ms:  # audio arriving meanwhile is caught up too
            end = self.audio_ms
            pcm = self.audio.between(sent, end)
            for offset in range(0, len(pcm), VAD_CHUNK_BYTES):
                await stream.send(vad_pb2.DetectRequest(audio=audio_pb2.AudioChunk(
                    pcm=pcm[offset: offset + VAD_CHUNK_BYTES], sample_rate_hz=PIPELINE_RATE)))
            sent = end
        self._vad, self._vad_base_ms = stream, start
        self._vad_pending.clear()  # (sent above)
        if self._input_finished:
            await stream.end()

    async def _read_vad(self) -> None:
        events = {
            VAD_EVENT.VAD_EVENT_TYPE_SPEECH_STARTED: self.hooks.on_start_of_speech,
            VAD_EVENT.VAD_EVENT_TYPE_SPEECH_PAUSED: self.hooks.on_speech_paused,
            VAD_EVENT.VAD_EVENT_TYPE_SPEECH_RESUMED: self.hooks.on_speech_resumed,
        }
        while True:
            try:
                async for event in self._vad:
                    if event.type == VAD_EVENT.VAD_EVENT_TYPE_SPEECH_ENDED:
                        self.hooks.on_end_of_speech(self._vad_base_ms + event.offset_ms,
                                                    event.turn_score if event.HasField("turn_score") else None)
                    elif event.type in events:
                        events[event.type](self._vad_base_ms + event.offset_ms)
                break
            except StageError as error:
                if error.code != grpc.StatusCode.UNAVAILABLE:
                    self.hooks.on_recognition_ended(error)
                    return
                log.warning("session %s: %s; reopening the VAD stream", self.session_id, error)
                try:
                    await self._open_vad()
                except StageError as reopen_error:
                    self.hooks.on_recognition_ended(reopen_error)
                    return
        self.hooks.on_recognition_ended(None)  # the client's audio ended, and so did the VAD's

    # ------------------------------------------------------------ audio in

    async def push(self, pcm: bytes, span=None) -> None:
        """Audio from the client (16 kHz): to the buffer, the VAD and the utterance's STT."""
        self.audio.append(pcm)
        self._vad_pending += pcm
        whole = len(self._vad_pending) // self.vad_batch_bytes * self.vad_batch_bytes
        if whole and self._vad is not None:  # (while a VAD stream reopens, its replay catches up)
            with telemetry.in_span(span):
                await self._vad.send(vad_pb2.DetectRequest(audio=audio_pb2.AudioChunk(
                    pcm=bytes(self._vad_pending[:whole]), sample_rate_hz=PIPELINE_RATE)))
            del self._vad_pending[:whole]
        u = self.utterance
        if u is None:
            self.audio.trim()
        elif self.audio_ms - u.sent_ms >= self.stt_batch_ms:
            await self._feed_stt(u)

    async def finish_input(self) -> None:
        """The client's audio ended: the VAD decides on what it has, then its stream ends."""
        self._input_finished = True
        if self._vad is None:
            return  # (a reopen in progress ends the new stream)
        if self._vad_pending:
            await self._vad.send(vad_pb2.DetectRequest(audio=audio_pb2.AudioChunk(
                pcm=bytes(self._vad_pending), sample_rate_hz=PIPELINE_RATE)))
            self._vad_pending.clear()
        await self._vad.end()

    # ------------------------------------------------------------ utterances

    async def start_utterance(self, index: int, speech_ms: int, span=None) -> Utterance:
        """An STT stream for speech that started at `speech_ms` (StageError if none opens);
        the stage's spans join `span`'s trace."""
        start = max(self.audio.base_ms, speech_ms - PRE_ROLL_MS)
        u = Utterance(index, start, speech_ms, self.audio.wall_time_at(speech_ms), sent_ms=start)
        with telemetry.in_span(span):
            u.stt = await self.stages.open(
                stt.CONTRACT, stt_pb2.TranscribeRequest(config=stt_pb2.SttConfig(
                    sample_rate_hz=PIPELINE_RATE, interim_results=True)),
                session_id=self.session_id)
        self.utterance = u
        await self._feed_stt(u)
        self.spawn(self._read_stt(u))
        return u

    async def end_utterance(self, u: Utterance) -> None:
        """No more audio for `u`: its final transcript follows."""
        if self.utterance is u:
            self.utterance = None
        if u.ended:
            return
        u.ended, u.ended_at = True, time.monotonic()
        await self._feed_stt(u)
        await u.stt.end()

    async def drop_utterance(self, u: Utterance) -> None:
        if self.utterance is u:
            self.utterance = None
        u.ended = u.dropped = True
        if u.stt is not None:
            await u.stt.cancel()

    async def _feed_stt(self, u: Utterance) -> None:
        end_ms = self.audio_ms
        pcm = self.audio.between(u.sent_ms, end_ms)
        if pcm:
            u.sent_ms = end_ms
            await send_audio_to_stt(u.stt, pcm)

    async def _read_stt(self, u: Utterance) -> None:
        final = ""
        try:
            async for result in self._within_stall(u.stt, lambda: u.ended_at):
                self.hooks.on_transcript(u, result.text, result.is_final)
                if result.is_final:
                    final = result.text
                    u.language, u.language_probability = result.language, result.language_probability
        except StageError as error:
            await u.stt.cancel()  # (a stalled stream is alive: stop its work)
            if not u.dropped:
                self.hooks.on_utterance_transcribed(u, "", error)
            return
        if not u.dropped:
            self.hooks.on_utterance_transcribed(u, final.strip(), None)

    async def transcribe(self, start_ms: int, span=None) -> str:
        """A one-off transcript of the audio since `start_ms` (a speculative reply's)."""
        with telemetry.in_span(span):
            stream = await self.stages.open(
                stt.CONTRACT, stt_pb2.TranscribeRequest(config=stt_pb2.SttConfig(sample_rate_hz=PIPELINE_RATE)),
                session_id=self.session_id)
        async with stream:
            await send_audio_to_stt(stream, self.audio.between(start_ms))
            await stream.end()
            ended_at = time.monotonic()
            return "".join([r.text async for r in self._within_stall(stream, lambda: ended_at) if r.is_final]).strip()

    async def _within_stall(self, stream, ended_at):
        """The STT stream's outputs; once its input has ended (`ended_at()` is not 0) the
        final transcript is due within stall_seconds (a live stage that sends nothing fails)."""
        outputs = aiter(stream)
        while True:
            since = ended_at()
            wait = since + self.stall_seconds - time.monotonic() if since else self.stall_seconds
            if since and wait <= 0:
                raise stalled("stt", self.stall_seconds)
            try:
                async with asyncio.timeout(wait):  # (not wait_for: in 3.11 it can swallow a cancel)
                    output = await anext(outputs)
            except StopAsyncIteration:
                return
            except TimeoutError:
                continue
            yield output

    async def close(self) -> None:
        if self.utterance is not None:
            await self.drop_utterance(self.utterance)
        if self._vad is not None:
            await self._vad.cancel()


async def send_audio_to_stt(stream, pcm: bytes, chunk_ms: int = STT_CHUNK_MS) -> None:
    """PCM16 to an STT stream in chunks it accepts (a backlog can be seconds long)."""
    step = PIPELINE_RATE * chunk_ms // 1000 * 2
    for offset in range(0, len(pcm), step):
        await stream.send(stt_pb2.TranscribeRequest(
            audio=audio_pb2.AudioChunk(pcm=pcm[offset: offset + step], sample_rate_hz=PIPELINE_RATE)))
