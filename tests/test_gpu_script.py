"""load/gpu.py, the GPU path (make bench-gpu): its dry run on the CPU with the real models and
the five real services, and the splitting of what it carries to a GPU machine in parts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from load import gpu

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_measures_every_stage_or_says_why_not(tmp_path):
    out = tmp_path / "gpu.json"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "load.gpu", "--dry-run", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["riva"]["streams_per_gpu"] == 270
    for stage in gpu.STAGES:  # each section: numbers, or an explicit reason
        section = report[stage]
        assert section.get("ran") or section.get("skipped", "").strip(), (stage, section)
    # Here every model is installed, so every stage must really run (a skip would hide a break).
    skipped = {stage: report[stage].get("skipped") for stage in gpu.STAGES if "skipped" in report[stage]}
    assert not skipped, skipped
    stt, tts, llm, v2v = (report[s] for s in gpu.STAGES)
    assert [r["streams"] for r in stt["levels"]] == [1, 2]
    assert all(r["chunks"] > 0 and r["mean_ms"] > 0 for r in stt["levels"])
    assert "capital" in stt["transcript"].lower()
    assert [r["streams"] for r in tts["levels"]] == [1, 2] and all(r["rtf_mean"] > 0 for r in tts["levels"])
    assert llm["first_token_ms_p50"] > 0 and all(r["tokens_per_s_per_stream"] > 0 for r in llm["levels"])
    assert v2v["v2v_ms_p50"] > 0 and v2v["turns"][0]["reply"]
    assert "### GPU path, dry run" in done.stdout and "Streams held" in done.stdout
    assert took < 600, f"the dry run took {took:.0f} s"  # about a minute on 2 busy cores


def test_parts_are_gathered_checked_and_missing_ones_named(tmp_path):
    sources = []
    for name, size in (("wheels/a.whl", 2500), ("model/model.bin", 7000), ("question.wav", 10)):
        path = tmp_path / "src" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(i % 251 for i in range(size)))
        sources.append((name, path))
    carry = tmp_path / "carry"
    parts, manifest = gpu.split(sources, carry, limit=3000)
    assert parts == 4 and sorted(p.name for p in carry.iterdir()) == ["1", "2", "3", "4"]
    assert all(sum(f.stat().st_size for f in (carry / str(k)).glob("*.bin")) <= 3000 for k in range(1, 5))

    stage = tmp_path / "stage"  # the device calls: cp -r .gpu/k/. STAGE for each part
    for k in (1, 2, 4):
        shutil.copytree(carry / str(k), stage, dirs_exist_ok=True)
    setup = gpu.prepare_stage(stage)
    assert any("model/model.bin" in problem and "did not arrive" in problem for problem in setup["problems"])
    assert "wheels/a.whl" in setup["files"] and "question.wav" in setup["files"]

    shutil.copytree(carry / "3", stage, dirs_exist_ok=True)
    setup = gpu.prepare_stage(stage)
    assert "model/model.bin" in setup["files"]
    assert (stage / "files" / "model" / "model.bin").read_bytes() == sources[1][1].read_bytes()

    broken = tmp_path / "broken"  # a piece that arrived damaged is refused
    for k in range(1, 5):
        shutil.copytree(carry / str(k), broken, dirs_exist_ok=True)
    piece = broken / Path(next(f for f in manifest if f["name"] == "model/model.bin")["pieces"][1]).name
    piece.write_bytes(b"x" + piece.read_bytes()[1:])
    assert any("model/model.bin: sha256 mismatch" in problem for problem in gpu.prepare_stage(broken)["problems"])


def test_how_to_run_names_the_device_calls(tmp_path):
    text = gpu.how_to_run(tmp_path / "absent")
    assert "not prepared yet" in text and "load/gpu_carry.sh" in text
    assert 'carry=[".gpu/4"]' in text and "python3 -m load.gpu --stage /tmp/voicestack-gpu" in text
