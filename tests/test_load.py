"""The load generator: its statistics, and one short run against the real stack."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `load/` sits beside services/, not inside the installed package

from load.stats import latency_rows, percentile, summarize, summarize_turns, table  # noqa: E402


def test_percentile_matches_numpy_and_handles_edges():
    rng = random.Random(7)
    for n in (1, 2, 3, 10, 101):
        values = [rng.uniform(0, 1000) for _ in range(n)]
        for q in (0, 50, 95, 99, 100):
            assert math.isclose(percentile(values, q), float(np.percentile(values, q)), rel_tol=1e-12)
    assert math.isnan(percentile([], 50))
    assert percentile([5, 1, 3], 50) == 3


def test_summaries_skip_missing_values_and_failed_turns():
    s = summarize([10, float("nan"), None, 30])
    assert s["n"] == 2 and s["p50"] == 20 and s["max"] == 30 and s["mean"] == 20
    turns = [{"ok": True, "voice_to_voice_ms": 100.0}, {"ok": True, "voice_to_voice_ms": 300.0},
             {"ok": False, "voice_to_voice_ms": 9999.0}, {"ok": True, "voice_to_voice_ms": 0.0}]
    v = summarize_turns(turns, ("voice_to_voice_ms",))["voice_to_voice_ms"]
    assert v["n"] == 2 and v["p50"] == 200


def test_table_is_markdown_with_numbers_right_aligned():
    level = {"sessions": 4, "turns_ok": 7, "turns_planned": 8, "errors": {"UNAVAILABLE (stt)": 1}, "refused": 0,
             "summary": summarize_turns([{"ok": True, "voice_to_voice_ms": 812.4, "endpointing_ms": 610.0,
                                          "stt_final_ms": 95.5, "llm_first_token_ms": 8.4,
                                          "tts_first_audio_ms": 70.0, "client_v2v_ms": 815.0}])}
    text = table(*latency_rows([level]))
    header, rule, row = text.splitlines()
    assert header.count("|") == rule.count("|") == row.count("|") == 13
    assert rule.startswith("|---") and rule.rstrip("|").endswith(":")  # numbers right-aligned
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == ["4", "7/8", "812"] and cells[7] == "8.4" and cells[-2:] == ["1", "0"]
    plain = table(["a", "b"], [["x", 1]], markdown=False)
    assert "|" not in plain and plain.splitlines()[2] == "x  1"


def test_cost_per_conversation_minute_prices_compute_and_calls_per_gpu():
    from load.cost import MODEL_STAGES, price

    measured = {"compute_per_minute": {"vad": 1.0, "stt": 6.0, "llm": 3.0, "tts": 18.0}}
    priced = price(measured, core_hour=0.036, utilisation=0.5, gpu_hour=3.0, stt_per_gpu=100, llm_per_gpu=50,
                   tts_per_gpu=200)
    # On cores: compute seconds at the core-second price, doubled by the 50% headroom.
    assert priced["cpu"]["tts"] == 18.0 * 0.036 / 3600 / 0.5
    assert priced["cpu_total"] == sum(priced["cpu"].values()) == 28.0 * 0.036 / 3600 / 0.5
    # On GPUs: a GPU-minute shared by the calls one GPU carries; the VAD stays on cores.
    assert priced["gpu"]["llm"] == 3.0 / 60 / 50 and priced["gpu"]["vad"] == priced["cpu"]["vad"]
    assert set(priced["gpu"]) == set(MODEL_STAGES)


def test_one_session_one_turn_against_the_stack(edge_address, tmp_path):
    out = tmp_path / "load.json"
    run = subprocess.run(
        [sys.executable, "-m", "load", "--address", edge_address, "--sessions", "1", "--turns", "1",
         "--ramp", "0", "--turn-timeout", "90", "--quiet", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    [level] = json.loads(out.read_text())["levels"]
    assert level["errors"] == {} and level["refused"] == 0, level["errors"]
    assert level["turns_ok"] == 1, level["turns"]
    v2v = level["summary"]["voice_to_voice_ms"]
    assert v2v["n"] == 1 and v2v["p50"] > 0
    [turn] = level["turns"]
    assert turn["voice_to_voice_ms"] >= turn["stt_final_ms"] + turn["llm_first_token_ms"] > 0
    assert "v2v p50" in run.stdout  # the table


def test_grpc_floor_measures_the_servers_cpu_per_frame():
    """The floor benchmark's server really reads the frames: its CPU grows with the frames sent."""
    from load import grpc_floor

    few = grpc_floor.measure(sessions=2, frame_ms=20, loop_kind="asyncio", seconds=2.0)
    many = grpc_floor.measure(sessions=20, frame_ms=20, loop_kind="uvloop", seconds=2.0)
    assert 0 < few["server_cores"] < many["server_cores"], (few, many)
    assert many["cpu_us_per_frame"] > 1 and many["sessions_per_core_at_most"] > 1
    assert "| uvloop" in grpc_floor.floor_table([few, many])
