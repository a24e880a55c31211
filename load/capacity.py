"""Edge capacity: how many sessions one edge core carries.

The stages run cheap engines (VOICESTACK_CHEAP_ENGINES=1: EnergyVad, FixedStt, FixedLlm and
SilentTts, in each stage's engine.py), so they answer at once and the edge and the bus are
what the load meets. Sessions ramp level by level, each streaming real speech in 20 ms
frames, until voice-to-voice p95 is more than 10% over its 1-session value (or anything
fails). For each level:

  edge CPU     /proc/<edge pid>/stat while every session of the level is in its call;
               sessions per edge core = sessions / edge cores busy
  NATS         nats-server's /varz (started with -m): in_msgs and out_msgs per second,
               per session
  the rest     CPU of every other process too (stages, nats-server, this load
               generator), since on a small machine they share the cores with the edge

  python -m load.capacity --levels 1,10,25,50 --json build/capacity.json
  python -m load.capacity --compare 50     # the per-message changes, before and after
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from pathlib import Path

from load import speech as speech_mod
from load.generator import Live, Plan, run_level
from load.stats import fmt_ms, summarize, table, write_json
from load.system import REPO, CpuMeter, nats_varz

CHEAP_ENV = {"VOICESTACK_CHEAP_ENGINES": "1", "VOICESTACK_CAPACITY": "5000"}
DEGRADED = 1.10  # p95 over 110% of the 1-session p95
LEVELS = (1, 10, 25, 50, 75, 100, 150, 200, 300, 400, 500)
CLIENT_LAG_MS = 20.0  # frames later than this at p99: the load generator is short of CPU too
SILENCE_MS = 300  # endpointing silence: the part of v2v no load changes; kept short so 10% means something


async def _sample(meter: CpuMeter, monitor_port: int, live: Live, samples: list, stop: asyncio.Event, every: float = 0.5):
    last_varz = await asyncio.to_thread(nats_varz, monitor_port)
    meter.read()
    while not stop.is_set():
        active_before = live.active
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass
        elapsed, cores = meter.read()
        varz = await asyncio.to_thread(nats_varz, monitor_port)
        samples.append({
            "t": time.monotonic() - live.began, "seconds": elapsed, "cores": cores,
            "all_in_call": active_before == live.active == live.plan.sessions,
            "active": live.active,
            "in_msgs_per_s": (varz["in_msgs"] - last_varz["in_msgs"]) / elapsed,
            "out_msgs_per_s": (varz["out_msgs"] - last_varz["out_msgs"]) / elapsed,
            "in_bytes_per_s": (varz["in_bytes"] - last_varz["in_bytes"]) / elapsed,
        })
        last_varz = varz


def _steady(samples: list, sessions: int) -> dict:
    """Means over the samples taken while every session was in its call."""
    steady = [s for s in samples if s["all_in_call"]] or samples
    seconds = sum(s["seconds"] for s in steady) or math.nan
    names = steady[0]["cores"] if steady else {}
    cores = {n: sum(s["cores"][n] * s["seconds"] for s in steady) / seconds for n in names}
    in_rate = sum(s["in_msgs_per_s"] * s["seconds"] for s in steady) / seconds
    out_rate = sum(s["out_msgs_per_s"] * s["seconds"] for s in steady) / seconds
    in_bytes = sum(s["in_bytes_per_s"] * s["seconds"] for s in steady) / seconds
    edge = cores.get("edge", math.nan)
    return {
        "window_s": seconds, "steady": bool([s for s in samples if s["all_in_call"]]),
        "cores": cores, "edge_cores": edge,
        "sessions_per_edge_core": sessions / edge if edge > 0 else math.nan,
        "edge_cpu_ms_per_session_second": edge * 1000 / sessions,
        "nats_in_msgs_per_s": in_rate, "nats_out_msgs_per_s": out_rate,
        "nats_in_msgs_per_s_per_session": in_rate / sessions,
        "nats_out_msgs_per_s_per_session": out_rate / sessions,
        "nats_in_bytes_per_s_per_session": in_bytes / sessions,
        "machine_cores_busy": sum(v for v in cores.values() if not math.isnan(v)),
    }


async def _measure(address: str, pids: dict, monitor_port: int, plan: Plan, speech: list, progress: bool) -> dict:
    """One level with its CPU and NATS samples."""
    live = Live(plan)
    samples: list = []
    stop = asyncio.Event()
    meter = CpuMeter({**pids, "load generator": os.getpid()})
    sampler = asyncio.create_task(_sample(meter, monitor_port, live, samples, stop))
    try:
        level = await run_level(address, plan, speech, live=live, progress=progress)
    finally:
        stop.set()
        await sampler
    level["resources"] = _steady(samples, plan.sessions)
    # With engines that take no time, what follows the endpointing decision is the edge's
    # and the bus's own work: STT final, LLM first token and TTS first audio over NATS.
    level["after_endpointing_ms"] = summarize(t["voice_to_voice_ms"] - t["endpointing_ms"]
                                              for t in level["turns"] if t["ok"])
    level.pop("turns")  # hundreds of turns a level: the summaries carry them
    return level


async def sweep(address: str, pids: dict, monitor_port: int, levels=LEVELS, turns: int = 2,
                budget_s: float = 180.0, progress: bool = True, speech=None, confirm: bool = True) -> dict:
    """Levels in order until one degrades. With `confirm`, a level that degrades without failing
    runs once more, and counts as degraded only if it does again: other work on a small shared
    machine comes in bursts, and one burst should not end the sweep."""
    speech = speech or speech_mod.sentences()
    results = []
    began = time.monotonic()
    reference = None
    stopped = "all levels ran"
    for n in levels:
        if time.monotonic() - began > budget_s:
            stopped = f"time budget of {budget_s:.0f}s spent"
            break
        # The 1-session reference gets more turns: every later level is judged against its p95.
        plan = Plan(sessions=n, turns=max(turns, 4) if n == 1 else turns, ramp_s=min(5.0, 0.05 * n),
                    silence_ms=SILENCE_MS, turn_timeout_s=20.0)
        attempts = []
        while True:
            level = await _measure(address, pids, monitor_port, plan, speech, progress)
            p95 = level["summary"]["voice_to_voice_ms"]["p95"]
            if reference is None:
                reference = p95
            level["v2v_p95_vs_1_session"] = p95 / reference if reference else math.nan
            failures = sum(level["errors"].values()) + level["refused"] + (level["turns_planned"] - level["turns_ok"])
            level["failures"] = failures
            level["degraded"] = bool(failures) or not p95 <= reference * DEGRADED
            attempts.append(level)
            if progress:
                r = level["resources"]
                print(f"  {n} sessions: v2v p95 {fmt_ms(p95)} ms ({level['v2v_p95_vs_1_session']:.2f}x), "
                      f"edge {r['edge_cores']:.2f} cores, {r['nats_in_msgs_per_s_per_session']:.0f} NATS msgs in/s "
                      f"a session, failures {failures}", file=sys.stderr)
            if not (confirm and level["degraded"] and not failures and len(attempts) == 1):
                break
            print(f"  {n} sessions degraded: running it once more to confirm", file=sys.stderr)
        level["attempts_p95_vs_1_session"] = [a["v2v_p95_vs_1_session"] for a in attempts]
        results.append(level)
        if level["degraded"]:
            stopped = (f"{n} sessions: " + (f"{level['failures']} failed turns/sessions" if level["failures"] else
                                             "v2v p95 " + " then ".join(f"{x:.2f}x" for x in level["attempts_p95_vs_1_session"])
                                             + " the 1-session p95"))
            if level["send_lag_ms"]["p99"] > CLIENT_LAG_MS:
                stopped += (f"; the load generator itself fell behind (frames up to "
                            f"{level['send_lag_ms']['p99']:.0f} ms late at p99), so the machine, not the edge alone, was saturated")
            break
    sustained = [lv for lv in results if not lv["degraded"]]
    best = sustained[-1] if sustained else None
    return {
        "levels": results,
        "stopped": stopped,
        "criterion": (f"v2v p95 <= {DEGRADED:.2f} x the 1-session p95 and no failures (a level that degrades runs "
                      f"again and counts only if it degrades twice); endpointing silence {SILENCE_MS} ms"),
        "one_session": results[0]["summary"] | {"after_endpointing_ms": results[0]["after_endpointing_ms"]} if results else {},
        "sustained_sessions": best["sessions"] if best else 0,
        "sessions_per_edge_core": best["resources"]["sessions_per_edge_core"] if best else math.nan,
        "edge_cpu_ms_per_session_second": best["resources"]["edge_cpu_ms_per_session_second"] if best else math.nan,
        "nats_msgs_per_s_per_session": (best["resources"]["nats_in_msgs_per_s_per_session"] if best else math.nan),
    }


def start_cheap_stack(log_dir: Path, env: dict | None = None):
    """nats-server with monitoring, and the five services on cheap engines, on free ports."""
    from voicestack.launcher import START_ORDER, Stack, free_port

    monitor_port = free_port()
    stack = Stack(ports="free", log_dir=log_dir, env=CHEAP_ENV | (env or {}), nats_args=["-m", str(monitor_port)])
    try:
        stack.start(START_ORDER)
    except BaseException:
        stack.stop_all()
        raise
    pids = {name: p.popen.pid for name, p in stack.processes.items()}
    pids["nats-server"] = stack.nats.pid
    return stack, pids, monitor_port


def run(levels=LEVELS, turns: int = 2, budget_s: float = 180.0, log_dir: Path = REPO / "build" / "capacity-logs",
        progress: bool = True) -> dict:
    stack, pids, monitor_port = start_cheap_stack(log_dir)
    try:
        return asyncio.run(sweep(stack.processes["edge"].address, pids, monitor_port, levels, turns, budget_s, progress))
    finally:
        stack.stop_all()


# What the per-message work costs, before and after the changes made for it: the edge and
# the stages as they were (every 20 ms frame its own bus message to the VAD and to the STT,
# asyncio's event loop), as they are, and as they are with clients sending 60 ms frames.
ARMS = (
    ("before: every frame to each stage, asyncio loop",
     {"VOICESTACK_BATCH_STAGE_AUDIO": "0", "VOICESTACK_UVLOOP": "0"}, 20),
    ("after: whole VAD windows, 60 ms STT batches, uvloop", {"VOICESTACK_UVLOOP": "1"}, 20),
    ("after, clients sending 60 ms frames", {"VOICESTACK_UVLOOP": "1"}, 60),
)
# The clients' frame size, the stack as it is (#18 item 6: which default keeps latency).
FRAME_ARMS = tuple((f"clients sending {ms} ms frames", {"VOICESTACK_UVLOOP": "1"}, ms) for ms in (20, 40, 60))


def compare(arms=ARMS, sessions: int = 50, rounds: int = 2, turns: int = 2,
            log_dir: Path = REPO / "build" / "capacity-logs", progress: bool = True) -> dict:
    """The same level under each arm's settings, arms alternating round by round (so other
    work on the machine falls on all alike); a fresh cheap stack for every run."""
    runs: dict[str, list] = {name: [] for name, _, _ in arms}
    speech = speech_mod.sentences()
    for r in range(rounds):
        for name, env, frame_ms in arms:
            stack, pids, monitor_port = start_cheap_stack(log_dir, env)
            try:
                plan = Plan(sessions=sessions, turns=turns, ramp_s=min(5.0, 0.05 * sessions), silence_ms=SILENCE_MS,
                            turn_timeout_s=20.0, frame_ms=frame_ms)
                level = asyncio.run(_measure(stack.processes["edge"].address, pids, monitor_port, plan, speech, False))
            finally:
                stack.stop_all()
            runs[name].append(level)
            if progress:
                res = level["resources"]
                print(f"  round {r + 1}, {name}: edge {res['edge_cpu_ms_per_session_second']:.1f} ms CPU per "
                      f"session-second, {res['nats_in_msgs_per_s_per_session']:.0f} NATS msgs in/s a session",
                      file=sys.stderr)
    arms_out = []
    for name, env, frame_ms in arms:
        levels = runs[name]
        edge_ms = summarize(lv["resources"]["edge_cpu_ms_per_session_second"] for lv in levels)["p50"]
        arms_out.append({
            "arm": name, "env": env, "frame_ms": frame_ms, "runs": len(levels),
            "edge_cpu_ms_per_session_second": edge_ms,
            "edge_cpu_ms_per_session_second_runs": [lv["resources"]["edge_cpu_ms_per_session_second"] for lv in levels],
            "sessions_per_edge_core": 1000 / edge_ms if edge_ms else math.nan,
            "cores": {n: summarize(lv["resources"]["cores"][n] for lv in levels)["p50"]
                      for n in levels[0]["resources"]["cores"]},
            "nats_in_msgs_per_s_per_session": summarize(lv["resources"]["nats_in_msgs_per_s_per_session"]
                                                        for lv in levels)["p50"],
            "v2v_p50": summarize(lv["summary"]["voice_to_voice_ms"]["p50"] for lv in levels)["p50"],
            "v2v_p95": summarize(lv["summary"]["voice_to_voice_ms"]["p95"] for lv in levels)["p50"],
            "turns_ok": sum(lv["turns_ok"] for lv in levels), "turns_planned": sum(lv["turns_planned"] for lv in levels),
        })
    return {"sessions": sessions, "rounds": rounds, "arms": arms_out}


def compare_table(result: dict) -> str:
    rows = [[a["arm"], f"{a['edge_cpu_ms_per_session_second']:.2f}",
             " / ".join(f"{x:.2f}" for x in a["edge_cpu_ms_per_session_second_runs"]),
             f"{a['sessions_per_edge_core']:.0f}", f"{a['nats_in_msgs_per_s_per_session']:.0f}",
             f"{a['cores'].get('vad', math.nan):.2f}", f"{a['cores'].get('nats-server', math.nan):.2f}",
             fmt_ms(a["v2v_p50"]), fmt_ms(a["v2v_p95"]), f"{a['turns_ok']}/{a['turns_planned']}"]
            for a in result["arms"]]
    return table(["", "edge CPU ms per session-s (median)", "each run", "sessions per edge core",
                  "NATS in msg/s/session", "VAD cores", "nats-server cores", "v2v p50", "v2v p95", "turns ok"], rows)


def capacity_table(result: dict) -> str:
    rows = []
    for level in result["levels"]:
        r, v = level["resources"], level["summary"]["voice_to_voice_ms"]
        failures = level.get("failures", sum(level["errors"].values()) + level["refused"])
        rows.append([
            level["sessions"], fmt_ms(v["p50"]), fmt_ms(v["p95"]),
            fmt_ms(level["after_endpointing_ms"]["p50"]), fmt_ms(level["after_endpointing_ms"]["p95"]),
            " then ".join(f"{x:.2f}x" for x in level.get("attempts_p95_vs_1_session", [level["v2v_p95_vs_1_session"]])),
            f"{r['edge_cores']:.2f}", f"{r['sessions_per_edge_core']:.0f}", f"{r['edge_cpu_ms_per_session_second']:.1f}",
            f"{r['nats_in_msgs_per_s_per_session']:.0f}", f"{r['nats_out_msgs_per_s_per_session']:.0f}",
            f"{r['cores'].get('load generator', math.nan):.2f}", fmt_ms(level["send_lag_ms"]["p99"]),
            f"{r['machine_cores_busy']:.2f}",
            f"{level['turns_ok']}/{level['turns_planned']}", failures,
        ])
    return table(["sessions", "v2v p50", "v2v p95", "after endpointing p50", "after endpointing p95", "p95 vs 1", "edge cores", "sessions/edge core",
                  "edge CPU ms per session-s", "NATS in msg/s/session", "NATS out msg/s/session",
                  "load gen cores", "load gen lag p99 ms", "all cores busy", "turns ok", "failures"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m load.capacity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default=",".join(map(str, LEVELS)))
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--budget", type=float, default=180.0, help="seconds; no new level starts after this")
    p.add_argument("--json", type=Path)
    p.add_argument("--compare", type=int, metavar="SESSIONS", help="instead of the sweep: the before/after "
                   "arms of the per-message work at this many sessions, alternating")
    p.add_argument("--rounds", type=int, default=2, help="with --compare: runs of each arm")
    p.add_argument("--frames", action="store_true", help="with --compare: the arms are the clients' frame "
                   "sizes (20, 40, 60 ms) on the stack as it is")
    args = p.parse_args(argv)
    if args.compare:
        result = compare(arms=FRAME_ARMS if args.frames else ARMS, sessions=args.compare, rounds=args.rounds,
                         turns=args.turns)
        print(compare_table(result))
        if args.json:
            write_json(args.json, result)
        return 0
    result = run([int(n) for n in args.levels.split(",")], args.turns, args.budget)
    print(capacity_table(result))
    print(f"sustained: {result['sustained_sessions']} sessions ({result['stopped']}); "
          f"{result['sessions_per_edge_core']:.0f} sessions per edge core")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
