"""The stack from its images (`make test-images`): the chart's CPU profile, rendered by
tools/podman_play.py (host networking, one pod per replica) and played with `podman kube play`,
on the Debian nats-server on the host. A spoken question is answered through the containers; a
SIGTERM'd STT container drains mid-turn without losing a turn (as tests/test_drain.py does with
processes); a kill -9'd TTS container mid-reply fails over (as tests/test_reliability.py does).
Each container's cold start (container start to gRPC health SERVING) goes to
build/images/cold-start.json."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import metric, silence, speak, words
from grpc_health.v1 import health_pb2, health_pb2_grpc
from voicestack.client import converse
from voicestack.v1 import edge_pb2

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = "localhost/voicestack"
TAG = next(line.split(":", 1)[1].strip().strip('"') for line in (ROOT / "charts/voicestack/Chart.yaml").read_text().splitlines()
           if line.startswith("appVersion:"))
IMAGES = [f"{REPOSITORY}-{target}:{TAG}" for target in ("cpu", "edge", "vad")]  # what the CPU profile runs
REPLICAS = ["stt=2", "tts=2"]  # two of each stage a test stops
COLD_START = ROOT / "build" / "images" / "cold-start.json"
QUESTION = "Please tell me what the capital city of France is."
STORY_PROMPT = "You are a storyteller. Always answer with a very long story of at least twenty sentences."
STORY = "Tell me a story about a brave dragon."
# One turn per caller: a slow speaker's pauses could otherwise end a turn mid-question.
ONE_TURN = {"endpointing": edge_pb2.EndpointingConfig(mode=edge_pb2.ENDPOINTING_MODE_SILENCE, silence_ms=1200)}


def podman(*args: str, check: bool = True, timeout: float = 300) -> str:
    return subprocess.run(["podman", *args], check=check, capture_output=True, text=True, timeout=timeout).stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_serving(pods: list[dict], timeout: float) -> dict[str, float]:
    """Seconds from each container's start to its gRPC health SERVING."""
    started = {p["container"]: int(podman("inspect", "--format", "{{.State.StartedAt.UnixNano}}", p["container"])) / 1e9
               for p in pods}
    ready: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(ready) < len(pods) and time.monotonic() < deadline:
        for p in pods:
            if p["container"] not in ready and serving(p["grpc_port"]):
                ready[p["container"]] = round(time.time() - started[p["container"]], 1)
        time.sleep(0.25)
    missing = [p["container"] for p in pods if p["container"] not in ready]
    assert not missing, f"not SERVING after {timeout:.0f} s: {missing}"
    return ready


def container_log(pod: dict) -> str:
    out = subprocess.run(["podman", "logs", pod["container"]], check=False, capture_output=True, text=True, timeout=60)
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def images_stack(tmp_path_factory):
    """nats-server on the host, and the chart's CPU profile under `podman kube play`: what runs where."""
    assert shutil.which("podman"), "podman is needed: `make images` installs it"
    for image in IMAGES:
        assert subprocess.run(["podman", "image", "exists", image], check=False).returncode == 0, \
            f"{image} missing: run `make images`"
    work = tmp_path_factory.mktemp("images")
    nats_port = free_port()
    play = work / "play.yaml"
    rendered = subprocess.run([sys.executable, str(ROOT / "tools" / "podman_play.py"), "--nats",
                               f"nats://127.0.0.1:{nats_port}", "--out", str(play), "--replicas", *REPLICAS],
                              check=True, capture_output=True, text=True, timeout=120)
    pods = json.loads(rendered.stdout)
    with open(work / "nats.log", "w") as nats_log:
        nats = subprocess.Popen(["nats-server", "-a", "127.0.0.1", "-p", str(nats_port)],
                                stdout=nats_log, stderr=subprocess.STDOUT)
    try:
        podman("kube", "play", str(play))
        cold = wait_serving(pods, timeout=600)
        COLD_START.parent.mkdir(parents=True, exist_ok=True)
        COLD_START.write_text(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "containers_started_together": len(pods),
                                          "loadavg": Path("/proc/loadavg").read_text().split()[0],
                                          "seconds_to_serving": cold}, indent=1) + "\n")
        print(f"\ncold start (container start to SERVING, {len(pods)} containers at once): {cold}")
        yield pods
    finally:
        for pod in pods:  # the containers' logs, kept with the test's other files
            (work / f"{pod['container']}.log").write_text(container_log(pod))
        subprocess.run(["podman", "kube", "down", str(play)], check=False, capture_output=True, timeout=120)
        nats.terminate()
        nats.wait(10)


def edge_address(pods: list[dict]) -> str:
    return f"127.0.0.1:{next(p['grpc_port'] for p in pods if p['stage'] == 'edge')}"


async def busy(replicas: list[dict], timeout: float = 60) -> dict:
    """The first replica seen holding a stream."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pod in replicas:
            if metric(pod["metrics_port"], "voicestack_streams_active") > 0:
                return pod
        await asyncio.sleep(0.1)
    raise AssertionError(f"no stream was ever opened on {[p['container'] for p in replicas]}")


def died_with(pod: dict, since: float) -> list[int]:
    """Exit codes of the container's deaths since `since` (podman's events; it restarts them)."""
    out = podman("events", "--since", str(int(since)), "--until", str(int(time.time()) + 1), "--filter",
                 f"container={pod['container']}", "--filter", "event=died", "--format", "{{.ContainerExitCode}}")
    return [int(code) for code in out.split()]


async def test_a_spoken_question_is_answered_through_the_containers(images_stack, speech_dir):
    question = np.concatenate([silence(3000), speak(QUESTION, speech_dir, speed=120)])
    conversation = await converse(edge_address(images_stack), question,
                                  config=edge_pb2.SessionConfig(**ONE_TURN), timeout=180)
    assert conversation.status.name == "OK", conversation.details
    assert not conversation.errors, conversation.errors
    [turn] = conversation.replies
    assert {"capital", "france"} <= set(words(turn.transcript)), turn.transcript
    assert turn.reply_text.strip() and turn.audio, turn
    print(f"\n  heard: {turn.transcript!r}\n  answered: {turn.reply_text!r} ({len(turn.audio)} bytes of audio)")


async def test_sigterm_drains_an_stt_container_without_losing_a_turn(images_stack, speech_dir):
    question = np.concatenate([silence(3000), speak(QUESTION, speech_dir, speed=120)])
    # Two callers: within the CPU profile's capacities (2 streams a replica) even with one STT
    # replica gone, and its two TTS replicas speaking both openings and both answers.
    sessions = [asyncio.create_task(converse(edge_address(images_stack), question,
                                             config=edge_pb2.SessionConfig(**ONE_TURN), timeout=180)) for _ in range(2)]
    replicas = [p for p in images_stack if p["stage"] == "stt"]
    victim = await busy(replicas)
    stopped_at = time.time()
    podman("kill", "--signal", "TERM", victim["container"])

    conversations = await asyncio.gather(*sessions)
    for conversation in conversations:
        assert conversation.status.name == "OK", conversation.details
        assert not conversation.errors, conversation.errors
        [turn] = conversation.replies
        assert {"capital", "france"} <= set(words(turn.transcript)), turn.transcript
        assert turn.reply_text.strip()
    # The drained replica finished its streams and exited 0 (podman then restarts it, as a
    # Deployment would replace it).
    deadline = time.monotonic() + 60
    while not died_with(victim, stopped_at) and time.monotonic() < deadline:
        await asyncio.sleep(1)
    assert died_with(victim, stopped_at)[:1] == [0], container_log(victim)[-3000:]
    assert "draining for up to" in container_log(victim)


async def test_kill_9_of_a_tts_container_mid_reply_fails_over(images_stack, speech_dir):
    config = edge_pb2.SessionConfig(system_prompt=STORY_PROMPT, max_reply_tokens=60, **ONE_TURN)
    story = np.concatenate([silence(3000), speak(STORY, speech_dir)])
    session = asyncio.create_task(converse(edge_address(images_stack), story, config=config, timeout=180))
    replicas = [p for p in images_stack if p["stage"] == "tts"]
    # Both replicas serving again (a previous run's kill is restarted by podman).
    await asyncio.to_thread(wait_serving, replicas, 300)
    victim = await busy(replicas, timeout=120)
    killed_at = time.time()
    podman("kill", "--signal", "KILL", victim["container"])

    conversation = await session
    assert conversation.status.name == "OK", conversation.details
    assert not conversation.errors, [(e.stage, e.message) for e in conversation.errors]
    [turn] = conversation.replies
    assert turn.ended and turn.reply_text.strip() and turn.audio, turn
    edge_log = container_log(next(p for p in images_stack if p["stage"] == "edge"))
    assert f"tts stream failing over from {victim['pod']}" in edge_log, edge_log[-3000:]
    assert died_with(victim, killed_at)[:1] == [137]
