"""The load generator: N concurrent Converse sessions, each a caller who listens to the
agent's opening, then asks T questions in real speech at real-time pace, waiting for
each answer before the next, with an open microphone (silence frames) in between.

Per turn it keeps the edge's TurnMetrics (voice-to-voice and each stage) and the
voice-to-voice seen at the client (last speech frame sent -> first agent audio
received). Per level it counts errors by gRPC status code and sessions refused.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import sys
import time
from dataclasses import dataclass, field

import grpc

from load.stats import STAGE_METRICS, fmt_ms, percentile, summarize, summarize_turns
from voicestack.audio import PIPELINE_RATE
from voicestack.client import Conversation, frames
from voicestack.errors import code_from_int
from voicestack.v1 import audio_pb2, edge_pb2, edge_pb2_grpc

FRAME_MS = 20
OPENING_GRACE_S = 3.0  # no word of an opening by then: the edge has no disclosure, start talking
REFUSALS = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)


@dataclass
class Plan:
    """What every session of a level does."""

    sessions: int = 1
    turns: int = 1
    ramp_s: float = 0.0  # sessions start evenly spread over this long
    turn_timeout_s: float = 60.0  # end of speech to the end of the answer
    gap_ms: int = 300  # silence after an answer, before the next question
    silence_ms: int = 0  # endpointing silence for the session (0 = the edge's default)
    frame_ms: int = FRAME_MS
    wait_opening: bool = True  # listen to the agent's disclosure before the first question

    def session_config(self) -> edge_pb2.SessionConfig:
        config = edge_pb2.SessionConfig()
        config.input_format.sample_rate_hz = PIPELINE_RATE
        config.input_format.encoding = audio_pb2.AUDIO_ENCODING_PCM16
        if self.silence_ms:
            config.endpointing.silence_ms = self.silence_ms
        return config


@dataclass
class Live:
    """Counters the progress line and a capacity sampler read while a level runs."""

    plan: Plan
    started: int = 0
    active: int = 0
    finished: int = 0
    refused: int = 0
    turns_ok: int = 0
    turns_failed: int = 0
    v2v: list = field(default_factory=list)
    errors: collections.Counter = field(default_factory=collections.Counter)
    send_lag_ms: list = field(default_factory=list)  # sampled: how late frames left
    began: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        p50 = percentile(self.v2v[-200:], 50) if self.v2v else math.nan
        errors = sum(self.errors.values())
        return (f"[{time.monotonic() - self.began:6.1f}s] sessions {self.plan.sessions}: "
                f"{self.active} active, {self.finished} done, {self.refused} refused | "
                f"turns {self.turns_ok}/{self.plan.sessions * self.plan.turns} ok, {self.turns_failed} failed | "
                f"v2v p50 {fmt_ms(p50)} ms | errors {errors}")


class _Pacer:
    """Frames leave at real-time pace from an absolute schedule (no drift); lateness is kept."""

    def __init__(self, frame_s: float, live: Live):
        self.frame_s = frame_s
        self.live = live
        self.start = time.monotonic()
        self.sent = 0

    async def next(self) -> None:
        self.sent += 1
        due = self.start + self.sent * self.frame_s
        now = time.monotonic()
        if self.sent % 10 == 0:  # a sample of how late frames leave (the client's own overload)
            self.live.send_lag_ms.append(max(0.0, now - due) * 1000)
        if now < due:
            await asyncio.sleep(due - now)


class _Session:
    def __init__(self, index: int, address: str, plan: Plan, speech: list, live: Live):
        self.index, self.address, self.plan, self.speech, self.live = index, address, plan, speech, live
        self.conversation = Conversation()
        self.turns: list[dict] = []
        self.started_at = self.ended_at = 0.0
        self.first_audio: dict[int, float] = {}  # turn index -> when its first agent audio arrived
        self.speech_started: list[int] = []  # turn indexes the edge opened, in order
        self.call_done = False
        self.refused = False
        self.error_codes: collections.Counter = collections.Counter()

    # ---------------------------------------------------------------- what the caller says

    def _reply_over(self, turn_index: int) -> bool:
        turn = self.conversation.turns.get(turn_index)
        return bool(turn and (turn.ended or turn.interrupted))

    async def _requests(self):
        plan, quiet = self.plan, bytes(PIPELINE_RATE * self.plan.frame_ms // 1000 * 2)
        yield edge_pb2.ConverseRequest(config=plan.session_config())
        pacer = _Pacer(plan.frame_ms / 1000, self.live)

        if plan.wait_opening:  # a caller listens to the agent's opening words first
            deadline = time.monotonic() + plan.turn_timeout_s
            while not self.call_done and time.monotonic() < deadline and not self._reply_over(0):
                if 0 not in self.conversation.turns and self.started_at and time.monotonic() - self.started_at > OPENING_GRACE_S:
                    break
                yield edge_pb2.ConverseRequest(audio=edge_pb2.AudioFrame(pcm=quiet))
                await pacer.next()

        for j in range(plan.turns):
            if self.call_done:
                return
            text, audio = self.speech[(self.index + j) % len(self.speech)]
            opened_before = len(self.speech_started)
            errors_before = len(self.conversation.errors)
            chunks = frames(audio, plan.frame_ms)
            for k, pcm in enumerate(chunks):
                if k == len(chunks) - 1:
                    end_of_speech = time.monotonic()
                yield edge_pb2.ConverseRequest(audio=edge_pb2.AudioFrame(pcm=pcm))
                await pacer.next()
            concurrent = self.live.active
            outcome = ""
            while True:
                opened = self.speech_started[opened_before:]
                if opened and self._reply_over(opened[-1]):
                    outcome = "ok"
                elif len(self.conversation.errors) > errors_before:
                    error = self.conversation.errors[errors_before]
                    outcome = code_from_int(error.code).name
                elif self.call_done:
                    outcome = "CALL_ENDED"
                elif time.monotonic() - end_of_speech > plan.turn_timeout_s:
                    outcome = "TURN_TIMEOUT" if opened else "TURN_TIMEOUT (no speech heard)"
                if outcome:
                    break
                yield edge_pb2.ConverseRequest(audio=edge_pb2.AudioFrame(pcm=quiet))
                await pacer.next()
            self._record_turn(j, text, opened[-1] if opened else -1, end_of_speech, concurrent, outcome)
            if outcome != "ok" and outcome != "CALL_ENDED":
                self.error_codes[outcome] += 1
            for _ in range(plan.gap_ms // plan.frame_ms):
                yield edge_pb2.ConverseRequest(audio=edge_pb2.AudioFrame(pcm=quiet))
                await pacer.next()
        # Done talking: close our side; the edge finishes and ends the call with OK.

    def _record_turn(self, j: int, text: str, turn_index: int, end_of_speech: float, concurrent: int, outcome: str) -> None:
        turn = self.conversation.turns.get(turn_index)
        metrics = turn.metrics if turn else None
        record = {
            "session": self.index, "turn": j + 1, "turn_index": turn_index, "ok": outcome == "ok",
            "outcome": outcome, "question": text, "concurrent": concurrent,
            "transcript": turn.transcript if turn else "", "reply_chars": len(turn.reply_text) if turn else 0,
            "voice_to_voice_ms": 0.0, "client_v2v_ms": 0.0,
            **{m: 0.0 for m in STAGE_METRICS},
        }
        if metrics is not None:
            record["voice_to_voice_ms"] = metrics.voice_to_voice_ms
            for m in STAGE_METRICS:
                record[m] = getattr(metrics, m)
        if turn_index in self.first_audio:
            record["client_v2v_ms"] = (self.first_audio[turn_index] - end_of_speech) * 1000
        if record["ok"] and not record["voice_to_voice_ms"]:  # e.g. interrupted before any audio
            record["ok"], record["outcome"] = False, "NO_AUDIO"
        self.turns.append(record)
        if record["ok"]:
            self.live.turns_ok += 1
            self.live.v2v.append(record["voice_to_voice_ms"])
        else:
            self.live.turns_failed += 1

    # ---------------------------------------------------------------- what the caller hears

    async def run(self, timeout: float) -> None:
        live = self.live
        live.started += 1
        async with grpc.aio.insecure_channel(self.address) as channel:
            call = edge_pb2_grpc.EdgeServiceStub(channel).Converse(self._requests(), timeout=timeout)
            try:
                async for event in call:
                    kind = event.WhichOneof("kind")
                    if kind == "session_started":
                        self.started_at = time.monotonic()
                        live.active += 1
                    elif kind == "speech_started":
                        self.speech_started.append(event.speech_started.turn_index)
                    elif kind == "agent_audio":
                        self.first_audio.setdefault(event.agent_audio.turn_index, time.monotonic())
                    elif kind == "error":
                        code = code_from_int(event.error.code).name
                        self.error_codes[f"{code} ({event.error.stage or 'edge'})"] += 1
                    self.conversation.record(event)
            except grpc.aio.AioRpcError as error:
                self.conversation.status, self.conversation.details = error.code(), error.details()
                if not self.started_at and error.code() in REFUSALS:
                    self.refused = True
                elif error.code() != grpc.StatusCode.CANCELLED or self.turns_left():
                    self.error_codes[error.code().name] += 1
            finally:
                self.call_done = True
                call.cancel()
        self.ended_at = time.monotonic()
        if self.started_at:
            live.active -= 1
        live.finished += 1
        live.refused += self.refused
        live.errors.update(self.error_codes)

    def turns_left(self) -> bool:
        return len(self.turns) < self.plan.turns


async def _progress(live: Live, stop: asyncio.Event, stream=sys.stderr, every: float = 0.5) -> None:
    tty = stream.isatty()
    last_plain = 0.0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
        if tty:
            stream.write("\r" + live.line().ljust(110))
            stream.flush()
        elif time.monotonic() - last_plain >= 5.0 or stop.is_set():
            stream.write(live.line() + "\n")
            stream.flush()
            last_plain = time.monotonic()
    if tty:
        stream.write("\r" + live.line().ljust(110) + "\n")
        stream.flush()


async def run_level(address: str, plan: Plan, speech: list, live: Live | None = None, progress: bool = True) -> dict:
    """Run one load level and return its record (per-turn data, summaries, failures)."""
    live = live or Live(plan)
    live.began = time.monotonic()
    stop = asyncio.Event()
    reporter = asyncio.create_task(_progress(live, stop)) if progress else None
    sessions = [_Session(i, address, plan, speech, live) for i in range(plan.sessions)]
    longest = max(len(a) for _, a in speech) / PIPELINE_RATE
    call_timeout = 60 + plan.turn_timeout_s * (plan.turns + 1) + plan.turns * (longest + 1)

    async def start(session: _Session, delay: float) -> None:
        await asyncio.sleep(delay)
        await session.run(call_timeout)

    began = time.monotonic()
    try:
        await asyncio.gather(*(start(s, plan.ramp_s * i / plan.sessions) for i, s in enumerate(sessions)))
    finally:
        stop.set()
        if reporter:
            await reporter
    ended = time.monotonic()

    turns = [t for s in sessions for t in s.turns]
    served = [s for s in sessions if s.started_at]
    steady = None
    if len(served) == plan.sessions and served:
        window = (max(s.started_at for s in served), min(s.ended_at for s in served))
        if window[1] > window[0]:
            steady = [window[0] - began, window[1] - began]
    return {
        "sessions": plan.sessions,
        "turns_planned": plan.sessions * plan.turns,
        "turns_ok": sum(t["ok"] for t in turns),
        "plan": {k: getattr(plan, k) for k in ("turns", "ramp_s", "turn_timeout_s", "gap_ms", "silence_ms", "frame_ms")},
        "summary": summarize_turns(turns),
        "errors": dict(live.errors),
        "refused": live.refused,
        "duration_s": ended - began,
        "steady_window_s": steady,  # when all sessions were in their call at once
        "send_lag_ms": summarize(live.send_lag_ms),
        "turns": turns,
    }


def merge_levels(levels: list[dict]) -> dict:
    """Runs of the same level one after another, as one record (turns pooled)."""
    turns = [t for level in levels for t in level["turns"]]
    errors: collections.Counter = collections.Counter()
    for level in levels:
        errors.update(level["errors"])
    return {
        **levels[0],
        "turns_planned": sum(level["turns_planned"] for level in levels),
        "turns_ok": sum(level["turns_ok"] for level in levels),
        "summary": summarize_turns(turns),
        "errors": dict(errors),
        "refused": sum(level["refused"] for level in levels),
        "duration_s": sum(level["duration_s"] for level in levels),
        "runs": len(levels),
        "turns": turns,
    }
