"""What a conversation-minute costs on this stack: each stage's compute seconds per minute of
calls, measured, turned into dollars at stated prices.

Measured: the embedded default (the five services, CPU models) on this machine; `--calls`
calls one after another, each a caller who listens to the disclosure, asks `--questions`
questions (espeak-ng speech at real-time pace) and listens to each answer to its end, with
a pause of `--pause` seconds, as a person would. Then `voicestack status`'s numbers: each
stage's compute seconds (VAD frames, STT decodes, LLM replies, TTS clauses) and the edge's
seconds of calls, so compute seconds per conversation-minute per stage.

Priced: all on CPU cores at `--core-hour` dollars a core-hour, each core kept at most
`--utilisation` busy (headroom for latency); and the GPU layout the chart deploys, from
capacities per GPU given on the command line (`--gpu-hour`, `--stt-streams-per-gpu`,
`--llm-streams-per-gpu`, `--tts-streams-per-gpu`: see BENCHMARKS.md for where each default
comes from), the edge and VAD on CPU as measured here.

    python -m load.cost [--calls 3] [--questions 3] [--json load/results/cost.json]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import numpy as np

from load.speech import SENTENCES, speak
from load.stats import table, write_json
from load.system import loadavg, machine
from voicestack import status
from voicestack.client import LiveMicrophone, silence
from voicestack.launcher import Stack
from voicestack.v1 import audio_pb2, edge_pb2

MODEL_STAGES = ("vad", "stt", "llm", "tts")
# Stated prices (2026 list prices, on demand; change them on the command line):
CORE_HOUR = 0.04  # one vCPU of a general-purpose cloud VM (c7i/n2 class: ~$0.035-0.05 a vCPU-hour)
GPU_HOUR = 3.00  # one H100 80GB in a cloud GPU VM (~$2.5-4 an hour on demand, 8-GPU VMs divided)
# Concurrent calls one GPU carries per GPU stage: STT from NVIDIA's published Riva figure
# (~270 streams at 160 ms chunks); LLM from our H100 run (>= 256 streams of SmolLM2-135M at a
# speaking pace, 2026-11-26; one LLM stream is busy only while the agent writes, so calls per
# GPU are higher still); TTS a stated guess (not measured on a GPU here: Kokoro-82M is about
# 100x real time on a GPU by its authors' account; at 1/3 of a call spoken by the agent,
# 100 concurrent calls is conservative).
STT_STREAMS_PER_GPU = 270
LLM_STREAMS_PER_GPU = 256
TTS_STREAMS_PER_GPU = 100
MANAGED = (("Vapi (platform fee, before models)", 0.05), ("Retell AI", 0.07), ("Bland AI", 0.09),
           ("OpenAI Realtime API (gpt-realtime, audio in and out)", 0.31))


async def one_call(address: str, questions: list[np.ndarray], pause_s: float) -> None:
    config = edge_pb2.SessionConfig(input_format=audio_pb2.AudioFormat(
        encoding=audio_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000))

    async def caller(script: LiveMicrophone, send) -> None:
        await script.wait_for(lambda: script.turn_done(0), 120)  # the disclosure, heard to its end
        for question in questions:
            asked = len(script.conversation.turns)
            await asyncio.sleep(pause_s)
            await send(question)
            await script.wait_for(lambda: script.turn_done(asked) or script.call_ended, 180)
        await asyncio.sleep(pause_s)

    await LiveMicrophone(config).run(address, caller, timeout=900)


def measure(calls: int, questions: int, pause_s: float) -> dict:
    spoken = [np.concatenate([speak(text), silence(200)]) for text in SENTENCES]
    with Stack(ports="free") as stack:
        stack.start()
        for call in range(calls):
            asked = [spoken[(call * questions + i) % len(spoken)] for i in range(questions)]
            asyncio.run(one_call(stack.processes["edge"].address, asked, pause_s))
            print(f"  call {call + 1}/{calls} done", file=sys.stderr)
        view = asyncio.run(status.collect(stack.nats_url))
    stages = view["stages"]
    talked = stages["edge"]["conversation_seconds"]
    return {"calls": calls, "questions": questions, "conversation_seconds": talked,
            "compute_seconds": {s: stages[s]["compute_seconds"] for s in MODEL_STAGES},
            "compute_per_minute": {s: stages[s]["compute_per_minute"] for s in MODEL_STAGES}}


def price(measured: dict, core_hour: float, utilisation: float, gpu_hour: float,
          stt_per_gpu: float, llm_per_gpu: float, tts_per_gpu: float) -> dict:
    """Dollars per conversation-minute: every stage on CPU cores (compute seconds at the core
    price, each core at most `utilisation` busy), and the GPU layout (STT, LLM, TTS on GPUs at
    their calls per GPU; VAD on CPU as measured)."""
    per_minute = measured["compute_per_minute"]
    core_second = core_hour / 3600 / utilisation
    cpu = {s: per_minute[s] * core_second for s in MODEL_STAGES}
    gpu_minute = gpu_hour / 60
    gpu = {"vad": cpu["vad"], "stt": gpu_minute / stt_per_gpu, "llm": gpu_minute / llm_per_gpu,
           "tts": gpu_minute / tts_per_gpu}
    return {"cpu": cpu, "cpu_total": sum(cpu.values()), "gpu": gpu, "gpu_total": sum(gpu.values())}


def markdown(measured: dict, priced: dict, args) -> str:
    rows = [[s, f"{measured['compute_per_minute'][s]:.1f}", f"${priced['cpu'][s]:.4f}", f"${priced['gpu'][s]:.4f}"]
            for s in MODEL_STAGES]
    rows.append(["**total**", f"{sum(measured['compute_per_minute'].values()):.1f}",
                 f"**${priced['cpu_total']:.4f}**", f"**${priced['gpu_total']:.4f}**"])
    out = [table(["stage", "compute s per call-minute (measured)", "$/min, all on CPU cores",
                  "$/min, STT/LLM/TTS on GPUs"], rows), "",
           table(["managed platform", "$/min (list price)"], [[n, f"${p:.2f}"] for n, p in MANAGED]), "",
           f"Prices: ${args.core_hour} a core-hour at most {args.utilisation:.0%} busy; ${args.gpu_hour} a GPU-hour "
           f"at {args.stt_streams_per_gpu:g} STT, {args.llm_streams_per_gpu:g} LLM and {args.tts_streams_per_gpu:g} "
           f"TTS calls per GPU. Measured over {measured['calls']} calls of {measured['questions']} questions, "
           f"{measured['conversation_seconds']:.0f} s of calls."]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--pause", type=float, default=1.0, help="seconds a caller waits before speaking")
    parser.add_argument("--core-hour", type=float, default=CORE_HOUR)
    parser.add_argument("--utilisation", type=float, default=0.5, help="the most a core is kept busy (0-1]")
    parser.add_argument("--gpu-hour", type=float, default=GPU_HOUR)
    parser.add_argument("--stt-streams-per-gpu", type=float, default=STT_STREAMS_PER_GPU)
    parser.add_argument("--llm-streams-per-gpu", type=float, default=LLM_STREAMS_PER_GPU)
    parser.add_argument("--tts-streams-per-gpu", type=float, default=TTS_STREAMS_PER_GPU)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not 0 < args.utilisation <= 1:
        parser.error("--utilisation must be in (0, 1]")
    start_load = loadavg()
    measured = measure(args.calls, args.questions, args.pause)
    priced = price(measured, args.core_hour, args.utilisation, args.gpu_hour, args.stt_streams_per_gpu,
                   args.llm_streams_per_gpu, args.tts_streams_per_gpu)
    print(markdown(measured, priced, args))
    print(f"load average at start / end: {start_load} / {loadavg()}", file=sys.stderr)
    if args.json:
        write_json(args.json, {"machine": machine(), "args": vars(args), "measured": measured, "priced": priced})
    return 0


if __name__ == "__main__":
    sys.exit(main())
