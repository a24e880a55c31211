"""The VAD and STT engines on the real embedded models and real audio.

Synthetic tones would not tell us whether Silero hears speech or Whisper
understands it, so the audio is espeak-ng speech (exact text, exact timing) and
one recording of a human voice shipped by alsa-utils.
"""

import string
import subprocess
import wave

import numpy as np
import pytest

from conftest import speak, words
from voicestack.stt.engine import WINDOW_SECONDS, WhisperEngine
from voicestack.vad.engine import SileroVad

SR = 16000
SENTENCE = "What is the capital of France"
HUMAN = "/usr/share/sounds/alsa/Front_Center.wav"


# Kept here until the shared audio module lands.
def read_wav(path) -> np.ndarray:
    """PCM16 WAV -> float32 mono at 16 kHz."""
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2, "PCM16 only"
        rate, channels = w.getframerate(), w.getnchannels()
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0
    return resample(x.reshape(-1, channels).mean(axis=1), rate, SR)


def resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    if src == dst:
        return x.astype(np.float32)
    if dst < src:  # low-pass below the new Nyquist first, or high frequencies fold back as noise
        cutoff = 0.45 * dst / src
        n = np.arange(-64, 65)
        taps = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hamming(len(n))
        x = np.convolve(x, taps / taps.sum(), mode="same")
    t = np.arange(int(len(x) * dst / src)) * (src / dst)
    return np.interp(t, np.arange(len(x)), x).astype(np.float32)


def voiced_extent(x: np.ndarray) -> tuple[int, int]:
    """First and last sample above 2% of the peak: where the speech really is."""
    loud = np.flatnonzero(np.abs(x) > 0.02 * np.abs(x).max())
    return int(loud[0]), int(loud[-1]) + 1


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR), np.float32)


def pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def run_vad(stream, x: np.ndarray, chunk_ms: int = 20):
    data, step = pcm16(x), SR * chunk_ms // 1000 * 2
    events = []
    for i in range(0, len(data), step):
        events += stream.feed(data[i : i + step])
    return events + stream.flush()


@pytest.fixture(scope="module")
def vad():
    return SileroVad(threads=1)


@pytest.fixture(scope="module")
def whisper():
    return WhisperEngine()


@pytest.fixture(scope="module")
def say(tmp_path_factory):
    """Text -> espeak-ng speech at 16 kHz, trimmed to where the voice is."""
    cache = {}

    def speak(text: str) -> np.ndarray:
        if text not in cache:
            out = tmp_path_factory.mktemp("espeak") / "out.wav"
            subprocess.run(["espeak-ng", "-w", str(out), text], check=True, capture_output=True)
            x = read_wav(out)
            start, end = voiced_extent(x)
            cache[text] = x[start:end]
        return cache[text]

    return speak


def test_one_sentence_gives_one_segment_at_the_right_place(vad, say):
    speech = say(SENTENCE)
    audio = np.concatenate([silence(1), speech, silence(1)])
    events = run_vad(vad.open(), audio)
    assert [e.type for e in events] == ["speech_started", "speech_ended"], events
    started, ended = events
    end_ms = 1000 + len(speech) * 1000 // SR
    assert abs(started.offset_ms - 1000) <= 150
    assert abs(ended.offset_ms - end_ms) <= 150
    # The decisions wait exactly for their rules: min_speech after the start, min_silence after the end.
    assert 100 <= started.decided_at_ms - started.offset_ms <= 100 + 64
    assert 500 <= ended.decided_at_ms - ended.offset_ms <= 500 + 64
    # Chunking is invisible: the whole recording in one feed decides the same events.
    assert run_vad(vad.open(), audio, chunk_ms=10_000) == events


def test_two_utterances_apart_give_two_segments(vad, say):
    audio = np.concatenate([silence(1), say(SENTENCE), silence(1.2), say("The weather is nice today"), silence(1)])
    events = run_vad(vad.open(min_silence_ms=500), audio)
    assert [e.type for e in events] == ["speech_started", "speech_ended"] * 2, events
    assert events[2].offset_ms - events[1].offset_ms >= 1000


def test_short_gap_pauses_and_resumes_without_ending(vad, say):
    first = say(SENTENCE)
    audio = np.concatenate([silence(1), first, silence(0.4), say("The weather is nice today"), silence(1)])
    events = run_vad(vad.open(min_silence_ms=500, pause_ms=200), audio)
    types = [e.type for e in events]
    # The final silence also pauses before it ends: a pause is always the first word on a silence.
    assert types == ["speech_started", "speech_paused", "speech_resumed", "speech_paused", "speech_ended"], events
    paused, resumed = events[1], events[2]
    gap_start = 1000 + len(first) * 1000 // SR
    assert abs(paused.offset_ms - gap_start) <= 150
    assert abs(resumed.offset_ms - (gap_start + 400)) <= 150
    assert paused.decided_at_ms - paused.offset_ms >= 200


def test_odd_byte_count_is_rejected(vad):
    with pytest.raises(ValueError):
        vad.open().feed(b"\x00\x00\x00")


def normalize(text: str) -> str:
    return text.lower().translate(str.maketrans("", "", string.punctuation))


def test_whisper_transcribes_espeak(whisper, say):
    text = normalize(whisper.transcribe(say(SENTENCE)))
    assert "capital" in text and "france" in text, text
    assert whisper.transcribe(np.zeros(0, np.float32)) == ""
    assert whisper.transcribe(silence(0.05)) == ""


def test_whisper_transcribes_recorded_human_speech(whisper):
    with wave.open(HUMAN) as w:
        assert w.getframerate() != SR  # 48 kHz: the resampling is exercised, not skipped
    text = normalize(whisper.transcribe(read_wav(HUMAN)))
    assert "front" in text and "center" in text, text


# A monologue, one sentence after another; rotated so that, decoded in Whisper's fixed
# 30 s windows, the one from 30 s came back as nothing (0 of the 13 words checked below).
MONOLOGUE = [
    "The conductor walked slowly along the corridor checking every ticket.",
    "At the first stop, an old man with a wooden cane climbed aboard.",
    "He sat down beside a young woman who was knitting a red scarf.",
    "They talked about the weather and the price of bread in the village.",
    "Later the train crossed a long bridge over a wide and quiet river.",
    "Children waved from the bank as the carriages rolled past them.",
    "Near noon the sun grew warm and many travellers fell asleep.",
    "The final station had a bakery that sold fresh apple pies.",
    "Everyone hurried to buy one before the shop closed for lunch.",
    "The pilot of a yellow balloon landed gently in the meadow nearby.",
    "An orchestra was playing violins and trumpets in the town square.",
    "Finally the elephant painted a purple giraffe on the museum wall.",
]


def test_whisper_transcribes_the_end_of_a_long_monologue(whisper, tmp_path):
    pieces, last_15s, at = [], [], 0.0
    for sentence in MONOLOGUE:
        speech = speak(sentence, tmp_path)
        if 30.0 <= at and at + len(speech) / SR <= 45.0:
            last_15s += [w for w in words(sentence) if len(w) > 3]  # short words are easily misheard
        pieces += [speech, silence(0.35)]
        at += len(speech) / SR + 0.35
    audio = np.concatenate(pieces)[: 45 * SR]
    assert len(audio) == 45 * SR > 1.5 * WINDOW_SECONDS * SR and len(last_15s) >= 10  # it is what it says
    heard = set(words(whisper.transcribe(audio)))
    assert sum(w in heard for w in last_15s) >= len(last_15s) / 2, (sorted(heard), last_15s)
    assert {"conductor", "corridor"} <= heard  # and the start is still there
