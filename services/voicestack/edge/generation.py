"""Generation: one reply, as functions over streams.

  perform_reply              fixed words, then (for a user turn) the LLM's answer
  perform_llm_inference      LLM deltas -> TTS text (and AgentText to the client once released)
  perform_tts_inference      TTS audio -> perform_audio_forwarding
  perform_audio_forwarding   paced agent audio into the client's output lane

The LLM and TTS streams of a reply are opened together and run in one TaskGroup: when
either fails, the other is cancelled (its stage stops its work) and the reply ends with
that one StageError, raised to the session, which reports it once. A TTS replica that
dies mid-reply is replaced, and the reply resumes at the first clause whose audio had
not fully arrived (ResumableTts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import grpc
from opentelemetry.trace import Status, StatusCode

from voicestack import llm, telemetry, tts
from voicestack.edge.observer import TurnObserver
from voicestack.edge.processing import NO_PROCESSORS, ProcessorChain
from voicestack.edge.output import Output
from voicestack.edge.speech import SpeechHandle
from voicestack.edge.tool_calls import ToolError, perform_tool_calls
from voicestack.errors import StageError, stalled
from voicestack.tts.engine import split_clauses
from voicestack.v1 import edge_pb2, llm_pb2, tts_pb2

log = logging.getLogger(__name__)

ASSISTANT = llm_pb2.CHAT_ROLE_ASSISTANT

MAX_TTS_RESUMES = 2
LANGUAGE_NAMES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian",
                  "pt": "Portuguese", "hi": "Hindi", "nl": "Dutch", "ja": "Japanese", "zh": "Chinese"}
FALLBACK_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
TTS_STALL_MARGIN = 1.25


@dataclass
class GenerationContext:
    """What a reply needs from its session."""

    stages: object  # bus.StageClient, or a test's fake with the same open()
    session_id: str
    output: Output
    observer: TurnObserver
    voice: str = ""
    temperature: float = 0.3
    max_tokens: int = 0
    audio_lead_ms: float = 300.0
    stall_seconds: float = 30.0  # a stage alive but silent this long while awaited has failed
    tools: object = None  # tools.SessionTools, when the session has any
    client_tools: object = None  # tool_calls.ClientToolCalls
    tool_failure_text: str = "Sorry, I couldn't do that just now."
    goodbye_text: str = "Goodbye."
    processors: ProcessorChain = NO_PROCESSORS
    recording: object = None  # recording.CallRecording, once the caller consented
    # Per LLM pool, the stream of this session's last request: the next is asked first on
    # the replica that served it (after any failover), where the conversation's prefix is
    # still in the KV cache.
    last_llm_streams: dict = field(default_factory=dict)
    llm_affinity: bool = True


async def together(*coroutines) -> None:
    """Run the coroutines in one TaskGroup; a StageError from one cancels the others and is
    raised alone (bugs stay in their ExceptionGroup)."""
    try:
        async with asyncio.TaskGroup() as group:
            for coroutine in coroutines:
                group.create_task(coroutine)
    except BaseExceptionGroup as failures:
        stage_errors, others = failures.split(StageError)
        if others is None:
            raise _leaves(stage_errors)[0] from None
        raise


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out = []
    for error in group.exceptions:
        out += _leaves(error) if isinstance(error, BaseExceptionGroup) else [error]
    return out


class ResumableTts:
    """A TTS stream that outlives its replica (the TTS stage's Failover.OPENER): when the
    stream fails UNAVAILABLE, a new one gets the text from the first clause whose audio
    had not fully arrived, so the caller hears a short gap, not the reply again."""

    def __init__(self, ctx: GenerationContext, language: str = "en"):
        self.ctx, self.language = ctx, language
        self.resumes = 0
        self._stream = None
        self._text = ""  # everything sent
        self._resume_at = 0  # in _text: where the clause whose audio is arriving starts
        self._clause_end = 0  # ... and where it ends
        self._ended = False
        self._lock = asyncio.Lock()  # sends wait while a new stream catches up
        self._last_text_at = 0.0

    async def open(self) -> None:
        self._stream = await self.ctx.stages.open(
            tts.CONTRACT, tts_pb2.SynthesizeRequest(config=tts_pb2.TtsConfig(voice=self.ctx.voice, language=self.language)),
            session_id=self.ctx.session_id)

    async def send(self, text: str) -> None:
        async with self._lock:
            self._last_text_at = time.monotonic()
            self._text += text
            await self._stream.send(tts_pb2.SynthesizeRequest(text=text))

    async def end(self) -> None:
        async with self._lock:
            self._ended = True
            await self._stream.end()

    async def cancel(self) -> None:
        if self._stream is not None:
            await self._stream.cancel()

    async def _next_output(self, stream):
        """The stream's next output. Once it has text to speak, silence for stall_seconds
        is a failure; the clock runs from the later of the last text in and the start of
        this wait (a slow LLM, or a reply waiting its turn, is not the TTS's fault)."""
        waiting_since = time.monotonic()
        # A little longer than the LLM's own limit: when the LLM stalls, it is the one to blame.
        limit = self.ctx.stall_seconds * TTS_STALL_MARGIN
        while True:
            wait = limit
            if self._text:
                wait = max(self._last_text_at, waiting_since) + limit - time.monotonic()
                if wait <= 0:
                    raise stalled("tts", self.ctx.stall_seconds)
            try:
                async with asyncio.timeout(wait):  # (not wait_for: in 3.11 it can swallow a cancel)
                    return await anext(stream)
            except TimeoutError:
                continue

    async def outputs(self):
        while True:
            try:
                stream = aiter(self._stream)
                while True:
                    try:
                        result = await self._next_output(stream)
                    except StopAsyncIteration:
                        break
                    if result.text:  # a new clause starts: the one before arrived whole
                        self._resume_at = self._clause_end
                        found = self._text.find(result.text, self._resume_at)
                        self._clause_end = found + len(result.text) if found >= 0 else self._resume_at
                    yield result
                return
            except StageError as error:
                if error.code != grpc.StatusCode.UNAVAILABLE or self.resumes >= MAX_TTS_RESUMES:
                    raise
                await self._resume(error)

    async def _resume(self, cause: StageError) -> None:
        async with self._lock:
            self.resumes += 1
            log.warning("tts stream failing over from %s: %s; resuming at the first clause not fully delivered",
                        getattr(self._stream, "replica_id", "?"), cause.message)
            await self._stream.cancel()
            await self.open()
            rest = self._text[self._resume_at:]
            self._clause_end = self._resume_at
            if rest.strip():
                await self._stream.send(tts_pb2.SynthesizeRequest(text=rest))
            if self._ended:
                await self._stream.end()


async def perform_reply(ctx: GenerationContext, handle: SpeechHandle, history: list[llm_pb2.ChatMessage]) -> None:
    """Produce the reply: fixed words straight to TTS, or the LLM's words as they come."""
    for text, interruptible in handle.fixed:
        await perform_fixed_speech(ctx, handle, text)
        if not interruptible:
            handle.protected_ms = handle.audio_sent_ms
    if handle.user_text:
        await perform_llm_reply(ctx, handle, history)
    if handle.end_call:  # the goodbye plays out before the session hangs up (a barge-in cancels this)
        await asyncio.sleep(max(0.0, handle.audio_sent_ms - handle.played_ms()) / 1000)


async def perform_fixed_speech(ctx: GenerationContext, handle: SpeechHandle, text: str) -> None:
    span = ctx.observer.stage_span(handle.turn, "tts.synthesize", "tts", voicestack__characters=len(text))
    speech = ResumableTts(ctx, handle.language)
    try:
        with telemetry.in_span(span):
            await speech.open()
        handle.turn.tts_first_text_at = handle.turn.tts_first_text_at or time.monotonic()
        try:
            await speech.send(text)
            await speech.end()
            handle.text += (" " if handle.text else "") + text
            ctx.output.send(agent_text=_agent_text(handle, text + " "))
            await perform_tts_inference(ctx, handle, speech, span)
        except BaseException:
            await speech.cancel()
            raise
    finally:
        telemetry.end_span(span)


@dataclass
class LlmRound:
    """One LLM request of a reply: the first, or one after tool results."""

    stream: object = None
    span: object = None
    sent: float = 0.0


async def perform_llm_reply(ctx: GenerationContext, handle: SpeechHandle, history: list[llm_pb2.ChatMessage]) -> None:
    """The LLM's answer spoken as it is written. With tools, the answer is rounds: the
    model's calls are run (tool_calls.py), their results go back to it, and its words go
    on into the same TTS stream; at most max_rounds rounds offer tools."""
    messages = list(history)
    if handle.language != "en":  # (not kept in the history: the next turn may switch back)
        name = LANGUAGE_NAMES.get(handle.language, f"the language {handle.language!r}")
        messages.append(llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_SYSTEM,
                                            content=f"The caller speaks {name}. Answer in {name}."))
    tts_span = ctx.observer.stage_span(handle.turn, "tts.synthesize", "tts", voicestack__language=handle.language)
    speech = ResumableTts(ctx, handle.language)
    current = LlmRound()
    streams: dict = {}

    async def open_tts():
        with telemetry.in_span(tts_span):
            await speech.open()
            streams["tts"] = speech

    try:
        # Opened together; if one is refused the other is cancelled on the way out.
        await together(_open_llm_round(ctx, handle, messages, current, offer_tools=True), open_tts())
        await together(perform_llm_rounds(ctx, handle, messages, current, speech),
                       perform_tts_inference(ctx, handle, speech, tts_span))
    except BaseException as error:
        for stream in (current.stream, streams.get("tts")):
            if stream is not None:
                with contextlib.suppress(Exception):
                    await stream.cancel()
        if isinstance(error, StageError):
            for span in (current.span, tts_span):
                if span is not None and span.is_recording():
                    span.set_status(Status(StatusCode.ERROR, str(error)))
        raise
    finally:
        tts_span.set_attribute("voicestack.characters", len(handle.text))
        for span in (current.span, tts_span):
            if span is not None and span.is_recording():
                span.end()
    if handle.error is not None:  # a tool failed: its line was said, now the turn ends with its Error
        raise handle.error


async def _open_llm_round(ctx: GenerationContext, handle: SpeechHandle, messages: list, current: LlmRound,
                          offer_tools: bool) -> None:
    tools = ctx.tools.definitions() if ctx.tools is not None and offer_tools else []
    request = llm_pb2.GenerateRequest(messages=messages, max_tokens=ctx.max_tokens, temperature=ctx.temperature,
                                      tools=tools)
    metrics = handle.turn.metrics
    contract = llm.POOLS.get(metrics.llm_route, llm.CONTRACT)
    current.span = ctx.observer.stage_span(handle.turn, "llm.generate", "llm", voicestack__messages=len(messages),
                                           voicestack__tools=len(tools), voicestack__llm__route=contract.name,
                                           voicestack__llm__route_reason=metrics.llm_route_reason)
    current.sent = time.monotonic()
    with telemetry.in_span(current.span):  # the stage's own spans become children of this one
        try:
            current.stream = await _open_llm(ctx, contract, request, current.span)
        except StageError as error:
            # No strong replica, or none with room: the fast pool answers rather than nobody.
            if contract is llm.CONTRACT or error.code not in FALLBACK_CODES:
                raise
            metrics.llm_route = llm.CONTRACT.name
            metrics.llm_route_reason += f"; {contract.name} {error.code.name.lower()}, fell back to {llm.CONTRACT.name}"
            current.span.set_attribute("voicestack.llm.route", llm.CONTRACT.name)
            current.span.set_attribute("voicestack.llm.route_reason", metrics.llm_route_reason)
            current.stream = await _open_llm(ctx, llm.CONTRACT, request, current.span)


async def _open_llm(ctx: GenerationContext, contract, request, span):
    """On the replica of the session's last request if it would start it at once (prefix-cache
    affinity: Stage.takes_named), else on any replica of the pool."""
    previous = getattr(ctx.last_llm_streams.get(contract.name), "replica_id", "") if ctx.llm_affinity else ""
    stream = await ctx.stages.open(contract, request, session_id=ctx.session_id, replica=previous)
    ctx.last_llm_streams[contract.name] = stream
    replica = getattr(stream, "replica_id", "")
    span.set_attribute("voicestack.llm.replica", replica)
    span.set_attribute("voicestack.llm.affinity", "first" if not previous else "kept" if replica == previous else "moved")
    return stream


async def perform_llm_rounds(ctx: GenerationContext, handle: SpeechHandle, messages: list, current: LlmRound,
                             speech: ResumableTts) -> None:
    rounds = 0
    while True:
        handle.round_start = len(handle.text)
        calls = await perform_llm_inference(ctx, handle, current.stream, speech, current.sent, current.span)
        if not calls:
            break
        rounds += 1
        said = handle.text[handle.round_start:]
        if said and not said[-1].isspace():
            await speech.send(" ")  # the words before the calls end a clause: speak them now
        asked = llm_pb2.ChatMessage(role=ASSISTANT, content=said.strip(), tool_calls=calls)
        try:
            results = await perform_tool_calls(ctx, handle, calls, lambda text: perform_saying(ctx, handle, speech, text))
        except ToolError as error:
            handle.error = error
            await perform_saying(ctx, handle, speech, ctx.tool_failure_text)
            break
        handle.exchange += [asked, *results]
        messages += [asked, *results]
        if handle.end_call:
            if not said.strip():
                await perform_saying(ctx, handle, speech, ctx.goodbye_text)
            break
        current.stream = None
        await _open_llm_round(ctx, handle, messages, current, offer_tools=rounds < ctx.tools.max_rounds)
    await speech.end()


async def perform_saying(ctx: GenerationContext, handle: SpeechHandle, speech: ResumableTts, text: str) -> None:
    """Fixed words within an LLM reply (a filler, the failure line, a goodbye)."""
    text = text.strip()
    if not text:
        return
    handle.text += (" " if handle.text and not handle.text[-1].isspace() else "") + text + " "
    await speech.send(text + " ")
    if handle.released:
        ctx.output.send(agent_text=_agent_text(handle, text + " "))


async def perform_llm_inference(ctx: GenerationContext, handle: SpeechHandle, llm_stream, speech: ResumableTts,
                                llm_sent: float, span) -> list:
    """LLM deltas to TTS as they arrive, and to the client once the reply is released
    (a speculative reply's words stay private until its turn ends); the round's tool
    calls, if the model made any."""
    pending: list[str] = []
    calls: list = []
    deltas = aiter(llm_stream)
    # With agent processors the text goes to the TTS clause by clause, each processed first
    # (the clause is their look-ahead); the TTS waits for a clause's end anyway.
    by_clause = ctx.processors.applies("agent")
    unprocessed = ""

    async def say(text: str) -> None:
        handle.text += text
        pending.append(text)
        await speech.send(text)

    async def say_clauses(final: bool = False) -> None:
        nonlocal unprocessed
        clauses, unprocessed = split_clauses(unprocessed, final=final, first=not handle.text.strip())
        for clause in clauses:
            await say(await ctx.processors.clause(clause, span) + " ")

    while True:
        try:
            async with asyncio.timeout(ctx.stall_seconds):
                delta = await anext(deltas)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise stalled("llm", ctx.stall_seconds) from None
        metrics = handle.turn.metrics
        if delta.text_delta or delta.tool_calls:
            if not metrics.llm_first_token_ms:
                ctx.observer.first_token(handle.turn, llm_sent, span)
        if delta.text_delta and by_clause:
            unprocessed += delta.text_delta
            await say_clauses()
        elif delta.text_delta:
            await say(delta.text_delta)
        calls += delta.tool_calls
        metrics.completion_tokens = delta.completion_tokens or metrics.completion_tokens
        if handle.released and pending:
            ctx.output.send(agent_text=_agent_text(handle, "".join(pending)))
            pending.clear()
    await say_clauses(final=True)
    span.set_attribute("gen_ai.usage.output_tokens", handle.turn.metrics.completion_tokens)
    span.end()
    if pending:
        await handle.wait_released()
        ctx.output.send(agent_text=_agent_text(handle, "".join(pending)))
    return calls


async def perform_tts_inference(ctx: GenerationContext, handle: SpeechHandle, speech: ResumableTts, span) -> None:
    """TTS audio to the client. The stream is read as fast as it comes and forwarding paces
    it, so a replica's death is noticed, and the reply resumed on another, while the audio
    already here still plays (read behind the pacing, the resume began only once it had)."""
    received: asyncio.Queue = asyncio.Queue()

    async def read() -> None:
        async for result in speech.outputs():
            received.put_nowait(result)
        received.put_nowait(None)

    async def forward() -> None:
        while (result := await received.get()) is not None:
            await perform_audio_forwarding(ctx, handle, result, span)

    await together(read(), forward())


async def perform_audio_forwarding(ctx: GenerationContext, handle: SpeechHandle,
                                   result: tts_pb2.SynthesizeResponse, span=None) -> None:
    """One chunk of agent audio to the client, once this reply may speak, paced to stay at
    most audio_lead_ms ahead of playback (so a barge-in has little to take back)."""
    await handle.wait_to_speak()
    if not handle.first_audio_at:
        ctx.observer.first_audio(handle.turn, span)
    else:
        ahead = handle.audio_sent_ms - (time.monotonic() - handle.first_audio_at) * 1000
        if ahead > ctx.audio_lead_ms:
            await asyncio.sleep((ahead - ctx.audio_lead_ms) / 1000)
    if handle.interrupted:  # (never a chunk of an interrupted reply, whatever woke this task)
        raise asyncio.CancelledError()
    audio = result.audio
    handle.add_audio(len(audio.pcm) / 2 / max(1, audio.sample_rate_hz) * 1000, result.text)
    ctx.output.send_audio(handle.turn_index, audio)
    if ctx.recording is not None:
        ctx.recording.agent_audio(audio.pcm, audio.sample_rate_hz)


def _agent_text(handle: SpeechHandle, text: str) -> edge_pb2.AgentText:
    return edge_pb2.AgentText(turn_index=handle.turn_index, text_delta=text)
