"""Turn-taking settings per session, and how a speculative transcript is matched to the
final one."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from voicestack.edge.recognition import STT_MAX_UTTERANCE_MS
from voicestack.audio import PIPELINE_RATE
from voicestack.config import Settings
from voicestack.v1 import edge_pb2, vad_pb2

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
    ignore_backchannels: bool = Settings.ignore_backchannels
    backchannel_max_ms: int = Settings.backchannel_max_ms
    # "silence": the turn ends after silence_ms; "model": the end-of-turn model decides at
    # each pause of turn_pause_ms, and the turn ends after max_wait_ms of silence at most.
    mode: str = Settings.endpointing_mode
    turn_threshold: float = Settings.turn_threshold
    turn_pause_ms: int = Settings.turn_pause_ms
    max_wait_ms: int = Settings.turn_max_wait_ms

    @classmethod
    def from_config(cls, config: edge_pb2.SessionConfig, settings) -> "TurnTaking":
        e, i = config.endpointing, config.interruption
        speculation = {edge_pb2.SPECULATION_MODE_ON: True, edge_pb2.SPECULATION_MODE_OFF: False}
        modes = {edge_pb2.ENDPOINTING_MODE_SILENCE: "silence", edge_pb2.ENDPOINTING_MODE_MODEL: "model"}
        return cls(
            mode=modes.get(e.mode, settings.endpointing_mode),
            turn_threshold=e.turn_threshold or settings.turn_threshold,
            turn_pause_ms=e.turn_pause_ms or settings.turn_pause_ms,
            max_wait_ms=e.max_wait_ms or settings.turn_max_wait_ms,
            silence_ms=e.silence_ms or cls.silence_ms,
            min_speech_ms=e.min_speech_ms or cls.min_speech_ms,
            max_utterance_ms=e.max_utterance_ms or cls.max_utterance_ms,
            speculation=speculation.get(e.speculation, settings.speculation),
            speculative_pause_ms=e.speculative_pause_ms or cls.speculative_pause_ms,
            interruptible=not i.disabled,
            barge_in_min_speech_ms=i.min_speech_ms or settings.barge_in_min_speech_ms,
            ignore_backchannels={edge_pb2.BACKCHANNELS_IGNORE: True, edge_pb2.BACKCHANNELS_INTERRUPT: False}.get(
                i.backchannels, settings.ignore_backchannels),
            backchannel_max_ms=i.backchannel_max_ms or settings.backchannel_max_ms,
        )

    @property
    def end_silence_ms(self) -> int:
        """The silence that ends a turn whatever else happens."""
        return self.max_wait_ms if self.mode == "model" else self.silence_ms

    def vad_config(self) -> vad_pb2.VadConfig:
        model = self.mode == "model"
        return vad_pb2.VadConfig(
            sample_rate_hz=PIPELINE_RATE, min_speech_ms=self.min_speech_ms,
            min_silence_ms=self.end_silence_ms,
            pause_ms=self.speculative_pause_ms if self.speculation else 0,
            turn_model=model, turn_threshold=self.turn_threshold if model else 0.0,
            turn_pause_ms=self.turn_pause_ms if model else 0)

    @property
    def split_ms(self) -> int:
        """A monologue is cut at this length, always under what the STT takes."""
        return min(self.max_utterance_ms, STT_MAX_UTTERANCE_MS - 1000)


# What a listener says to show they follow, not to take the turn, as Whisper writes it
# ("Mm-hmm.", "M-HUM.", "Uh-huh.", "Yeah, yeah.", "You're right."), repeated or combined,
# with the filler Whisper often puts first ("and", "well") or hears in a breath ("you").
# HUM is every hum-like word (mm, hmm, mhm, uh, huh, um, and Whisper's "mem home" for a
# long one). Anything else is a turn.
HUM = r"(?:[mh]+[aeiou]?)+m*s?|u+h*|a+h+|o+h+"
BACKCHANNEL_WORDS = (
    "yeah|yea|yep|yup|yes|ya|right|okay|ok|sure|i see|got it|i got it|alright|all right|cool|nice|wow|"
    "exactly|totally|true|go on|indeed|thanks|thank you|you re right|that s right|that s true|makes sense|"
    "fair enough|of course|sounds good|good|great|fine|perfect|i know|and|well|so|oh|huh|you")
BACKCHANNEL = re.compile(rf"(?:\b(?:{HUM}|{BACKCHANNEL_WORDS})\b ?)+")


def is_backchannel(text: str) -> bool:
    """Whether a transcript of speech over the agent is only a backchannel (or nothing)."""
    words = normalized(text)
    return not words or BACKCHANNEL.fullmatch(words) is not None


def normalized(text: str) -> str:
    return " ".join("".join(c.lower() if c.isalnum() else " " for c in text).split())


def same_words(a: str, b: str) -> bool:
    """Whether a speculative transcript matches the final one: the same words, allowing
    about one in five to differ (Whisper may hear "of" as "on" with a little more audio)."""
    a_words, b_words = normalized(a).split(), normalized(b).split()
    return bool(a_words) and difflib.SequenceMatcher(None, a_words, b_words).ratio() >= SAME_WORDS_RATIO
