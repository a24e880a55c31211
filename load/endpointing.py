"""End of turn, silence against the model, on a labelled set of real and synthetic speech.

The set (built here, from nothing a test tunes to):
  done      whole utterances followed by silence: the eight human recordings Debian's
            alsa-utils ships (/usr/share/sounds/alsa: "Front Center" ...), and sentences
            spoken by Kokoro (the TTS model; natural intonation: espeak-ng's robotic one is
            outside what the turn model learned, and it scores it at random) at three speeds;
  not done  the same speech cut at a pause: each human recording cut in the gap between its
            two words, and each sentence spoken in two halves cut mid-sentence, with a pause
            of 400, 600, 800 or 1000 ms between, then the rest.

For each way of deciding (silence 300 and 600 ms; the model at three thresholds, scoring at a
200 ms pause and waiting at most 2500 ms), the audio runs through the VAD stage's own
VadStream (Silero, and Smart Turn v3.2 in model mode), offline:
  false cut-off   a "not done" sample whose turn ended in its pause (the speaker cut off);
  delay           "done" samples: end of speech -> the decision (audio time, plus the
                  model's compute for the decision that ended the turn).

    python -m load.endpointing [--json load/results/endpointing.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from load.stats import fmt_ms, summarize, table, write_json
from load.system import machine
from voicestack.audio import PIPELINE_RATE, float_to_pcm16, read_wav
from voicestack.vad.engine import ENDED, SileroVad, TurnPolicy

ALSA = Path("/usr/share/sounds/alsa")
HUMAN = ["Front_Center", "Front_Left", "Front_Right", "Rear_Center", "Rear_Left", "Rear_Right", "Side_Left", "Side_Right"]
# (first half, second half): cut mid-sentence where a speaker might pause to think.
SENTENCES = [
    ("I would like to book a table", "for two people tonight."),
    ("Can you tell me", "what the weather will be tomorrow?"),
    ("My order number is", "four five six seven."),
    ("I was wondering if", "you could help me with my account."),
    ("The thing is", "I never got the package."),
    ("Could you please", "transfer me to someone in billing?"),
    ("What I really need is", "a refund for last month."),
    ("I think the problem is with", "the router in the living room."),
]
SPEEDS = (0.9, 1.0, 1.15)  # Kokoro's speed
PAUSES_MS = (400, 600, 800, 1000)
TAIL_MS = 3000
CHUNK_MS = 20
MODES = [("silence 300 ms", 300, None), ("silence 600 ms", 600, None),
         ("model, threshold 0.3", 2500, 0.3), ("model, threshold 0.5", 2500, 0.5), ("model, threshold 0.7", 2500, 0.7)]
MODEL_PAUSE_MS = 200


@dataclass
class Sample:
    name: str
    audio: np.ndarray  # float32, 16 kHz
    done: bool
    speech_end_ms: int = 0  # done: where speech ends
    pause_ms: tuple[int, int] = (0, 0)  # not done: the pause, start and end


def silence(ms: int) -> np.ndarray:
    return np.zeros(PIPELINE_RATE * ms // 1000, np.float32)


def word_gap(audio: np.ndarray) -> tuple[int, int]:
    """The quietest stretch in the middle half of a two-word recording: (start, end) samples."""
    frame = PIPELINE_RATE // 100
    energy = np.array([np.sqrt(np.mean(audio[i:i + frame] ** 2)) for i in range(0, len(audio) - frame, frame)])
    loud = energy > 0.05 * energy.max()
    first, last = int(np.argmax(loud)), len(loud) - int(np.argmax(loud[::-1]))
    quiet = [i for i in range(first + (last - first) // 4, first + 3 * (last - first) // 4) if not loud[i]]
    if not quiet:
        middle = (first + last) // 2
        return middle * frame, middle * frame
    return quiet[0] * frame, (quiet[-1] + 1) * frame


class Speaker:
    """Kokoro, in process, at 16 kHz, silence trimmed."""

    def __init__(self):
        from voicestack.config import Settings
        from voicestack.tts.engine import build_engine

        self.engine = build_engine(Settings())

    def __call__(self, text: str, speed: float) -> np.ndarray:
        from voicestack.audio import resample

        pcm = self.engine.synthesize(text, speed=speed).astype(np.float32) / 32768.0
        return trimmed(resample(pcm, self.engine.sample_rate, PIPELINE_RATE))


def quiet_point(audio: np.ndarray, fraction: float) -> int:
    """The quietest 20 ms within 15% of the audio around `fraction` of it (a word gap): a sample index."""
    frame = PIPELINE_RATE // 50
    centre, reach = int(len(audio) * fraction), int(len(audio) * 0.15)
    starts = range(max(0, centre - reach), min(len(audio) - frame, centre + reach), frame // 4)
    quietest = min(starts, key=lambda i: float(np.mean(audio[i:i + frame] ** 2)))
    return quietest + frame // 2


def trimmed(audio: np.ndarray) -> np.ndarray:
    loud = np.flatnonzero(np.abs(audio) > 0.02 * np.abs(audio).max())
    return audio[loud[0]: loud[-1] + 1]


def labelled_set() -> list[Sample]:
    speak = Speaker()
    lead = silence(300)
    samples = []
    for name in HUMAN:
        audio = trimmed(read_wav(ALSA / f"{name}.wav"))
        samples.append(Sample(f"human {name}", np.concatenate([lead, audio, silence(TAIL_MS)]), True,
                              speech_end_ms=(len(lead) + len(audio)) * 1000 // PIPELINE_RATE))
        gap_start, gap_end = word_gap(audio)
        for pause in PAUSES_MS:
            first, rest = audio[:gap_start], audio[gap_end:]
            start = (len(lead) + len(first)) * 1000 // PIPELINE_RATE
            samples.append(Sample(f"human {name} cut, {pause} ms", np.concatenate(
                [lead, first, silence(pause), rest, silence(TAIL_MS)]), False, pause_ms=(start, start + pause)))
    for first_half, second_half in SENTENCES:
        for speed in SPEEDS:
            whole = speak(f"{first_half} {second_half}", speed)
            samples.append(Sample(f"kokoro x{speed}: {first_half} {second_half}", np.concatenate(
                [lead, whole, silence(TAIL_MS)]), True, speech_end_ms=(len(lead) + len(whole)) * 1000 // PIPELINE_RATE))
            # Cut inside the whole sentence, so the first half keeps its unfinished intonation
            # (spoken alone it would end like a sentence, and be one).
            cut = quiet_point(whole, len(first_half) / len(f"{first_half} {second_half}"))
            first, rest = whole[:cut], whole[cut:]
            start = (len(lead) + len(first)) * 1000 // PIPELINE_RATE
            for pause in PAUSES_MS:
                samples.append(Sample(f"kokoro x{speed}: {first_half} / {pause} ms", np.concatenate(
                    [lead, first, silence(pause), rest, silence(TAIL_MS)]), False, pause_ms=(start, start + pause)))
    return samples


def first_end(vad: SileroVad, sample: Sample, min_silence_ms: int, policy: TurnPolicy | None) -> tuple[int, float, float]:
    """(audio ms when the first turn ended, the model's compute for that decision (s), its score)."""
    stream = vad.open(threshold=0.5, min_silence_ms=min_silence_ms, min_speech_ms=200, turn=policy)
    pcm = float_to_pcm16(sample.audio)
    step = PIPELINE_RATE * CHUNK_MS // 1000 * 2
    for at in range(0, len(pcm), step):
        started = time.perf_counter()
        events = stream.feed(pcm[at: at + step])
        spent = time.perf_counter() - started
        for event in events:
            if event.type == ENDED:
                return event.decided_at_ms, spent, event.turn_score
    for event in stream.flush():
        if event.type == ENDED:
            return event.decided_at_ms, 0.0, event.turn_score
    return -1, 0.0, -1.0


def evaluate(samples: list[Sample]) -> list[dict]:
    from voicestack.vad.turn_model import TurnDetector

    vad = SileroVad()
    detector = TurnDetector.load(threads=1)
    rows = []
    for label, min_silence_ms, threshold in MODES:
        policy = TurnPolicy(detector, threshold, MODEL_PAUSE_MS) if threshold is not None else None
        cut_offs, delays, details = 0, [], []
        for sample in samples:
            ended_ms, spent, score = first_end(vad, sample, min_silence_ms, policy)
            if sample.done:
                delays.append(ended_ms - sample.speech_end_ms + spent * 1000)
            else:
                cut = sample.pause_ms[0] <= ended_ms <= sample.pause_ms[1] + MODEL_PAUSE_MS
                cut_offs += cut
                details.append({"sample": sample.name, "cut_off": bool(cut), "score": score})
        not_done = sum(not s.done for s in samples)
        d = summarize(delays)
        rows.append({"mode": label, "not_done": not_done, "cut_offs": cut_offs, "false_cut_off_rate": cut_offs / not_done,
                     "delay_mean_ms": d["mean"], "delay_p50_ms": d["p50"], "delay_p95_ms": d["p95"], "details": details})
        print(f"{label}: {cut_offs}/{not_done} cut off, delay mean {d['mean']:.0f} ms", file=sys.stderr, flush=True)
    return rows


def report(rows: list[dict], samples: list[Sample]) -> str:
    done = sum(s.done for s in samples)
    head = (f"{done} done samples ({len(HUMAN)} human, {done - len(HUMAN)} Kokoro); "
            f"{len(samples) - done} not done (pauses {', '.join(map(str, PAUSES_MS))} ms)\n\n")
    return head + table(["end of turn", "false cut-offs", "rate", "delay mean", "p50", "p95"], [
        [r["mode"], f"{r['cut_offs']}/{r['not_done']}", f"{r['false_cut_off_rate']:.0%}", fmt_ms(r["delay_mean_ms"]),
         fmt_ms(r["delay_p50_ms"]), fmt_ms(r["delay_p95_ms"])] for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m load.endpointing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="load/results/endpointing.json")
    args = p.parse_args(argv)
    samples = labelled_set()
    rows = evaluate(samples)
    write_json(Path(args.json), {"machine": machine(), "modes": rows})
    print(report(rows, samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
