"""The agent's replies: one handle per reply, and the scheduler that lets them speak one
at a time, in the order they were released.

A SpeechHandle lives from the moment a reply is started (its words may be generated
before it may speak: a speculative reply is held until its turn ends, a reply behind
another waits for it) until its last audio chunk is queued for the client, or it is
interrupted, or it fails. It knows what was sent and how much the client played, so the
history can keep only what was heard.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from voicestack.errors import StageError


def heard_text(spoken: list[tuple[str, float]], played_ms: float, sent_ms: float) -> str:
    """The words of `spoken` [(clause, audio ms where it starts)] within the first
    `played_ms` of audio (`sent_ms` in all): whole clauses, and of the clause playing,
    words in proportion to the time."""
    words: list[str] = []
    for i, (text, start_ms) in enumerate(spoken):
        end_ms = spoken[i + 1][1] if i + 1 < len(spoken) else sent_ms
        if played_ms >= end_ms:
            words += text.split()
        elif played_ms > start_ms:
            clause = text.split()
            words += clause[: int(len(clause) * (played_ms - start_ms) / max(1.0, end_ms - start_ms))]
    return " ".join(words)


@dataclass(eq=False)  # a handle is itself: kept in sets, compared by identity
class SpeechHandle:
    """One reply: to a user turn (`user_text`, answered by the LLM), or fixed words spoken
    without it (`fixed`: [(text, interruptible)], the disclosure and the greeting)."""

    turn_index: int
    user_text: str = ""
    language: str = "en"  # the reply's: the LLM is asked to answer in it, the TTS speaks it
    fixed: list = field(default_factory=list)
    turn: object = None  # the observer's record of the turn (spans, metrics)
    text: str = ""  # all the text generated so far
    spoken: list = field(default_factory=list)  # (clause, audio ms where it starts), as sent
    audio_sent_ms: float = 0.0
    first_audio_at: float = 0.0
    played_report_ms: int = -1
    protected_ms: float = -1.0  # audio before this cannot be interrupted (-1: none; 0: not yet known)
    error: StageError | None = None
    interrupted: bool = False
    # Tool rounds: the assistant calls and tool results so far (for the history), where
    # the text of the round now generating starts, and what the calls asked for.
    exchange: list = field(default_factory=list)
    round_start: int = 0
    filler_spoken: bool = False
    end_call: bool = False
    task: asyncio.Task | None = None
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    _may_speak: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        if any(not interruptible for _, interruptible in self.fixed):
            self.protected_ms = 0.0

    # ------------------------------------------------------------ order

    @property
    def released(self) -> bool:
        return self._released.is_set()

    async def wait_released(self) -> None:
        await self._released.wait()

    async def wait_to_speak(self) -> None:
        """Until this reply is released (a held speculation is not) and its turn to speak."""
        await self._released.wait()
        await self._may_speak.wait()

    def done(self) -> bool:
        return self.task is not None and self.task.done()

    def interrupt(self) -> None:
        """Stop the reply now: its task cancels the LLM and TTS streams on the way out."""
        self.interrupted = True
        if self.task is not None:
            self.task.cancel()

    # ------------------------------------------------------------ what was heard

    def add_audio(self, ms: float, clause: str = "") -> None:
        now = time.monotonic()
        if not self.first_audio_at:
            self.first_audio_at = now
        if clause:
            self.spoken.append((clause, self.audio_sent_ms))
        self.audio_sent_ms += ms

    def played_ms(self) -> float:
        """The client's report if it sent one, else the clock since the first chunk."""
        if self.played_report_ms >= 0:
            played = self.played_report_ms
        elif self.first_audio_at:
            played = (time.monotonic() - self.first_audio_at) * 1000
        else:
            played = 0.0
        return min(played, self.audio_sent_ms)

    def heard(self) -> str:
        return heard_text(self.spoken, self.played_ms(), self.audio_sent_ms)

    def sent_text(self) -> str:
        return heard_text(self.spoken, self.audio_sent_ms, self.audio_sent_ms)

    def interruptible_now(self) -> bool:
        if self.protected_ms < 0:
            return True
        return self.protected_ms > 0 and self.played_ms() >= self.protected_ms


class SpeechScheduler:
    """Released replies speak one at a time, in release order: the head may speak, the
    ones behind it generate and wait."""

    def __init__(self) -> None:
        self._queue: deque[SpeechHandle] = deque()

    def release(self, handle: SpeechHandle) -> None:
        if handle in self._queue:
            return
        handle._released.set()
        self._queue.append(handle)
        self._advance()

    def remove(self, handle: SpeechHandle) -> None:
        """The handle is done (finished, failed or interrupted): the next may speak."""
        if handle in self._queue:
            self._queue.remove(handle)
        self._advance()

    def _advance(self) -> None:
        if self._queue:
            self._queue[0]._may_speak.set()

    @property
    def speaking(self) -> SpeechHandle | None:
        """The reply whose audio goes out now (or would, were it generated)."""
        return self._queue[0] if self._queue else None

    def waiting(self) -> list[SpeechHandle]:
        return list(self._queue)[1:]
