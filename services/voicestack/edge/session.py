"""One conversation, conducted by the edge.

The session owns what the stages must not know: the history, the turn state and
the clock. Audio flows in; VAD events drive the turns:

  speech started  -> an Utterance: an STT stream fed the audio from the speech start
  speech paused   -> (speculation on) a held Reply on the transcript so far
  speech resumed  -> the held Reply is thrown away (a miss)
  speech ended    -> the STT stream ends; on its final transcript a Reply starts, or
                     the held one is released if it heard the same words (a hit)
  speech over the agent, long enough, once the disclosure has played (barge-in)
                  -> cancel LLM and TTS, drop queued audio, keep in the history only
                     what the client heard

A Reply streams LLM text into TTS as it arrives, and TTS audio to the client from
its first chunk, paced to stay just ahead of playback.

Latencies are measured between named events. end_of_speech is when the audio at the
VAD's speech-end offset arrived at the edge, not when the VAD decided.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import grpc

from voicestack.audio import PIPELINE_RATE, VAD_WINDOW_SAMPLES, float_to_pcm16, pcm16_to_float, resample
from opentelemetry import trace
from opentelemetry.trace import Link, StatusCode

from voicestack import discovery, telemetry
from voicestack.bus import StageClient, StageStream
from voicestack.errors import StageError
from voicestack.v1 import audio_pb2, edge_pb2, llm_pb2, stt_pb2, tts_pb2, vad_pb2

log = logging.getLogger(__name__)

PRE_ROLL_MS = 200  # audio before the VAD's speech start, so first phonemes are not clipped
RING_MS = 2000  # audio kept while nobody speaks
RING_TRIM_BYTES = PIPELINE_RATE * 2  # ... give or take a second
MAX_EVENTS_QUEUED = 2000  # a client this far behind is not reading: end its session
VAD_CHUNK_BYTES = PIPELINE_RATE // 10 * 2  # 100 ms: what a client's largest frame carries
VAD_WINDOW_BYTES = VAD_WINDOW_SAMPLES * 2
VAD_EVENT = vad_pb2.VadEventType
SAME_WORDS_RATIO = 0.8


@dataclass
class TurnTaking:
    """Per-session turn-taking settings (SessionConfig, else the server's defaults)."""

    silence_ms: int = 600
    min_speech_ms: int = 200
    max_utterance_ms: int = 30000
    speculation: bool = False
    speculative_pause_ms: int = 250
    interruptible: bool = True
    barge_in_min_speech_ms: int = 400

    @classmethod
    def from_config(cls, config: edge_pb2.SessionConfig, settings) -> "TurnTaking":
        e, i = config.endpointing, config.interruption
        speculation = {edge_pb2.SPECULATION_MODE_ON: True, edge_pb2.SPECULATION_MODE_OFF: False}
        return cls(
            silence_ms=e.silence_ms or cls.silence_ms,
            min_speech_ms=e.min_speech_ms or cls.min_speech_ms,
            max_utterance_ms=e.max_utterance_ms or cls.max_utterance_ms,
            speculation=speculation.get(e.speculation, settings.speculation),
            speculative_pause_ms=e.speculative_pause_ms or cls.speculative_pause_ms,
            interruptible=not i.disabled,
            barge_in_min_speech_ms=i.min_speech_ms or settings.barge_in_min_speech_ms,
        )


async def send_audio(stt: StageStream, pcm: bytes, chunk_ms: int = 500) -> None:
    """PCM16 to an STT stream in chunks it accepts (a backlog can be seconds long)."""
    step = PIPELINE_RATE * chunk_ms // 1000 * 2
    for offset in range(0, len(pcm), step):
        chunk = audio_pb2.AudioChunk(pcm=pcm[offset: offset + step], sample_rate_hz=PIPELINE_RATE)
        await stt.send(stt_pb2.TranscribeRequest(audio=chunk))


def normalized(text: str) -> str:
    return " ".join("".join(c.lower() if c.isalnum() else " " for c in text).split())


def same_words(a: str, b: str) -> bool:
    """Whether a speculative transcript matches the final one: the same words, allowing
    about one in five to differ (Whisper may hear "of" as "on" with a little more audio)."""
    a_words, b_words = normalized(a).split(), normalized(b).split()
    return bool(a_words) and difflib.SequenceMatcher(None, a_words, b_words).ratio() >= SAME_WORDS_RATIO


@dataclass
class Reply:
    """The agent's answer to one turn, or the words it speaks first."""

    turn_index: int
    user_text: str = ""  # what the LLM answers ("" for fixed words)
    fixed: list = field(default_factory=list)  # [(text, interruptible)] spoken without the LLM
    metrics: edge_pb2.TurnMetrics = field(default_factory=edge_pb2.TurnMetrics)
    released: asyncio.Event = field(default_factory=asyncio.Event)  # a held (speculative) reply is not
    after: asyncio.Task | None = None  # the reply that must finish speaking first
    task: asyncio.Task | None = None
    streams: list = field(default_factory=list)
    text: str = ""
    spoken: list = field(default_factory=list)  # (clause, audio ms where it starts)
    audio_sent_ms: float = 0.0
    protected: bool = False  # starts with words that cannot be interrupted (the disclosure)
    protected_ms: float = 0.0  # ... and they end here in its audio, once known
    end_of_speech: float = 0.0
    tts_first_text_at: float = 0.0
    first_audio_at: float = 0.0
    played_report_ms: int = -1
    span: object = None  # the turn's span: this reply ends it

    def played_ms(self) -> float:
        """The client's report if it sent one, else the clock since the first chunk."""
        if self.played_report_ms >= 0:
            played = self.played_report_ms
        elif self.first_audio_at:
            played = (time.monotonic() - self.first_audio_at) * 1000
        else:
            played = 0.0
        return min(played, self.audio_sent_ms)

    def speaking(self) -> bool:
        return self.task is not None and not self.task.done()

    def interruptible_now(self) -> bool:
        if not self.protected:
            return True
        return self.protected_ms > 0 and self.played_ms() >= self.protected_ms

    def heard_text(self, played: float) -> str:
        words = []
        for i, (text, start_ms) in enumerate(self.spoken):
            end_ms = self.spoken[i + 1][1] if i + 1 < len(self.spoken) else self.audio_sent_ms
            if played >= end_ms:
                words += text.split()
            elif played > start_ms:  # part of this clause: words in proportion to the time
                clause = text.split()
                words += clause[: int(len(clause) * (played - start_ms) / max(1.0, end_ms - start_ms))]
        return " ".join(words)


@dataclass
class Utterance:
    """What the user is saying now."""

    index: int
    start_ms: int  # first audio sent to STT (speech start less the pre-roll)
    speech_ms: int  # where the VAD heard speech start
    speech_wall: float  # when that audio arrived
    over_agent: bool = False  # began while the agent spoke: interrupts once long enough
    stt: StageStream | None = None
    sent_to_stt_ms: int = 0
    stt_task: asyncio.Task | None = None
    speculation: Reply | None = None
    metrics: edge_pb2.TurnMetrics = field(default_factory=edge_pb2.TurnMetrics)
    span: object = None  # the turn's span, until a Reply takes it over
    stt_span: object = None


class Session:
    def __init__(self, session_id: str, stages: StageClient, config: edge_pb2.SessionConfig, settings, meters=None):
        self.id = session_id
        self.stages = stages
        self.settings = settings
        self.meters = meters
        self.input_rate = config.input_format.sample_rate_hz or PIPELINE_RATE
        self.turn_taking = TurnTaking.from_config(config, settings)
        self.voice = config.voice
        self.greeting = config.greeting
        self.max_reply_tokens = config.max_reply_tokens
        self.history: list[tuple[int, str]] = [(llm_pb2.CHAT_ROLE_SYSTEM, config.system_prompt or settings.system_prompt)]
        self.events: asyncio.Queue = asyncio.Queue(MAX_EVENTS_QUEUED)
        self.turn_count = 0
        self.utterance: Utterance | None = None
        self.reply: Reply | None = None  # the latest reply started: speaking, or waiting its turn
        self.audible: Reply | None = None  # the reply whose audio is going out now
        self.speculative_hits = self.speculative_misses = self.interruptions = 0
        self.monologue: list[str] = []  # parts of an utterance cut at max_utterance_ms, not yet answered
        self.audio = bytearray()  # 16 kHz PCM16 since `audio_base_ms`
        self.audio_base_ms = 0
        self.arrivals: deque = deque(maxlen=4000)  # (audio end ms, wall time)
        self.vad: StageStream | None = None
        self.vad_base_ms = 0
        # Audio goes to the VAD in whole 32 ms windows (it would hold a partial one until the
        # rest came anyway) and to the STT in stt_batch_ms batches; unbatched, every frame.
        self.vad_pending = bytearray()  # audio short of a whole batch, not yet sent
        self.vad_batch_bytes = VAD_WINDOW_BYTES if settings.batch_stage_audio else 2
        self.stt_batch_ms = settings.stt_batch_ms if settings.batch_stage_audio else 0
        self.input_finished = False
        self.failure: StageError | None = None
        # Each turn is its own trace; this short span links them to the session.
        session_span = telemetry.start_span("session", voicestack__session__id=session_id)
        session_span.end()
        self.session_link = Link(session_span.get_span_context())
        self.trace_text = settings.trace_text
        self._tasks: set[asyncio.Task] = set()
        self._turns_finishing: set[asyncio.Task] = set()

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
            while not self.events.empty():  # nothing more for this client: make room for the end
                self.events.get_nowait()
            self._end_events()

    def _end_events(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.events.put_nowait(None)

    def spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            if isinstance(error, StageError):
                self._turn_error(self.turn_count, error)
            else:
                log.error("session %s: %s failed", self.id, task.get_coro().__qualname__, exc_info=error)

    def wall_time_at(self, offset_ms: int) -> float:
        """When the audio at `offset_ms` arrived."""
        for end_ms, wall in self.arrivals:
            if end_ms >= offset_ms:
                return wall
        return time.monotonic()

    def audio_between(self, start_ms: int, end_ms: int | None = None) -> bytes:
        def index(ms):
            return max(0, (ms - self.audio_base_ms) * PIPELINE_RATE // 1000 * 2)
        return bytes(self.audio[index(start_ms): None if end_ms is None else index(end_ms)])

    def _turn_error(self, index: int, error: StageError) -> None:
        log.warning("session %s turn %d: %s", self.id, index, error)
        if self.meters:
            self.meters.errors.add(1, {"stage": error.stage or "edge", "code": error.code.name})
        self.emit(error=edge_pb2.Error(code=error.code.value[0], message=str(error), stage=error.stage))

    # ------------------------------------------------------------------ lifecycle

    async def _open_vad(self) -> None:
        """A VAD stream from here on: its offsets count from the audio received so far,
        or, when it replaces a lost one mid-utterance, from the utterance's start."""
        tt = self.turn_taking
        vad = await self.stages.open(
            "vad", vad_pb2.DetectResponse,
            vad_pb2.DetectRequest(config=vad_pb2.VadConfig(
                sample_rate_hz=PIPELINE_RATE, min_silence_ms=tt.silence_ms, min_speech_ms=tt.min_speech_ms,
                pause_ms=tt.speculative_pause_ms if tt.speculation else 0,
            )),
            session_id=self.id, replay=False,  # a session of audio is too much to replay: reopen instead
        )
        # A new stream that missed the start of the speech in progress would never hear it
        # end (the turn would hang until max_utterance_ms): it hears the utterance again.
        # Audio arriving meanwhile is caught up too; then live audio follows, in order.
        start = self.utterance.start_ms if self.utterance else self.audio_ms
        sent = start
        while sent < self.audio_ms:
            end = self.audio_ms
            pcm = self.audio_between(sent, end)
            for offset in range(0, len(pcm), VAD_CHUNK_BYTES):
                await vad.send(vad_pb2.DetectRequest(audio=audio_pb2.AudioChunk(
                    pcm=pcm[offset: offset + VAD_CHUNK_BYTES], sample_rate_hz=PIPELINE_RATE)))
            sent = end
        self.vad, self.vad_base_ms = vad, start
        self.vad_pending.clear()  # (sent above)

    async def start(self) -> None:
        await self._open_vad()
        self.spawn(self._read_vad())
        fixed = []
        if self.settings.disclosure and self.settings.disclosure_text:
            fixed.append((self.settings.disclosure_text, False))
        if self.greeting:
            fixed.append((self.greeting, True))
        if fixed:
            self._start_reply(Reply(turn_index=0, fixed=fixed, span=self._turn_span(0)))

    async def finish_input(self) -> None:
        """The client closed its side: finish the turn in progress, then end."""
        self.input_finished = True
        if self.vad_pending:
            await self._send_vad(bytes(self.vad_pending), self.utterance)
            self.vad_pending.clear()
        await self.vad.end()

    async def close(self) -> None:
        if self.utterance:
            await self._drop_utterance(self.utterance)
        for reply in (self.reply, self.audible):
            if reply:
                await self._cancel_reply(reply)
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
        u = self.utterance
        self.vad_pending += pcm
        whole = len(self.vad_pending) // self.vad_batch_bytes * self.vad_batch_bytes
        if whole:
            await self._send_vad(bytes(self.vad_pending[:whole]), u)
            del self.vad_pending[:whole]
        if u is None:
            excess = len(self.audio) - RING_MS * PIPELINE_RATE // 1000 * 2
            if excess >= RING_TRIM_BYTES:  # in steps, not a 64 kB move for every frame
                excess -= excess % (PIPELINE_RATE // 1000 * 2)  # whole milliseconds, so audio_base_ms stays exact
                del self.audio[:excess]
                self.audio_base_ms += excess // 2 * 1000 // PIPELINE_RATE
            return
        if self.audio_ms - u.sent_to_stt_ms >= self.stt_batch_ms:
            await self._feed_stt(u)
        if u.over_agent:
            await self._maybe_barge_in(u)
        if self.audio_ms - u.start_ms > self.turn_taking.max_utterance_ms:
            # A monologue is cut into turns: this part is heard now, answered at the end.
            await self._end_utterance(self.audio_ms, reply=False)
            await self._start_utterance(self.audio_ms)

    async def _send_vad(self, pcm: bytes, u: Utterance | None) -> None:
        with telemetry.in_span(u.span if u else None):  # the VAD's decisions join the turn's trace
            await self.vad.send(vad_pb2.DetectRequest(audio=audio_pb2.AudioChunk(pcm=pcm, sample_rate_hz=PIPELINE_RATE)))

    async def _feed_stt(self, u: Utterance) -> None:
        pcm = self.audio_between(u.sent_to_stt_ms)
        if pcm and u.stt is not None:
            u.sent_to_stt_ms = self.audio_ms
            await send_audio(u.stt, pcm)

    def on_playback(self, report: edge_pb2.PlaybackPosition) -> None:
        if self.audible and self.audible.turn_index == report.turn_index:
            self.audible.played_report_ms = max(0, report.played_ms)

    # ------------------------------------------------------------------ VAD events

    async def _read_vad(self) -> None:
        try:
            while True:
                try:
                    await self._handle_vad_events()
                    break
                except StageError as error:
                    if error.code != grpc.StatusCode.UNAVAILABLE:
                        raise
                    # The VAD replica died: a fresh stream elsewhere (it re-learns the
                    # speech state within a frame or two; an utterance in progress goes on).
                    log.warning("session %s: %s; reopening the VAD stream", self.id, error)
                    await self._open_vad()
                    if self.input_finished:
                        await self.vad.end()
            # The client closed its side: let the last turn and reply finish, then end the call.
            # (The VAD stream ended because the client's audio did.)
            while self._turns_finishing:
                await asyncio.gather(*self._turns_finishing, return_exceptions=True)
            if self.reply and self.reply.task:
                with contextlib.suppress(asyncio.CancelledError, StageError):
                    await self.reply.task
            self._end_events()
        except StageError as error:
            self.fail(error)

    async def _handle_vad_events(self) -> None:
        async for event in self.vad:
            u = self.utterance
            offset_ms = self.vad_base_ms + event.offset_ms
            if event.type == VAD_EVENT.VAD_EVENT_TYPE_SPEECH_STARTED:
                if u is None:  # (after a VAD reopen mid-utterance, the utterance just goes on)
                    await self._start_utterance(offset_ms)
            elif u is None:
                continue
            elif event.type == VAD_EVENT.VAD_EVENT_TYPE_SPEECH_ENDED:
                await self._end_utterance(offset_ms)
            elif event.type == VAD_EVENT.VAD_EVENT_TYPE_SPEECH_PAUSED:
                self._speculate(u, offset_ms)
            elif event.type == VAD_EVENT.VAD_EVENT_TYPE_SPEECH_RESUMED and u.speculation:
                await self._speculation_missed(u)

    async def _start_utterance(self, speech_ms: int) -> None:
        self.turn_count += 1
        start = max(self.audio_base_ms, speech_ms - PRE_ROLL_MS)
        u = Utterance(self.turn_count, start, speech_ms, self.wall_time_at(speech_ms), sent_to_stt_ms=start)
        u.span = self._turn_span(u.index, start_time=u.speech_wall)
        u.stt_span = telemetry.start_span("stt", parent=u.span, voicestack__stage="stt")
        self.utterance = u
        self.emit(speech_started=edge_pb2.SpeechStarted(turn_index=u.index, offset_ms=speech_ms))
        await self._cancel_unheard_reply()  # the user was not done: a reply not yet heard is stale
        if self.audible is not None:
            u.over_agent = True  # a cough must not cut the agent off: wait for more speech
        try:
            with telemetry.in_span(u.stt_span):
                u.stt = await self.stages.open(
                    "stt", stt_pb2.TranscribeResponse,
                    stt_pb2.TranscribeRequest(config=stt_pb2.SttConfig(sample_rate_hz=PIPELINE_RATE, interim_results=True)),
                    session_id=self.id,
                    # Transcripts are snapshots whose number depends on timing: after a
                    # failover take them all again (skipping by count could drop the final).
                    skip_delivered=False,
                )
        except StageError as error:
            self._turn_error(u.index, error)
            self.utterance = None
            self._end_turn_unanswered(u, error=error)
            return
        await self._feed_stt(u)
        u.stt_task = self.spawn(self._read_stt(u))
        if u.over_agent:
            await self._maybe_barge_in(u)

    async def _read_stt(self, u: Utterance) -> str:
        final = ""
        async for result in u.stt:
            if not u.over_agent:  # speech under the agent stays private until it interrupts
                self.emit(transcript=edge_pb2.Transcript(turn_index=u.index, text=result.text, is_final=result.is_final))
            if result.is_final:
                final = result.text
        if u.stt_span is not None:
            u.stt_span.set_attribute("voicestack.audio_seconds", round(u.sent_to_stt_ms / 1000 - u.start_ms / 1000, 3))
        telemetry.end_span(u.stt_span)
        return final.strip()

    async def _end_utterance(self, speech_end_ms: int, reply: bool = True) -> None:
        u, self.utterance = self.utterance, None
        if u.over_agent:
            if speech_end_ms - u.speech_ms < self.turn_taking.barge_in_min_speech_ms:
                await self._drop_utterance(u)  # a cough, an "mm-hm": the agent goes on
                return
            u.over_agent = False  # a real turn that could not interrupt: answered after the agent
        decided = time.monotonic()
        end_of_speech = min(self.wall_time_at(speech_end_ms), decided)
        u.metrics.endpointing_ms = (decided - end_of_speech) * 1000
        endpointing = telemetry.start_span("endpointing", parent=u.span, start_time=end_of_speech,
                                           voicestack__silence_ms=self.turn_taking.silence_ms)
        telemetry.end_span(endpointing, decided)
        self.emit(speech_ended=edge_pb2.SpeechEnded(turn_index=u.index, offset_ms=speech_end_ms))
        if u.stt is None:
            return
        await self._feed_stt(u)
        await u.stt.end()
        task = self.spawn(self._finish_turn(u, decided, end_of_speech, reply))
        self._turns_finishing.add(task)
        task.add_done_callback(self._turns_finishing.discard)

    async def _finish_turn(self, u: Utterance, decided: float, end_of_speech: float, reply: bool) -> None:
        try:
            text = await u.stt_task
        except StageError as error:
            self._turn_error(u.index, error)
            self._end_turn_unanswered(u, error=error)
            return
        u.metrics.stt_final_ms = (time.monotonic() - decided) * 1000
        finalize = telemetry.start_span("stt.finalize", parent=u.span, start_time=decided, voicestack__stage="stt")
        if self.trace_text:
            finalize.set_attribute("voicestack.transcript", text)
        finalize.end()
        spec = u.speculation
        if (spec and spec.user_text and same_words(spec.user_text, text)
                and spec.task and not spec.task.done()):
            self.speculative_hits += 1
            spec.metrics.speculative_hit = True
            chosen = spec
        else:
            if spec:
                await self._speculation_missed(u)
            chosen = None
        if not reply:
            if text:
                self.monologue.append(text)
            self._end_turn_unanswered(u)
            return
        if self.monologue:  # the last part of a long utterance: answer all of it
            text = " ".join([*self.monologue, text]).strip()
            self.monologue.clear()
            chosen = None
            if spec:
                await self._cancel_reply(spec)
        if not text:  # noise: nothing to answer
            self._end_turn_unanswered(u)
            return
        if self.reply is not chosen:
            await self._cancel_unheard_reply()  # this turn supersedes an answer not yet heard
        if chosen is None:
            chosen = self._start_reply(Reply(turn_index=u.index, user_text=text, span=u.span))
        else:
            telemetry.end_span(chosen.span)  # the speculation's own span; the turn's takes over
            chosen.span = u.span
        u.span = None
        chosen.metrics.endpointing_ms = u.metrics.endpointing_ms
        chosen.metrics.stt_final_ms = u.metrics.stt_final_ms
        chosen.end_of_speech = end_of_speech
        self._release(chosen)

    async def _drop_utterance(self, u: Utterance) -> None:
        for task in (u.stt_task,):
            if task and not task.done():
                task.cancel()
        if u.stt:
            await u.stt.cancel()
        if u.speculation:
            await self._cancel_reply(u.speculation)
        self._end_turn_unanswered(u, dropped=True)

    def _turn_span(self, index: int, start_time: float | None = None):
        return telemetry.start_span("turn", start_time=start_time, links=[self.session_link],
                                    voicestack__session__id=self.id, voicestack__turn__index=index)

    def _end_turn_unanswered(self, u: Utterance, error: StageError | None = None, dropped: bool = False) -> None:
        """Every user turn ends with AgentTurnEnded or Interrupted; this one gets no answer
        (noise, a cough under the agent, part of a monologue, a failed stage)."""
        self.emit(agent_turn_ended=edge_pb2.AgentTurnEnded(turn_index=u.index))
        for span in (u.stt_span, u.span):
            if span is not None and span.is_recording():
                if error:
                    span.set_status(StatusCode.ERROR, str(error))
                if dropped:
                    span.set_attribute("voicestack.turn.dropped", True)
                span.end()
        u.span = None

    def _add_user_text(self, text: str) -> None:
        role, content = self.history[-1]
        if role == llm_pb2.CHAT_ROLE_USER:  # a turn whose reply was cut before a word: one message
            self.history[-1] = (role, f"{content} {text}")
        else:
            self.history.append((llm_pb2.CHAT_ROLE_USER, text))

    # ------------------------------------------------------------------ speculation

    def _speculate(self, u: Utterance, pause_ms: int) -> None:
        if (not self.turn_taking.speculation or u.speculation or u.over_agent
                or self.reply is not None or self.audible is not None):
            return
        spec = Reply(turn_index=u.index, span=telemetry.start_span("speculation", parent=u.span))
        u.speculation = spec
        # All the audio so far, pause included: the final decode sees the same plus silence.
        spec.task = self.spawn(self._speculative_reply(spec, self.audio_between(u.start_ms)))

    async def _speculative_reply(self, spec: Reply, audio: bytes) -> None:
        with telemetry.in_span(spec.span):
            stt = await self.stages.open(
                "stt", stt_pb2.TranscribeResponse,
                stt_pb2.TranscribeRequest(config=stt_pb2.SttConfig(sample_rate_hz=PIPELINE_RATE)), session_id=self.id,
                skip_delivered=False,
            )
        spec.streams.append(stt)
        await send_audio(stt, audio)
        await stt.end()
        spec.user_text = "".join([r.text async for r in stt if r.is_final]).strip()
        if spec.user_text:
            await self._speak(spec)

    async def _speculation_missed(self, u: Utterance) -> None:
        spec, u.speculation = u.speculation, None
        self.speculative_misses += 1
        await self._cancel_reply(spec)

    # ------------------------------------------------------------------ replies

    async def _cancel_unheard_reply(self) -> None:
        reply = self.reply
        if reply is not None and reply.user_text and not reply.first_audio_at:
            await self._cancel_reply(reply)
            self.emit(agent_turn_ended=edge_pb2.AgentTurnEnded(turn_index=reply.turn_index))  # superseded

    def _previous_task(self) -> asyncio.Task | None:
        previous = self.reply or self.audible
        return previous.task if previous else None

    def _start_reply(self, reply: Reply) -> Reply:
        reply.after = self._previous_task()
        if reply.fixed:  # an LLM reply is released when its turn ends
            reply.released.set()
            reply.protected = not all(interruptible for _, interruptible in reply.fixed)
        reply.task = self.spawn(self._speak(reply))
        self.reply = reply
        return reply

    def _release(self, reply: Reply) -> None:
        if self.reply is not reply:
            reply.after = self._previous_task()
            self.reply = reply
        self._add_user_text(reply.user_text)
        reply.released.set()

    async def _speak(self, reply: Reply) -> None:
        """Produce the reply: fixed words straight to TTS, or the LLM's words as they come."""
        try:
            for text, interruptible in reply.fixed:
                await self._synthesize(reply, text)
                if not interruptible:
                    reply.protected_ms = reply.audio_sent_ms
            if reply.user_text:
                await self._generate(reply)
            await self._finished(reply)
        except StageError as error:
            self._turn_error(reply.turn_index, error)
            await self._cancel_streams(reply)
            if reply.span is not None:
                reply.span.set_status(StatusCode.ERROR, str(error))
        except asyncio.CancelledError:
            await self._cancel_streams(reply)
            if reply.span is not None:
                reply.span.set_attribute("voicestack.turn.cancelled", True)
            raise
        finally:
            if self.reply is reply:
                self.reply = None
            if self.audible is reply:
                self.audible = None
            if reply.span is not None and reply.span.is_recording():
                reply.span.end()

    async def _open_tts(self, reply: Reply) -> StageStream:
        tts = await self.stages.open("tts", tts_pb2.SynthesizeResponse,
                                     tts_pb2.SynthesizeRequest(config=tts_pb2.TtsConfig(voice=self.voice)), session_id=self.id)
        reply.streams.append(tts)
        return tts

    async def _synthesize(self, reply: Reply, text: str) -> None:
        span = telemetry.start_span("tts.synthesize", parent=reply.span, voicestack__stage="tts",
                                    voicestack__characters=len(text))
        try:
            with telemetry.in_span(span):
                tts = await self._open_tts(reply)
            reply.tts_first_text_at = reply.tts_first_text_at or time.monotonic()
            await tts.send(tts_pb2.SynthesizeRequest(text=text))
            await tts.end()
            reply.text += (" " if reply.text else "") + text
            self.emit(agent_text=edge_pb2.AgentText(turn_index=reply.turn_index, text_delta=text + " "))
            async for result in tts:
                await self._send_audio(reply, result, span)
        finally:
            span.end()

    async def _generate(self, reply: Reply) -> None:
        history = [*self.history] if reply.released.is_set() else [*self.history, (llm_pb2.CHAT_ROLE_USER, reply.user_text)]
        request = llm_pb2.GenerateRequest(
            messages=[llm_pb2.ChatMessage(role=role, content=content) for role, content in history],
            max_tokens=self.max_reply_tokens, temperature=self.settings.llm_temperature,
        )
        llm_sent = time.monotonic()
        llm_span = telemetry.start_span("llm.generate", parent=reply.span, voicestack__stage="llm",
                                        voicestack__messages=len(request.messages))
        tts_span = telemetry.start_span("tts.synthesize", parent=reply.span, voicestack__stage="tts")

        async def open_in(span, opening):
            with telemetry.in_span(span):  # the stage's own spans become children of this one
                return await opening

        pump = None
        try:
            llm, tts = await asyncio.gather(
                open_in(llm_span, self.stages.open("llm", llm_pb2.GenerateResponse, request, session_id=self.id)),
                open_in(tts_span, self._open_tts(reply)))
            reply.streams.append(llm)
            pump = self.spawn(self._pump(reply, llm, tts, llm_sent, llm_span))
            async for result in tts:
                await self._send_audio(reply, result, tts_span)
            await pump
        finally:
            if pump:
                pump.cancel()
            tts_span.set_attribute("voicestack.characters", len(reply.text))
            for span in (llm_span, tts_span):
                if span.is_recording():
                    span.end()

    async def _pump(self, reply: Reply, llm: StageStream, tts: StageStream, llm_sent: float, span) -> None:
        """LLM deltas to TTS as they arrive (and to the client, once released)."""
        pending_text = []
        async for delta in llm:
            if delta.text_delta:
                now = time.monotonic()
                if not reply.metrics.llm_first_token_ms:
                    reply.metrics.llm_first_token_ms = (now - llm_sent) * 1000
                    reply.tts_first_text_at = now
                    span.add_event("first_token")
                reply.text += delta.text_delta
                pending_text.append(delta.text_delta)
                await tts.send(tts_pb2.SynthesizeRequest(text=delta.text_delta))
            reply.metrics.completion_tokens = delta.completion_tokens or reply.metrics.completion_tokens
            if reply.released.is_set() and pending_text:
                self.emit(agent_text=edge_pb2.AgentText(turn_index=reply.turn_index, text_delta="".join(pending_text)))
                pending_text.clear()
        span.set_attribute("gen_ai.usage.output_tokens", reply.metrics.completion_tokens)
        span.end()
        await tts.end()
        if pending_text:
            await reply.released.wait()
            self.emit(agent_text=edge_pb2.AgentText(turn_index=reply.turn_index, text_delta="".join(pending_text)))

    async def _send_audio(self, reply: Reply, result: tts_pb2.SynthesizeResponse, span=None) -> None:
        await reply.released.wait()  # a speculative reply holds its audio until its turn ends
        if reply.after is not None and not reply.after.done():
            with contextlib.suppress(BaseException):
                await asyncio.shield(reply.after)  # replies never talk over each other
        now = time.monotonic()
        if not reply.first_audio_at:
            reply.first_audio_at = now
            self.audible = reply
            reply.metrics.tts_first_audio_ms = (now - reply.tts_first_text_at) * 1000
            if span is not None:
                span.add_event("first_audio")
            out = telemetry.start_span("first_audio_out", parent=reply.span)
            if reply.end_of_speech:
                reply.metrics.voice_to_voice_ms = (now - reply.end_of_speech) * 1000
                out.set_attribute("voicestack.voice_to_voice_ms", reply.metrics.voice_to_voice_ms)
                reply.span.set_attribute("voicestack.voice_to_voice_ms", reply.metrics.voice_to_voice_ms)
            out.end()
        else:
            # Stay at most audio_lead_ms ahead of playback, so a barge-in has little to take back.
            ahead = reply.audio_sent_ms - (now - reply.first_audio_at) * 1000
            if ahead > self.settings.audio_lead_ms:
                await asyncio.sleep((ahead - self.settings.audio_lead_ms) / 1000)
        if result.text:
            reply.spoken.append((result.text, reply.audio_sent_ms))
        reply.audio_sent_ms += len(result.audio.pcm) / 2 / result.audio.sample_rate_hz * 1000
        self.emit(agent_audio=edge_pb2.AgentAudio(turn_index=reply.turn_index, audio=result.audio))

    async def _finished(self, reply: Reply) -> None:
        text = reply.text.strip()
        if reply.user_text:
            self.history.append((llm_pb2.CHAT_ROLE_ASSISTANT, text))
        m = reply.metrics
        m.turn_index = reply.turn_index
        m.agent_audio_ms = reply.audio_sent_ms
        m.speculative_hits, m.speculative_misses = self.speculative_hits, self.speculative_misses
        m.interruptions = self.interruptions
        self.emit(turn_metrics=m)
        if reply.span is not None:
            reply.span.set_attribute("voicestack.agent_audio_seconds", round(reply.audio_sent_ms / 1000, 3))
            reply.span.end()
            self.emit(turn_trace=self._waterfall(reply))
        self.emit(agent_turn_ended=edge_pb2.AgentTurnEnded(turn_index=reply.turn_index, text=text))
        if self.meters and reply.end_of_speech:
            self.meters.voice_to_voice.record(m.voice_to_voice_ms / 1000)
            discovery.observe_latency(m.voice_to_voice_ms / 1000, "voice_to_voice")
            for kind, value in (("endpointing", m.endpointing_ms), ("stt_final", m.stt_final_ms),
                                ("llm_first_token", m.llm_first_token_ms), ("tts_first_audio", m.tts_first_audio_ms)):
                self.meters.stage_latency.record(value / 1000, {"stage": "edge", "kind": kind})

    def _waterfall(self, reply: Reply) -> edge_pb2.TurnTrace:
        """The turn's spans recorded in this process, as offsets from the turn's start."""
        context = reply.span.get_span_context()
        spans = telemetry.turn_spans.take(context.trace_id)
        turn = next((s for s in spans if s.context.span_id == context.span_id), None)
        trace_out = edge_pb2.TurnTrace(turn_index=reply.turn_index, trace_id=trace.format_trace_id(context.trace_id))
        if turn is None:  # not sampled
            return trace_out
        names = {s.context.span_id: s.name for s in spans}
        for s in sorted(spans, key=lambda s: s.start_time):
            trace_out.spans.add(
                name=s.name, parent_name=names.get(s.parent.span_id, "") if s.parent else "",
                start_ms=(s.start_time - turn.start_time) / 1e6, duration_ms=(s.end_time - s.start_time) / 1e6)
        return trace_out

    async def _cancel_streams(self, reply: Reply) -> None:
        for stream in reply.streams:
            await stream.cancel()

    async def _cancel_reply(self, reply: Reply) -> None:
        if reply.task and not reply.task.done():
            reply.task.cancel()
            with contextlib.suppress(BaseException):
                await reply.task
        await self._cancel_streams(reply)
        if self.reply is reply:
            self.reply = None
        if self.audible is reply:
            self.audible = None

    # ------------------------------------------------------------------ barge-in

    async def _maybe_barge_in(self, u: Utterance) -> None:
        reply = self.audible
        if reply is None or not reply.speaking():
            u.over_agent = False  # the agent finished meanwhile: an ordinary turn
            return
        long_enough = self.audio_ms - u.speech_ms >= self.turn_taking.barge_in_min_speech_ms
        if long_enough and self.turn_taking.interruptible and reply.interruptible_now():
            await self._barge_in(u, reply)

    async def _barge_in(self, u: Utterance, reply: Reply) -> None:
        played = reply.played_ms()
        heard = reply.heard_text(played)
        await self._cancel_reply(reply)
        await self._cancel_unheard_reply()  # an answer queued behind it is stale too
        self._drop_queued_audio(reply.turn_index)
        u.over_agent = False
        self.interruptions += 1
        if reply.user_text and heard:
            self.history.append((llm_pb2.CHAT_ROLE_ASSISTANT, heard))
        reaction_ms = (time.monotonic() - u.speech_wall) * 1000
        if self.meters:
            self.meters.stage_latency.record(reaction_ms / 1000, {"stage": "edge", "kind": "barge_in"})
        self.emit(interrupted=edge_pb2.Interrupted(
            turn_index=reply.turn_index, played_ms=int(played), heard_text=heard, barge_in_reaction_ms=reaction_ms))

    def _drop_queued_audio(self, turn_index: int) -> None:
        """Agent audio not yet handed to gRPC is never sent."""
        kept = []
        while not self.events.empty():
            event = self.events.get_nowait()
            if event is not None and event.WhichOneof("kind") == "agent_audio" and event.agent_audio.turn_index == turn_index:
                continue
            kept.append(event)
        for event in kept:
            self.events.put_nowait(event)
