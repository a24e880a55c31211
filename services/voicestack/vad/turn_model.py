"""Smart Turn v3.2 (ONNX) end-of-turn model behind a narrow interface.

The VAD says when the user stopped making sound; this model says whether what
they said sounds finished ("What is the capital of France?") or not ("I need to
buy some ..."). It hears the last 8 s of the utterance, so it judges intonation
and wording, not only silence: scored at a pause, it lets the VAD stage tell a
finished turn from a mid-sentence pause.

The model (Whisper-tiny encoder plus a small classifier, int8, 8.7 MB,
BSD-2-Clause, Daily) ships in the pipecat-ai wheel; `models.smart_turn_v3()`
finds it. Its input, as it was trained:
- 16 kHz mono float audio, the LAST 8 s of the utterance (128000 samples);
  shorter audio is padded with zeros IN FRONT, so the end of speech always sits
  at the end of the window;
- the whole 8 s window normalised to zero mean and unit variance (eps 1e-7);
- Whisper's log-mel features of it: centred STFT (reflect padding), periodic
  Hann window, n_fft 400, hop 160, power spectrum, 80 Slaney mel bins 0-8 kHz,
  last frame dropped (800 frames), log10 floored at 1e-10, clamped to
  max - 8, then (x + 4) / 4;
- input `input_features` float32 (batch, 80, 800); output (batch, 1): the
  sigmoid probability that the turn is complete.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from voicestack import models

SAMPLE_RATE = 16000
WINDOW_SAMPLES = 8 * SAMPLE_RATE  # the model hears the last 8 s
N_FFT = 400
HOP = 160
N_MELS = 80
NORM_EPS = 1e-7


class TurnDetector:
    """The model: one per process, shared by streams (InferenceSession.run is thread-safe)."""

    def __init__(self, session, model_name: str):
        self._session = session
        self.model_name = model_name
        from faster_whisper.feature_extractor import FeatureExtractor

        # Whisper's Slaney mel filterbank (80, 201); the STFT is ours, batched, below.
        self._mel = FeatureExtractor.get_mel_filters(SAMPLE_RATE, N_FFT, n_mels=N_MELS).astype(np.float32)
        self._window = np.hanning(N_FFT + 1)[:-1].astype(np.float32)  # periodic Hann

    @classmethod
    def load(cls, threads: int = 1) -> TurnDetector:
        """Load the model with `threads` intra-op threads and run it once, so the first decision is not slow."""
        import onnxruntime  # imported here so the package imports without the models extra

        path = models.smart_turn_v3()
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        session = onnxruntime.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        detector = cls(session, Path(path).stem)
        detector.score(np.zeros(SAMPLE_RATE, np.float32))  # warm-up: allocations and kernels on a dummy run
        return detector

    def score(self, audio: np.ndarray) -> float:
        """Probability in [0, 1] that the turn is complete, from the last 8 s of `audio`
        (float32 mono 16 kHz: the utterance so far, ending where the decision is made)."""
        features = self.features(audio)
        prob = self._session.run(None, {"input_features": features[None]})[0]
        return float(np.clip(prob.reshape(-1)[0], 0.0, 1.0))

    def features(self, audio: np.ndarray) -> np.ndarray:
        """The model's input for `audio`: float32 (80, 800) log-mel of its last 8 s."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"expected mono audio (1-D), got shape {audio.shape}")
        x = np.zeros(WINDOW_SAMPLES, np.float32)  # zeros in front: the end of speech stays at the end
        tail = audio[-WINDOW_SAMPLES:]
        if tail.size:
            x[-tail.size:] = tail
        x = (x - x.mean()) / np.sqrt(x.var() + NORM_EPS)
        padded = np.pad(x, N_FFT // 2, mode="reflect")
        frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:-1]  # 800 frames
        power = np.abs(np.fft.rfft(frames * self._window, axis=-1)) ** 2  # (800, 201)
        mel = self._mel @ power.T.astype(np.float32)  # (80, 800)
        log = np.log10(np.maximum(mel, 1e-10))
        log = np.maximum(log, log.max() - 8.0)
        return ((log + 4.0) / 4.0).astype(np.float32)
