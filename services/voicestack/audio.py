"""Audio helpers shared by every service: PCM16 <-> float, resampling, WAV files."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

SUPPORTED_RATES = (8000, 16000, 24000, 48000)
PIPELINE_RATE = 16000  # VAD and STT work at 16 kHz
VAD_WINDOW_SAMPLES = 512  # the VAD decides on 32 ms windows at 16 kHz, nothing shorter


def pcm16_to_float(pcm: bytes) -> np.ndarray:
    if len(pcm) % 2:
        raise ValueError(f"PCM16 audio must have an even byte count, got {len(pcm)} bytes")
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


def rms(pcm: bytes) -> float:
    """RMS of PCM16 audio, full scale 1.0."""
    samples = pcm16_to_float(pcm)
    return float(np.sqrt(np.mean(samples * samples))) if samples.size else 0.0


def level_dbfs(pcm: bytes) -> float:
    """RMS level of PCM16 audio in dB below full scale (-100 for silence)."""
    value = rms(pcm)
    return max(-100.0, 20 * float(np.log10(value))) if value > 0 else -100.0


def float_to_pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def trim_quiet(pcm: np.ndarray, rate: int, lead_ms: float | None = None, tail_ms: float | None = None,
               threshold: float = 0.01) -> np.ndarray:
    """int16 audio with its quiet start (and end) cut to at most lead_ms (tail_ms); None
    leaves that end as it is. Quiet: below `threshold` of full scale, so the cut falls in
    near-silence and makes no click."""
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > threshold * 32767)
    if not len(loud):
        return pcm
    start = max(0, loud[0] - int(lead_ms * rate / 1000)) if lead_ms is not None else 0
    end = min(len(pcm), loud[-1] + 1 + int(tail_ms * rate / 1000)) if tail_ms is not None else len(pcm)
    return pcm[start:end]


def resample(audio: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Windowed-sinc low-pass plus linear interpolation: enough for speech models,
    no extra dependency."""
    if src_rate == dst_rate or audio.size == 0:
        return audio.astype(np.float32, copy=False)
    if dst_rate < src_rate:  # low-pass below the new Nyquist first, or highs fold back as noise
        cutoff = 0.45 * dst_rate / src_rate
        n = np.arange(-32, 33)
        taps = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hamming(n.size)
        audio = np.convolve(audio, taps / taps.sum(), mode="same")
    n_out = int(round(audio.size * dst_rate / src_rate))
    positions = np.arange(n_out, dtype=np.float64) * (src_rate / dst_rate)
    return np.interp(positions, np.arange(audio.size), audio).astype(np.float32)


def read_wav(path: str | Path, rate: int = PIPELINE_RATE) -> np.ndarray:
    """Mono float32 at `rate` from a PCM WAV of any rate and channel count."""
    try:
        with wave.open(str(path), "rb") as wav:
            width, channels, src_rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{path}: not a PCM WAV file ({exc}); convert it, e.g. sox IN -b 16 OUT.wav") from None
    if width == 2:
        samples = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 1:
        samples = (np.frombuffer(frames, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 4:
        samples = np.frombuffer(frames, dtype="<i4").astype(np.float32) / 2147483648.0
    else:
        raise ValueError(f"{path}: {8 * width}-bit samples are not supported; use 16-bit PCM")
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    return resample(samples, src_rate, rate)


def write_wav(path: str | Path, pcm16: bytes, rate: int) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm16)
