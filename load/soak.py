"""python -m load.soak: N sessions for M minutes, watching every process's memory and
file descriptors. Not part of `make test`.

  python -m load.soak                               # 4 sessions for 3 minutes (the defaults)
  python -m load.soak --sessions 8 --minutes 30 --json build/soak-30m.json
  python -m load.soak --cheap --sessions 50 --minutes 10    # the edge and the bus only

It starts nats-server and the five services itself (free ports), then runs rounds of
N concurrent callers, each listening to the agent's opening, asking --turns questions
in real speech and hanging up, so sessions churn as well as last. Every --every seconds
it samples each process's RSS (/proc/<pid>/status VmRSS) and open file descriptors
(/proc/<pid>/fd). At the end it prints the samples and a verdict per process:
  flat     after the --warmup, RSS grew by no more than the allowance below and
           descriptors by no more than FD_ALLOWANCE;
  plateau  RSS grew more than that, but not in the last third of the run (a cache or
           an allocator arena filling up to its high-water mark: the LLM's prefix cache,
           onnxruntime's arena);
  growing  still growing at the end, or descriptors growing: a leak until shown otherwise.
The exit status is 1 when a process is growing or a turn failed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import time
from pathlib import Path

from load import speech as speech_mod
from load.__main__ import CHEAP_ENV
from load.generator import Live, Plan, run_level
from load.stats import fmt_ms, summarize, table, write_json
from load.system import REPO, machine

# Growth allowed after the warm-up: allocator arenas and caches settle in steps of a
# few MB; a leak of one buffer per turn or session outgrows this within minutes.
RSS_ALLOWANCE_MB = 10.0
RSS_ALLOWANCE_FRACTION = 0.05
FD_ALLOWANCE = 3


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sample(pids: dict[str, int]) -> dict[str, dict]:
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = {"rss_mb": round(rss_mb(pid), 1), "fds": fd_count(pid)}
        except OSError:  # the process is gone: that is a finding too
            out[name] = {"rss_mb": None, "fds": None}
    return out


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if not var:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var * 60


def verdict(samples: list[dict], warmup_s: float) -> dict[str, dict]:
    """Per process: memory and descriptors at the end of the warm-up and at the end."""
    after = [s for s in samples if s["t"] >= warmup_s] or samples[-1:]
    late_from = after[-1]["t"] - (after[-1]["t"] - after[0]["t"]) / 3
    result = {}
    for name in samples[0]["processes"]:
        series = [(s["t"], s["processes"][name]) for s in after if s["processes"][name]["rss_mb"] is not None]
        if not series:
            result[name] = {"state": "growing", "why": "process gone"}
            continue
        (t0, first), (_, last) = series[0], series[-1]
        rss_growth = last["rss_mb"] - first["rss_mb"]
        fd_growth = last["fds"] - first["fds"]
        allowance = max(RSS_ALLOWANCE_MB, RSS_ALLOWANCE_FRACTION * first["rss_mb"])
        late = next(p for t, p in series if t >= late_from)
        late_growth = last["rss_mb"] - late["rss_mb"]
        if fd_growth > FD_ALLOWANCE or late_growth > allowance / 2:
            state = "growing"
        elif rss_growth > allowance:
            state = "plateau"
        else:
            state = "flat"
        result[name] = {
            "rss_start_mb": first["rss_mb"], "rss_end_mb": last["rss_mb"],
            "rss_max_mb": max(p["rss_mb"] for _, p in series), "rss_growth_mb": round(rss_growth, 1),
            "rss_slope_mb_per_min": round(slope_per_minute([(t, p["rss_mb"]) for t, p in series]), 2),
            "fds_start": first["fds"], "fds_end": last["fds"], "fds_max": max(p["fds"] for _, p in series),
            "fd_growth": fd_growth, "rss_allowance_mb": round(allowance, 1),
            "rss_growth_last_third_mb": round(late_growth, 1), "state": state,
            "since_s": round(t0),
        }
    return result


async def soak(address: str, pids: dict[str, int], plan: Plan, minutes: float, every: float, speech: list) -> dict:
    began = time.monotonic()
    samples: list[dict] = []
    rounds: list[dict] = []
    live = Live(plan)
    stop = asyncio.Event()

    async def sampler():
        while True:
            samples.append({"t": round(time.monotonic() - began, 1), "processes": sample(pids),
                            "sessions_done": live.finished, "turns_ok": live.turns_ok,
                            "turns_failed": live.turns_failed})
            line = "  ".join(f"{n} {p['rss_mb']}MB/{p['fds']}fd" for n, p in samples[-1]["processes"].items())
            print(f"[{samples[-1]['t']:7.1f}s] {line} | turns ok {live.turns_ok} failed {live.turns_failed}",
                  file=sys.stderr, flush=True)
            try:
                await asyncio.wait_for(stop.wait(), every)
                return
            except asyncio.TimeoutError:
                pass

    sampling = asyncio.create_task(sampler())
    try:
        while time.monotonic() - began < minutes * 60:
            rounds.append(await run_level(address, plan, speech, live=live, progress=False))
    finally:
        stop.set()
        await sampling
    samples.append({"t": round(time.monotonic() - began, 1), "processes": sample(pids),
                    "sessions_done": live.finished, "turns_ok": live.turns_ok, "turns_failed": live.turns_failed})
    return {"samples": samples, "rounds": rounds, "duration_s": time.monotonic() - began}


def samples_table(samples: list[dict]) -> str:
    names = list(samples[0]["processes"])
    headers = ["t (s)", *[f"{n} MB / fds" for n in names], "sessions", "turns ok", "failed"]
    rows = [[f"{s['t']:.0f}", *[f"{s['processes'][n]['rss_mb']} / {s['processes'][n]['fds']}" for n in names],
             s["sessions_done"], s["turns_ok"], s["turns_failed"]] for s in samples]
    return table(headers, rows)


def verdict_table(result: dict[str, dict]) -> str:
    headers = ["process", "RSS after warm-up (MB)", "RSS at end", "growth", "in the last third",
               "slope (MB/min)", "fds after warm-up", "fds at end", "verdict"]
    rows = [[name, v.get("rss_start_mb", "-"), v.get("rss_end_mb", "-"), v.get("rss_growth_mb", "-"),
             v.get("rss_growth_last_third_mb", "-"), v.get("rss_slope_mb_per_min", "-"), v.get("fds_start", "-"),
             v.get("fds_end", "-"), v["state"]] for name, v in result.items()]
    return table(headers, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m load.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=4, help="concurrent callers (default 4)")
    p.add_argument("--minutes", type=float, default=3.0, help="how long to keep calling (default 3)")
    p.add_argument("--turns", type=int, default=2, help="questions per call before hanging up (default 2)")
    p.add_argument("--every", type=float, default=10.0, help="seconds between samples (default 10)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds before the baseline sample (default: a third of the run, at most 120)")
    p.add_argument("--cheap", action="store_true", help="cheap engines: the edge and the bus only")
    p.add_argument("--json", type=Path, default=REPO / "load" / "results" / "soak.json", help="write the results here")
    p.add_argument("--log-dir", type=Path, default=REPO / "build" / "soak-logs", help="service logs")
    args = p.parse_args(argv)
    if args.sessions < 1 or args.minutes <= 0 or args.every <= 0:
        p.error("--sessions, --minutes and --every must be positive")
    warmup = args.warmup if args.warmup is not None else min(120.0, args.minutes * 60 / 3)

    from voicestack.launcher import START_ORDER, Stack

    speech = speech_mod.sentences()
    plan = Plan(sessions=args.sessions, turns=args.turns, ramp_s=min(5.0, args.sessions * 0.5))
    stack = Stack(ports="free", log_dir=args.log_dir, env=CHEAP_ENV if args.cheap else {})
    print(f"starting the stack{' (cheap engines)' if args.cheap else ''}; logs in {args.log_dir}", file=sys.stderr)
    try:
        stack.start(START_ORDER)
        pids = {name: proc.popen.pid for name, proc in stack.processes.items()}
        pids["nats"] = stack.nats.pid
        print(f"{args.sessions} sessions x {args.minutes:g} min, sampling every {args.every:g} s "
              f"(baseline after {warmup:.0f} s)", file=sys.stderr)
        run = asyncio.run(soak(stack.processes["edge"].address, pids, plan, args.minutes, args.every, speech))
    finally:
        stack.stop_all()

    turns = [t for r in run["rounds"] for t in r["turns"]]
    # (the rounds share one Live: its error counts are running totals)
    errors = collections.Counter(run["rounds"][-1]["errors"] if run["rounds"] else {})
    result = verdict(run["samples"], warmup)
    print(samples_table(run["samples"]))
    print()
    print(verdict_table(result))
    ok = sum(t["ok"] for t in turns)
    v2v = summarize(t["voice_to_voice_ms"] for t in turns if t["ok"])
    print(f"\n{len(run['rounds'])} rounds, {sum(r['sessions'] for r in run['rounds'])} sessions, "
          f"{ok}/{len(turns)} turns ok, errors {dict(errors) or 'none'}; "
          f"v2v p50 {fmt_ms(v2v['p50'])} ms, p95 {fmt_ms(v2v['p95'])} ms")
    out = {
        "machine": machine(),
        "command": "python -m load.soak " + " ".join(sys.argv[1:] if argv is None else argv),
        "plan": {"sessions": args.sessions, "minutes": args.minutes, "turns": args.turns, "every_s": args.every,
                 "warmup_s": warmup, "cheap_engines": args.cheap},
        "allowance": {"rss_mb": RSS_ALLOWANCE_MB, "rss_fraction": RSS_ALLOWANCE_FRACTION, "fds": FD_ALLOWANCE},
        "duration_s": run["duration_s"],
        "rounds": len(run["rounds"]),
        "sessions": sum(r["sessions"] for r in run["rounds"]),
        "turns": len(turns), "turns_ok": ok, "errors": dict(errors),
        "voice_to_voice_ms": v2v,
        "verdict": result,
        "samples": run["samples"],
    }
    write_json(args.json, out)
    print(f"wrote {args.json}", file=sys.stderr)
    steady = all(v["state"] != "growing" for v in result.values())
    return 0 if steady and ok == len(turns) and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
