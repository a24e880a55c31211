"""The embedded STT models side by side: tiny.en (the default, English only) and base
(multilingual), on Kokoro-spoken questions in English, French and German: load time, decode
time (median of three), the language heard and the words.

    python -m load.stt_models
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from voicestack.audio import PIPELINE_RATE, resample

QUESTIONS = [("en", "af_sarah", "What is the capital of France?"),
             ("en", "af_sarah", "Can you recommend a good book for the summer?"),
             ("fr", "ff_siwis", "Quelle est la capitale de l'Italie ?"),
             ("fr", "ff_siwis", "Bonjour, je voudrais savoir quelle est la capitale de l'Italie, s'il vous plaît."),
             ("de", "if_sara", "Wie ist das Wetter heute in Berlin?"),
             ("de", "if_sara", "Guten Tag, ich möchte wissen, wie das Wetter heute in Berlin ist.")]


def main() -> int:
    from voicestack.stt.engine import WhisperEngine
    from voicestack.tts.engine import KokoroEngine

    tts = KokoroEngine()
    clips = [(lang, resample(tts.synthesize(text, voice, 1.0, lang).astype(np.float32) / 32768,
                             tts.sample_rate, PIPELINE_RATE)) for lang, voice, text in QUESTIONS]
    for name in ("tiny.en", "base"):
        started = time.perf_counter()
        stt = WhisperEngine(model=name)
        print(f"{name}: load {time.perf_counter() - started:.2f} s")
        stt.transcribe_heard(clips[0][1])  # warm
        for lang, audio in clips:
            times = []
            for _ in range(3):
                started = time.perf_counter()
                heard = stt.transcribe_heard(audio)
                times.append(time.perf_counter() - started)
            print(f"  {lang} {audio.size / PIPELINE_RATE:.1f} s: {statistics.median(times) * 1000:.0f} ms, "
                  f"{heard.language} {heard.language_probability:.2f}: {heard.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
