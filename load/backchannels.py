"""Backchannels over the agent: how often "mm-hm", "yeah", "right" would interrupt it, and
what ignoring them costs a real interruption.

The clips are spoken by Kokoro (the TTS model) in voices the backchannel word list was NOT
written from (it was written from tiny.en's transcripts of jm_kumo, af_heart, am_michael and
bf_emma): HELD_OUT_VOICES, each saying
  backchannels    "Mm-hmm.", "Yeah, yeah.", "Right." ... at a normal and a slow pace, so
                  most are longer than the 400 ms barge-in minimum;
  interruptions   "Wait, stop, I have another question." ... which must interrupt.

Offline (always): each clip, with the silence after it, through the STT engine (tiny.en),
as the edge gets its final transcript, and the edge's rule (turn_taking.is_backchannel):
  false interruption   a backchannel taken for a turn (BACKCHANNELS_IGNORE); with
                       BACKCHANNELS_INTERRUPT every clip past 400 ms interrupts
  missed interruption  an interruption taken for a backchannel

With --pipeline, through real processes (the embedded default on free ports), one call per
clip and mode, alternating: a question that gets a long answer; once the agent has spoken
for PLAY_FIRST_S, the clip over it. Whether the reply was interrupted, and the barge-in
reaction (start of the clip's speech -> agent audio stopped, as `Interrupted` reports it).

    python -m load.backchannels [--pipeline] [--json load/results/backchannels.json]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import numpy as np

from load.endpointing import trimmed
from load.stats import fmt_ms, summarize, table, write_json
from load.system import machine
from voicestack.audio import PIPELINE_RATE, resample
from voicestack.client import LiveMicrophone
from voicestack.v1 import audio_pb2, edge_pb2

BACKCHANNELS = ("Mm-hmm.", "Uh-huh.", "Yeah.", "Yeah, yeah.", "Right.", "Right, right.", "Okay.", "I see.",
                "Sure.", "Got it.")
INTERRUPTIONS = ("Wait, stop, I have another question.", "No, tell me about Paris instead.",
                 "Hold on, what time is it?", "Sorry, can you say that again?",
                 "Actually, I want to know about the moon.")
QUESTION = "Tell me a long story about a brave dragon."
STORY_PROMPT = "You are a storyteller. Always answer with a very long story of at least twenty sentences."
PLAY_FIRST_S = 1.0
MODES = {"interrupt": edge_pb2.BACKCHANNELS_INTERRUPT, "ignore": edge_pb2.BACKCHANNELS_IGNORE}
HELD_OUT_VOICES = ("af_sarah", "am_adam", "bm_george", "af_nicole")
BARGE_IN_MIN_MS = 400


def clips(tts, voices=HELD_OUT_VOICES) -> list[dict]:
    """Every backchannel at two paces and every interruption, in each voice, at 16 kHz."""
    def say(text: str, voice: str, speed: float) -> np.ndarray:
        pcm = tts.synthesize(text, voice, speed).astype(np.float32) / 32768.0
        return trimmed(resample(pcm, tts.sample_rate, PIPELINE_RATE))

    out = []
    for voice in voices:
        out += [{"kind": "backchannel", "text": text, "voice": voice, "speed": speed, "audio": say(text, voice, speed)}
                for text in BACKCHANNELS for speed in (1.0, 0.7)]
        out += [{"kind": "interruption", "text": text, "voice": voice, "speed": 1.0, "audio": say(text, voice, 1.0)}
                for text in INTERRUPTIONS]
    for clip in out:
        clip["clip_ms"] = round(clip["audio"].size / PIPELINE_RATE * 1000)
    return out


def offline(samples: list[dict]) -> list[dict]:
    from voicestack.edge.turn_taking import is_backchannel
    from voicestack.stt.engine import WhisperEngine

    stt = WhisperEngine()
    rows = []
    for clip in samples:
        heard = stt.transcribe(np.concatenate([clip["audio"], np.zeros(PIPELINE_RATE // 2, np.float32)]))
        rows.append({k: v for k, v in clip.items() if k != "audio"} | {"heard": heard, "backchannel": is_backchannel(heard)})
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def offline_report(rows: list[dict]) -> str:
    back = [r for r in rows if r["kind"] == "backchannel"]
    long_back = [r for r in back if r["clip_ms"] >= BARGE_IN_MIN_MS]
    inter = [r for r in rows if r["kind"] == "interruption"]

    def rate(hits: int, n: int) -> str:
        return f"{hits}/{n} ({100 * hits / n:.0f}%)" if n else "-"

    return table(["backchannels", "false interruptions (all clips)", "(clips >= 400 ms)", "missed interruptions"], [
        ["interrupt (any speech past 400 ms)", rate(len(long_back), len(back)), rate(len(long_back), len(long_back)),
         rate(sum(r["clip_ms"] < BARGE_IN_MIN_MS for r in inter), len(inter))],
        ["ignore (the transcript decides)", rate(sum(not r["backchannel"] for r in back), len(back)),
         rate(sum(not r["backchannel"] for r in long_back), len(long_back)),
         rate(sum(r["backchannel"] for r in inter), len(inter))]])


def interrupted(mic: LiveMicrophone) -> bool:
    first = mic.conversation.turns.get(1)
    return bool(first and first.interrupted)


async def trial(address: str, question: np.ndarray, clip: np.ndarray, mode: int) -> dict:
    config = edge_pb2.SessionConfig(
        input_format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=PIPELINE_RATE),
        system_prompt=STORY_PROMPT, max_reply_tokens=100,
        interruption=edge_pb2.InterruptionConfig(backchannels=mode))

    async def speaker(mic: LiveMicrophone, send):
        await mic.wait_for(lambda: mic.turn_done(0))
        await send(question)
        await mic.wait_for(lambda: 1 in mic.first_audio, timeout=120)
        await asyncio.sleep(PLAY_FIRST_S)
        await send(clip)
        # The outcome is known once the reply is interrupted or the clip's turn has ended
        # (dropped as a backchannel, or heard): no need to hear the story out.
        await mic.wait_for(lambda: interrupted(mic) or mic.turn_done(2), timeout=120)

    conversation = await LiveMicrophone(config).run(address, speaker, timeout=300)
    first = conversation.turns[1]
    second = conversation.turns.get(2)
    # A reply that ended before the clip did measured nothing (the clip was not over the agent).
    ended_before_clip = first.interrupted is None and first.ended and \
        len(first.audio) / 2 / 24 < PLAY_FIRST_S * 1000 + clip.size / PIPELINE_RATE * 1000
    return {"interrupted": first.interrupted is not None,
            "reaction_ms": first.interrupted.barge_in_reaction_ms if first.interrupted else None,
            "heard": second.transcript if second else "",
            "answered": bool(second and second.reply_text),
            "agent_done_before_clip_ended": ended_before_clip}


async def pipeline(tts, voice: str) -> list[dict]:
    from voicestack.launcher import START_ORDER, Stack

    question = trimmed(resample(tts.synthesize(QUESTION, voice).astype(np.float32) / 32768.0, tts.sample_rate, PIPELINE_RATE))
    samples = clips(tts, (voice,))
    results = []
    with Stack(ports="free", log_dir="build/backchannel-logs") as stack:
        stack.start(START_ORDER)
        address = stack.processes["edge"].address
        for clip in samples:
            for mode_name, mode in MODES.items():
                row = {k: v for k, v in clip.items() if k != "audio"} | {
                    "mode": mode_name, **await trial(address, question, clip["audio"], mode)}
                results.append(row)
                print(row, file=sys.stderr, flush=True)
    return results


def report(rows: list[dict]) -> str:
    out = []
    for mode in MODES:
        # A trial whose reply ended while the clip was still being said measured nothing.
        mine = [r for r in rows if r["mode"] == mode and not r["agent_done_before_clip_ended"]]
        back = [r for r in mine if r["kind"] == "backchannel"]
        long_back = [r for r in back if r["clip_ms"] >= BARGE_IN_MIN_MS]
        inter = [r for r in mine if r["kind"] == "interruption"]
        reaction = summarize(r["reaction_ms"] for r in inter if r["interrupted"])
        out.append([mode, f"{sum(r['interrupted'] for r in back)}/{len(back)}",
                    f"{sum(r['interrupted'] for r in long_back)}/{len(long_back)}",
                    f"{sum(not r['interrupted'] for r in inter)}/{len(inter)}",
                    fmt_ms(reaction["p50"]), fmt_ms(reaction["max"])])
    return table(["backchannels", "false interruptions", "of clips >= 400 ms", "missed interruptions",
                  "reaction p50, ms", "reaction max, ms"], out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m load.backchannels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="load/results/backchannels.json")
    p.add_argument("--pipeline", action="store_true", help="also calls through real processes")
    p.add_argument("--voice", default=HELD_OUT_VOICES[0], help="with --pipeline: the caller's voice")
    args = p.parse_args(argv)
    from voicestack.tts.engine import KokoroEngine

    tts = KokoroEngine()
    result = {"machine": machine(), "offline": offline(clips(tts))}
    print(offline_report(result["offline"]))
    if args.pipeline:
        result["pipeline"] = asyncio.run(pipeline(tts, args.voice))
        print()
        print(report(result["pipeline"]))
    write_json(Path(args.json), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
