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
  false cut-off   a "not done" sample whose turn ended in its pause, or a "done" one whose
                  turn ended between its words (the speaker cut off, either way);
  delay           "done" samples: end of speech -> the decision after it (audio time, plus
                  the model's compute for that decision).

Then, with --pipeline, voice-to-voice through real processes (the embedded default on free
ports): whole questions spoken by Kokoro, one session each, alternating silence 600 ms and the
model at threshold 0.5, so both see the same machine at the same time.

    python -m load.endpointing [--pipeline] [--json load/results/endpointing.json]
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
from voicestack.client import silence
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


def turn_ends(vad: SileroVad, sample: Sample, min_silence_ms: int, policy: TurnPolicy | None) -> list[tuple[int, float, float]]:
    """Every end of turn in the sample: (audio ms decided, the model's compute for it (s), its score)."""
    stream = vad.open(threshold=0.5, min_silence_ms=min_silence_ms, min_speech_ms=200, turn=policy)
    pcm = float_to_pcm16(sample.audio)
    step = PIPELINE_RATE * CHUNK_MS // 1000 * 2
    ends = []
    for at in range(0, len(pcm), step):
        started = time.perf_counter()
        events = stream.feed(pcm[at: at + step])
        spent = time.perf_counter() - started
        ends += [(e.decided_at_ms, spent, e.turn_score) for e in events if e.type == ENDED]
    ends += [(e.decided_at_ms, 0.0, e.turn_score) for e in stream.flush() if e.type == ENDED]
    return ends


def evaluate(samples: list[Sample]) -> list[dict]:
    from voicestack.vad.turn_model import TurnDetector

    vad = SileroVad()
    detector = TurnDetector.load(threads=1)
    rows = []
    for label, min_silence_ms, threshold in MODES:
        policy = TurnPolicy(detector, threshold, MODEL_PAUSE_MS) if threshold is not None else None
        cut_offs, delays, details = 0, [], []
        for sample in samples:
            ends = turn_ends(vad, sample, min_silence_ms, policy)
            if sample.done:
                # Ended inside the utterance (between its words) is a cut-off too; the delay is
                # to the end that came after the speech.
                early = [e for e in ends if e[0] < sample.speech_end_ms - 100]
                after = [e for e in ends if e[0] >= sample.speech_end_ms - 100]
                cut = bool(early)
                if after:
                    delays.append(after[0][0] - sample.speech_end_ms + after[0][1] * 1000)
            else:
                start, end = sample.pause_ms
                cut = any(start <= e[0] <= end + MODEL_PAUSE_MS for e in ends)
            cut_offs += cut
            details.append({"sample": sample.name, "done": sample.done, "cut_off": cut,
                            "scores": [round(e[2], 3) for e in ends]})
        d = summarize(delays)
        rows.append({"mode": label, "samples": len(samples), "cut_offs": cut_offs,
                     "not_done_cut_offs": sum(x["cut_off"] for x in details if not x["done"]),
                     "done_cut_offs": sum(x["cut_off"] for x in details if x["done"]),
                     "false_cut_off_rate": cut_offs / len(samples),
                     "delay_mean_ms": d["mean"], "delay_p50_ms": d["p50"], "delay_p95_ms": d["p95"], "details": details})
        print(f"{label}: {cut_offs}/{len(samples)} cut off, delay mean {d['mean']:.0f} ms", file=sys.stderr, flush=True)
    return rows


def report(rows: list[dict], samples: list[Sample]) -> str:
    done = sum(s.done for s in samples)
    head = (f"{done} done samples ({len(HUMAN)} human, {done - len(HUMAN)} Kokoro); "
            f"{len(samples) - done} not done (pauses {', '.join(map(str, PAUSES_MS))} ms)\n\n")
    return head + table(["end of turn", "cut off: not done", "cut off: done (between words)", "false cut-off rate",
                         "delay mean", "p50", "p95"], [
        [r["mode"], f"{r['not_done_cut_offs']}/{len(samples) - done}", f"{r['done_cut_offs']}/{done}",
         f"{r['false_cut_off_rate']:.0%}", fmt_ms(r["delay_mean_ms"]), fmt_ms(r["delay_p50_ms"]),
         fmt_ms(r["delay_p95_ms"])] for r in rows])


QUESTIONS = ["What is the capital of France?", "Can you recommend a good book?", "How far away is the moon?",
             "What should I cook for dinner tonight?", "Tell me something interesting about whales.",
             "Which planet is the largest?"]


async def pipeline_v2v(rounds: int) -> list[dict]:
    """v2v per question, silence 600 ms and the model alternating, on a stack started here."""
    from voicestack.client import converse
    from voicestack.launcher import START_ORDER, Stack
    from voicestack.v1 import edge_pb2

    speak = Speaker()
    modes = {"silence 600 ms": edge_pb2.EndpointingConfig(mode=edge_pb2.ENDPOINTING_MODE_SILENCE, silence_ms=600),
             "model, threshold 0.5": edge_pb2.EndpointingConfig(mode=edge_pb2.ENDPOINTING_MODE_MODEL, turn_threshold=0.5)}
    audio = {q: np.concatenate([silence(300), speak(q, 1.0)]) for q in QUESTIONS}
    turns = []
    with Stack(ports="free", log_dir="build/endpointing-logs") as stack:
        stack.start(START_ORDER)
        address = stack.processes["edge"].address
        for _ in range(rounds):
            for question in QUESTIONS:
                for mode, endpointing in modes.items():
                    conversation = await converse(address, audio[question], timeout=120,
                                                  config=edge_pb2.SessionConfig(endpointing=endpointing))
                    m = conversation.replies[0].metrics if conversation.replies else None
                    turns.append({"mode": mode, "question": question, "ok": m is not None,
                                  "turns": len(conversation.replies),
                                  "v2v_ms": m.voice_to_voice_ms if m else None,
                                  "endpointing_ms": m.endpointing_ms if m else None})
                    print(f"{mode}: {turns[-1]}", file=sys.stderr, flush=True)
    return turns


def pipeline_report(turns: list[dict]) -> str:
    rows = []
    for mode in dict.fromkeys(t["mode"] for t in turns):
        mine = [t for t in turns if t["mode"] == mode and t["ok"]]
        v, e = summarize(t["v2v_ms"] for t in mine), summarize(t["endpointing_ms"] for t in mine)
        rows.append([mode, str(len(mine)), fmt_ms(e["p50"]), fmt_ms(v["p50"]), fmt_ms(v["p95"]), fmt_ms(v["mean"])])
    return table(["end of turn", "turns", "endpointing p50", "v2v p50", "v2v p95", "v2v mean"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m load.endpointing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="load/results/endpointing.json")
    p.add_argument("--pipeline", action="store_true", help="also voice-to-voice through real processes")
    p.add_argument("--rounds", type=int, default=2, help="with --pipeline: rounds over the questions")
    args = p.parse_args(argv)
    samples = labelled_set()
    rows = evaluate(samples)
    result = {"machine": machine(), "modes": rows}
    print(report(rows, samples))
    if args.pipeline:
        import asyncio
        result["pipeline"] = asyncio.run(pipeline_v2v(args.rounds))
        print()
        print(pipeline_report(result["pipeline"]))
    write_json(Path(args.json), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
