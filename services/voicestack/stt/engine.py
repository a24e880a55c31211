"""faster-whisper behind a narrow interface: one utterance of audio in, its text out.

The stage calls this for interim and final transcripts of the current utterance,
so decoding is tuned for latency and repeatability rather than long-form
accuracy: greedy, temperature 0 with no fallback, no timestamps, no context
carried between calls (each call is independent, which also makes failover
replays give the same text).
"""

from __future__ import annotations

import numpy as np

from voicestack import models


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

        # None means the embedded model; otherwise a CTranslate2 directory or a size name.
        path = str(models.whisper_tiny_en()) if model is None else model
        self._model = WhisperModel(
            path, device=device, compute_type=compute_type, cpu_threads=threads, num_workers=workers
        )

    def transcribe(self, audio: np.ndarray) -> str:
        """float32 mono 16 kHz samples in [-1, 1]; returns the text, stripped."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"expected mono 1-D audio, got shape {audio.shape}")
        if len(audio) < self.sample_rate // 10:  # too short to hold a word; Whisper would invent one
            return ""
        segments, _ = self._model.transcribe(
            audio,
            language="en",
            beam_size=1,
            temperature=0.0,
            without_timestamps=True,
            vad_filter=False,
            condition_on_previous_text=False,
        )
        return "".join(s.text for s in segments).strip()
