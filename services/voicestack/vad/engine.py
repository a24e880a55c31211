"""Silero VAD v6 (ONNX) behind a narrow streaming interface.

One `SileroVad` per process holds the onnxruntime session; every audio stream
gets its own `VadStream` with the model's recurrent state, so many concurrent
streams share one model. The stream turns per-frame speech probabilities into
events (started / paused / resumed / ended) whose offsets are positions in the
stream's own audio, so the edge can time spans from the audio, not the clock.

`EnergyVad` is the benchmarks-only stand-in (settings.cheap_engines): loudness in
place of the model. `build_engine(settings)` picks one of the two.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from voicestack import models
from voicestack.audio import VAD_WINDOW_SAMPLES
from voicestack.config import Settings

SAMPLE_RATE = 16000
CONTEXT_SAMPLES = 64  # Silero v6 sees the tail of the previous frame in front of each new one
MAX_BATCH_FRAMES = 1024  # bounds memory when a caller feeds a long recording at once
ENERGY_THRESHOLD = 0.01  # EnergyVad: RMS of a 32 ms frame (full scale 1.0) above it is "speech"

STARTED, ENDED, PAUSED, RESUMED = "speech_started", "speech_ended", "speech_paused", "speech_resumed"


@dataclass(frozen=True)
class VadEvent:
    type: str  # "speech_started" | "speech_ended" | "speech_paused" | "speech_resumed"
    offset_ms: int  # started/resumed: first speech sample; ended/paused: end of the last speech frame
    decided_at_ms: int  # audio consumed when the decision was made
    turn_score: float = -1.0  # ended, with a TurnPolicy: the model's last score (-1: it did not score)


class TurnScorer(Protocol):
    def score(self, audio: np.ndarray) -> float: ...


@dataclass(frozen=True)
class TurnPolicy:
    """End of turn by model: at a pause of `pause_ms` in speech the utterance so far is
    scored (turn_model.TurnDetector); at `threshold` or above speech ends there, else it
    ends at the stream's min_silence_ms (the longest wait), or goes on if speech resumes."""

    scorer: TurnScorer
    threshold: float = 0.5
    pause_ms: int = 200


TURN_AUDIO_SAMPLES = 8 * SAMPLE_RATE  # what the turn model sees of an utterance: its last 8 s
TURN_PRE_ROLL_SAMPLES = SAMPLE_RATE // 5  # and 200 ms before its start, for a soft onset


def _ms(samples: int) -> int:
    return samples * 1000 // SAMPLE_RATE


class SileroVad:
    """The model: one per process, shared by streams (InferenceSession.run is thread-safe)."""

    FRAME_SAMPLES = VAD_WINDOW_SAMPLES

    def __init__(self, threads: int = 1):
        import onnxruntime  # imported here so the package imports without the models extra

        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self._session = onnxruntime.InferenceSession(
            str(models.silero_vad()), sess_options=opts, providers=["CPUExecutionProvider"]
        )

    def open(self, threshold=0.5, min_silence_ms=500, min_speech_ms=100, pause_ms=0,
             turn: TurnPolicy | None = None) -> VadStream:
        return VadStream(self, threshold, min_silence_ms, min_speech_ms, pause_ms, turn)

    def _probs(self, frames: np.ndarray, h: np.ndarray, c: np.ndarray):
        # The model runs its LSTM over the batch axis in order, so a batch of
        # consecutive frames gives exactly what feeding them one by one would.
        p, h, c = self._session.run(None, {"input": frames, "h": h, "c": c})
        return p.reshape(-1), h, c


class EnergyVad:
    """BENCHMARKS ONLY (cheap_engines): SileroVad's interface with RMS energy in place of the model.

    It measures the edge and the bus, never whether speech is detected: any loud noise is
    "speech". The streams are the real `VadStream`s (same segmenter, events and offsets);
    only the per-frame speech probability is replaced: 1.0 when the frame is loud.
    """

    FRAME_SAMPLES = VAD_WINDOW_SAMPLES  # VadStream cuts the same windows as for Silero

    def __init__(self, threshold: float = ENERGY_THRESHOLD):
        self.threshold = threshold

    def open(self, threshold=0.5, min_silence_ms=500, min_speech_ms=100, pause_ms=0,
             turn: TurnPolicy | None = None) -> VadStream:
        return VadStream(self, threshold, min_silence_ms, min_speech_ms, pause_ms, turn)

    def _probs(self, frames: np.ndarray, h: np.ndarray, c: np.ndarray):
        new = frames[:, CONTEXT_SAMPLES:]  # each row is 64 samples of context + the frame
        rms = np.sqrt(np.mean(np.square(new), axis=1))
        return (rms > self.threshold).astype(np.float32), h, c


def build_engine(settings: Settings) -> SileroVad | EnergyVad:
    if settings.cheap_engines:
        return EnergyVad()
    return SileroVad(threads=settings.threads or 1)


class FixedTurnScorer:
    """BENCHMARKS ONLY (cheap_engines): every pause is the end of the turn."""

    model_name = "fixed-turn-score"

    def score(self, audio: np.ndarray) -> float:
        return 1.0


def build_turn_scorer(settings: Settings):
    if settings.cheap_engines:
        return FixedTurnScorer()
    from voicestack.vad.turn_model import TurnDetector

    return TurnDetector.load(threads=settings.threads or 1)


class VadStream:
    """Per-stream state: model state, context, leftover samples and the segmenter.

    Not thread-safe: one stream belongs to one caller.
    """

    def __init__(self, vad: SileroVad | EnergyVad, threshold: float, min_silence_ms: int, min_speech_ms: int, pause_ms: int,
                 turn: TurnPolicy | None = None):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if min(min_silence_ms, min_speech_ms, pause_ms) < 0:
            raise ValueError("min_silence_ms, min_speech_ms and pause_ms must be >= 0")
        self._vad = vad
        self._on = threshold
        self._off = max(threshold - 0.15, 0.01)  # hysteresis: staying in speech is easier than entering it
        self._min_silence = min_silence_ms * SAMPLE_RATE // 1000
        self._min_speech = min_speech_ms * SAMPLE_RATE // 1000
        self._pause = pause_ms * SAMPLE_RATE // 1000
        self._h = np.zeros((1, 1, 128), np.float32)
        self._c = np.zeros((1, 1, 128), np.float32)
        self._context = np.zeros(CONTEXT_SAMPLES, np.float32)
        self._leftover = np.zeros(0, np.float32)
        self._done = 0  # samples through the model
        self._closed = False
        # segmenter
        self._voiced = False
        self._start: int | None = None  # first sample of the current (maybe unconfirmed) speech
        self._confirmed = False  # speech_started emitted
        self._silence_from: int | None = None  # end of the last speech frame, while silent in speech
        self._paused = False
        # end of turn by model: the recent audio (for scoring), and this pause's score
        self._turn = turn
        self._turn_pause = (turn.pause_ms if turn else 0) * SAMPLE_RATE // 1000
        self._recent: deque[np.ndarray] = deque()  # chunks as fed: appended per frame, joined per decision
        self._recent_base = 0  # sample index of the first chunk's first sample
        self._scored_pause = False
        self._turn_score = -1.0

    def feed(self, pcm16: bytes) -> list[VadEvent]:
        """Any length of PCM16 LE mono 16 kHz; returns the events it decided."""
        if self._closed:
            raise RuntimeError("VadStream is flushed")
        if len(pcm16) % 2:
            raise ValueError(f"PCM16 needs an even byte count, got {len(pcm16)}")
        samples = np.frombuffer(pcm16, dtype="<i2").astype(np.float32) / 32768.0
        audio = np.concatenate([self._leftover, samples])
        n = len(audio) // SileroVad.FRAME_SAMPLES * SileroVad.FRAME_SAMPLES
        self._leftover = audio[n:]
        return self._run(audio[:n], limit=None)

    def flush(self) -> list[VadEvent]:
        """End of input: decide the last partial frame and end any open speech."""
        if self._closed:
            return []
        self._closed = True
        end = self._done + len(self._leftover)
        events = []
        if len(self._leftover):
            frame = np.zeros(SileroVad.FRAME_SAMPLES, np.float32)
            frame[: len(self._leftover)] = self._leftover
            events += self._run(frame, limit=end)  # zero padding is not audio: clamp times to it
        if self._confirmed:
            at = self._silence_from if self._silence_from is not None else end
            events.append(VadEvent(ENDED, _ms(min(at, end)), _ms(end)))
        self._start, self._confirmed = None, False  # unconfirmed speech was too short to report
        return events

    def scores_soon(self) -> bool:
        """Will the next feed() likely run the turn model (tens of ms: worth a thread)?"""
        return (self._turn is not None and self._confirmed and self._silence_from is not None
                and not self._scored_pause)

    def _run(self, audio: np.ndarray, limit: int | None) -> list[VadEvent]:
        step = SileroVad.FRAME_SAMPLES
        events: list[VadEvent] = []
        if self._turn is not None:
            self._keep_recent(audio)
        for at in range(0, len(audio), step * MAX_BATCH_FRAMES):
            chunk = audio[at : at + step * MAX_BATCH_FRAMES]
            padded = np.concatenate([self._context, chunk])
            frames = np.lib.stride_tricks.sliding_window_view(padded, CONTEXT_SAMPLES + step)[::step]
            probs, self._h, self._c = self._vad._probs(np.ascontiguousarray(frames), self._h, self._c)
            self._context = chunk[-CONTEXT_SAMPLES:]
            for p in probs:
                begin = self._done
                self._done += step
                end = self._done if limit is None else min(self._done, limit)
                events += self._segment(float(p), begin, end)
        return events

    def _segment(self, p: float, begin: int, end: int) -> list[VadEvent]:
        self._voiced = p >= (self._off if self._voiced else self._on)
        if self._start is None:  # idle
            if self._voiced:
                self._start = begin
                return self._confirm(end)
            return []
        if not self._confirmed:  # speech too short so far: a dip drops it (a click, a breath)
            if self._voiced:
                return self._confirm(end)
            self._start = None
            return []
        if self._voiced:
            self._silence_from = None
            self._scored_pause = False
            if self._paused:
                self._paused = False
                return [VadEvent(RESUMED, _ms(begin), _ms(end))]
            return []
        if self._silence_from is None:
            self._silence_from = begin
        silent = end - self._silence_from
        if self._turn is not None and not self._scored_pause and silent >= self._turn_pause:
            self._scored_pause = True
            self._turn_score = self._score(end)
            if self._turn_score >= self._turn.threshold:
                return [self._end(end)]
        if silent >= self._min_silence:
            return [self._end(end)]
        if self._pause and not self._paused and silent >= self._pause:
            self._paused = True
            return [VadEvent(PAUSED, _ms(self._silence_from), _ms(end))]
        return []

    def _end(self, end: int) -> VadEvent:
        event = VadEvent(ENDED, _ms(self._silence_from), _ms(end), self._turn_score)
        self._start, self._confirmed, self._silence_from, self._paused = None, False, None, False
        self._scored_pause, self._turn_score = False, -1.0
        return event

    def _keep_recent(self, audio: np.ndarray) -> None:
        """Audio the turn model may need: since the speech start (less a pre-roll), at most
        its last 8 s, up to what has been fed. Kept as chunks, so a frame costs an append,
        not a copy of seconds of audio; whole chunks are let go once before what is needed."""
        self._recent.append(audio)
        keep_from = self._done - TURN_PRE_ROLL_SAMPLES if self._start is None else self._start - TURN_PRE_ROLL_SAMPLES
        keep_from = max(keep_from, self._done + len(audio) - TURN_AUDIO_SAMPLES - SAMPLE_RATE)
        while self._recent and self._recent_base + len(self._recent[0]) <= keep_from:
            self._recent_base += len(self._recent.popleft())

    def _score(self, end: int) -> float:
        """The turn model on the utterance up to `end` (never audio past the decision point)."""
        recent = np.concatenate(self._recent)
        begin = max(self._start - TURN_PRE_ROLL_SAMPLES, end - TURN_AUDIO_SAMPLES, self._recent_base)
        return float(self._turn.scorer.score(recent[begin - self._recent_base: end - self._recent_base]))

    def _confirm(self, end: int) -> list[VadEvent]:
        if end - self._start >= self._min_speech:
            self._confirmed = True
            return [VadEvent(STARTED, _ms(self._start), _ms(end))]
        return []
