"""Real speech for load: espeak-ng sentences, generated once and cached as WAV files."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from voicestack.audio import PIPELINE_RATE, read_wav

# Short questions, as a caller would ask them; each session starts at a different one.
SENTENCES = (
    "What is the capital of France?",
    "How far away is the moon?",
    "Can you tell me a short joke?",
    "What should I cook for dinner tonight?",
    "Why is the sky blue?",
    "How many legs does a spider have?",
)
DEFAULT_CACHE = Path(os.environ.get("VOICESTACK_LOAD_CACHE", Path(__file__).resolve().parent.parent / "build" / "load-speech"))


def speak(text: str, cache: Path = DEFAULT_CACHE, speed: int = 150) -> np.ndarray:
    """`text` spoken by espeak-ng as float32 at 16 kHz, leading and trailing silence trimmed."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{hashlib.sha1(f'{speed}:{text}'.encode()).hexdigest()[:16]}.wav"
    if not path.exists():
        if not shutil.which("espeak-ng"):
            raise SystemExit("espeak-ng is needed to make test speech: apt-get install espeak-ng (make apt)")
        partial = path.with_suffix(".tmp.wav")
        subprocess.run(["espeak-ng", "-s", str(speed), "-w", str(partial), text], check=True)
        partial.rename(path)
    audio = read_wav(path)
    loud = np.flatnonzero(np.abs(audio) > 0.02 * np.abs(audio).max())
    pad = PIPELINE_RATE // 50  # 20 ms either side
    return audio[max(0, loud[0] - pad): loud[-1] + pad].astype(np.float32)


def sentences(texts=SENTENCES, cache: Path = DEFAULT_CACHE) -> list[tuple[str, np.ndarray]]:
    return [(text, speak(text, cache)) for text in texts]
