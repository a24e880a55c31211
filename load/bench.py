"""`make bench`: the standard benchmark set on this machine, in a few minutes.

  1. bus hop: one round trip through StageEndpoint/StageClient, and through bare nats.py
  2. voicestack end to end on the embedded models, real speech at real-time pace: 1 session,
     alternating with the in-process baseline (the same models called directly, no NATS,
     no gRPC) turn for turn, for the overhead; then a few sessions at once
  3. edge capacity on cheap engines (VOICESTACK_CHEAP_ENGINES=1): the sweep, and the
     per-message changes before and after (arms alternating at one level)
  4. the floor: a bare grpc.aio server reading the same 20 ms frames and doing nothing
  5. STT finalization and TTS first audio before and after (load/features.py: the STT and
     TTS stages restarted with pause decoding / clause splitting off, then on)

Writes load/results/bench.json and load/results/bench.png, and rewrites what lies
between the markers in BENCHMARKS.md (hand-written text outside them is kept).

  python -m load.bench [--sessions 1,2,10] [--skip-capacity] [--no-markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path

from load import baseline, capacity, features, grpc_floor
from load import speech as speech_mod
from load.generator import Plan, merge_levels, run_level
from load.plot import draw
from load.stats import fmt_ms, latency_rows, table, write_json
from load.system import REPO, loadavg, machine

RESULTS = REPO / "load" / "results"
BENCHMARKS = REPO / "BENCHMARKS.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
TARGETS = {"added_p50_ms": 5.0, "added_p99_ms": 20.0, "bus_hop_p50_us": 300.0, "sessions_per_edge_core": 500}
HEADER = """# Benchmarks

How fast voicestack answers, where each turn's time goes, and how far one edge scales.
Reproduce with `make bench` (about fifteen minutes on 2 cores); it rewrites everything
between the markers below and draws `load/results/bench.png`. The tools are in `load/`
(`voicestack-load --help` = `python -m load --help`, `python -m load.baseline --help`,
`python -m load.capacity --help`, `python -m load.grpc_floor --help`).

Definitions, as the edge measures them (TurnMetrics):
- **voice-to-voice (v2v)**: from when the audio at the end of the caller's speech reached the
  edge to when the first byte of the agent's audio left it. It includes the endpointing
  silence (the VAD's wait to be sure the caller stopped).
- **endpointing**: that silence wait; **STT final**: endpointing decision to final transcript;
  **LLM first token**: request to first token; **TTS first audio**: first token to first audio
  (the first clause has to be written, then synthesized).
- **added latency**: voicestack's v2v less the in-process baseline's on the same audio.

"""


async def _real(address: str, speech: list, levels: list[int], turns: int, turns_many: int, rounds: int):
    """voicestack and the in-process baseline by turns: `rounds` x (one voicestack session of
    `turns` questions, then the baseline's same turns), so other work on the machine falls on
    both alike; then the levels of several sessions."""
    engines = await asyncio.to_thread(baseline.Engines)
    try:
        # Discarded warm-ups: every model has run once, in both, before anything is timed.
        await asyncio.to_thread(engines.tts.synthesize, baseline.Settings().disclosure_text)
        await run_level(address, Plan(sessions=1, turns=1), speech, progress=False)
        await baseline.run_turns(engines, speech, 1)
        ones, base = [], []
        for r in range(rounds):
            level = await run_level(address, Plan(sessions=1, turns=turns, turn_timeout_s=90.0), speech)
            for turn in level["turns"]:
                turn["round"] = r
            ones.append(level)
            base += await baseline.run_turns(engines, speech, turns, round_=r)
            print(baseline.baseline_table(base), file=sys.stderr)
    finally:
        await engines.aclose()
    results = [merge_levels(ones)] if 1 in levels else []
    for n in levels:
        if n != 1:
            results.append(await run_level(address, Plan(sessions=n, turns=turns_many, ramp_s=2.0, turn_timeout_s=90.0),
                                           speech))
    return results, base, merge_levels(ones)


def run_real(speech: list, levels: list[int], turns: int, turns_many: int, rounds: int, feature_turns: int = 0):
    """The real-model levels and overhead, then (with feature_turns) the STT and TTS before/after
    on the same stack, last, since it restarts those two stages with their features off."""
    from voicestack.launcher import START_ORDER, Stack

    # Every stage takes every session (the defaults are sized for one replica per core or GPU):
    # on this machine the extra sessions wait for the CPU inside the stages.
    env = {"VOICESTACK_CAPACITY": str(max(levels) + 2)}
    with Stack(ports="free", log_dir=REPO / "build" / "bench-logs", env=env) as stack:
        print("starting the embedded default (real models)...", file=sys.stderr)
        stack.start(START_ORDER)
        real = asyncio.run(_real(stack.processes["edge"].address, speech, levels, turns, turns_many, rounds))
        if not feature_turns:
            return real, None
        print("STT finalization and TTS first audio, before and after...", file=sys.stderr)
        return real, asyncio.run(features.measure(stack, feature_turns, parts=("stt", "tts")))


def sustainable_real(levels: list[dict]) -> str:
    """The largest level on the real models that holds the 1-session p95 within the capacity
    sweep's criterion (and fails no turn)."""
    one = next((lv for lv in levels if lv["sessions"] == 1), None)
    if one is None:
        return ""
    reference = one["summary"]["voice_to_voice_ms"]["p95"]
    best, verdicts = 1, []
    for lv in sorted(levels, key=lambda lv: lv["sessions"]):
        ratio = lv["summary"]["voice_to_voice_ms"]["p95"] / reference
        failed = lv["turns_planned"] - lv["turns_ok"]
        if lv["sessions"] > 1:
            verdicts.append(f"{lv['sessions']} sessions: p95 {ratio:.2f}x" + (f", {failed} turns failed" if failed else ""))
        if ratio <= capacity.DEGRADED and not failed:
            best = max(best, lv["sessions"])
    return (f"Largest sustainable level on the real models here: **{best} session{'s' if best > 1 else ''}** "
            f"(v2v p95 within {capacity.DEGRADED:.2f}x the 1-session p95 and no failed turn; "
            + "; ".join(verdicts) + "). On 2 CPU cores the four models share the cores, so each added "
            "session queues behind the others' decoding and synthesis; the edge itself carries far more "
            "(the capacity sweep below).")


def _pm(value: float, unit: str = "ms") -> str:
    return "-" if value is None or math.isnan(value) else f"{value:+.0f} {unit}"


def markdown(result: dict) -> str:
    m = result["machine"]
    out = [
        "_Generated by `make bench` (`python -m load.bench`): edit outside the markers, not here._",
        "",
        f"- machine: {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}, loopback only",
        f"- commit: {m['commit']}; date: {m['date']}; command: `{result['command']}`; took {result['took_s']:.0f} s",
        f"- load average at start / end: {m['loadavg']} / {result['loadavg_end']} "
        "(anything above the voicestack processes' own use means other work shared the CPUs)",
        "",
    ]
    real = result.get("real")
    if real:
        headers, rows = latency_rows(real)
        out += ["### Voice-to-voice on the embedded models (CPU), ms", "",
                "Each session listens to the agent's disclosure, then asks its questions (espeak-ng speech, "
                "20 ms frames at real-time pace), waiting for each answer. Percentiles are over the turns of "
                "the level: with this few turns, p99 is close to the maximum.", "",
                table(headers, rows), ""]
        out += [sustainable_real(real), ""]
    over = result.get("overhead")
    if over:
        rows = []
        for name, key in (("voice-to-voice", "voice_to_voice_ms"), ("endpointing", "endpointing_ms"),
                          ("STT final", "stt_final_ms"), ("LLM first token", "llm_first_token_ms"),
                          ("TTS first audio", "tts_first_audio_ms")):
            o = over[key]
            rows.append([name, fmt_ms(o["voicestack_p50"]), fmt_ms(o["baseline_p50"]), _pm(o["added_p50"]),
                         fmt_ms(o["voicestack_p99"]), fmt_ms(o["baseline_p99"]), _pm(o["added_p99"]),
                         # (a ratio to a baseline of ~0 ms, a decode already done, says nothing)
                         f"{o['ratio_p50']:.2f}x" if not math.isnan(o["ratio_p50"]) and o["baseline_p50"] >= 1 else "-"])
        v = over["voice_to_voice_ms"]
        out += ["### Overhead against the in-process baseline", "",
                f"1 session; voicestack and the baseline (`load/baseline.py`: the same models in this one process, "
                f"no NATS, no gRPC, the STT decoding on the STT stage's own schedule - at speech pauses - placed on "
                f"the audio's clock) alternate, {result['rounds']} rounds of {result['turns']} turns each, and each "
                f"voicestack turn is paired with the baseline turn of the same audio and place in the conversation "
                f"({over['pairs']} pairs; {over['same_transcript']} heard the same words, {over['same_reply_length']} "
                "got a reply of the same length). Added = the percentiles of the per-turn differences. It is "
                "everything voicestack does besides running the models: gRPC, the NATS hops, the edge's turn logic, "
                "and the stages working at once on the same cores (the VAD, STT decodes and the caller's audio "
                "competing, LLM and TTS overlapping), which the one-thing-at-a-time baseline does not do.", "",
                table(["", "voicestack p50", "baseline p50", "added p50", "voicestack p99", "baseline p99",
                       "added p99", "ratio p50"], rows), "",
                f"Target: under {TARGETS['added_p50_ms']:.0f} ms p50 and {TARGETS['added_p99_ms']:.0f} ms p99 added per turn: "
                f"measured {_pm(v['added_p50'])} p50, {_pm(v['added_p99'])} p99 "
                f"(v2v ratio {v['ratio_p50']:.2f}x). With a few turns on a shared 2-core machine, differences "
                "of a few hundred ms are within the noise (the models' own times vary that much from run to run): "
                "the bus hop, and the capacity run's time from the endpointing decision to the first agent audio "
                "on engines that take no time, measure voicestack's own cost directly.", ""]
    hop = result.get("bus_hop")
    if hop:
        s, b, o = hop["stream_round_trip_us"], hop["bare_nats_round_trip_us"], hop["open_us"]
        rows = [["stage stream round trip (StageClient -> StageEndpoint -> back)", f"{s['p50']:.0f}", f"{s['p99']:.0f}", s["n"]],
                ["bare nats.py round trip, same payload", f"{b['p50']:.0f}", f"{b['p99']:.0f}", b["n"]],
                ["stream open (request/reply on the queue group)", f"{o['p50']:.0f}", f"{o['p99']:.0f}", o["n"]]]
        out += ["### Bus hop, µs", "",
                "One process, two NATS connections to a local nats-server, a trivial echo handler; a round trip "
                "is two hops, so one hop is about half.", "",
                table(["", "p50 µs", "p99 µs", "n"], rows), "",
                f"Target: a hop under {TARGETS['bus_hop_p50_us']:.0f} µs p50: measured about "
                f"{s['p50'] / 2:.0f} µs (half the stream round trip).", ""]
    cap = result.get("capacity")
    if cap:
        out += ["### Edge capacity (cheap engines: the edge and the bus only)", "",
                "Stages on `VOICESTACK_CHEAP_ENGINES=1` (the stand-ins in each stage's `engine.py`: energy VAD, fixed "
                "transcript and reply, silent TTS), never evidence the pipeline works. Sessions ramp level by "
                f"level until {cap['criterion']}. Edge CPU from /proc while every session of the level is in "
                "its call; NATS messages from nats-server's /varz. On this machine the load generator, "
                "nats-server and the four stages share the same cores with the edge.", "",
                capacity.capacity_table(cap), "",
                f"Sustained: **{cap['sustained_sessions']} sessions** ({cap['stopped']}), "
                f"**{cap['sessions_per_edge_core']:.0f} sessions per edge core** at that level, "
                f"{cap['edge_cpu_ms_per_session_second']:.1f} ms of edge CPU per session-second "
                f"(at most {1000 / cap['edge_cpu_ms_per_session_second']:.0f} sessions on one fully busy core), "
                f"{cap['nats_msgs_per_s_per_session']:.0f} NATS messages in per second per session. "
                f"Target: {TARGETS['sessions_per_edge_core']} sessions per edge core.", ""]
        one = cap.get("one_session")
        if one:
            after = one["after_endpointing_ms"]
            out += [f"With engines that take no time, what voicestack itself adds to a turn shows directly: at 1 session "
                    f"the time from the endpointing decision to the first agent audio is {fmt_ms(after['p50'])} ms p50, "
                    f"{fmt_ms(after['p99'])} ms p99 (STT final {fmt_ms(one['stt_final_ms']['p50'])}, LLM first token "
                    f"{fmt_ms(one['llm_first_token_ms']['p50'])}, TTS first audio {fmt_ms(one['tts_first_audio_ms']['p50'])} "
                    f"ms p50: stream opens, the reply's first clause arriving delta by delta, hops over NATS); and "
                    f"endpointing takes {fmt_ms(one['endpointing_ms']['p50'])} ms p50 for {capacity.SILENCE_MS} ms of "
                    "configured silence (the VAD decides on 32 ms windows, and its events cross the bus).", ""]
    comparison = result.get("per_message")
    if comparison:
        arms = {a["arm"]: a for a in comparison["arms"]}
        before, after = comparison["arms"][0], comparison["arms"][1]
        out += ["### Per-message work, before and after", "",
                f"The edge's CPU goes mostly to handling messages: each 20 ms client frame is a gRPC message in, "
                f"and was a NATS message to the VAD and another to the STT. Changed: the VAD gets whole 32 ms "
                f"windows (it decides on nothing shorter, so no latency is added), the STT gets 60 ms batches "
                f"while the user speaks, data messages carry one header and a trace context only inside a turn, "
                f"and the \"after\" arms run every service on uvloop (`VOICESTACK_UVLOOP=1`). Cheap engines, "
                f"{comparison['sessions']} sessions, {comparison['rounds']} runs of each arm alternating "
                f"(`python -m load.capacity --compare {comparison['sessions']}`); the first arm turns the batching "
                "off and runs asyncio's loop (`VOICESTACK_BATCH_STAGE_AUDIO=0 VOICESTACK_UVLOOP=0`).", "",
                capacity.compare_table(comparison), "",
                f"Bus messages per session: {before['nats_in_msgs_per_s_per_session']:.0f} -> "
                f"{after['nats_in_msgs_per_s_per_session']:.0f} a second; edge CPU "
                f"{before['edge_cpu_ms_per_session_second']:.1f} -> {after['edge_cpu_ms_per_session_second']:.1f} ms per "
                f"session-second (runs of the same arm differ by up to "
                f"{max(max(a['edge_cpu_ms_per_session_second_runs']) - min(a['edge_cpu_ms_per_session_second_runs']) for a in arms.values()):.1f} ms "
                "on this shared machine).", ""]
    floor = result.get("grpc_floor")
    if floor:
        best20 = min((r for r in floor if r["frame_ms"] == 20), key=lambda r: r["cpu_ms_per_session_second"])
        out += ["### The floor: grpc.aio alone", "",
                "A bare grpc.aio server with the edge's Converse method and messages reads the same streams of "
                "frames at real-time pace and does nothing with them (`python -m load.grpc_floor`): no session, no "
                "NATS. No Python gRPC edge can spend less per frame, so this bounds sessions per core from above.", "",
                grpc_floor.floor_table(floor), "",
                f"Reading 20 ms frames costs grpc.aio itself {best20['cpu_ms_per_session_second']:.1f} ms of CPU per "
                f"session-second here (at most {best20['sessions_per_core_at_most']:.0f} sessions per core); the "
                f"{TARGETS['sessions_per_edge_core']}-session target needs "
                f"{1000 / TARGETS['sessions_per_edge_core']:.1f} ms for everything the edge does. Most of gRPC's cost "
                "is its poller thread waking the event loop for each message (a socket write per wake-up: "
                "`py-spy --native` on the edge puts a fifth of its CPU there). Larger client frames divide it: "
                "the protocol takes 10-100 ms frames.", ""]
    feats = result.get("features")
    if feats:
        out += ["### STT finalization and TTS first audio, before and after", "",
                "Real models, each stage's own gRPC API at real-time pace (`python -m load.features --parts stt,tts`): "
                "STT finalization is the end of the audio (600 ms of trailing silence, as the edge's endpointing "
                "would send) to the final transcript, with decoding only at the end (`stt_pause_decode=false`, "
                "before) and at speech pauses (after); TTS first audio is the first word in (five replies "
                "arriving word by word at ~100 words a second, as from the LLM) to the first audio out, and first "
                "speech heard adds the quiet before the voice in that audio, for each `tts_split`: the whole "
                "sentence, the first clause of 4+ words, the first phrase (the default).", "",
                features.markdown(feats), ""]
    if result.get("plot"):
        out += [f"![latency vs sessions, and where the time goes]({result['plot']})", ""]
    return "\n".join(out)


def rewrite(path: Path, body: str) -> None:
    """Replace what lies between the markers; create the file (or the markers) if missing."""
    text = path.read_text() if path.exists() else HEADER
    block = f"{BEGIN}\n{body.rstrip()}\n{END}"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m load.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", default="1,2,10", help="levels on the real models (default 1,2,10)")
    p.add_argument("--turns", type=int, default=3, help="turns per round of the 1-session level (and the baseline)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of voicestack-then-baseline at 1 session")
    p.add_argument("--turns-many", type=int, default=2, help="turns per session of the other levels")
    p.add_argument("--capacity-levels", default="1,10,25,50,100,150,200,300")
    p.add_argument("--capacity-budget", type=float, default=150.0)
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--skip-bus", action="store_true")
    p.add_argument("--skip-capacity", action="store_true")
    p.add_argument("--compare-sessions", type=int, default=50, help="level of the per-message before/after (0: skip)")
    p.add_argument("--compare-rounds", type=int, default=2)
    p.add_argument("--skip-floor", action="store_true")
    p.add_argument("--skip-features", action="store_true")
    p.add_argument("--features-turns", type=int, default=3)
    p.add_argument("--no-markdown", action="store_true", help="leave BENCHMARKS.md alone")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--render", type=Path, metavar="BENCH_JSON",
                   help="measure nothing: rewrite BENCHMARKS.md from an earlier bench.json")
    args = p.parse_args(argv)
    if args.render:
        rewrite(BENCHMARKS, markdown(json.loads(args.render.read_text(), parse_constant=lambda c: math.nan)))
        print(f"rewrote {BENCHMARKS} from {args.render}", file=sys.stderr)
        return 0

    began = time.monotonic()
    speech = speech_mod.sentences()
    flags = " ".join(sys.argv[1:] if argv is None else argv)
    result: dict = {"machine": machine(), "command": f"python -m load.bench {flags}".strip() + (" (make bench)" if not flags else "")}
    if not args.skip_bus:
        print("bus hop...", file=sys.stderr)
        result["bus_hop"] = baseline.run_bus_hop()
    if not args.skip_real:
        levels = [int(n) for n in args.sessions.split(",")]
        result["rounds"], result["turns"] = args.rounds, args.turns
        (result["real"], result["baseline"], one), result["features"] = run_real(
            speech, levels, args.turns, args.turns_many, args.rounds, 0 if args.skip_features else args.features_turns)
        headers, rows = latency_rows(result["real"])
        print(table(headers, rows), file=sys.stderr)
        result["overhead"] = baseline.overhead(one["turns"], result["baseline"])
    if not args.skip_capacity:
        print("edge capacity on cheap engines...", file=sys.stderr)
        result["capacity"] = capacity.run([int(n) for n in args.capacity_levels.split(",")],
                                          budget_s=args.capacity_budget)
        print(capacity.capacity_table(result["capacity"]), file=sys.stderr)
        if args.compare_sessions:
            print("per-message work, before and after...", file=sys.stderr)
            result["per_message"] = capacity.compare(sessions=args.compare_sessions, rounds=args.compare_rounds)
            print(capacity.compare_table(result["per_message"]), file=sys.stderr)
    if not args.skip_floor:
        result["grpc_floor"] = grpc_floor.run(sessions=args.compare_sessions or 50)
        print(grpc_floor.floor_table(result["grpc_floor"]), file=sys.stderr)

    if not args.skip_features and args.skip_real:  # (otherwise measured on the real-model stack above)
        result["features"] = features.run(args.features_turns, parts=("stt", "tts"))
    if result.get("features"):
        print(features.markdown(result["features"]), file=sys.stderr)

    args.out.mkdir(parents=True, exist_ok=True)
    series = [("embedded models", result.get("real") or []), ("cheap engines", (result.get("capacity") or {}).get("levels", []))]
    if any(levels for _, levels in series):
        png = draw(series, args.out / "bench.png", title=f"voicestack, {result['machine']['nproc']} CPUs, {result['machine']['date']}")
        result["plot"] = str(png.relative_to(REPO)) if png.is_relative_to(REPO) else str(png)
    result["took_s"] = time.monotonic() - began
    result["loadavg_end"] = loadavg()
    write_json(args.out / "bench.json", result)
    body = markdown(result)
    print(body)
    if not args.no_markdown:
        rewrite(BENCHMARKS, body)
        print(f"rewrote {BENCHMARKS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
