"""What arrives in a session's inbox: one dataclass per kind of event, taken in order by
the session's one task (session.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from voicestack.edge.recognition import Utterance
from voicestack.edge.speech import SpeechHandle
from voicestack.errors import ServiceError, StageError
from voicestack.v1 import edge_pb2


@dataclass
class AudioIn:
    pcm: bytes


@dataclass
class Playback:
    report: edge_pb2.PlaybackPosition


@dataclass
class InputEnded:
    pass


@dataclass
class Failed:
    error: ServiceError  # the call ends with this status


@dataclass
class VadDecision:
    kind: str  # "start" | "pause" | "resume" | "end"
    offset_ms: int
    turn_score: float | None = None  # "end" decided by the end-of-turn model: its score


@dataclass
class Transcript:
    utterance: Utterance
    text: str
    is_final: bool


@dataclass
class Transcribed:
    utterance: Utterance
    text: str
    error: StageError | None


@dataclass
class RecognitionEnded:
    error: StageError | None


@dataclass
class KeysPressed:
    digits: str  # the caller's keypad (Dtmf), "" when the pause after the last key is over


@dataclass
class ToolAnswered:
    result: edge_pb2.ToolResult  # the client's answer to a ToolCall


@dataclass
class ReplyDone:
    handle: SpeechHandle


class HooksToInbox:
    """RecognitionHooks that only enqueue: recognition's tasks never decide anything."""

    def __init__(self, inbox: asyncio.Queue):
        self.inbox = inbox

    def on_start_of_speech(self, offset_ms: int) -> None:
        self.inbox.put_nowait(VadDecision("start", offset_ms))

    def on_speech_paused(self, offset_ms: int) -> None:
        self.inbox.put_nowait(VadDecision("pause", offset_ms))

    def on_speech_resumed(self, offset_ms: int) -> None:
        self.inbox.put_nowait(VadDecision("resume", offset_ms))

    def on_end_of_speech(self, offset_ms: int, turn_score: float | None = None) -> None:
        self.inbox.put_nowait(VadDecision("end", offset_ms, turn_score))

    def on_transcript(self, utterance: Utterance, text: str, is_final: bool) -> None:
        self.inbox.put_nowait(Transcript(utterance, text, is_final))

    def on_utterance_transcribed(self, utterance: Utterance, text: str, error: StageError | None) -> None:
        self.inbox.put_nowait(Transcribed(utterance, text, error))

    def on_recognition_ended(self, error: StageError | None) -> None:
        self.inbox.put_nowait(RecognitionEnded(error))
