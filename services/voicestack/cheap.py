"""Cheap engines: trivial, deterministic stand-ins for the four models.

FOR MEASURING THE EDGE AND THE BUS ONLY. With `cheap_engines` on (env
VOICESTACK_CHEAP_ENGINES=1, flag --cheap-engines) every stage answers at once, so
what a load test measures is the session edge, NATS and the stream layer: sessions
per edge core, messages per session, the bus's share of voice-to-voice. A stack
running these engines says nothing about whether the pipeline works: the VAD only
looks at loudness, STT always hears the same sentence, the LLM always gives the same
reply and TTS speaks silence. Never use a result from them as evidence that speech
is understood or spoken.

Each class has the interface of the real engine it replaces, so the stage servers
use them unchanged:
  EnergyVad    like vad.engine.SileroVad: open() -> a VadStream (feed()/flush() ->
               VadEvent), with a loudness threshold in place of the model.
  FixedStt     like stt.engine.WhisperEngine: transcribe(audio) -> a fixed sentence.
  FixedLlm     like llm.engine.LlamaCppEngine: async stream() -> a fixed reply as
               a few Deltas, the last with finish_reason and token counts.
  SilentTts    like tts.engine.KokoroEngine: synthesize() -> int16 silence at
               24 kHz, as long as the text would take to say.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import numpy as np

from voicestack.audio import VAD_WINDOW_SAMPLES
from voicestack.llm.engine import Delta
from voicestack.vad.engine import CONTEXT_SAMPLES, VadStream

ENERGY_THRESHOLD = 0.01  # RMS of a 32 ms frame (full scale 1.0): above it is "speech"
TRANSCRIPT = "What is the capital of France?"
REPLY = "The capital of France is Paris, a city on the Seine."
SECONDS_PER_CHAR = 0.065  # about how fast Kokoro speaks English text


class EnergyVad:
    """SileroVad's interface with RMS energy in place of the model.

    The streams are the real `VadStream`s (same segmenter, same events and offsets);
    only the per-frame speech probability is replaced: 1.0 when the frame is loud.
    """

    FRAME_SAMPLES = VAD_WINDOW_SAMPLES  # VadStream cuts the same windows as for Silero

    def __init__(self, threshold: float = ENERGY_THRESHOLD):
        self.threshold = threshold

    def open(self, threshold=0.5, min_silence_ms=500, min_speech_ms=100, pause_ms=0) -> VadStream:
        return VadStream(self, threshold, min_silence_ms, min_speech_ms, pause_ms)

    def _probs(self, frames: np.ndarray, h: np.ndarray, c: np.ndarray):
        new = frames[:, CONTEXT_SAMPLES:]  # each row is 64 samples of context + the frame
        rms = np.sqrt(np.mean(np.square(new), axis=1))
        return (rms > self.threshold).astype(np.float32), h, c


class FixedStt:
    """WhisperEngine's interface: every utterance is heard as the same sentence."""

    sample_rate = 16000

    def __init__(self, text: str = TRANSCRIPT):
        self.text = text

    def transcribe(self, audio: np.ndarray) -> str:
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"expected mono 1-D audio, got shape {audio.shape}")
        if len(audio) < self.sample_rate // 10:  # as Whisper's engine: too short to hold a word
            return ""
        return self.text


class FixedLlm:
    """LlamaCppEngine's interface: the same reply, a word per Delta, at once."""

    model_name = "cheap-fixed-reply"

    def __init__(self, reply: str = REPLY):
        self.reply = reply

    async def stream(self, messages: list[dict], max_tokens: int, temperature: float) -> AsyncIterator[Delta]:
        words = self.reply.split(" ")[: max(1, max_tokens)]
        prompt = sum(len(m.get("content", "").split()) for m in messages)
        for n, word in enumerate(words, 1):
            await asyncio.sleep(0)  # a real engine yields to the loop between tokens
            yield Delta(word if n == 1 else " " + word, completion_tokens=n, prompt_tokens=prompt)
        yield Delta("", "stop" if len(words) == len(self.reply.split(" ")) else "length", len(words), prompt)

    async def aclose(self) -> None:
        return None


class SilentTts:
    """KokoroEngine's interface: silence as long as the text would take to say."""

    sample_rate = 24000
    default_voice = "silence"

    def voices(self) -> list[str]:
        return [self.default_voice]

    def synthesize(self, text: str, voice: str = "", speed: float = 1.0) -> np.ndarray:
        voice = voice or self.default_voice
        if voice not in self.voices():
            raise ValueError(f"unknown voice {voice!r}; available: {', '.join(self.voices())}")
        if not speed > 0:
            raise ValueError(f"speed must be positive, got {speed}")
        seconds = len(text.strip()) * SECONDS_PER_CHAR / speed
        return np.zeros(int(seconds * self.sample_rate), np.int16)
