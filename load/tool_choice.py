"""How well the embedded LLM (SmolLM2-135M in llama.cpp) calls tools: spoken-style requests
run through LlamaCppEngine directly. Per request: did it call the right tool (or none, for
chit-chat), with the right arguments, and how long until its first delta (a text token, or
the whole call). The same requests without tools give the first-token time the tool decision
adds to. Then a few tool results: does the text answer that follows use them?

Two request sets: "tuned" (get_time, get_weather(city), end_call), on which the engine's
decision rule (NO_TOOL_PHRASES, TOOL_MARGIN) was chosen, and "held out" (other tools, written
before that rule was run on them), which says how well the rule carries over.

    .venv/bin/python -m load.tool_choice [--verbose] [--json build/tool_choice.json]

Markdown tables go to stdout (BENCHMARKS.md has a run); --verbose prints each request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
import time

from load.stats import summarize, write_json
from voicestack.config import Settings
from voicestack.llm.engine import Delta, LlamaCppEngine

SYSTEM = "You are a friendly voice assistant on a phone call. Answer in one or two short sentences."
def tool(name: str, description: str, properties: dict | None = None, required=()) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties or {}, **({"required": list(required)} if required else {})}}}


TOOLS = [
    {"type": "function", "function": {
        "name": "get_time", "description": "Get the current local time.",
        "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city, e.g. Paris"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "end_call", "description": "End the phone call. Use it when the caller says goodbye or asks to hang up.",
        "parameters": {"type": "object", "properties": {}}}},
]
# (what the caller said, the tool it needs or None, the arguments it needs)
REQUESTS = [
    ("What time is it?", "get_time", {}),
    ("Do you know what time it is right now?", "get_time", {}),
    ("Hey, could you tell me the time?", "get_time", {}),
    ("what's the time", "get_time", {}),
    ("Sorry, how late is it?", "get_time", {}),
    ("What's the weather in Paris?", "get_weather", {"city": "Paris"}),
    ("Is it raining in London right now?", "get_weather", {"city": "London"}),
    ("How hot is it in Tokyo today?", "get_weather", {"city": "Tokyo"}),
    ("Tell me the weather for Berlin please.", "get_weather", {"city": "Berlin"}),
    ("Should I take an umbrella in Seattle today?", "get_weather", {"city": "Seattle"}),
    ("Okay, that's all, goodbye!", "end_call", {}),
    ("Please hang up now.", "end_call", {}),
    ("Thanks, bye bye.", "end_call", {}),
    ("I'm done, you can end the call.", "end_call", {}),
    ("Alright, talk to you later, bye.", "end_call", {}),
    ("Hi, how are you doing?", None, {}),
    ("Tell me a joke.", None, {}),
    ("What is the capital of France?", None, {}),
    ("Can you recommend a good book?", None, {}),
    ("My name is Anna, nice to meet you.", None, {}),
]
# (request, the call made, what the tool returned, what the answer should say)
RESULTS = [
    ("What time is it?", ("get_time", {}), "14:32", "14:32"),
    ("What's the weather in Paris?", ("get_weather", {"city": "Paris"}), "sunny, 21 degrees", "21"),
    ("Is it raining in London right now?", ("get_weather", {"city": "London"}), "light rain, 12 degrees", "rain"),
    ("Can you tell me what time it is?", ("get_time", {}), "The time is 14:32.", "14:32"),
    ("Time please.", ("get_time", {}), "The time is 9:05.", "9:05"),
    ("What's the weather like in Rome?", ("get_weather", {"city": "Rome"}), '{"forecast": "rain, 12 degrees"}', "rain"),
    ("What is the status of order 42?", ("get_order_status", {"order_id": "42"}), "order 42 shipped", "shipped"),
    ("Where is my order 17?", ("get_order_status", {"order_id": "17"}), "order 17 shipped", "shipped"),
]
HELD_OUT_TOOLS = [
    tool("transfer_to_agent", "Transfer the caller to a human agent."),
    tool("book_table", "Book a table at the restaurant.",
         {"people": {"type": "integer"}, "time": {"type": "string", "description": "e.g. 7 pm"}}, ["people", "time"]),
    tool("check_order", "Check the status of an order.", {"order_number": {"type": "string"}}, ["order_number"]),
    tool("end_call", "End the phone call."),
]
# Arguments: each value one of the accepted ones (compared lowercased, without spaces).
HELD_OUT_REQUESTS = [
    ("Can I talk to a real person please?", "transfer_to_agent", {}),
    ("Put me through to a human.", "transfer_to_agent", {}),
    ("I want to speak with an agent.", "transfer_to_agent", {}),
    ("I'd like to book a table for four at 7 pm.", "book_table", {"people": [4], "time": ["7pm", "7:00pm", "19:00"]}),
    ("Can you reserve a table for two tonight at eight?", "book_table",
     {"people": [2], "time": ["8", "eight", "8pm", "8:00pm", "20:00", "tonightateight", "eightpm"]}),
    ("Table for 3 people at 6:30 please.", "book_table", {"people": [3], "time": ["6:30", "6:30pm", "18:30"]}),
    ("Where is my order 12345?", "check_order", {"order_number": ["12345"]}),
    ("What's the status of order A-778?", "check_order", {"order_number": ["a-778", "a778"]}),
    ("Has my order 5521 shipped yet?", "check_order", {"order_number": ["5521"]}),
    ("That's everything, goodbye.", "end_call", {}),
    ("Bye!", "end_call", {}),
    ("What's your name?", None, {}),
    ("How does a rainbow form?", None, {}),
    ("Thanks, that's great.", None, {}),
    ("Do you have parking?", None, {}),
    ("Good morning!", None, {}),
]
SETS = {"tuned": (TOOLS, REQUESTS), "held out": (HELD_OUT_TOOLS, HELD_OUT_REQUESTS)}
MAX_TOKENS = Settings().llm_max_tokens  # what the LLM stage allows a reply unless asked otherwise (80)
UNFINISHED = re.compile(r"the arguments of (\S+) did not end")  # the engine's warning


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class EngineWarnings(logging.Handler):
    """The engine's warnings: one says a chosen tool's arguments did not end (text instead)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def conversation(said: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": said}]


async def run(engine: LlamaCppEngine, messages: list[dict], tools) -> tuple[list[Delta], float]:
    """The deltas, and the seconds until the first (a text token or the whole call)."""
    started = time.perf_counter()
    first = None
    deltas = []
    async for delta in engine.stream(messages, MAX_TOKENS, 0.0, tools=tools):
        if first is None and (delta.text or delta.tool_calls):
            first = time.perf_counter() - started
        deltas.append(delta)
    return deltas, first if first is not None else time.perf_counter() - started


def arguments_fit(got: dict, wanted: dict) -> bool:
    def norm(value) -> str:
        return str(value).lower().replace(" ", "").replace(".", "")

    accepted = {k: [norm(v) for v in (vs if isinstance(vs, list) else [vs])] for k, vs in wanted.items()}
    return got.keys() == accepted.keys() and all(norm(v) in accepted[k] for k, v in got.items())


async def choices(engine: LlamaCppEngine, tools: list[dict], requests: list, verbose: bool) -> list[dict]:
    await run(engine, conversation("Hello."), tools)  # warm: this tool set's priors, the system prompt's KV
    warnings = EngineWarnings()
    logging.getLogger("voicestack.llm.engine").addHandler(warnings)
    rows = []
    for said, wanted, arguments in requests:
        # Without tools first: the first-token time the decision adds to (same prompt, KV warm).
        _, plain = await run(engine, conversation(said), None)
        warnings.messages.clear()
        deltas, first = await run(engine, conversation(said), tools)
        unfinished = [m.group(1) for m in map(UNFINISHED.search, warnings.messages) if m]
        calls = deltas[-1].tool_calls
        called = calls[0]["name"] if calls else None
        args = json.loads(calls[0]["arguments"]) if calls else {}
        right = called == wanted
        args_right = right and arguments_fit(args, arguments)
        said_text = "".join(d.text for d in deltas)
        rows.append({"said": said, "wanted": wanted or "none", "called": called or "none", "arguments": args,
                     "right": right, "arguments_right": args_right, "first_ms": first * 1000,
                     "arguments_unfinished": unfinished[0] if unfinished else None,
                     "plain_first_ms": plain * 1000, "text": said_text})
        if verbose:
            log(f"  {said!r}: wanted {wanted or 'none'}, got {called or 'text'} {args if calls else said_text[:60]!r}"
                f" in {first * 1000:.0f} ms (no tools: {plain * 1000:.0f} ms)")
    logging.getLogger("voicestack.llm.engine").removeHandler(warnings)
    return rows


async def answers(engine: LlamaCppEngine, verbose: bool) -> list[dict]:
    rows = []
    for said, (name, arguments), result, expect in RESULTS:
        messages = conversation(said) + [
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": result},
        ]
        deltas, first = await run(engine, messages, TOOLS)
        text = "".join(d.text for d in deltas)
        rows.append({"said": said, "result": result, "answer": text, "uses_result": expect.lower() in text.lower(),
                     "first_ms": first * 1000})
        if verbose:
            log(f"  {said!r} + {result!r} -> {text!r}")
    return rows


def tables(sets: dict[str, list[dict]], answered: list[dict]) -> str:
    lines = ["| set | wanted | requests | right tool (or none) | right arguments (of right tool) | "
             "first delta p50 / max, ms | without tools: first token p50, ms |",
             "|---|---|---|---|---|---|---|"]
    wrong = []
    for name, rows in sets.items():
        wanted = list(dict.fromkeys(r["wanted"] for r in rows))
        for label, group in [(w, [r for r in rows if r["wanted"] == w]) for w in wanted] + [("**all**", rows)]:
            first = summarize(r["first_ms"] for r in group)
            plain = summarize(r["plain_first_ms"] for r in group)
            calls = [r for r in group if r["wanted"] != "none"]
            args = f"{sum(r['arguments_right'] for r in calls)}/{sum(r['right'] for r in calls)}" if calls else "-"
            lines.append(f"| {name} | {label} | {len(group)} | {sum(r['right'] for r in group)}/{len(group)} | {args} | "
                         f"{first['p50']:.0f} / {first['max']:.0f} | {plain['p50']:.0f} |")
        wrong += [f"{name}: {r['said']!r} wanted {r['wanted']}, got {r['called']}"
                  + (f" (chose {r['arguments_unfinished']}, whose arguments did not end: text instead)"
                     if r["arguments_unfinished"] else "") for r in rows if not r["right"]]
        wrong += [f"{name}: {r['said']!r} {r['called']} with {r['arguments']}" for r in rows
                  if r["right"] and r["wanted"] != "none" and not r["arguments_right"]]
    lines += ["", "Wrong:", *[f"- {w}" for w in wrong or ["nothing"]]]
    lines += ["", "| request | tool result | answer | uses the result | first token, ms |", "|---|---|---|---|---|"]
    for r in answered:
        lines.append(f"| {r['said']} | {r['result']} | {r['answer'].strip()!r} | {'yes' if r['uses_result'] else 'no'} "
                     f"| {r['first_ms']:.0f} |")
    return "\n".join(lines)


async def main_async(args) -> dict:
    engine = LlamaCppEngine(threads=args.threads)
    try:
        sets = {}
        for name, (tools, requests) in SETS.items():
            log(f"{name}:")
            sets[name] = await choices(engine, tools, requests, args.verbose)
        answered = await answers(engine, args.verbose)
    finally:
        await engine.aclose()
    return {"model": engine.model_name, "sets": sets, "answers": answered}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m load.tool_choice", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0 = its default)")
    p.add_argument("--verbose", action="store_true", help="print each request and what the model did (stderr)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    results = asyncio.run(main_async(args))
    print(tables(results["sets"], results["answers"]))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
