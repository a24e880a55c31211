"""The floor voicestack is measured against: the same models called directly in one
process (no NATS, no gRPC), on the same audio, with the same turn structure as a
load-generator session:

  VAD       Silero over the caller's audio in 20 ms frames, as the edge feeds it;
            endpointing = from the frame holding the end of speech to the frame on
            which the VAD decided it ended (its silence wait), plus that frame's compute
  STT       Whisper on the utterance as the edge sends it (its pre-roll through
            the deciding frame), with the STT stage's own rule for when to decode
            (stt/engine.py's DecodeSchedule: at a 200 ms pause in speech, and every 0.8 s
            of new audio for interim results): the decodes run here one after another, and each is placed
            on the audio's clock (audio time = wall time for a caller at real-time pace),
            so a decode started at a pause has the rest of the silence wait to finish in.
            The final transcript is ready when the decode covering the last speech is,
            or, if none does, after a decode of the whole utterance at the end.
  LLM       SmolLM2 on the same history (system prompt, earlier turns) to the first
            token, and on to the first clause the TTS stage would speak
  TTS       Kokoro on that first clause (split as the stage splits it: tts/engine.py's
            split_clauses)

Its voice-to-voice is endpointing + STT + LLM first token + (first clause's text
+ its synthesis), the same named events the edge times. voicestack's added latency
per turn is its voice-to-voice less this one.

Also the bus-hop microbenchmark: one NATS round trip through a StageEndpoint and a
StageClient (a trivial echo handler), next to a bare nats.py round trip.

  python -m load.baseline --turns 3            # baseline turns, then the bus hop
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path

import numpy as np

from load.stats import STAGE_METRICS, fmt_ms, summarize, summarize_turns, table, write_json
from voicestack.audio import PIPELINE_RATE, float_to_pcm16
from voicestack.config import Settings
from voicestack.edge.recognition import PRE_ROLL_MS  # the edge's, so both send the STT the same audio

FRAME_MS = 20
SILENCE_MS = 600  # the edge's default endpointing silence (TurnTaking.silence_ms)
MIN_SPEECH_MS = 200  # TurnTaking.min_speech_ms


class Engines:
    """The four models, built as the stage servers build them with default settings."""

    def __init__(self):
        from voicestack.llm import engine as llm
        from voicestack.stt import engine as stt
        from voicestack.tts import engine as tts
        from voicestack.vad import engine as vad

        settings = Settings()  # the defaults, not this shell's VOICESTACK_* (so never cheap engines)
        self.vad = vad.build_engine(settings)
        self.stt = stt.build_engine(settings)
        self.llm = llm.build_engine(settings)
        self.tts = tts.build_engine(settings)

    async def aclose(self) -> None:
        await self.llm.aclose()


def _frames(pcm: bytes) -> list[bytes]:
    step = PIPELINE_RATE * FRAME_MS // 1000 * 2
    return [pcm[i: i + step] for i in range(0, len(pcm), step)]


async def run_turns(engines: Engines, speech: list, turns: int, session: int = 0, settings: Settings | None = None,
                    progress=None, round_: int = 0) -> list[dict]:
    """One caller's turns, in process. Records carry the same metric names as the load generator's."""
    from voicestack.tts.engine import split_clauses
    from voicestack.vad.engine import ENDED, STARTED

    settings = settings or Settings()
    history = [{"role": "system", "content": settings.system_prompt}]
    # The edge keeps one VAD stream for the whole session; so does this.
    vad = engines.vad.open(threshold=0.5, min_silence_ms=SILENCE_MS, min_speech_ms=MIN_SPEECH_MS)
    audio_ms = 0
    records = []
    # Before each question the caller was quiet (the opening, or the last answer): enough
    # for the edge's full pre-roll, which it takes from its ring buffer.
    lead = np.zeros(PIPELINE_RATE * 300 // 1000, np.float32)
    for j in range(turns):
        text, speech_audio = speech[(session + j) % len(speech)]
        tail = np.zeros(PIPELINE_RATE * (SILENCE_MS + 1000) // 1000, np.float32)
        pcm = float_to_pcm16(np.concatenate([lead, speech_audio, tail]))
        turn_pcm = bytearray()
        base_ms = audio_ms
        started_ms = started_decided_ms = ended = None
        vad_ms = 0.0
        for frame in _frames(pcm):
            turn_pcm += frame
            audio_ms += len(frame) // 2 * 1000 // PIPELINE_RATE
            t0 = time.perf_counter()
            events = vad.feed(frame)
            spent = (time.perf_counter() - t0) * 1000
            for event in events:
                if event.type == STARTED and started_ms is None:
                    started_ms, started_decided_ms = event.offset_ms, event.decided_at_ms
                elif event.type == ENDED and started_ms is not None and ended is None:
                    ended, vad_ms = event, spent
            if ended:
                break
        if ended is None:
            records.append({"session": session, "round": round_, "turn": j + 1, "ok": False, "outcome": "NO_SPEECH_END",
                            "question": text})
            continue

        def arrived(offset_ms: int) -> int:  # end of the 20 ms frame that carried this audio
            return -(-offset_ms // FRAME_MS) * FRAME_MS

        endpointing = arrived(ended.decided_at_ms) - arrived(ended.offset_ms) + vad_ms
        start = max(base_ms, started_ms - PRE_ROLL_MS)
        utterance = bytes(turn_pcm[(start - base_ms) * PIPELINE_RATE // 1000 * 2:])
        transcript, stt_ms = await stt_as_the_stage_decodes(
            engines, utterance, opened_ms=arrived(started_decided_ms) - start, decided_ms=arrived(ended.decided_at_ms) - start,
            pause_decode=settings.stt_pause_decode, batch_ms=settings.stt_batch_ms if settings.batch_stage_audio else FRAME_MS)

        history.append({"role": "user", "content": transcript})
        t0 = time.perf_counter()
        first_token = clause_at = None
        clause = ""
        reply = ""
        async with contextlib.aclosing(engines.llm.stream(history, settings.llm_max_tokens, settings.llm_temperature)) as deltas:
            async for delta in deltas:
                if delta.text and first_token is None:
                    first_token = time.perf_counter()
                reply += delta.text
                if not clause:
                    ready, _ = split_clauses(reply)
                    if ready:
                        clause, clause_at = ready[0], time.perf_counter()
        if not clause:
            ready, _ = split_clauses(reply, final=True)
            clause, clause_at = (ready[0] if ready else ""), time.perf_counter()
        history.append({"role": "assistant", "content": reply.strip()})
        t1 = time.perf_counter()
        await asyncio.to_thread(engines.tts.synthesize, clause)
        tts_synth_ms = (time.perf_counter() - t1) * 1000
        llm_first_ms = ((first_token or clause_at) - t0) * 1000
        tts_first_audio = ((clause_at - (first_token or clause_at)) * 1000) + tts_synth_ms
        record = {
            "session": session, "round": round_, "turn": j + 1, "ok": bool(clause), "outcome": "ok" if clause else "EMPTY_REPLY",
            "question": text, "transcript": transcript, "reply_chars": len(reply), "first_clause": clause,
            "endpointing_ms": endpointing, "stt_final_ms": stt_ms, "llm_first_token_ms": llm_first_ms,
            "tts_first_audio_ms": tts_first_audio, "tts_synthesis_ms": tts_synth_ms, "vad_frame_ms": vad_ms,
        }
        record["voice_to_voice_ms"] = sum(record[m] for m in STAGE_METRICS)
        records.append(record)
        if progress:
            progress(record)
    return records


async def stt_as_the_stage_decodes(engines: Engines, utterance: bytes, opened_ms: int, decided_ms: int,
                                   pause_decode: bool = True, batch_ms: int = 60) -> tuple[str, float]:
    """(final transcript, ms from the endpointing decision to it) for an utterance fed to the
    STT stage as the edge feeds it: everything up to `opened_ms` (the VAD's speech start,
    when the edge opens the stream) at once, then `batch_ms` at a time until `decided_ms`
    (the end-of-turn decision). Decodes follow the stage's DecodeSchedule and are placed on the
    audio's clock; nothing here runs in parallel, so this is the stage's algorithm without
    the bus, the processes or competing work."""
    from voicestack.stt.engine import DecodeSchedule

    async def decode(pcm: bytes) -> tuple[str, float]:
        t0 = time.perf_counter()
        text = await asyncio.to_thread(engines.stt.transcribe, np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0)
        return text, (time.perf_counter() - t0) * 1000

    bytes_per_ms = PIPELINE_RATE * 2 // 1000
    cuts = [min(opened_ms, decided_ms)]
    while cuts[-1] < decided_ms:
        cuts.append(min(cuts[-1] + batch_ms, decided_ms))
    schedule = DecodeSchedule(pause_decode, interim=True)  # the edge asks for interim results
    audio = b""
    last = None  # (covers bytes, done at audio ms, text) of the latest decode
    for cut in cuts:
        chunk = utterance[len(audio): cut * bytes_per_ms]
        audio += chunk
        schedule.add(chunk)
        if (last is None or last[1] <= cut) and schedule.due(last[0] if last else 0):  # none in flight
            text, spent = await decode(audio)
            last = (len(audio), cut + spent, text)
    if last is not None and schedule.final(last[0]):
        # Done before the decision: ready at once (1 µs: 0 means "not measured" in these records).
        return last[2], max(0.001, last[1] - decided_ms)
    return await decode(audio)


def overhead(voicestack_turns: list[dict], baseline_turns: list[dict]) -> dict:
    """voicestack's added latency per turn: turn by turn against the baseline turn with the same
    round and position (same audio, same place in the conversation), then percentiles of the
    differences. Runs alternate, so other work on the machine falls on both alike."""
    base = {(t.get("round", 0), t["turn"]): t for t in baseline_turns if t.get("ok")}
    pairs = [(v, base[(v.get("round", 0), v["turn"])]) for v in voicestack_turns
             if v.get("ok") and (v.get("round", 0), v["turn"]) in base]
    same_words = sum(_words(v.get("transcript", "")) == _words(b.get("transcript", "")) for v, b in pairs)
    same_reply = sum(v.get("reply_chars") == b.get("reply_chars") for v, b in pairs)
    out = {"pairs": len(pairs), "same_transcript": same_words, "same_reply_length": same_reply}
    for metric in ("voice_to_voice_ms", *STAGE_METRICS):
        ours, theirs = [v[metric] for v, _ in pairs], [b[metric] for _, b in pairs]
        added = [a - b for a, b in zip(ours, theirs)]
        v, b, d = summarize(ours), summarize(theirs), summarize(added)
        out[metric] = {
            "voicestack_p50": v["p50"], "voicestack_p99": v["p99"], "baseline_p50": b["p50"], "baseline_p99": b["p99"],
            "added_p50": d["p50"], "added_p99": d["p99"], "added_mean": d["mean"],
            "ratio_p50": v["p50"] / b["p50"] if b["p50"] else float("nan"), "n": d["n"],
        }
    return out


def _words(text: str) -> str:
    return " ".join("".join(c.lower() if c.isalnum() else " " for c in text).split())


# ---------------------------------------------------------------- the bus hop


async def bus_hop(nats_url: str, messages: int = 2000, warmup: int = 200, opens: int = 50) -> dict:
    """Round trips through StageEndpoint + StageClient (trivial handler) and through bare nats.py.

    Both ends live in this one process and loop (two NATS connections), so a round trip
    is two hops plus both sides' Python; one hop is about half of it.
    """
    import nats

    from voicestack.bus import Failover, StageClient, StageContract, StageEndpoint
    from voicestack.v1 import audio_pb2, vad_pb2

    hop = StageContract("hop", vad_pb2.DetectRequest, vad_pb2.DetectResponse, Failover.OPENER)

    async def echo(requests, context):
        async for _ in requests:
            yield vad_pb2.DetectResponse(type=vad_pb2.VAD_EVENT_TYPE_SPEECH_STARTED, offset_ms=1, decided_at_ms=1)

    stage_nc, edge_nc = await nats.connect(nats_url), await nats.connect(nats_url)
    endpoint = StageEndpoint(stage_nc, "hop", "hop-1", 1000, echo, vad_pb2.DetectRequest)
    await endpoint.start()
    client = StageClient(edge_nc)
    await client.start()
    await stage_nc.flush()  # the subscriptions are on the server before the first open
    await edge_nc.flush()
    frame = vad_pb2.DetectRequest(audio=audio_pb2.AudioChunk(pcm=bytes(640), sample_rate_hz=PIPELINE_RATE))
    try:
        open_us = []
        for _ in range(opens):
            t0 = time.perf_counter_ns()
            stream = await client.open(hop)
            open_us.append((time.perf_counter_ns() - t0) / 1000)
            await stream.cancel()
        stream = await client.open(hop)
        stage_us = []
        for i in range(warmup + messages):
            t0 = time.perf_counter_ns()
            await stream.send(frame)
            await anext(stream)
            if i >= warmup:
                stage_us.append((time.perf_counter_ns() - t0) / 1000)
        await stream.cancel()

        # The same payload through bare nats.py: what the stream layer adds on top.
        replies: asyncio.Queue = asyncio.Queue()
        payload = frame.SerializeToString()

        async def bounce(msg):
            await stage_nc.publish(msg.reply, msg.data)

        async def back(msg):
            replies.put_nowait(msg)

        inbox = edge_nc.new_inbox()
        await stage_nc.subscribe("hop.raw", cb=bounce)
        await edge_nc.subscribe(inbox, cb=back)
        await stage_nc.flush()
        await edge_nc.flush()
        raw_us = []
        for i in range(warmup + messages):
            t0 = time.perf_counter_ns()
            await edge_nc.publish("hop.raw", payload, reply=inbox)
            await replies.get()
            if i >= warmup:
                raw_us.append((time.perf_counter_ns() - t0) / 1000)
    finally:
        await client.close()
        await endpoint.close()
        await stage_nc.close()
        await edge_nc.close()
    return {"stream_round_trip_us": summarize(stage_us), "bare_nats_round_trip_us": summarize(raw_us),
            "open_us": summarize(open_us), "messages": messages,
            "note": "one process, two NATS connections, loopback; a round trip is two hops"}


def run_bus_hop(messages: int = 2000) -> dict:
    from voicestack.launcher import Stack

    stack = Stack(ports="free", nats_auth=False)  # (its "hop" stage is no role of bus_permissions.py)
    stack.start_nats()
    try:
        return asyncio.run(bus_hop(stack.nats_url, messages))
    finally:
        stack.stop_nats()


def baseline_table(records: list[dict]) -> str:
    s = summarize_turns(records, ("voice_to_voice_ms", *STAGE_METRICS))
    rows = [[name, s[m]["n"], fmt_ms(s[m]["p50"]), fmt_ms(s[m]["p95"]), fmt_ms(s[m]["p99"])]
            for name, m in (("voice-to-voice", "voice_to_voice_ms"), ("endpointing", "endpointing_ms"),
                            ("STT final", "stt_final_ms"), ("LLM first token", "llm_first_token_ms"),
                            ("TTS first audio", "tts_first_audio_ms"))]
    return table(["in process", "turns", "p50 ms", "p95 ms", "p99 ms"], rows)


async def run_baseline(speech: list, turns: int, sessions: int = 1, warmup: bool = True, progress=None) -> list[dict]:
    """Load the models, one warm-up turn (discarded), then `sessions` callers one after another."""
    engines = await asyncio.to_thread(Engines)
    try:
        # The disclosure is synthesized in every voicestack session before the first turn: warm TTS the same way.
        await asyncio.to_thread(engines.tts.synthesize, Settings().disclosure_text)
        if warmup:
            await run_turns(engines, speech, 1, session=0)  # as bench.py's warm-up session: same first question
        records = []
        for session in range(sessions):
            records += await run_turns(engines, speech, turns, session=session, progress=progress)
        return records
    finally:
        await engines.aclose()


def main(argv=None) -> int:
    from load import speech as speech_mod

    p = argparse.ArgumentParser(prog="python -m load.baseline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--messages", type=int, default=2000, help="bus-hop round trips")
    p.add_argument("--no-bus", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    speech = speech_mod.sentences()
    records = asyncio.run(run_baseline(speech, args.turns,
                                       progress=lambda r: print(f"turn {r['turn']}: v2v {fmt_ms(r['voice_to_voice_ms'])} ms "
                                                                f"({r['transcript']!r})", file=sys.stderr)))
    print(baseline_table(records))
    result = {"turns": records}
    if not args.no_bus:
        hop = run_bus_hop(args.messages)
        result["bus_hop"] = hop
        print(f"bus round trip (StageEndpoint/StageClient): p50 {hop['stream_round_trip_us']['p50']:.0f} us, "
              f"p99 {hop['stream_round_trip_us']['p99']:.0f} us; bare nats.py p50 {hop['bare_nats_round_trip_us']['p50']:.0f} us; "
              f"stream open p50 {hop['open_us']['p50']:.0f} us")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
