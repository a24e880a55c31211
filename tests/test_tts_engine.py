"""The Kokoro TTS engine on the real model: the audio must be speech Whisper can read back."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from voicestack import models
from voicestack.tts.engine import MAX_TOKENS, KokoroEngine, _chunks

FOX = "The quick brown fox jumps over the lazy dog."

# 89 words, about 570 tokens: more than one model context, so it must be chunked.
LONG = (
    "Voice agents feel natural only when they answer quickly. When the caller stops speaking, "
    "the system has to notice the silence, transcribe the final words, ask the language model "
    "for a reply, and start speaking the first sentence before the rest of the answer exists. "
    "Every stage streams its output to the next one, so the delays overlap instead of adding up. "
    "If the caller interrupts, everything still queued is cancelled at once, and the conversation "
    "history keeps only the words the caller actually heard before the interruption happened."
)


@pytest.fixture(scope="module")
def engine() -> KokoroEngine:
    return KokoroEngine()


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


def _to_16k(pcm: np.ndarray, rate: int) -> np.ndarray:
    samples = pcm.astype(np.float32) / 32768.0
    positions = np.arange(0, len(samples), rate / 16000)
    return np.interp(positions, np.arange(len(samples)), samples).astype(np.float32)


def test_fox_is_speech_whisper_understands(engine):
    audio = engine.synthesize(FOX)
    assert engine.sample_rate == 24000
    assert audio.dtype == np.int16 and audio.ndim == 1
    seconds = len(audio) / engine.sample_rate
    assert 1.0 < seconds < 8.0
    rms = np.sqrt(np.mean(audio.astype(np.float64) ** 2))
    assert rms > 300, f"audio is nearly silent (rms {rms:.0f})"

    from faster_whisper import WhisperModel

    whisper = WhisperModel(str(models.whisper_tiny_en()), device="cpu", compute_type="int8")
    segments, _ = whisper.transcribe(_to_16k(audio, engine.sample_rate), language="en", beam_size=1)
    heard = set(_words(" ".join(s.text for s in segments)))
    said = _words(FOX)
    assert sum(w in heard for w in said) >= 5, f"Whisper heard {sorted(heard)}"


def test_unknown_voice_is_named(engine):
    with pytest.raises(ValueError, match="no_such_voice") as err:
        engine.synthesize("hello", voice="no_such_voice")
    assert engine.default_voice in str(err.value)  # the message lists what is available


def test_voices_include_default(engine):
    assert engine.default_voice in engine.voices()


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_empty_text_gives_empty_audio(engine, text):
    audio = engine.synthesize(text)
    assert audio.dtype == np.int16 and audio.size == 0


def test_long_text_is_chunked(engine):
    assert len(engine._tokens(engine.phonemize(LONG))) > MAX_TOKENS  # the test means what it says
    audio = engine.synthesize(LONG)
    assert len(audio) / engine.sample_rate > 15.0  # all of it was spoken, not just the first chunk


def test_concurrent_calls_match_sequential(engine):
    texts = ["Hello there.", "How can I help you today?", "Goodbye for now."]
    expected = [engine.synthesize(t) for t in texts]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(engine.synthesize, texts))
    for want, have in zip(expected, got):
        assert len(want) == len(have)


def test_chunks_never_exceed_the_context():
    tokens = lambda s: [ord(c) for c in s]  # one token per character
    sentence = "a" * 300 + ". " + "b" * 300 + ", " + " ".join(["word"] * 200) + " " + "x" * 1200
    chunks = _chunks(tokens, sentence)
    assert all(0 < len(c) <= MAX_TOKENS for c in chunks)
    assert sum(len(c) for c in chunks) >= len(sentence.replace(" ", ""))
