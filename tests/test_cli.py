"""The `voicestack` command line: `talk` on audio with nothing to hear, `talk --tools`, and what `up`
says each service serves."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import time

import numpy as np

from conftest import silence, speak
from voicestack.audio import PIPELINE_RATE, float_to_pcm16, write_wav
from voicestack.cli import add_stack_flags, main, model_label, show_stack, stack_env
from voicestack.launcher import Stack

OPENAI_MODEL = "served-elsewhere-7b"


def test_talk_refuses_an_empty_wav(tmp_path, capsys):
    empty = tmp_path / "empty.wav"
    write_wav(empty, b"", PIPELINE_RATE)
    started = time.monotonic()
    # Nothing listens on the address: the refusal must come before any connection.
    assert main(["talk", "--wav", str(empty), "--address", "127.0.0.1:1", "--timeout", "30"]) == 2
    assert time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert "empty.wav" in err and "0 samples" in err, err


def edge_served(stack) -> int:
    from voicestack.launcher import _discover
    return sum(r.get("served", 0) for r in asyncio.run(_discover(stack.nats_url)) if r.get("stage") == "edge")


def test_talk_says_when_no_speech_was_heard(stack, edge_address, tmp_path):
    # Quiet hiss, no voice: the VAD must hear nothing, and `talk` must not wait out --timeout.
    noise = np.random.default_rng(7).normal(0.0, 0.01, PIPELINE_RATE * 3 // 2).astype(np.float32)
    wav = tmp_path / "noise.wav"
    write_wav(wav, float_to_pcm16(noise), PIPELINE_RATE)
    served_before = edge_served(stack)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "voicestack", "talk", "--wav", str(wav), "--out",
                           str(tmp_path / "reply.wav"), "--address", edge_address, "--timeout", "60"],
                          capture_output=True, text=True, timeout=90)
    elapsed = time.monotonic() - started
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert f"no speech was detected in {wav}" in done.stderr, done.stderr
    assert "DEADLINE_EXCEEDED" not in done.stderr
    # 1.5 s of audio + 1 s of trailing silence + 2 s of grace, plus start-up; far from 60 s.
    assert elapsed < 20, f"took {elapsed:.1f}s"
    # The client ended that call, normally: `voicestack status` counts it as served (issue #13).
    time.sleep(0.5)
    assert edge_served(stack) == served_before + 1


def test_up_shows_the_model_each_service_serves(tmp_path, capsys):
    # Only NATS and an LLM replica on the OpenAI engine (it connects to its server per
    # request, and its health check is off, so none needs to run): cheap, and not the default model.
    env = {"VOICESTACK_LLM_ENGINE": "openai", "VOICESTACK_LLM_URL": "http://127.0.0.1:9/v1",
           "VOICESTACK_LLM_HEALTH_URL": "off", "VOICESTACK_LLM_MODEL": OPENAI_MODEL}
    with Stack(ports="free", log_dir=tmp_path, env=env) as stack:
        stack.start_nats()
        stack.spawn("llm")
        stack.wait_ready(["llm"], timeout=60)

        show_stack(stack)
        llm_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("llm "))
        assert f"{OPENAI_MODEL} (openai)" in llm_row, llm_row
        assert "SmolLM2" not in llm_row

        # Without its log line, the replica's announcement on the bus says the same.
        stack.processes["llm"].log_path = None
        assert stack.served(["llm"])["llm"]["model"] == OPENAI_MODEL


def test_model_label():
    assert model_label({"model": "SmolLM2-135M-Instruct.Q4_1", "device": "cpu", "engine": "llamacpp"}) \
        == "SmolLM2-135M-Instruct.Q4_1 (cpu)"
    assert model_label({"model": "qwen", "device": "cpu", "engine": "openai"}) == "qwen (openai)"
    assert model_label({"model": "-", "device": "cpu"}) == "-"
    assert model_label(None) == "?"


def test_up_hands_service_settings_to_every_service():
    parser = argparse.ArgumentParser()
    add_stack_flags(parser)
    args = parser.parse_args(["--llm-engine", "openai", "--llm-url", "http://vllm:8000/v1", "--disclosure", "false"])
    assert stack_env(args) == {"VOICESTACK_LLM_ENGINE": "openai", "VOICESTACK_LLM_URL": "http://vllm:8000/v1",
                               "VOICESTACK_DISCLOSURE": "false"}
    # Ports and replica ids are the launcher's to give, one per process.
    assert not hasattr(args, "grpc_port")


TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "Get the current time of day",
                                              "parameters": {"type": "object", "properties": {}}}}


def test_talk_refuses_a_tools_file_that_does_not_say_how_to_run_a_tool(tmp_path, capsys):
    wav = tmp_path / "hum.wav"
    write_wav(wav, float_to_pcm16(np.full(PIPELINE_RATE // 2, 0.1, dtype=np.float32)), PIPELINE_RATE)
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps({"tools": [TIME_TOOL]}))
    assert main(["talk", "--wav", str(wav), "--tools", str(tools), "--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "get_time" in err and '"command" or "result"' in err, err


def test_talk_runs_the_client_tools_of_its_tools_file(stack, edge_address, tmp_path):
    wav = tmp_path / "question.wav"
    write_wav(wav, float_to_pcm16(np.concatenate([silence(300), speak("What time is it?", tmp_path)])), PIPELINE_RATE)
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps({"tools": [{**TIME_TOOL, "command": ["date", "+%H:%M"]}]}))
    # (In 60 ms frames: the edge takes 10-100 ms, and talk sends what it is told.)
    done = subprocess.run([sys.executable, "-m", "voicestack", "talk", "--wav", str(wav), "--tools", str(tools),
                           "--out", str(tmp_path / "reply.wav"), "--address", edge_address, "--timeout", "90",
                           "--frame-ms", "60"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert re.search(r"tool call:  get_time\(\{\}\) -> '\d\d:\d\d'", done.stdout), done.stdout
