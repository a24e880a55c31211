"""One conversation, conducted by the edge: the policy, in one task.

Everything that happens in a call arrives in the session's inbox as an event: audio and
playback reports from the client, the client's end, the VAD's decisions and the
transcripts (through RecognitionHooks), replies finishing. One task takes them in order
and makes every decision, so no decision races another:

  speech started  -> a user turn, its STT stream; an answer not yet heard is stale
  speech paused   -> (speculation on) a held reply on the transcript so far
  speech resumed  -> the held reply is thrown away (a miss)
  speech ended    -> the STT stream ends; on its final transcript a reply starts, or the
                     held one is released if it heard the same words (a hit)
  speech over the agent, long enough, once the disclosure has played (barge-in)
                  -> interrupt the reply, clear its queued audio, keep in the history
                     only what the client heard
  a monologue past max_utterance_ms -> cut into parts, heard now, answered at the end

Every user turn ends exactly once: `AgentTurnEnded` (after one `Error` if a stage failed
it) or `Interrupted`. The parts: recognition.py (audio in), speech.py (reply handles and
their order), generation.py (LLM into TTS into paced audio), output.py (to the client),
observer.py (spans and meters), events.py (what the inbox holds), turn_taking.py (settings),
processing.py (the team's processors on the text), recording.py (consent and the recording).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import grpc

from voicestack import llm
from voicestack.audio import PIPELINE_RATE, VAD_WINDOW_SAMPLES, float_to_pcm16, level_dbfs, pcm16_to_float, resample
from voicestack.edge.events import (AudioIn, Failed, HooksToInbox, InputEnded, KeysPressed, Playback,
                                    RecognitionEnded, ReplyDone, ToolAnswered, Transcribed, Transcript,
                                    VadDecision)
from voicestack.edge.generation import GenerationContext, perform_reply
from voicestack.edge.observer import TurnObserver, TurnRecord
from voicestack.edge.processing import NO_PROCESSORS, ProcessorChain
from voicestack.edge.recording import CallRecording, consent_answer
from voicestack.edge.output import Output
from voicestack.edge.recognition import Recognition, Utterance
from voicestack.edge.routing import Route, choose_route, tool_words
from voicestack.edge.speech import SpeechHandle, SpeechScheduler
from voicestack.edge.tool_calls import ClientToolCalls
from voicestack.edge.turn_taking import TurnTaking, is_backchannel, same_words
from voicestack.errors import ServiceError, StageError
from voicestack.v1 import edge_pb2, llm_pb2

log = logging.getLogger(__name__)

MAX_HISTORY_MESSAGES = 120  # after the system prompt (the LLM stage takes 200)
INBOX_HIGH = 200  # events: a client sending faster than the session keeps up waits here
KEYPAD_PAUSE_S = 2.0  # keys pressed, then this long without another: the keypad turn ends (or at "#")
RECORDINGS_CLOSING: set[asyncio.Task] = set()  # recordings being stored after their calls ended
SYSTEM, USER, ASSISTANT = llm_pb2.CHAT_ROLE_SYSTEM, llm_pb2.CHAT_ROLE_USER, llm_pb2.CHAT_ROLE_ASSISTANT


@dataclass
class UserTurn:
    """A user's turn from speech start until it is answered or ends."""

    utterance: Utterance
    record: TurnRecord
    over_agent: bool = False  # began while the agent spoke: interrupts once long enough
    # Nothing but a backchannel heard of it so far (its latest interim, while over the agent).
    only_backchannel: bool = True
    # Over the agent, long enough, but no more than a backchannel so far: the final
    # transcript decides (a backchannel is dropped, anything else interrupts then).
    backchannel_pending: bool = False
    continuation: bool = False  # a later part of a monologue: never a cough
    answer: bool = True  # False for a monologue's parts: heard now, answered at the end
    decided_at: float = 0.0
    speculation: SpeechHandle | None = None
    level_dbfs: float = -100.0

    @property
    def index(self) -> int:
        return self.utterance.index


def voice_note(m: edge_pb2.TurnMetrics) -> str:
    """How a turn was said, for the LLM: short, and the same shape every turn."""
    return (f"[voice: language {m.language or '?'} ({m.language_probability:.2f}), "
            f"{m.words_per_second:.1f} words/s, level {m.level_dbfs:.0f} dBFS]")


def _message(role: int, content: str) -> llm_pb2.ChatMessage:
    return llm_pb2.ChatMessage(role=role, content=content)


class Session:
    """`async with Session(...) as session:` opens its VAD stream (StageError if it cannot)
    and runs the conversation until `session.output` closes; leaving the block stops
    every task and cancels every stage stream the session holds."""

    def __init__(self, session_id: str, stages, config: edge_pb2.SessionConfig, settings, meters=None,
                 tools=None, processors: ProcessorChain = NO_PROCESSORS, recording_store=None):
        self.id = session_id
        self.settings = settings
        self.input_rate = config.input_format.sample_rate_hz or PIPELINE_RATE
        self.turn_taking = tt = TurnTaking.from_config(config, settings)
        self.greeting = config.greeting
        self.llm_route_hint = config.llm_route
        notes = {edge_pb2.VOICE_NOTES_ON: True, edge_pb2.VOICE_NOTES_OFF: False}
        self.voice_notes = notes.get(config.voice_notes, settings.voice_notes)
        self.reply_languages = {code.strip() for code in settings.reply_languages.split(",") if code.strip()}
        self.language = "en"  # of the replies: follows the caller's (see _reply_language)
        self.tool_vocabulary = tool_words(tools.definitions()) if tools is not None else set()
        self.history: list[llm_pb2.ChatMessage] = [_message(SYSTEM, config.system_prompt or settings.system_prompt)]
        self.inbox: asyncio.Queue = asyncio.Queue()
        self._inbox_low = asyncio.Event()
        self.output = Output()
        self.observer = TurnObserver(session_id, meters, settings.trace_text)
        self.generation = GenerationContext(
            stages, session_id, self.output, self.observer, voice=config.voice,
            temperature=settings.llm_temperature, max_tokens=config.max_reply_tokens,
            audio_lead_ms=settings.audio_lead_ms, stall_seconds=settings.stage_stall_seconds,
            tools=tools, client_tools=ClientToolCalls(self.output),
            tool_failure_text=settings.tool_failure_text, goodbye_text=settings.goodbye_text, processors=processors,
            llm_affinity=settings.llm_affinity)
        self.processors = processors
        # Recording (recording.py): with a store, from the caller's consent to the end of the call.
        self.recording_store = recording_store
        self.recording: CallRecording | None = None
        self.awaiting_consent = False
        if recording_store is not None and config.recording_consent:
            self._start_recording("client")
        self.recognition = Recognition(
            session_id, stages, HooksToInbox(self.inbox), self._spawn,
            tt.vad_config(),
            vad_batch_bytes=VAD_WINDOW_SAMPLES * 2 if settings.batch_stage_audio else 2,
            stt_batch_ms=settings.stt_batch_ms if settings.batch_stage_audio else 0,
            stall_seconds=settings.stage_stall_seconds)
        self.speech = SpeechScheduler()
        self.replies: set[SpeechHandle] = set()  # every reply whose task runs, held ones too
        self.user: UserTurn | None = None  # the turn being spoken
        self.finishing: dict[int, UserTurn] = {}  # spoken, waiting for the final transcript
        self.ended_turns: set[int] = set()
        self.turn_count = 0
        self.monologue: list[str] = []  # parts of a long utterance, not yet answered
        self.speculative_hits = self.speculative_misses = self.interruptions = self.backchannels = 0
        self.input_ended = self.recognition_ended = False
        self.keypad = ""  # keys pressed for the keypad turn not yet ended
        self._keypad_timer: asyncio.TimerHandle | None = None
        self._group: asyncio.TaskGroup | None = None
        self._runner: asyncio.Task | None = None
        self._started = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------ lifetime

    async def __aenter__(self) -> "Session":
        self._runner = asyncio.create_task(self._run())
        started = asyncio.create_task(self._started.wait())
        await asyncio.wait([self._runner, started], return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if self._runner.done():  # the VAD stream did not open
            self._runner.result()
            raise self.output.failure or ServiceError(grpc.StatusCode.INTERNAL, "session did not start")
        return self

    async def __aexit__(self, *exc) -> None:
        if self._runner is not None and not self._runner.done():
            self._runner.cancel()
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)
        if self.recording is not None:
            # To the store even if this call is being cancelled (a hang-up): it finishes on its own.
            closing = asyncio.create_task(self._close_recording())
            RECORDINGS_CLOSING.add(closing)
            closing.add_done_callback(RECORDINGS_CLOSING.discard)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(closing)

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                try:
                    await self.recognition.start()
                except StageError as error:
                    self.output.close(error)
                    return
                self._started.set()
                self._speak_first()
                try:
                    await self._take_events()
                finally:
                    self._inbox_low.set()  # nobody takes events any more: a waiting reader goes on
                    await self._stop_everything()
        except asyncio.CancelledError:
            await self._stop_everything()
            raise
        except Exception as error:  # a bug: the call ends with INTERNAL, nothing left running
            log.error("session %s failed", self.id, exc_info=error)
            self.output.close(ServiceError(grpc.StatusCode.INTERNAL, "internal error in the session"))

    def _spawn(self, coroutine) -> asyncio.Task:
        task = self._group.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _stop_everything(self) -> None:
        if self._keypad_timer is not None:
            self._keypad_timer.cancel()
        for handle in list(self.replies):
            handle.interrupt()
        for turn in [self.user, *self.finishing.values()]:
            if turn is not None and turn.speculation is not None:
                turn.speculation.interrupt()
        await self.recognition.close()
        for task in list(self._tasks):  # (a VAD reopen still waiting for a replica, say)
            task.cancel()

    async def _take_events(self) -> None:
        while not self.output.closed:
            event = await self.inbox.get()
            if self.inbox.qsize() < INBOX_HIGH // 2:
                self._inbox_low.set()
            await self._handle(event)
            if (self.input_ended and self.recognition_ended and self.user is None and not self.finishing
                    and not self.replies):
                self.output.close()  # the client is done and so is every turn

    # ------------------------------------------------------------ from the client

    async def on_audio(self, pcm: bytes) -> None:
        if self.input_rate != PIPELINE_RATE:
            pcm = float_to_pcm16(resample(pcm16_to_float(pcm), self.input_rate, PIPELINE_RATE))
        if self.output.closed:
            return
        self.inbox.put_nowait(AudioIn(pcm))
        if self.inbox.qsize() >= INBOX_HIGH:  # backpressure: the client's reads wait
            self._inbox_low.clear()
            await self._inbox_low.wait()

    def on_playback(self, report: edge_pb2.PlaybackPosition) -> None:
        self.inbox.put_nowait(Playback(report))

    def finish_input(self) -> None:
        self.inbox.put_nowait(InputEnded())

    def fail(self, error: ServiceError) -> None:
        self.inbox.put_nowait(Failed(error))

    def on_tool_result(self, result: edge_pb2.ToolResult) -> None:
        self.inbox.put_nowait(ToolAnswered(result))

    def on_dtmf(self, digits: str) -> None:
        self.inbox.put_nowait(KeysPressed(digits.upper()))

    # ------------------------------------------------------------ decisions

    async def _handle(self, event) -> None:
        if isinstance(event, AudioIn):
            await self._on_audio(event.pcm)
        elif isinstance(event, VadDecision):
            await self._on_vad(event)
        elif isinstance(event, Transcript):
            turn = self._turn_of(event.utterance)
            if turn is not None and not turn.over_agent:  # speech under the agent stays private until it interrupts
                self.output.send(transcript=edge_pb2.Transcript(turn_index=turn.index, text=event.text,
                                                                is_final=event.is_final))
            elif turn is not None and turn is self.user:  # its words may be what makes it an interruption
                turn.only_backchannel = is_backchannel(event.text)
                self._maybe_barge_in(turn)
        elif isinstance(event, Transcribed):
            await self._on_transcribed(event)
        elif isinstance(event, ReplyDone):
            self._on_reply_done(event.handle)
        elif isinstance(event, Playback):
            for handle in self.replies:
                if handle.turn_index == event.report.turn_index:
                    handle.played_report_ms = max(0, event.report.played_ms)
        elif isinstance(event, InputEnded):
            self.input_ended = True
            await self.recognition.finish_input()
        elif isinstance(event, RecognitionEnded):
            if event.error is not None:
                self.output.close(event.error)
                return
            self.recognition_ended = True
            if self.user is not None:  # the audio ended mid-speech: that is the end of the turn
                await self._end_user_turn(self.recognition.audio_ms)
        elif isinstance(event, ToolAnswered):
            self.generation.client_tools.answer(event.result)
        elif isinstance(event, KeysPressed):
            await self._on_keys(event.digits)
        elif isinstance(event, Failed):
            self.output.close(event.error)

    def _turn_of(self, utterance: Utterance) -> UserTurn | None:
        if self.user is not None and self.user.utterance is utterance:
            return self.user
        turn = self.finishing.get(utterance.index)
        return turn if turn is not None and turn.utterance is utterance else None

    async def _on_audio(self, pcm: bytes) -> None:
        u = self.user
        if self.recording is not None:
            self.recording.user_audio(pcm)
        await self.recognition.push(pcm, span=u.record.span if u else None)
        if u is None:
            return
        if u.over_agent:
            self._maybe_barge_in(u)
        if self.recognition.audio_ms - u.utterance.start_ms >= self.turn_taking.split_ms:
            # A monologue is cut into turns: this part is heard now, answered at the end.
            await self._end_user_turn(self.recognition.audio_ms, answer=False)
            await self._start_user_turn(self.recognition.audio_ms, continuation=True)

    async def _on_vad(self, event: VadDecision) -> None:
        u = self.user
        if event.kind == "start":
            if u is None:  # (after a VAD reopen mid-utterance, the utterance just goes on)
                await self._start_user_turn(event.offset_ms)
        elif u is None:
            return
        elif event.kind == "end":
            await self._end_user_turn(event.offset_ms, turn_score=event.turn_score)
        elif event.kind == "pause":
            self._speculate(u)
        elif event.kind == "resume" and u.speculation is not None:
            self._speculation_missed(u)

    async def _start_user_turn(self, speech_ms: int, continuation: bool = False) -> None:
        self.turn_count += 1
        index = self.turn_count
        record = self.observer.turn(index, start_time=self.recognition.audio.wall_time_at(speech_ms))
        self.observer.stt_started(record)
        self.output.send(speech_started=edge_pb2.SpeechStarted(turn_index=index, offset_ms=speech_ms))
        self._drop_unheard_replies()  # the user was not done: a reply not yet heard is stale
        over_agent = self.speech.speaking is not None and not continuation
        try:
            utterance = await self.recognition.start_utterance(index, speech_ms, span=record.stt_span)
        except StageError as error:
            self._end_turn(index, record, error=error)
            return
        # A cough must not cut the agent off: speech over it interrupts once long enough.
        self.user = UserTurn(utterance, record, over_agent=over_agent, continuation=continuation)
        if self.user.over_agent:
            self._maybe_barge_in(self.user)

    async def _end_user_turn(self, speech_end_ms: int, answer: bool = True, turn_score: float | None = None) -> None:
        u, self.user = self.user, None
        if u.over_agent:
            if speech_end_ms - u.utterance.speech_ms < self.turn_taking.barge_in_min_speech_ms:
                await self.recognition.drop_utterance(u.utterance)  # a cough, a click: the agent goes on
                self._cancel_speculation(u)
                self._end_turn(u.index, u.record, dropped=True)
                return
            if self.turn_taking.ignore_backchannels and self.speech.speaking is not None:
                u.backchannel_pending = True  # "mm-hm" or more? The final transcript says.
            else:
                u.over_agent = False  # a real turn that could not interrupt: answered after the agent
        decided = time.monotonic()
        u.utterance.speech_end_ms = speech_end_ms
        # (now, while the ring buffer surely holds the speech)
        u.level_dbfs = level_dbfs(self.recognition.audio.between(u.utterance.speech_ms, speech_end_ms))
        end_of_speech = min(self.recognition.audio.wall_time_at(speech_end_ms), decided)
        self.observer.endpointing(u.record, end_of_speech, decided, self.turn_taking, turn_score)
        self.output.send(speech_ended=edge_pb2.SpeechEnded(turn_index=u.index, offset_ms=speech_end_ms))
        u.answer, u.decided_at = answer, decided
        self.finishing[u.index] = u
        try:
            await self.recognition.end_utterance(u.utterance)
        except StageError as error:
            self._on_transcribed_error(u, error)

    async def _on_transcribed(self, event: Transcribed) -> None:
        turn = self._turn_of(event.utterance)
        if turn is None:
            return  # dropped meanwhile
        if event.error is not None:
            if turn is self.user:  # the STT failed while the user still spoke: this turn is lost
                self.user = None
                await self.recognition.drop_utterance(turn.utterance)
            self._on_transcribed_error(turn, event.error)
            return
        del self.finishing[turn.index]
        self.observer.stt_ended(turn.record, (turn.utterance.sent_ms - turn.utterance.start_ms) / 1000)
        if turn.backchannel_pending and self._heard_backchannel(turn, event.text):
            return
        text = event.text
        try:
            recorded = await self._for_the_record(text, turn.record.span)
            if self.processors.applies("user"):
                text = await self.processors.run(text, "user", turn.record.span)
        except StageError as error:  # a fail-closed processor
            self._on_transcribed_error(turn, error)
            return
        self.observer.stt_finalized(turn.record, turn.decided_at, recorded)
        if self.recording is not None:
            self.recording.transcript(turn.index, "user", recorded)
        self._how_it_was_said(turn, event.text)
        self._answer(turn, text)

    async def _for_the_record(self, text: str, span=None) -> str:
        """`text` as traces and recordings may keep it: through the "record" processors."""
        if text and (self.observer.trace_text or self.recording is not None) and self.processors.applies("record"):
            return await self.processors.run(text, "record", span)
        return text

    async def _close_recording(self) -> None:
        """The agent's words through the record processors, then everything to the store."""
        for index, text in self.recording.agent_said:
            try:
                self.recording.transcript(index, "agent", await self._for_the_record(text))
            except StageError as error:  # the redactor failed: keep nothing rather than the raw text
                log.warning("session %s turn %d: agent text not recorded: %s", self.id, index, error)
                self.recording.writer.mark_gap(f"turn {index}: agent text not recorded ({error.stage})")
        await self.recording.close()

    async def _on_keys(self, digits: str) -> None:
        """The caller's keypad: keys gather into one turn, ended by "#" or by a pause."""
        if self._keypad_timer is not None:
            self._keypad_timer.cancel()
            self._keypad_timer = None
        self.keypad += digits
        if not self.keypad:
            return
        if digits and "#" not in digits:
            loop = asyncio.get_running_loop()
            self._keypad_timer = loop.call_later(KEYPAD_PAUSE_S, self.inbox.put_nowait, KeysPressed(""))
            return
        keys, self.keypad = self.keypad, ""
        self.turn_count += 1
        index = self.turn_count
        now = time.monotonic()
        record = self.observer.turn(index)
        record.end_of_speech = now  # (voice-to-voice: from the last key to the first audio)
        turn = UserTurn(Utterance(index, self.recognition.audio_ms, self.recognition.audio_ms, now), record,
                        decided_at=now)
        if self.awaiting_consent:  # phone lines say "press 1 to agree" in their consent_text
            self.awaiting_consent = False
            agreed = keys.startswith("1")
            if agreed:
                self._start_recording("dtmf")
            self._say(turn, self.settings.consent_yes_text if agreed else self.settings.consent_no_text)
            return
        text = f"[keypad: {' '.join(keys)}]"
        self.output.send(transcript=edge_pb2.Transcript(turn_index=index, text=text, is_final=True))
        if self.recording is not None:  # keys may be a PIN or a card number: how many, not which
            self.recording.transcript(index, "user", f"[keypad: {len(keys)} keys]")
        try:
            if self.processors.applies("user"):
                text = await self.processors.run(text, "user", record.span)
        except StageError as error:
            self._end_turn(index, record, error=error)
            return
        self._answer(turn, text)

    def _heard_backchannel(self, turn: UserTurn, text: str) -> bool:
        """Speech over the agent has its final transcript: a backchannel ends unanswered and
        the agent goes on; anything else interrupts now (if it still can) and is answered."""
        turn.backchannel_pending = turn.over_agent = False
        answers_consent = self.awaiting_consent and consent_answer(text) is not None  # a "yes" that counts
        if is_backchannel(text) and not answers_consent:
            self.backchannels += 1
            self._cancel_speculation(turn)
            self._end_turn(turn.index, turn.record, dropped=True)
            return True
        self.output.send(transcript=edge_pb2.Transcript(turn_index=turn.index, text=text, is_final=True))
        reply = self.speech.speaking
        if reply is not None and self.turn_taking.interruptible and reply.interruptible_now():
            self._barge_in(turn, reply)
        return False

    def _reply_language(self, turn: UserTurn) -> str:
        """The caller's language when the STT is sure of it (English where the agent does
        not speak it); a turn it is unsure of (a short "okay") keeps the call's language."""
        u = turn.utterance
        if u.language and u.language_probability >= self.settings.language_min_probability:
            self.language = u.language if u.language in self.reply_languages else "en"
        return self.language

    def _on_transcribed_error(self, turn: UserTurn, error: StageError) -> None:
        self.finishing.pop(turn.index, None)
        self._cancel_speculation(turn)
        self._end_turn(turn.index, turn.record, error=error)

    def _answer(self, turn: UserTurn, text: str) -> None:
        if self.awaiting_consent and turn.answer and text:
            self.awaiting_consent = False  # asked once: anything but a clear answer is a no
            agreed = consent_answer(text)
            if agreed is not None:
                if agreed:
                    self._start_recording("spoken")
                self._say(turn, self.settings.consent_yes_text if agreed else self.settings.consent_no_text)
                return
        if not turn.answer:  # a monologue's part: heard now, answered with the rest
            self._cancel_speculation(turn)
            if text:
                self.monologue.append(text)
            self._end_turn(turn.index, turn.record)
            return
        spec = turn.speculation
        language = self._reply_language(turn)
        hit = (spec is not None and spec.user_text and same_words(spec.user_text, text) and not spec.done()
               and spec.language == language)
        if spec is not None and not hit:
            self._speculation_missed(turn)
        if self.monologue:  # the last part of a long utterance: answer all of it
            text = " ".join([*self.monologue, text]).strip()
            self.monologue.clear()
            if hit:
                self._cancel_speculation(turn)
                hit = False
        if not text:  # noise: nothing to answer
            self._end_turn(turn.index, turn.record)
            return
        self._drop_unheard_replies()  # this turn supersedes an answer not yet heard
        heard = text
        if self.voice_notes:  # the LLM reads how it was said too (the history keeps the note)
            heard = f"{text} {voice_note(turn.record.metrics)}"
        if hit:
            self.speculative_hits += 1
            self.observer.adopt(turn.record, spec.turn)
            spec.turn = turn.record
            handle = spec
            turn.speculation = None
        else:
            handle = SpeechHandle(turn.index, user_text=text, turn=turn.record, language=language)
        self._add_history(_message(USER, heard))
        self.speech.release(handle)
        if handle.task is None:
            self._start_reply(handle)

    # ------------------------------------------------------------ replies

    def _say(self, turn: UserTurn, text: str) -> None:
        """Fixed words as the turn's reply (not the LLM's; not kept in the history)."""
        self._cancel_speculation(turn)
        self._drop_unheard_replies()
        handle = SpeechHandle(turn.index, fixed=[(text, True)], turn=turn.record)
        self.speech.release(handle)
        self._start_reply(handle)

    def _start_recording(self, consent: str) -> None:
        self.recording = CallRecording(self.recording_store, self.id, self.settings.recording_retention_days, consent)
        self.generation.recording = self.recording
        log.info("session %s: recording (consent: %s)", self.id, consent)

    def _speak_first(self) -> None:
        fixed = []
        if self.settings.disclosure and self.settings.disclosure_text:
            fixed.append((self.settings.disclosure_text, False))
        if self.recording_store is not None and self.recording is None:
            fixed.append((self.settings.consent_text, True))  # the caller's next turn answers it
            self.awaiting_consent = True
        if self.greeting:
            fixed.append((self.greeting, True))
        if fixed:
            handle = SpeechHandle(0, fixed=fixed, turn=self.observer.turn(0))
            self.speech.release(handle)
            self._start_reply(handle)

    def _start_reply(self, handle: SpeechHandle, transcribe_from_ms: int | None = None) -> None:
        self.replies.add(handle)
        handle.task = self._spawn(self._run_reply(handle, transcribe_from_ms))

    async def _run_reply(self, handle: SpeechHandle, transcribe_from_ms: int | None) -> None:
        try:
            if transcribe_from_ms is not None:  # a speculation: the words so far first
                handle.user_text = await self.recognition.transcribe(transcribe_from_ms, span=handle.turn.span)
                if not handle.user_text:
                    return
            history = self.history if handle.released else [*self.history, _message(USER, handle.user_text)]
            if handle.user_text:
                route = self._route(handle.user_text, len(history))
                handle.turn.metrics.llm_route, handle.turn.metrics.llm_route_reason = route.pool, route.reason
            await perform_reply(self.generation, handle, list(history))
        except StageError as error:
            handle.error = error
        finally:
            self.inbox.put_nowait(ReplyDone(handle))

    def _on_reply_done(self, handle: SpeechHandle) -> None:
        self.replies.discard(handle)
        self.speech.remove(handle)
        if not handle.released or handle.interrupted or handle.turn_index in self.ended_turns:
            return  # a held speculation (its turn decides), or a reply already ended
        if handle.error is not None:
            said = handle.sent_text()
            if handle.user_text:
                self._keep_reply(handle, said)
            self._end_turn(handle.turn_index, handle.turn, error=handle.error, text=said)
            return
        text = handle.text.strip()
        if handle.user_text:
            self._keep_reply(handle, text)
        m = handle.turn.metrics
        m.speculative_hits, m.speculative_misses = self.speculative_hits, self.speculative_misses
        m.interruptions, m.backchannels = self.interruptions, self.backchannels
        trace = self.observer.answered(handle.turn, handle.audio_sent_ms)
        self.output.send(turn_metrics=m)
        self.output.send(turn_trace=trace)
        self._end_turn(handle.turn_index, None, text=text)
        if handle.end_call:  # the agent hung up (end_call), its goodbye played: the call ends with OK
            log.info("session %s: ended by the agent (end_call)", self.id)
            self.output.close()

    def _drop_unheard_replies(self, keep: SpeechHandle | None = None) -> None:
        """Answers the user has not heard a word of are stale once the user speaks on:
        each is cancelled and its turn ends empty."""
        for handle in [self.speech.speaking, *self.speech.waiting()]:
            if handle is None or handle is keep or not handle.user_text or handle.first_audio_at:
                continue
            handle.interrupt()
            self.speech.remove(handle)
            self.replies.discard(handle)
            self._end_turn(handle.turn_index, handle.turn, cancelled=True)

    def _keep_reply(self, handle: SpeechHandle, said: str) -> None:
        """Into the history: the reply's tool calls and results, then the words of its last
        round that were `said` (all of them, or what the client heard)."""
        for message in handle.exchange:
            self._add_history(message)
        earlier_words = len(handle.text[:handle.round_start].split()) if handle.exchange else 0
        said = " ".join(said.split()[earlier_words:])
        if said:
            self._add_history(_message(ASSISTANT, said))

    def _add_history(self, message: llm_pb2.ChatMessage) -> None:
        last = self.history[-1]
        if message.role == USER and last.role == USER:  # a turn whose reply was cut before a word: one message
            self.history[-1] = _message(USER, f"{last.content} {message.content}")
        else:
            self.history.append(message)
        # The LLM stage fits the history to its model's context by tokens; this bound only
        # keeps a long call's requests under the stage's message limit and the bus's payload.
        while len(self.history) > MAX_HISTORY_MESSAGES + 1:
            # The oldest turn: its user message and everything up to the next one (the
            # answer, with any tool calls and results, which must not be split).
            end = next((i for i in range(2, len(self.history)) if self.history[i].role == USER), len(self.history))
            del self.history[1:end]

    def _how_it_was_said(self, turn: UserTurn, text: str) -> None:
        """Language, speech rate and level of the turn, into its metrics and its trace."""
        u, m = turn.utterance, turn.record.metrics
        speech_seconds = max(0.001, (u.speech_end_ms - u.speech_ms) / 1000)
        m.language, m.language_probability = u.language, u.language_probability
        m.words_per_second = len(text.split()) / speech_seconds if u.speech_end_ms > u.speech_ms else 0.0
        m.level_dbfs = turn.level_dbfs
        self.observer.how_it_was_said(turn.record)

    def _route(self, user_text: str, history_messages: int) -> Route:
        if self.settings.llm_routing == "fast" and not self.llm_route_hint:
            return Route(llm.CONTRACT, "routing off (llm_routing=fast)")
        return choose_route(user_text, hint=self.llm_route_hint, tool_vocabulary=self.tool_vocabulary,
                            history_messages=history_messages)

    # ------------------------------------------------------------ speculation

    def _speculate(self, u: UserTurn) -> None:
        if (not self.turn_taking.speculation or u.speculation is not None or u.over_agent
                or self.speech.speaking is not None):
            return
        u.speculation = SpeechHandle(u.index, turn=self.observer.speculation(u.record), language=self.language)
        # All the audio so far, pause included: the final decode sees the same plus silence.
        self._start_reply(u.speculation, transcribe_from_ms=u.utterance.start_ms)

    def _speculation_missed(self, u: UserTurn) -> None:
        self.speculative_misses += 1
        self._cancel_speculation(u)

    def _cancel_speculation(self, u: UserTurn) -> None:
        spec, u.speculation = u.speculation, None
        if spec is not None:
            spec.interrupt()
            self.replies.discard(spec)
            self.observer.turn_ended(spec.turn, cancelled=True)

    # ------------------------------------------------------------ barge-in

    def _maybe_barge_in(self, u: UserTurn) -> None:
        reply = self.speech.speaking
        if reply is None:
            u.over_agent = False  # the agent finished meanwhile: an ordinary turn
            return
        tt = self.turn_taking
        spoken_ms = self.recognition.audio_ms - u.utterance.speech_ms
        if spoken_ms < tt.barge_in_min_speech_ms or not tt.interruptible or not reply.interruptible_now():
            return
        if tt.ignore_backchannels and spoken_ms < tt.backchannel_max_ms and u.only_backchannel:
            return  # nothing but "mm-hm" heard so far: wait for its words
        self._barge_in(u, reply)

    def _barge_in(self, u: UserTurn, reply: SpeechHandle) -> None:
        played = reply.played_ms()
        heard = reply.heard()
        reply.interrupt()
        self.speech.remove(reply)
        self.replies.discard(reply)
        self.output.clear_audio(reply.turn_index)
        self._drop_unheard_replies()  # an answer queued behind it is stale too
        u.over_agent = False
        self.interruptions += 1
        if reply.user_text:
            self._keep_reply(reply, heard)
        reaction_ms = (time.monotonic() - u.utterance.speech_wall) * 1000
        self.observer.barge_in(reaction_ms)
        self.observer.turn_ended(reply.turn, cancelled=True)
        self._end_turn(reply.turn_index, None, interrupted=edge_pb2.Interrupted(
            turn_index=reply.turn_index, played_ms=int(played), heard_text=heard, barge_in_reaction_ms=reaction_ms))

    # ------------------------------------------------------------ the end of a turn

    def _end_turn(self, index: int, record: TurnRecord | None, *, text: str = "", error: StageError | None = None,
                  interrupted: edge_pb2.Interrupted | None = None, dropped: bool = False,
                  cancelled: bool = False) -> None:
        """The one place a turn ends: one Error if a stage failed it, then AgentTurnEnded
        (or Interrupted). Never twice."""
        if index in self.ended_turns:
            log.error("session %s: turn %d ended twice (ignored)", self.id, index)
            return
        self.ended_turns.add(index)
        said = interrupted.heard_text if interrupted is not None else text
        if self.recording is not None and said:
            self.recording.agent_said.append((index, said))  # redacted when the recording closes
        if error is not None:
            log.warning("session %s turn %d: %s", self.id, index, error)
            self.observer.stage_failed(error)
            self.output.send(error=edge_pb2.Error(code=error.code.value[0], message=str(error), stage=error.stage))
        self.observer.turn_ended(record, error=error, dropped=dropped, cancelled=cancelled)
        if interrupted is not None:
            self.output.send(interrupted=interrupted)
        else:
            self.output.send(agent_turn_ended=edge_pb2.AgentTurnEnded(turn_index=index, text=text))
