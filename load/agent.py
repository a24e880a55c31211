"""The agent's extras, measured on real processes: tool round trips and LLM routing.

1. Tool round trip: "What time is it?" spoken to the embedded default with a client-side
   get_time tool. Per turn: whether the model called the tool; call emitted (the ToolCall
   reaching the client) -> result sent; result -> the first agent audio after it (the
   LLM's second round and the TTS); voice-to-voice of the turn.
2. Routing: spoken requests of different kinds, each in its own session, with the
   llm-strong pool up (`up --strong-llm`: the same embedded model, more room): the share
   of turns per pool, the router's reasons, and LLM first-token latency per pool.

    python -m load.agent [--rounds 3] [--json load/results/agent.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from load.speech import speak
from load.stats import fmt_ms, summarize, table, write_json
from load.system import machine
from voicestack.client import converse, silence
from voicestack.launcher import START_ORDER, STRONG_LLM, Stack
from voicestack.v1 import edge_pb2, tools_pb2

GET_TIME = edge_pb2.ClientTool(definition=tools_pb2.ToolDefinition(
    name="get_time", description="Get the current time of day",
    parameters_json=json.dumps({"type": "object", "properties": {}})))
TOOL_QUESTIONS = ["What time is it?", "Can you tell me the time, please?", "What time is it now?"]
ROUTED_QUESTIONS = [
    "Hello there.", "Good morning.", "Thank you very much.",
    "Why is the sky blue?", "Explain how a bicycle works.", "Compare tea and coffee.",
    "What time is it in London?",
]


async def tool_turn(address: str, question: str) -> dict:
    marks: dict[str, float] = {}

    def on_event(event) -> None:
        kind = event.WhichOneof("kind")
        if kind == "tool_call" and "call" not in marks:
            marks["call"] = time.monotonic()
        elif kind == "agent_audio" and event.agent_audio.turn_index > 0 and "result" in marks \
                and "audio_after" not in marks:
            marks["audio_after"] = time.monotonic()

    def get_time(_arguments: dict) -> str:
        marks["result"] = time.monotonic()
        return f"The time is {time.strftime('%H:%M')}."

    config = edge_pb2.SessionConfig(tools=edge_pb2.ToolsConfig(client_tools=[GET_TIME]))
    audio = np.concatenate([silence(300), speak(question)])
    conversation = await converse(address, audio, config=config, timeout=120, on_event=on_event,
                                  tools={"get_time": get_time})
    turn = conversation.replies[0] if conversation.replies else None
    m = turn.metrics if turn else None
    return {
        "question": question, "ok": bool(turn and turn.ended and not conversation.errors),
        "called": "call" in marks, "reply": turn.reply_text.strip() if turn else "",
        "call_to_result_ms": (marks["result"] - marks["call"]) * 1000 if "result" in marks else None,
        "result_to_audio_ms": (marks["audio_after"] - marks["result"]) * 1000 if "audio_after" in marks else None,
        "v2v_ms": m.voice_to_voice_ms if m else None,
        "edge_tool_ms": m.tool_ms if m else None,
    }


async def routed_turn(address: str, question: str) -> dict:
    conversation = await converse(address, np.concatenate([silence(300), speak(question)]), timeout=120)
    turn = conversation.replies[0] if conversation.replies else None
    m = turn.metrics if turn and turn.metrics else None
    return {"question": question, "ok": bool(m), "route": m.llm_route if m else "", "reason": m.llm_route_reason if m else "",
            "llm_first_token_ms": m.llm_first_token_ms if m else None, "v2v_ms": m.voice_to_voice_ms if m else None}


async def measure(address: str, rounds: int) -> dict:
    tools, routes = [], []
    for r in range(rounds):
        for question in TOOL_QUESTIONS:
            tools.append(await tool_turn(address, question))
            print(f"tool round {r + 1}: {tools[-1]}", file=sys.stderr, flush=True)
        for question in ROUTED_QUESTIONS:
            routes.append(await routed_turn(address, question))
            print(f"route round {r + 1}: {routes[-1]}", file=sys.stderr, flush=True)
    return {"tools": tools, "routes": routes}


def report(results: dict) -> str:
    tools = results["tools"]
    called = [t for t in tools if t["called"]]
    lines = ["### Tool round trip (client-side get_time, embedded models)", ""]
    rows = [["turns", str(len(tools))], ["tool called", f"{len(called)}/{len(tools)}"]]
    for key, label in (("call_to_result_ms", "call emitted -> result sent (client tool)"),
                       ("result_to_audio_ms", "result -> first audio after it"),
                       ("edge_tool_ms", "edge: waiting for results (TurnMetrics.tool_ms)"),
                       ("v2v_ms", "voice-to-voice of the tool turns")):
        s = summarize(t[key] for t in called)
        rows.append([f"{label} p50 / p95", f"{fmt_ms(s['p50'])} / {fmt_ms(s['p95'])}"])
    lines += [table(["", "value"], rows), ""]
    routes = results["routes"]
    by_pool = defaultdict(list)
    for r in routes:
        if r["ok"]:
            by_pool[r["route"]].append(r)
    lines += ["### Routing (llm and llm-strong up, the same embedded model)", ""]
    rows = []
    for pool, turns in sorted(by_pool.items()):
        s = summarize(t["llm_first_token_ms"] for t in turns)
        v = summarize(t["v2v_ms"] for t in turns)
        reasons = Counter(t["reason"].split(" (")[0] for t in turns).most_common(3)
        rows.append([pool, f"{len(turns)}/{len(routes)}", fmt_ms(s["p50"]), fmt_ms(s["p95"]), fmt_ms(v["p50"]),
                     "; ".join(f"{reason} x{n}" for reason, n in reasons)])
    lines += [table(["pool", "share of turns", "first token p50", "p95", "v2v p50", "reasons"], rows)]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m load.agent", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default="load/results/agent.json")
    p.add_argument("--log-dir", default="build/agent-logs")
    args = p.parse_args(argv)
    with Stack(ports="free", log_dir=args.log_dir) as stack:
        stack.start(START_ORDER)
        name, service, extra = STRONG_LLM
        stack.spawn(service, name=name, args=extra)
        stack.wait_ready([name])
        results = asyncio.run(measure(stack.processes["edge"].address, args.rounds))
    results["machine"] = machine()
    write_json(Path(args.json), results)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
