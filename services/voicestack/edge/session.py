"""One conversation, conducted by the edge.

The session owns what the stages must not know: the history, the turn state and
the clock. Audio flows in; VAD events drive the turns:

  speech started -> open an STT stream, send it the utterance's audio from its start
  speech ended   -> end the STT stream; on its final transcript start the reply:
                    LLM deltas go to TTS as they arrive, TTS audio to the client
                    from its first chunk
  speech during a reply (barge-in) -> cancel LLM and TTS, drop queued audio, keep in
                    the history only what the client heard

Latencies are measured between named events. end_of_speech is when the audio at the
VAD's speech-end offset arrived at the edge (not when the VAD decided).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import grpc

from voicestack.audio import PIPELINE_RATE, pcm16_to_float, resample, float_to_pcm16
from voicestack.bus import StageClient, StageStream
from voicestack.errors import StageError
from voicestack.v1 import audio_pb2, edge_pb2, llm_pb2, stt_pb2, tts_pb2, vad_pb2

log = logging.getLogger(__name__)

PRE_ROLL_MS = 200  # audio before the VAD's speech start, so first phonemes are not clipped
RING_MS = 2000  # audio kept before an utterance starts
MAX_EVENTS_QUEUED = 2000  # a client this far behind is not reading: end its session


@dataclass
class Endpointing:
    silence_ms: int = 600
    min_speech_ms: int = 200
    max_utterance_ms: int = 30000

    @classmethod
    def from_config(cls, config: edge_pb2.EndpointingConfig) -> "Endpointing":
        return cls(
            silence_ms=config.silence_ms or cls.silence_ms,
            min_speech_ms=config.min_speech_ms or cls.min_speech_ms,
            max_utterance_ms=config.max_utterance_ms or cls.max_utterance_ms,
        )


@dataclass
class Turn:
    index: int
    start_ms: int
    stt: StageStream | None = None
    sent_to_stt_ms: int = 0
    end_of_speech: float = 0.0  # wall time the last speech sample arrived
    decided: float = 0.0  # wall time the VAD ended the turn
    stt_task: asyncio.Task | None = None
    reply_task: asyncio.Task | None = None
    metrics: edge_pb2.TurnMetrics = field(default_factory=edge_pb2.TurnMetrics)
    reply_text: str = ""
    spoken: list = field(default_factory=list)  # (clause text, audio ms) in the order sent
    audio_sent_ms: float = 0.0
    tts_first_text_at: float = 0.0
    first_audio_at: float = 0.0
    played_ms: int = -1  # the client's last playback report, -1 = none


class Session:
    def __init__(self, session_id: str, stages: StageClient, config: edge_pb2.SessionConfig, settings, meters=None):
        self.id = session_id
        self.stages = stages
        self.settings = settings
        self.meters = meters
        self.input_rate = config.input_format.sample_rate_hz or PIPELINE_RATE
        self.endpointing = Endpointing.from_config(config.endpointing)
        self.voice = config.voice
        self.max_reply_tokens = config.max_reply_tokens
        self.history: list[tuple[int, str]] = [(llm_pb2.CHAT_ROLE_SYSTEM, config.system_prompt or settings.system_prompt)]
        self.events: asyncio.Queue = asyncio.Queue(MAX_EVENTS_QUEUED)
        self.turn_count = 0
        self.turn: Turn | None = None  # the utterance being heard
        self.replying: Turn | None = None  # the turn whose reply is being spoken
        self.audio = bytearray()  # 16 kHz PCM16 since `audio_base_ms`
        self.audio_base_ms = 0
        self.arrivals: deque = deque(maxlen=4000)  # (audio end ms, wall time)
        self.vad: StageStream | None = None
        self._tasks: set[asyncio.Task] = set()
        self._vad_task: asyncio.Task | None = None
        self.failure: StageError | None = None

    # ------------------------------------------------------------------ plumbing

    @property
    def audio_ms(self) -> int:
        return self.audio_base_ms + len(self.audio) // 2 * 1000 // PIPELINE_RATE

    def emit(self, **event) -> None:
        try:
            self.events.put_nowait(edge_pb2.ConverseResponse(**event))
        except asyncio.QueueFull:
            self.fail(StageError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 "client is not reading the stream fast enough; session ended"))

    def fail(self, error: StageError) -> None:
        """End the session with `error` (the servicer turns it into the call's status)."""
        if self.failure is None:
            self.failure = error
            with contextlib.suppress(asyncio.QueueFull):
                self.events.put_nowait(None)

    def spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def wall_time_at(self, offset_ms: int) -> float:
        """When the audio at `offset_ms` arrived."""
        for end_ms, wall in self.arrivals:
            if end_ms >= offset_ms:
                return wall
        return time.monotonic()

    def audio_since(self, offset_ms: int) -> bytes:
        start = max(0, (offset_ms - self.audio_base_ms) * PIPELINE_RATE // 1000 * 2)
        return bytes(self.audio[start:])

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.vad = await self.stages.open(
            "vad", vad_pb2.DetectResponse,
            vad_pb2.DetectRequest(config=vad_pb2.VadConfig(
                sample_rate_hz=PIPELINE_RATE, min_silence_ms=self.endpointing.silence_ms,
                min_speech_ms=self.endpointing.min_speech_ms,
            )),
            session_id=self.id, replay=False,
        )
        self._vad_task = self.spawn(self._read_vad())

    async def finish_input(self) -> None:
        """The client closed its side: finish the turn in progress, then end."""
        if self.vad:
            await self.vad.end()

    async def close(self) -> None:
        for turn in (self.turn, self.replying):
            if turn:
                await self._cancel_turn(turn)
        if self.vad:
            await self.vad.cancel()
        for task in list(self._tasks):
            task.cancel()

    # ------------------------------------------------------------------ audio in

    async def on_audio(self, pcm: bytes) -> None:
        if self.input_rate != PIPELINE_RATE:
            pcm = float_to_pcm16(resample(pcm16_to_float(pcm), self.input_rate, PIPELINE_RATE))
        self.audio += pcm
        self.arrivals.append((self.audio_ms, time.monotonic()))
        await self.vad.send(vad_pb2.DetectRequest(audio=audio_pb2.AudioChunk(pcm=pcm, sample_rate_hz=PIPELINE_RATE)))
        turn = self.turn
        if turn is not None and turn.stt is not None:
            await self._feed_stt(turn)
            if self.audio_ms - turn.start_ms > self.endpointing.max_utterance_ms:
                # A monologue is cut into turns; the next one starts at once.
                await self._end_utterance(self.audio_ms)
                await self._start_utterance(self.audio_ms)
        elif turn is None:
            self._trim_ring()

    def _trim_ring(self) -> None:
        excess = len(self.audio) - RING_MS * PIPELINE_RATE // 1000 * 2
        if excess > 0:
            excess -= excess % 2
            del self.audio[:excess]
            self.audio_base_ms += excess // 2 * 1000 // PIPELINE_RATE

    async def _feed_stt(self, turn: Turn) -> None:
        pcm = self.audio_since(turn.sent_to_stt_ms)
        if pcm:
            turn.sent_to_stt_ms = self.audio_ms
            await turn.stt.send(stt_pb2.TranscribeRequest(audio=audio_pb2.AudioChunk(pcm=pcm, sample_rate_hz=PIPELINE_RATE)))

    # ------------------------------------------------------------------ VAD events

    async def _read_vad(self) -> None:
        try:
            async for event in self.vad:
                if event.type == vad_pb2.VAD_EVENT_TYPE_SPEECH_STARTED:
                    await self._start_utterance(event.offset_ms)
                elif event.type == vad_pb2.VAD_EVENT_TYPE_SPEECH_ENDED and self.turn is not None:
                    await self._end_utterance(event.offset_ms)
            # VAD input ended (client closed): wait for the turns in flight, then end.
            for turn in (self.turn, self.replying):
                if turn and turn.reply_task:
                    with contextlib.suppress(asyncio.CancelledError, StageError):
                        await turn.reply_task
            with contextlib.suppress(asyncio.QueueFull):
                self.events.put_nowait(None)
        except StageError as error:
            self.fail(error)

    async def _start_utterance(self, offset_ms: int) -> None:
        if self.replying is not None:
            await self._barge_in()
        self.turn_count += 1
        start = max(self.audio_base_ms, offset_ms - PRE_ROLL_MS)
        turn = Turn(index=self.turn_count, start_ms=start, sent_to_stt_ms=start)
        self.turn = turn
        self.emit(speech_started=edge_pb2.SpeechStarted(turn_index=turn.index, offset_ms=offset_ms))
        try:
            turn.stt = await self.stages.open(
                "stt", stt_pb2.TranscribeResponse,
                stt_pb2.TranscribeRequest(config=stt_pb2.SttConfig(sample_rate_hz=PIPELINE_RATE, interim_results=True)),
                session_id=self.id,
            )
        except StageError as error:
            self._turn_error(turn, error)
            self.turn = None
            return
        await self._feed_stt(turn)
        turn.stt_task = self.spawn(self._read_stt(turn))

    async def _end_utterance(self, offset_ms: int) -> None:
        turn, self.turn = self.turn, None
        turn.decided = time.monotonic()
        turn.end_of_speech = min(self.wall_time_at(offset_ms), turn.decided)
        turn.metrics.endpointing_ms = (turn.decided - turn.end_of_speech) * 1000
        self.emit(speech_ended=edge_pb2.SpeechEnded(turn_index=turn.index, offset_ms=offset_ms))
        if turn.stt is None:
            return
        await self._feed_stt(turn)
        await turn.stt.end()
        turn.reply_task = self.spawn(self._reply(turn))
        self.replying = turn

    async def _read_stt(self, turn: Turn) -> str:
        final = ""
        async for result in turn.stt:
            self.emit(transcript=edge_pb2.Transcript(turn_index=turn.index, text=result.text, is_final=result.is_final))
            if result.is_final:
                final = result.text
        return final

    def _turn_error(self, turn: Turn, error: StageError) -> None:
        log.warning("session %s turn %d: %s", self.id, turn.index, error)
        if self.meters:
            self.meters.errors.add(1, {"stage": error.stage or "edge", "code": error.code.name})
        self.emit(error=edge_pb2.Error(code=error.code.value[0], message=str(error), stage=error.stage))

    # ------------------------------------------------------------------ the reply

    async def _reply(self, turn: Turn) -> None:
        llm = tts = None
        try:
            text = (await turn.stt_task).strip()
            turn.metrics.stt_final_ms = (time.monotonic() - turn.decided) * 1000
            if not text:  # noise, a cough: no reply
                return
            self.history.append((llm_pb2.CHAT_ROLE_USER, text))
            request = llm_pb2.GenerateRequest(
                messages=[llm_pb2.ChatMessage(role=role, content=content) for role, content in self.history],
                max_tokens=self.max_reply_tokens, temperature=self.settings.llm_temperature,
            )
            llm_sent = time.monotonic()
            llm, tts = await asyncio.gather(
                self.stages.open("llm", llm_pb2.GenerateResponse, request, session_id=self.id),
                self.stages.open("tts", tts_pb2.SynthesizeResponse,
                                 tts_pb2.SynthesizeRequest(config=tts_pb2.TtsConfig(voice=self.voice)), session_id=self.id),
            )
            pump = self.spawn(self._pump_llm_to_tts(turn, llm, tts, llm_sent))
            async for result in tts:
                await self._send_audio(turn, result)
            await pump
            self.history.append((llm_pb2.CHAT_ROLE_ASSISTANT, turn.reply_text.strip()))
            turn.metrics.turn_index = turn.index
            turn.metrics.agent_audio_ms = turn.audio_sent_ms
            self.emit(turn_metrics=turn.metrics)
            self.emit(agent_turn_ended=edge_pb2.AgentTurnEnded(turn_index=turn.index, text=turn.reply_text.strip()))
            self._record(turn)
        except StageError as error:
            self._turn_error(turn, error)
            for stream in (llm, tts):
                if stream:
                    await stream.cancel()
        finally:
            if self.replying is turn:
                self.replying = None

    async def _pump_llm_to_tts(self, turn: Turn, llm: StageStream, tts: StageStream, llm_sent: float) -> None:
        async for delta in llm:
            if delta.text_delta:
                if not turn.metrics.llm_first_token_ms:
                    turn.metrics.llm_first_token_ms = (time.monotonic() - llm_sent) * 1000
                if not turn.tts_first_text_at:
                    turn.tts_first_text_at = time.monotonic()
                turn.reply_text += delta.text_delta
                self.emit(agent_text=edge_pb2.AgentText(turn_index=turn.index, text_delta=delta.text_delta))
                await tts.send(tts_pb2.SynthesizeRequest(text=delta.text_delta))
            turn.metrics.completion_tokens = delta.completion_tokens or turn.metrics.completion_tokens
        await tts.end()

    async def _send_audio(self, turn: Turn, result: tts_pb2.SynthesizeResponse) -> None:
        now = time.monotonic()
        if not turn.first_audio_at:
            turn.first_audio_at = now
            turn.metrics.tts_first_audio_ms = (now - turn.tts_first_text_at) * 1000
            turn.metrics.voice_to_voice_ms = (now - turn.end_of_speech) * 1000
        chunk_ms = len(result.audio.pcm) / 2 / result.audio.sample_rate_hz * 1000
        if result.text:
            turn.spoken.append((result.text, turn.audio_sent_ms))
        turn.audio_sent_ms += chunk_ms
        self.emit(agent_audio=edge_pb2.AgentAudio(turn_index=turn.index, audio=result.audio))

    def _record(self, turn: Turn) -> None:
        if not self.meters:
            return
        m = turn.metrics
        self.meters.voice_to_voice.record(m.voice_to_voice_ms / 1000)
        for kind, value in (("endpointing", m.endpointing_ms), ("stt_final", m.stt_final_ms),
                            ("llm_first_token", m.llm_first_token_ms), ("tts_first_audio", m.tts_first_audio_ms)):
            self.meters.stage_latency.record(value / 1000, {"stage": "edge", "kind": kind})

    # ------------------------------------------------------------------ barge-in

    def on_playback(self, report: edge_pb2.PlaybackPosition) -> None:
        for turn in (self.replying,):
            if turn and turn.index == report.turn_index:
                turn.played_ms = max(0, report.played_ms)

    def heard(self, turn: Turn) -> tuple[int, str]:
        """How much of the reply the client played, and the text of that part."""
        if turn.played_ms >= 0:
            played = turn.played_ms
        elif turn.first_audio_at:  # no report: assume real-time playback from the first chunk
            played = (time.monotonic() - turn.first_audio_at) * 1000
        else:
            played = 0
        played = min(played, turn.audio_sent_ms)
        words = []
        for i, (text, start_ms) in enumerate(turn.spoken):
            end_ms = turn.spoken[i + 1][1] if i + 1 < len(turn.spoken) else turn.audio_sent_ms
            if played >= end_ms:
                words += text.split()
            elif played > start_ms:  # part of this clause: words in proportion to the time
                clause = text.split()
                words += clause[: int(len(clause) * (played - start_ms) / max(1.0, end_ms - start_ms))]
        return int(played), " ".join(words)

    async def _barge_in(self) -> None:
        turn, self.replying = self.replying, None
        played_ms, heard_text = self.heard(turn)
        await self._cancel_turn(turn)
        if heard_text:
            self.history.append((llm_pb2.CHAT_ROLE_ASSISTANT, heard_text))
        self.emit(interrupted=edge_pb2.Interrupted(turn_index=turn.index, played_ms=played_ms, heard_text=heard_text))

    async def _cancel_turn(self, turn: Turn) -> None:
        for task in (turn.reply_task, turn.stt_task):
            if task and not task.done():
                task.cancel()
        if turn.stt:
            await turn.stt.cancel()
