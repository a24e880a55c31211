"""Before/after numbers for the latency features, measured in one run on real processes:

- speculative replies off vs on (per session: same stack, sessions alternate);
- STT finalization with and without decoding at speech pauses (`stt_pause_decode`),
  through the STT stage's own gRPC API at real-time pace: end of input -> final;
- TTS time to first audio, and to the first speech heard in it, by how the reply is cut
  (`tts_split`: sentence, clause, phrase), replies streamed to the TTS stage at an LLM's
  pace, the splits alternating `--rounds` times;
- barge-in reaction: user speech start (in the audio) -> agent audio stopped.

The STT and TTS variants restart that stage's process with the setting changed.

    python -m load.features [--turns 5] [--json build/features.json]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from load.speech import speak
from load.stats import summarize, table, write_json
from voicestack.audio import PIPELINE_RATE, float_to_pcm16
from voicestack.client import converse, silence
from voicestack.launcher import Stack
from voicestack.v1 import audio_pb2, edge_pb2, stt_pb2, stt_pb2_grpc, tts_pb2, tts_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = ("What is the capital of France?", "Why is the sky blue?", "How far away is the moon?")
STORY = "You are a storyteller. Always answer with a very long story of at least twenty sentences."
# Replies as a small LLM writes them: a first clause of 4+ words, an opening word, long first sentences.
TTS_REPLIES = ("The capital of France is Paris, a city of light and art, "
               "and it is lovely in the spring when the trees are green.",
               "Sure, the sky looks blue because the air scatters blue light more than red light.",
               "The moon is about three hundred and eighty four thousand kilometres away from the Earth.",
               "Yes, Paris is the capital of France and its largest city.",
               "I think the best time to visit Paris is in the spring when the weather is mild and the parks are green.")
TTS_SPLITS = ("sentence", "clause", "phrase")
QUIET = 0.01 * 32767  # audio.trim_quiet's threshold: below it, nothing is heard yet
LLM_TOKEN_SECONDS = 0.01  # the embedded LLM writes ~100 tokens/s


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def speculation(edge: str, turns: int) -> dict:
    results = {"off": [], "on": []}
    for i in range(turns):
        question = speak(QUESTIONS[i % len(QUESTIONS)])
        for mode, value in (("off", edge_pb2.SPECULATION_MODE_OFF), ("on", edge_pb2.SPECULATION_MODE_ON)):
            config = edge_pb2.SessionConfig(endpointing=edge_pb2.EndpointingConfig(speculation=value))
            conversation = await converse(edge, np.concatenate([silence(300), question]), config=config, timeout=90)
            metrics = [t.metrics for t in conversation.replies if t.metrics and t.metrics.voice_to_voice_ms]
            if metrics:
                results[mode].append({"voice_to_voice_ms": metrics[-1].voice_to_voice_ms,
                                      "hit": metrics[-1].speculative_hit})
            log(f"  speculation {mode}: {metrics[-1].voice_to_voice_ms if metrics else float('nan'):.0f} ms")
    return {mode: {"voice_to_voice": summarize(r["voice_to_voice_ms"] for r in rows),
                   "hits": sum(r["hit"] for r in rows), "turns": len(rows)}
            for mode, rows in results.items()}


async def stt_finalization(address: str, turns: int) -> list[float]:
    """End of input -> final transcript, the utterance streamed at real time with the
    600 ms of trailing silence the edge's endpointing would send before ending it."""
    latencies = []
    for i in range(turns):
        audio = np.concatenate([speak(QUESTIONS[i % len(QUESTIONS)]), silence(600)])
        pcm = float_to_pcm16(audio)
        step = PIPELINE_RATE * 20 // 1000 * 2
        ended = 0.0

        async def requests():
            nonlocal ended
            yield stt_pb2.TranscribeRequest(config=stt_pb2.SttConfig(interim_results=True))
            start = time.monotonic()
            for n, offset in enumerate(range(0, len(pcm), step)):
                yield stt_pb2.TranscribeRequest(audio=audio_pb2.AudioChunk(pcm=pcm[offset: offset + step]))
                await asyncio.sleep(max(0.0, start + (n + 1) * 0.02 - time.monotonic()))
            ended = time.monotonic()

        async with grpc.aio.insecure_channel(address) as channel:
            async for result in stt_pb2_grpc.SttServiceStub(channel).Transcribe(requests()):
                if result.is_final:
                    latencies.append((time.monotonic() - ended) * 1000)
    return latencies


async def tts_first_audio(address: str, replies=TTS_REPLIES) -> list[dict]:
    """Per reply: first text in -> first audio out, and -> the first speech in that audio
    (played from its first byte: the quiet before the voice is waited through too), the
    reply arriving word by word as from an LLM."""
    out = []
    for reply in replies:
        first_text = 0.0

        async def requests():
            nonlocal first_text
            yield tts_pb2.SynthesizeRequest(config=tts_pb2.TtsConfig())
            first_text = time.monotonic()
            for word in reply.split(" "):
                yield tts_pb2.SynthesizeRequest(text=word + " ")
                await asyncio.sleep(LLM_TOKEN_SECONDS)

        first_byte, heard, rate = None, 0, 24000
        async with grpc.aio.insecure_channel(address) as channel:
            async for result in tts_pb2_grpc.TtsServiceStub(channel).Synthesize(requests()):
                if first_byte is None:
                    first_byte = (time.monotonic() - first_text) * 1000
                rate = result.audio.sample_rate_hz or rate
                pcm = np.frombuffer(result.audio.pcm, "<i2")
                loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > QUIET)
                if len(loud):
                    heard += int(loud[0])
                    break
                heard += len(pcm)
        out.append({"first_audio_ms": first_byte, "first_speech_ms": first_byte + heard / rate * 1000})
    return out


def kokoro_lead_quiet(replies=TTS_REPLIES) -> dict:
    """The quiet before the voice in Kokoro's own output for each reply's first words, and
    after the TTS stage trims it (tts/server.py LEAD_MS): what a caller waits through."""
    from voicestack.audio import trim_quiet
    from voicestack.tts.engine import KokoroEngine, split_clauses
    from voicestack.tts.server import LEAD_MS, TAIL_MS

    engine = KokoroEngine()
    raw, trimmed = [], []
    for reply in replies:
        first = split_clauses(reply, final=True, first=True)[0][0]
        audio = engine.synthesize(first)
        for out, pcm in ((raw, audio), (trimmed, trim_quiet(audio, engine.sample_rate, LEAD_MS, TAIL_MS))):
            loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > QUIET)
            out.append(loud[0] / engine.sample_rate * 1000 if len(loud) else float("nan"))
    return {"kokoro": summarize(raw), "trimmed": summarize(trimmed)}


async def tts_splits(stack: Stack, rounds: int) -> dict:
    """Each split in turn (the TTS stage restarted with it), `rounds` times over."""
    rows: dict[str, list[dict]] = {split: [] for split in TTS_SPLITS}
    for round_ in range(rounds):
        for split in TTS_SPLITS:
            address = restart(stack, "tts", tts_split=split)
            rows[split] += await tts_first_audio(address)
            heard = ", ".join(f"{r['first_speech_ms']:.0f}" for r in rows[split][-len(TTS_REPLIES):])
            log(f"  tts_split={split} (round {round_ + 1}/{rounds}): first speech {heard} ms")
    return {split: {"first_audio": summarize(r["first_audio_ms"] for r in got),
                    "first_speech": summarize(r["first_speech_ms"] for r in got)} for split, got in rows.items()}


async def barge_in(edge: str, turns: int) -> list[float]:
    reactions = []
    for i in range(turns):
        audio = np.concatenate([silence(300), speak("Tell me a story about a dragon."), silence(4500),
                                speak("Stop, I have another question.")])
        config = edge_pb2.SessionConfig(system_prompt=STORY, max_reply_tokens=400)
        conversation = await converse(edge, audio, config=config, expect_turns=1, timeout=120)
        interrupted = [t.interrupted for t in conversation.replies if t.interrupted]
        if interrupted:
            reactions.append(interrupted[0].barge_in_reaction_ms)
        log(f"  barge-in: {reactions[-1] if interrupted else float('nan'):.0f} ms")
    return reactions


def restart(stack: Stack, service: str, **settings) -> str:
    stack.stop(service)
    env = {f"VOICESTACK_{k.upper()}": str(v) for k, v in settings.items()}
    process = stack.spawn(service, env=env)
    stack.wait_ready([service])
    return process.address


PARTS = ("speculation", "barge_in", "stt", "tts")


async def with_and_without(stack: Stack, service: str, timed, turns: int, **before) -> tuple[dict, dict]:
    """(before, after) summaries of `timed(address, turns)`: the stage as it runs now (the
    feature on, after), then restarted with the `before` settings (the feature off)."""
    log(f"{timed.__name__}: as configured ...")
    after = await timed(stack.processes[service].address, turns)
    address = restart(stack, service, **before)
    log(f"{timed.__name__}: with {before} ...")
    return summarize(await timed(address, turns)), summarize(after)


async def measure(stack: Stack, turns: int, parts=PARTS) -> dict:
    edge = stack.processes["edge"].address
    result = {}
    if "speculation" in parts:
        log("speculative replies off/on ...")
        result["speculation"] = await speculation(edge, turns)
    if "barge_in" in parts:
        log("barge-in ...")
        result["barge_in"] = summarize(await barge_in(edge, max(2, turns // 2)))
    if "stt" in parts:
        off, on = await with_and_without(stack, "stt", stt_finalization, turns, stt_pause_decode="false")
        result["stt_final"] = {"pause_decode_off": off, "pause_decode_on": on}
    if "tts" in parts:
        result["tts_first_audio"] = await tts_splits(stack, max(1, turns // 2))
        result["tts_lead_quiet"] = kokoro_lead_quiet()
    return result


def markdown(result: dict) -> str:
    def ms(summary, key="p50"):
        value = summary.get(key, float("nan"))
        return f"{value:.0f}" if value == value else "-"

    def row(label, summary, n=None):
        return [label, ms(summary), ms(summary, "p95"), summary.get("n", 0) if n is None else n]

    rows = []
    spec = result.get("speculation")
    if spec:
        rows += [row("voice-to-voice, speculation off", spec["off"]["voice_to_voice"], spec["off"]["turns"]),
                 row("voice-to-voice, speculation on", spec["on"]["voice_to_voice"],
                     f'{spec["on"]["turns"]} ({spec["on"]["hits"]} hits)')]
    if "barge_in" in result:
        rows.append(row("barge-in reaction (speech start -> agent audio stopped)", result["barge_in"]))
    if "stt_final" in result:
        rows += [row("STT finalization, decode at end only (before)", result["stt_final"]["pause_decode_off"]),
                 row("STT finalization, decode at speech pauses (after)", result["stt_final"]["pause_decode_on"])]
    if "tts_lead_quiet" in result:
        rows += [row("quiet before the voice, Kokoro's output (before)", result["tts_lead_quiet"]["kokoro"]),
                 row("quiet before the voice, as the TTS stage sends it (after)", result["tts_lead_quiet"]["trimmed"])]
    for split, got in result.get("tts_first_audio", {}).items():
        rows += [row(f"TTS first audio, tts_split={split}", got["first_audio"]),
                 row(f"TTS first speech heard, tts_split={split}", got["first_speech"])]
    return table(["measurement", "p50 ms", "p95 ms", "n"], rows)


def run(turns: int = 5, log_dir: Path = REPO / "build" / "features-logs", parts=PARTS) -> dict:
    # The disclosure is off here only so each measured session starts with the question.
    with Stack(ports="free", log_dir=log_dir, env={"VOICESTACK_DISCLOSURE": "false"}) as stack:
        stack.start()
        return asyncio.run(measure(stack, turns, parts))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"some of {','.join(PARTS)}")
    parser.add_argument("--json", default=str(REPO / "build" / "features.json"))
    args = parser.parse_args(argv)
    result = run(args.turns, parts=[part for part in args.parts.split(",") if part])
    write_json(Path(args.json), result)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
