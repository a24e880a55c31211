"""faster-whisper behind a narrow interface: one utterance of audio in, its text out.

The stage calls this for interim and final transcripts of the current utterance,
so decoding is tuned for latency and repeatability rather than long-form
accuracy: greedy, temperature 0 with no fallback, no timestamps, no context
carried between calls (each call is independent, which also makes failover
replays give the same text).

Audio longer than WINDOW_SECONDS (a monologue) is decoded in pieces cut at quiet
points. Left to itself, faster-whisper hops through it in fixed 30 s windows that cut
words in half, and without timestamps tiny.en often gives up on such a window: the
30-60 s of a minute-long utterance came back as one word.

Also here, as pure logic load/baseline.py replays: `DecodeSchedule`, the stage's rule
for when to decode an utterance while it arrives. `FixedStt` is the benchmarks-only
stand-in (settings.cheap_engines); `build_engine(settings)` picks the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from voicestack import models
from voicestack.audio import PIPELINE_RATE, rms
from voicestack.config import Settings

# Interim decodes re-read the whole utterance; one per this much new audio keeps
# them from starving the final decode on a small CPU.
INTERIM_EVERY_SECONDS = 0.8
PAUSE_BYTES = int(0.2 * PIPELINE_RATE) * 2  # quiet this long after speech starts a decode
SILENCE_FLOOR = 0.003  # RMS below this is silence whatever the speaker's level
QUIET_FRACTION = 0.05  # ... and so is anything 26 dB below the loudest chunk so far
TRANSCRIPT = "What is the capital of France?"  # all FixedStt ever hears
# Longest piece decoded at once (Whisper sees 30 s). Measured on 40 espeak-ng monologues of
# 45 s: decoded whole, 5 lost most of their last 15 s; cut at quiet points into pieces of
# 12.5-25 s, none did (nor any of 20 of 59 s), and words recognised overall went 70% -> 88%.
WINDOW_SECONDS = 25.0
QUIET_FRAME_SAMPLES = 320  # 20 ms: loudness is compared frame by frame, over 3 frames


@dataclass(frozen=True)
class Heard:
    text: str
    language: str  # BCP-47
    language_probability: float  # 1.0 when the model serves one language only


class WhisperEngine:
    """One model per process; `workers` concurrent transcribe() calls run in parallel."""

    sample_rate = 16000

    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        compute_type: str = "int8",
        threads: int = 0,
        workers: int = 1,
    ):
        from faster_whisper import WhisperModel  # imported here so the package imports without the models extra

        # None means the embedded tiny.en; models.whisper() says what else a name may be.
        self._model = WhisperModel(
            models.whisper(model or ""), device=device, compute_type=compute_type, cpu_threads=threads,
            num_workers=workers,
        )
        # An English-only model is told so; a multilingual one detects the language per utterance.
        self.languages: frozenset[str] = frozenset(self._model.supported_languages)

    def transcribe(self, audio: np.ndarray) -> str:
        """float32 mono 16 kHz samples in [-1, 1]; returns the text, stripped."""
        return self.transcribe_heard(audio).text

    def transcribe_heard(self, audio: np.ndarray, language: str = "") -> Heard:
        """The text, and the language the model heard with its probability. `language`
        ("" = detect it, if the model knows more than English) is a code in `languages`."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"expected mono 1-D audio, got shape {audio.shape}")
        if len(audio) < self.sample_rate // 10:  # too short to hold a word; Whisper would invent one
            return Heard("", language or "en", 1.0)
        if not language and len(self.languages) == 1:
            language = next(iter(self.languages))
        segments, info = self._model.transcribe(
            audio,
            language=language or None,
            beam_size=1,
            temperature=0.0,
            without_timestamps=True,
            vad_filter=False,
            condition_on_previous_text=False,
            clip_timestamps=quiet_cuts(audio, self.sample_rate),  # each piece decoded on its own
        )
        text = "".join(s.text for s in segments).strip()  # (decoding happens here, segments are lazy)
        return Heard(text, info.language, float(info.language_probability))


def quiet_cuts(audio: np.ndarray, rate: int) -> list[float]:
    """Pieces of WINDOW_SECONDS / 2 to WINDOW_SECONDS covering the audio, as [start, end, start,
    end, ...] seconds, each cut at its quietest 60 ms, so a cut falls between words. (No short
    last piece: a scrap of near silence is where Whisper invents words.)"""
    window, shortest = int(WINDOW_SECONDS * rate), int(WINDOW_SECONDS * rate) // 2
    cuts, start = [0.0], 0
    if len(audio) > window:
        frames = audio[: len(audio) // QUIET_FRAME_SAMPLES * QUIET_FRAME_SAMPLES].reshape(-1, QUIET_FRAME_SAMPLES)
        loudness = np.convolve(np.mean(frames * frames, axis=1), np.ones(3) / 3, mode="same")
        while len(audio) - start > window:
            first = (start + shortest) // QUIET_FRAME_SAMPLES
            last = min(start + window, len(audio) - shortest) // QUIET_FRAME_SAMPLES
            start = (first + int(np.argmin(loudness[first:last]))) * QUIET_FRAME_SAMPLES + QUIET_FRAME_SAMPLES // 2
            cuts += [start / rate, start / rate]
    return cuts + [len(audio) / rate]


class FixedStt:
    """BENCHMARKS ONLY (cheap_engines): WhisperEngine's interface; every utterance is heard
    as the same sentence. It measures the edge and the bus, never whether speech is understood."""

    sample_rate = 16000
    languages = frozenset({"en"})

    def __init__(self, text: str = TRANSCRIPT):
        self.text = text

    def transcribe(self, audio: np.ndarray) -> str:
        return self.transcribe_heard(audio).text

    def transcribe_heard(self, audio: np.ndarray, language: str = "") -> Heard:
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"expected mono 1-D audio, got shape {audio.shape}")
        if len(audio) < self.sample_rate // 10:  # as WhisperEngine: too short to hold a word
            return Heard("", "en", 1.0)
        return Heard(self.text, "en", 1.0)


def build_engine(settings: Settings) -> WhisperEngine | FixedStt:
    if settings.cheap_engines:
        return FixedStt()
    return WhisperEngine(
        model=settings.stt_model or None, device=settings.device,
        compute_type="int8" if settings.device == "cpu" else "float16", threads=settings.threads,
    )


class DecodeSchedule:
    """When to decode an utterance while it arrives: as soon as speech pauses (so that if the
    turn ends there, the final transcript is ready, or nearly, when the end arrives) and every
    INTERIM_EVERY_SECONDS of new audio for interim results. Byte counts only, no clock:
    load/baseline.py replays the same schedule on the audio's clock."""

    def __init__(self, pause_decode: bool, interim: bool, interim_seconds: float = INTERIM_EVERY_SECONDS):
        self.pause_decode, self.interim, self.interim_seconds = pause_decode, interim, interim_seconds
        self.length = 0  # bytes of audio so far
        self.speech_end = 0  # bytes: just past the last chunk that sounded like speech
        self.loudest = 0.0

    def add(self, pcm: bytes) -> None:
        self.length += len(pcm)
        level = rms(pcm)
        self.loudest = max(self.loudest, level)
        if level > max(SILENCE_FLOOR, QUIET_FRACTION * self.loudest):
            self.speech_end = self.length

    def due(self, decoded: int) -> bool:
        """Start a decode now? (The last one covered `decoded` bytes and is done.)"""
        paused = self.pause_decode and self.speech_end > decoded and self.length - self.speech_end >= PAUSE_BYTES
        interim = self.interim and self.length - decoded >= self.interim_seconds * PIPELINE_RATE * 2
        return paused or interim

    def final(self, covers: int) -> bool:
        """Is a decode of the first `covers` bytes the final transcript (nothing but quiet since)?"""
        return self.pause_decode and covers >= self.speech_end
