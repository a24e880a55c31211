"""Time per end-of-turn decision of the Smart Turn v3.2 model (voicestack.vad.turn_model).

Each decision is one `TurnDetector.score()` on a full 8 s window (the model's input is
always 8 s: shorter audio is padded), so the audio does not change the cost. Split into
the log-mel features (numpy) and the ONNX inference, on 1 and 2 intra-op threads.
The load average is printed with the table: on a shared machine the times include
whatever else runs.

  python -m load.turn_model_bench --decisions 50 --threads 1,2
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from load.stats import table
from load.system import machine


def measure(threads: list[int], decisions: int, audio: np.ndarray) -> list[list]:
    """Decisions interleaved over the thread counts, so a load that comes and goes
    (a shared machine) weighs on all of them alike."""
    from voicestack.vad.turn_model import TurnDetector

    detectors, load_s = [], []
    for n in threads:
        start = time.perf_counter()
        detectors.append(TurnDetector.load(threads=n))  # includes the warm-up inference
        load_s.append(time.perf_counter() - start)
    total = [[] for _ in threads]
    feats = [[] for _ in threads]
    for _ in range(decisions):
        for i, detector in enumerate(detectors):
            t0 = time.perf_counter()
            detector.features(audio)
            t1 = time.perf_counter()
            detector.score(audio)
            t2 = time.perf_counter()
            feats[i].append(t1 - t0)
            total[i].append(t2 - t1)

    def ms(xs, q):
        return f"{1000 * float(np.percentile(xs, q)):.1f}"

    return [[n, f"{load_s[i]:.2f}", ms(total[i], 50), ms(total[i], 95), ms(feats[i], 50), decisions]
            for i, n in enumerate(threads)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m load.turn_model_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decisions", type=int, default=50)
    p.add_argument("--threads", default="1,2", help="comma list of intra-op thread counts")
    args = p.parse_args(argv)
    audio = np.random.default_rng(0).normal(0, 0.1, 8 * 16000).astype(np.float32)
    rows = measure([int(t) for t in args.threads.split(",")], args.decisions, audio)
    info = machine()
    print(f"Smart Turn v3.2, {info['nproc']} CPUs ({info['cpu_model']}), commit {info['commit']}, "
          f"{info['date']}, load average {info['loadavg']}\n")
    print(table(["threads", "load + warm-up s", "decision p50 ms", "decision p95 ms", "of which features p50 ms",
                 "decisions"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
