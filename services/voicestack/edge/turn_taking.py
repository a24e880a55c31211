"""Turn-taking settings per session, and how a speculative transcript is matched to the
final one."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from voicestack.edge.recognition import STT_MAX_UTTERANCE_MS
from voicestack.v1 import edge_pb2

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

    @property
    def split_ms(self) -> int:
        """A monologue is cut at this length, always under what the STT takes."""
        return min(self.max_utterance_ms, STT_MAX_UTTERANCE_MS - 1000)


def normalized(text: str) -> str:
    return " ".join("".join(c.lower() if c.isalnum() else " " for c in text).split())


def same_words(a: str, b: str) -> bool:
    """Whether a speculative transcript matches the final one: the same words, allowing
    about one in five to differ (Whisper may hear "of" as "on" with a little more audio)."""
    a_words, b_words = normalized(a).split(), normalized(b).split()
    return bool(a_words) and difflib.SequenceMatcher(None, a_words, b_words).ratio() >= SAME_WORDS_RATIO
