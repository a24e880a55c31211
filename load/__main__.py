"""python -m load: concurrent Converse sessions against an edge, with percentiles.

  python -m load --address 127.0.0.1:50051 --sessions 1,4 --turns 2 --ramp 2
  python -m load --start --sessions 1 --turns 3            # starts the embedded default itself
  python -m load --start --cheap --sessions 1,20,50         # cheap engines: the edge and bus only

Progress goes to stderr while it runs; the table to stdout at the end; --json and
--plot write the results.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from load import speech as speech_mod
from load.generator import Plan, run_level
from load.plot import draw
from load.stats import latency_rows, table, write_json
from load.system import REPO, machine

CHEAP_ENV = {"VOICESTACK_CHEAP_ENGINES": "1", "VOICESTACK_CAPACITY": "5000"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m load", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", help="edge gRPC address, host:port")
    where.add_argument("--start", action="store_true", help="start nats-server and the five services here (free ports)")
    p.add_argument("--cheap", action="store_true", help="with --start: cheap engines (VOICESTACK_CHEAP_ENGINES=1), "
                   "so the edge and the bus are what is measured; never evidence the pipeline works")
    p.add_argument("--sessions", default="1", help="concurrent sessions; a comma list runs one level after another (default 1)")
    p.add_argument("--turns", type=int, default=2, help="questions per session (default 2)")
    p.add_argument("--ramp", type=float, default=2.0, help="seconds over which a level's sessions start (default 2)")
    p.add_argument("--turn-timeout", type=float, default=60.0, help="seconds from end of speech to the answer's end")
    p.add_argument("--silence-ms", type=int, default=0, help="endpointing silence per session (0 = edge default)")
    p.add_argument("--gap-ms", type=int, default=300, help="silence after each answer before the next question")
    p.add_argument("--frame-ms", type=int, default=20, help="audio per request (10-100; 60 costs the edge about a "
                   "quarter less CPU than 20, for up to 40 ms more buffering at the client: BENCHMARKS.md)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--plot", type=Path, help="draw the PNG here")
    p.add_argument("--log-dir", type=Path, default=REPO / "build" / "load-logs", help="service logs with --start")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    args = p.parse_args(argv)
    args.levels = [int(n) for n in str(args.sessions).split(",") if n.strip()]
    if not args.levels or min(args.levels) < 1:
        p.error("--sessions: one or more positive counts, e.g. 1,4")
    return args


async def sweep(address: str, levels: list[int], plan: Plan, speech: list, progress: bool = True) -> list[dict]:
    results = []
    for n in levels:
        level_plan = Plan(**{**plan.__dict__, "sessions": n})
        results.append(await run_level(address, level_plan, speech, progress=progress))
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    speech = speech_mod.sentences()
    plan = Plan(turns=args.turns, ramp_s=args.ramp, turn_timeout_s=args.turn_timeout,
                silence_ms=args.silence_ms, gap_ms=args.gap_ms, frame_ms=args.frame_ms)
    stack = None
    address = args.address
    try:
        if args.start:
            from voicestack.launcher import START_ORDER, Stack

            stack = Stack(ports="free", log_dir=args.log_dir, env=CHEAP_ENV if args.cheap else {})
            print(f"starting the stack{' (cheap engines)' if args.cheap else ''}; logs in {args.log_dir}", file=sys.stderr)
            stack.start(START_ORDER)
            address = stack.processes["edge"].address
        started = time.time()
        levels = asyncio.run(sweep(address, args.levels, plan, speech, progress=not args.quiet))
    finally:
        if stack is not None:
            stack.stop_all()
    headers, rows = latency_rows(levels)
    print(table(headers, rows))
    result = {
        "machine": machine(),
        "command": "python -m load " + " ".join(sys.argv[1:] if argv is None else argv),
        "address": address, "started_stack": bool(args.start), "cheap_engines": bool(args.cheap),
        "started_at": started, "levels": levels,
    }
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        draw([("cheap engines" if args.cheap else "voicestack", levels)], args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    failed = sum(sum(level["errors"].values()) + level["refused"] for level in levels)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
