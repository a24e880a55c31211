"""LLM prefix-cache affinity: a session's next request on the replica that served its last
one, or on any replica of the pool, measured as the LLM's first token.

Two LLM replicas (the embedded SmolLM2 on llama.cpp; each keeps the prompts it evaluated in
its KV cache and a small RAM prefix cache) on a local nats-server. `--concurrency` sessions
at a time, of `--turns` turns each, open their LLM streams over the bus as the edge does
(StageClient.open with `replica=` the last stream's replica, or without), the conversation
growing each turn with the replies actually generated. After a warm-up batch, the modes
alternate (ABBA), a batch of sessions each, `--rounds` times in one run, so both see the
same machine.

    python -m load.affinity [--rounds 4] [--concurrency 3] [--turns 6] [--pause 3] [--json load/results/affinity.json]

The edge's side of it (it asks for the replica of the session's last turn, `llm_affinity`)
is tested in tests/test_edge_fast.py; this measures what that is worth on the stage.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from load.stats import fmt_ms, summarize, table, write_json
from load.system import machine
from voicestack.launcher import Stack
from voicestack.v1 import llm_pb2

SYSTEM = "You are a helpful assistant who speaks English. Reply in one short sentence."
QUESTIONS = ("What is the capital of France?", "And what river runs through it?",
             "How many people live there?", "What is it famous for?", "What should I eat there?",
             "When is the best time to visit?", "How do I get there from London?",
             "Is it expensive?", "Thank you, anything else?")
MAX_TOKENS = 24
# A production agent's instructions run to pages (persona, policies, tools): --system-words
# pads the system prompt with these, so the prefix a warm cache saves is as long as theirs.
POLICY = ("Always greet the caller politely and confirm their account number before discussing any order. "
          "Never read out a full card number; say only its last four digits. If the caller asks for a refund, "
          "check the order date first: refunds are possible within thirty days of delivery. ")
MODES = ("affinity", "any replica")


def message(role: int, content: str) -> llm_pb2.ChatMessage:
    return llm_pb2.ChatMessage(role=role, content=content)


def system_prompt(words: int) -> str:
    policy = POLICY.split()
    return " ".join([SYSTEM, *(policy[i % len(policy)] for i in range(words))])


async def one_session(client, mode: str, turns: int, session: str, pause_s: float = 0.0,
                      system: str = SYSTEM) -> list[dict]:
    from voicestack.llm import CONTRACT

    history = [message(llm_pb2.CHAT_ROLE_SYSTEM, system)]
    last_replica = ""
    out = []
    for turn in range(turns):
        if turn:
            await asyncio.sleep(pause_s)  # the agent speaks its reply, the caller answers
        history.append(message(llm_pb2.CHAT_ROLE_USER, QUESTIONS[turn % len(QUESTIONS)]))
        request = llm_pb2.GenerateRequest(messages=history, max_tokens=MAX_TOKENS, temperature=0.3)
        asked = last_replica if mode == "affinity" else ""
        started = time.perf_counter()
        first = None
        reply = []
        async with await client.open(CONTRACT, request, session_id=session, replica=asked) as stream:
            await stream.end()
            async for response in stream:
                if first is None and response.text_delta:
                    first = (time.perf_counter() - started) * 1000
                reply.append(response.text_delta)
            replica = stream.replica_id
        out.append({"mode": mode, "turn": turn + 1, "first_token_ms": first, "replica": replica,
                    "kept": bool(last_replica) and replica == last_replica, "messages": len(history)})
        last_replica = replica
        history.append(message(llm_pb2.CHAT_ROLE_ASSISTANT, "".join(reply).strip()))
    return out


async def run(rounds: int, concurrency: int, turns: int, pause_s: float, system: str, stack: Stack) -> list[dict]:
    import nats

    from voicestack.bus import StageClient

    nc = await nats.connect(stack.nats_url, **stack.nats_options("edge"))  # as the edge joins the bus
    client = StageClient(nc)
    await client.start()
    rows: list[dict] = []
    try:
        # Warm-up, not counted: the replicas' first generations are slow (page faults, empty caches).
        await asyncio.gather(*(one_session(client, MODES[1], 2, f"warm-{i}", system=system) for i in range(concurrency)))
        for round_ in range(rounds):
            for mode in (MODES if round_ % 2 == 0 else MODES[::-1]):  # ABBA: neither mode always first
                batch = await asyncio.gather(*(one_session(client, mode, turns, f"bench-{round_}-{mode}-{i}", pause_s,
                                                           system) for i in range(concurrency)))
                rows += [row for session in batch for row in session]
                print(f"  round {round_ + 1}/{rounds}: {concurrency} sessions with {mode} done", file=sys.stderr)
    finally:
        await client.close()
        await nc.close()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="batches per mode (alternating)")
    parser.add_argument("--concurrency", type=int, default=3, help="sessions at a time")
    parser.add_argument("--turns", type=int, default=6, help="turns per session")
    parser.add_argument("--pause", type=float, default=3.0, help="seconds between a reply and the next "
                        "request (the reply spoken, the caller's answer): 0 keeps the replicas saturated")
    parser.add_argument("--system-words", type=int, default=0, help="pad the system prompt to about this many "
                        "more words of instructions (a production agent's prompt is long)")
    parser.add_argument("--json", type=Path, help="write the raw turns and the summary here")
    args = parser.parse_args(argv)

    with Stack(ports="free") as stack:
        stack.start_nats()
        stack.spawn("llm")
        stack.spawn("llm", name="llm-2")
        print("starting two LLM replicas...", file=sys.stderr)
        stack.wait_ready(["llm", "llm-2"])
        rows = asyncio.run(run(args.rounds, args.concurrency, args.turns, args.pause,
                               system_prompt(args.system_words), stack))

    summary = {}
    table_rows = []
    for mode in MODES:
        later = [r for r in rows if r["mode"] == mode and r["turn"] > 1 and r["first_token_ms"] is not None]
        stats = summarize(r["first_token_ms"] for r in later)
        kept = sum(r["kept"] for r in later) / len(later) if later else 0.0
        summary[mode] = {**stats, "same_replica": kept}
        table_rows.append([mode, str(len(later)), f"{kept:.0%}", fmt_ms(stats["p50"]), fmt_ms(stats["p95"]),
                           fmt_ms(stats["mean"])])
    print(table(["mode", "turns 2+", "same replica", "first token p50", "p95", "mean"], table_rows))
    if args.json:
        write_json(args.json, {"machine": machine(), "rounds": args.rounds, "concurrency": args.concurrency,
                               "turns": args.turns, "pause_s": args.pause, "system_words": args.system_words,
                               "max_tokens": MAX_TOKENS, "summary": summary, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
