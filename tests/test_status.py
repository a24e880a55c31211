"""`voicestack status`, run as the command an SRE types.

The bus view runs against real processes: nats-server, the five services and a second
STT replica (our own stack, so SIGTERMing a replica disturbs no other test). The
Kubernetes view runs against kmock, a stand-in speaking the real Kubernetes REST
protocol to the real `kubernetes` client: no cluster can run here.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import sys
import time

import kmock
import nats
import numpy as np
import pytest

import voicestack
from conftest import silence, speak
from voicestack import discovery, status
from voicestack.bus import StageClient
from voicestack.client import converse
from voicestack.config import SERVICES
from voicestack.launcher import START_ORDER, Stack
from voicestack.stt import CONTRACT as STT
from voicestack.v1 import audio_pb2, stt_pb2


async def run_status(*args, timeout: float = 60.0) -> tuple[int, str]:
    """`voicestack status ARGS` in a subprocess (so this test's event loop keeps serving)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voicestack", "status", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert not err.strip(), err.decode()
    return proc.returncode, out.decode()


async def status_json(nats_url: str, *args) -> tuple[int, dict]:
    code, out = await run_status("--json", "--nats-url", nats_url, *args)
    return code, json.loads(out)


async def poll(nats_url: str, predicate, timeout: float = 30.0) -> dict:
    """Run `status --json` until predicate(view) holds; the last view otherwise fails."""
    deadline = time.monotonic() + timeout
    while True:
        _, view = await status_json(nats_url)
        if predicate(view):
            return view
        assert time.monotonic() < deadline, f"not seen in {timeout:.0f}s; last view:\n{json.dumps(view, indent=1)}"
        await asyncio.sleep(0.2)


def replica(view: dict, stack: Stack, name: str) -> dict | None:
    """The replica the launcher started as `name`: its id ends in its gRPC port."""
    process = stack.processes[name]
    return next((r for r in view["stages"][process.service]["replicas"]
                 if r["replica_id"].endswith(f"-{process.grpc_port}")), None)


# ------------------------------------------------------------------ the bus, real processes


@pytest.fixture(scope="module")
def status_stack(tmp_path_factory):
    """The embedded default plus a second STT replica that drains for up to 20 s."""
    with Stack(ports="free", log_dir=tmp_path_factory.mktemp("status-logs")) as running:
        running.start(START_ORDER)
        running.spawn("stt", name="stt-2", env={"VOICESTACK_DRAIN_SECONDS": "20"})
        running.wait_ready(["stt-2"])
        yield running


async def test_every_replica_is_listed_with_its_capacity(status_stack):
    code, view = await status_json(status_stack.nats_url)

    assert code == 0 and view["bus_error"] is None and view["problems"] == []
    assert list(view["stages"]) == list(SERVICES)
    for stage in SERVICES:
        entry = view["stages"][stage]
        assert entry["live"] >= 1 and entry["capacity"] > 0, entry
        assert all(r["version"] == voicestack.__version__ and r["uptime_seconds"] >= 0 for r in entry["replicas"])
    stt = view["stages"]["stt"]
    assert stt["live"] == 2 and stt["draining"] == 0
    first, second = replica(view, status_stack, "stt"), replica(view, status_stack, "stt-2")
    assert first and second, [r["replica_id"] for r in stt["replicas"]]
    assert first["capacity"] > 0 and second["capacity"] > 0
    assert stt["capacity"] == first["capacity"] + second["capacity"]
    assert second["model"] == "whisper-tiny.en" and second["device"] == "cpu"


async def test_an_open_session_shows_as_streams_in_flight(status_stack, speech_dir):
    audio = np.concatenate([silence(300), speak("What is the capital of France?", speech_dir), silence(300)])
    session = asyncio.create_task(converse(status_stack.processes["edge"].address, audio, timeout=90))
    try:
        during = await poll(status_stack.nats_url, lambda v: v["stages"]["edge"]["active"] >= 1
                            and v["stages"]["vad"]["active"] >= 1, timeout=20)
    finally:
        conversation = await session
    assert conversation.status.name == "OK", conversation.details
    assert during["stages"]["edge"]["utilisation"] > 0

    after = await poll(status_stack.nats_url, lambda v: v["stages"]["edge"]["active"] == 0)
    assert after["stages"]["stt"]["served"] >= 1 and after["stages"]["llm"]["served"] >= 1
    # What the call cost (#18): each model stage's compute seconds per minute of calls.
    stages = after["stages"]
    assert stages["edge"]["conversation_seconds"] > 2  # at least the question and its answer
    for stage in ("vad", "stt", "llm", "tts"):
        assert stages[stage]["compute_seconds"] > 0, stage
        assert stages[stage]["compute_per_minute"] == pytest.approx(
            60 * stages[stage]["compute_seconds"] / stages["edge"]["conversation_seconds"], rel=0.01)
    assert "COMPUTE/CALL-MIN" in status.render(after, status.Paint(False))


async def test_a_sigtermed_replica_shows_draining_then_leaves(status_stack):
    _, view = await status_json(status_stack.nats_url)
    leaving = replica(view, status_stack, "stt-2")["replica_id"]

    # Hold a stream on stt-2 over the bus, as the edge would, so its drain has to wait.
    nc = await nats.connect(status_stack.nats_url, **status_stack.nats_options("edge"))  # the edge's credentials
    stages = StageClient(nc)
    await stages.start()
    try:
        stream = await stages.open(STT, stt_pb2.TranscribeRequest(config=stt_pb2.SttConfig()),
                                   replica=leaving)
        assert stream.replica_id == leaving
        await stream.send(stt_pb2.TranscribeRequest(audio=audio_pb2.AudioChunk(pcm=bytes(16000))))

        status_stack.processes["stt-2"].popen.send_signal(signal.SIGTERM)
        draining = await poll(status_stack.nats_url,
                              lambda v: (replica(v, status_stack, "stt-2") or {}).get("draining"), timeout=10)
        stt = draining["stages"]["stt"]
        assert stt["live"] == 1 and stt["draining"] == 1
        assert replica(draining, status_stack, "stt-2")["active"] == 1
        assert stt["capacity"] == replica(draining, status_stack, "stt")["capacity"]  # a draining replica takes no new streams
        assert {"stage": "stt", "level": "warning",
                "message": f"replica {leaving} draining (1 stream left)"} in draining["problems"]
        code, text = await run_status("--nats-url", status_stack.nats_url)
        assert code == 0 and "1 (+1 draining)" in text

        await stream.end()  # the stream finishes, so the drain does
        assert [r.is_final async for r in stream] == [True]
    finally:
        await stages.close()
        await nc.close()

    gone = await poll(status_stack.nats_url, lambda v: replica(v, status_stack, "stt-2") is None, timeout=15)
    assert gone["stages"]["stt"]["live"] == 1 and gone["stages"]["stt"]["draining"] == 0
    assert await asyncio.to_thread(status_stack.processes["stt-2"].popen.wait, 15) == 0


# ------------------------------------------------------------------ the bus, announced in process


class FakeReplica:
    """All that discovery.announce needs: a name and a snapshot."""

    def __init__(self, stage: str, replica_id: str, capacity: int = 4, active: int = 0):
        self.name = stage
        self.state = {"stage": stage, "replica_id": replica_id, "model": f"{stage}-model", "device": "cuda",
                      "active": active, "capacity": capacity, "served": 7, "cancelled": 0, "refused": 0,
                      "errors": 1, "started_at": time.time() - 90, "draining": False}

    def snapshot(self) -> dict:
        return dict(self.state)


@pytest.fixture
async def bus():
    """A bare nats-server (an open bus: one connection announces every stage) and
    `announce(stage, replica_id, ...)` for fake replicas on it."""
    with Stack(ports="free", nats_auth=False) as local:
        local.start_nats()
        nc = await nats.connect(local.nats_url)
        announced = []

        async def announce(stage, replica_id, **state):
            fake = FakeReplica(stage, replica_id, **state)
            announced.append(await discovery.announce(nc, fake))
            return announced[-1]

        announce.url = local.nats_url
        yield announce
        for announcement in announced:
            await announcement.stop()
        await nc.close()


async def test_nats_service_api_carries_identity_and_latency(bus):
    announcement = await bus("stt", "stt-a", capacity=8, active=2)
    for ms in range(100, 200):  # 100 finals of 100..199 ms
        discovery.observe_latency(ms / 1000, "final")
    nc = await nats.connect(bus.url)
    try:
        info = json.loads((await nc.request("$SRV.INFO.voicestack-stt", b"", timeout=2)).data)
        direct = json.loads((await nc.request(discovery.status_subject("stt", "stt-a"), b"", timeout=2)).data)
    finally:
        await nc.close()
    assert info["name"] == "voicestack-stt" and info["version"] == voicestack.__version__
    assert info["metadata"] == {"stage": "stt", "replica_id": "stt-a", "model": "stt-model", "device": "cuda"}
    assert direct["active"] == 2 and direct["capacity"] == 8 and 89 <= direct["uptime_seconds"] < 120
    assert direct["latency"]["final"]["p50"] == pytest.approx(0.149)
    assert direct["latency"]["final"]["p95"] == pytest.approx(0.194)

    view = await status.collect(bus.url)
    stt = view["stages"]["stt"]
    assert stt["active"] == 2 and stt["capacity"] == 8 and stt["utilisation"] == 0.25 and stt["errors"] == 1
    assert stt["latency"] == {"kind": "final", "count": 100, "p50": pytest.approx(0.149), "p95": pytest.approx(0.194),
                              "estimated": False}

    # Two replicas' latencies merge through their histograms, as Prometheus' would: inside the right buckets.
    second = await bus("stt", "stt-b", capacity=8)
    stt = (await status.collect(bus.url))["stages"]["stt"]
    assert stt["latency"]["count"] == 200 and stt["latency"]["estimated"]
    assert 0.1 <= stt["latency"]["p50"] <= 0.15 and 0.15 <= stt["latency"]["p95"] <= 0.2
    await second.stop()

    announcement.draining = True  # what runtime does the moment SIGTERM arrives
    view = await status.collect(bus.url)
    assert view["stages"]["stt"]["draining"] == 1 and view["stages"]["stt"]["live"] == 0
    await announcement.stop()
    view = await status.collect(bus.url)
    assert view["stages"]["stt"]["replicas"] == []


def test_compute_per_conversation_minute_and_a_replica_not_ready():
    replica = {"stage": "llm", "replica_id": "llm-a", "active": 0, "capacity": 4, "compute_seconds": 30.0}
    stages = {"edge": status.bus_stage("edge", [{"stage": "edge", "replica_id": "e", "capacity": 10,
                                                  "conversation_seconds": 120.0}]),
              "llm": status.bus_stage("llm", [replica, {**replica, "replica_id": "llm-b", "model_server_up": False}])}
    status.compute_per_conversation_minute(stages)
    assert stages["llm"]["compute_per_minute"] == 30.0  # 60 s of compute over 2 minutes of calls
    assert "compute_per_minute" not in stages["edge"]
    # The replica whose model server is down takes nothing: not live, no capacity, said why.
    assert stages["llm"]["live"] == 1 and stages["llm"]["not_ready"] == 1 and stages["llm"]["capacity"] == 4
    assert any("llm-b's model server is down" in message for _, message in stages["llm"]["problems"])
    no_calls = {"edge": status.bus_stage("edge", []), "llm": status.bus_stage("llm", [replica])}
    status.compute_per_conversation_minute(no_calls)
    assert no_calls["llm"]["compute_per_minute"] is None  # nothing to divide by


async def test_a_stage_with_no_replica_is_shown_in_red(bus):
    for stage in ("edge", "vad", "stt", "tts"):
        await bus(stage, f"{stage}-1")

    code, text = await run_status("--nats-url", bus.url)
    assert code == 1
    assert "\x1b[" not in text  # not a terminal: no colour
    [llm_row] = [line for line in text.splitlines() if line.startswith("llm ")]
    assert llm_row.split()[:4] == ["llm", "0", "0/0", "-"]
    assert "ERROR   llm: no replica on the bus" in text

    # On a terminal the row is red.
    controller, terminal = pty.openpty()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "voicestack", "status", "--nats-url", bus.url,
                                                stdout=terminal, stderr=terminal)
    os.close(terminal)
    assert await asyncio.wait_for(proc.wait(), 30) == 1
    painted = b""
    while chunk := await asyncio.to_thread(_read_pty, controller):
        painted += chunk
    os.close(controller)
    assert any(line.startswith(b"\x1b[31mllm ") for line in painted.splitlines()), painted


def _read_pty(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the other side closed
        return b""


async def test_an_unreachable_bus_is_said_so():
    code, view = await status_json("nats://127.0.0.1:9")
    assert code == 2 and view["bus_error"]


# ------------------------------------------------------------------ the cluster, against kmock

NAMESPACE, RELEASE = "voice", "rel"
DEPLOYMENTS, PODS, EVENTS = "apps/v1/deployments", "v1/pods", "v1/events"
HPAS, SCALED_OBJECTS = "autoscaling/v2/horizontalpodautoscalers", "keda.sh/v1alpha1/scaledobjects"


class LabelledEmulator(kmock.KubernetesEmulator):
    """kmock's emulator, plus what the API server does with ?labelSelector=a=b,c=d."""

    async def _serve_list(self, request):
        listing = await super()._serve_list(request)
        wanted = [term.split("=", 1) for term in (request.params.get("labelSelector") or "").split(",") if term]
        listing["items"] = [item for item in listing["items"]
                            if all(item["metadata"].get("labels", {}).get(k) == v for k, v in wanted)]
        return listing


def meta(name: str, stage: str | None = None, release: str = RELEASE) -> dict:
    labels = {"app.kubernetes.io/instance": release, "app.kubernetes.io/component": stage} if stage else {}
    return {"name": name, "namespace": NAMESPACE, "labels": labels, "creationTimestamp": "2026-01-01T00:00:00Z"}


def deployment(stage: str, desired: int, ready: int, gpus: int = 0, release: str = RELEASE) -> dict:
    resources = {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(f"{release}-voicestack-{stage}", stage, release),
            "spec": {"replicas": desired, "template": {"spec": {"containers": [
                {"name": stage, "image": "voicestack:0.1.0", "resources": resources}]}}},
            "status": {"replicas": desired, "readyReplicas": ready}}


def pod(stage: str, suffix: str, ready: bool = True, pending_because: str = "") -> dict:
    if pending_because:
        status_ = {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": pending_because}]}
    else:
        status_ = {"phase": "Running", "conditions": [
            {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": str(ready)}]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta(f"{RELEASE}-voicestack-{stage}-{suffix}", stage),
            "spec": {"containers": [{"name": stage}]}, "status": status_}


def hpa(name: str, target: str, low: int, high: int, current: int, desired: int, limited: bool = False) -> dict:
    conditions = [{"type": "ScalingLimited", "status": "True", "reason": "TooManyReplicas"}] if limited else []
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta(name),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
                     "minReplicas": low, "maxReplicas": high},
            "status": {"currentReplicas": current, "desiredReplicas": desired, "lastScaleTime": "2026-01-01T00:05:00Z",
                       "conditions": conditions}}


def event(name: str, kind: str, obj: str, reason: str, message: str, when: str) -> dict:
    return {"apiVersion": "v1", "kind": "Event", "metadata": meta(name), "type": "Normal", "reason": reason,
            "message": message, "involvedObject": {"kind": kind, "name": obj, "namespace": NAMESPACE},
            "lastTimestamp": when}


@pytest.fixture
async def cluster(tmp_path):
    """kmock on a free port and a kubeconfig pointing at it; `cluster.add(resource, obj)`."""
    async with LabelledEmulator() as api, kmock.Server(api) as server:
        for resource in (DEPLOYMENTS, PODS, EVENTS, HPAS):  # served even when empty, as a real cluster does
            api.resources[resource] = {}

        def add(resource: str, obj: dict) -> None:
            api.objects[kmock.resource(resource), obj["metadata"]["namespace"], obj["metadata"]["name"]] = obj

        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": str(server.url).rstrip("/")}}],
            "users": [{"name": "sre", "user": {"token": "not-checked"}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "sre", "namespace": NAMESPACE}}],
        }))
        add.api, add.args = api, ["--kube", "--kubeconfig", str(kubeconfig), "--release", RELEASE]
        yield add


GPU_SHORTAGE = "0/4 nodes are available: 2 Insufficient nvidia.com/gpu, 2 node(s) didn't match Pod's node affinity/selector."


async def test_cluster_view_autoscaler_at_max_gpu_pending_and_mismatch(bus, cluster):
    # The bus: one of each, two STT; one LLM although two LLM pods are ready.
    for stage, replica_id in [("edge", "e1"), ("vad", "v1"), ("stt", "s1"), ("stt", "s2"), ("llm", "l1"), ("tts", "t1")]:
        await bus(stage, replica_id)
    # The cluster: edge healthy under an HPA; vad healthy with no autoscaler.
    cluster(DEPLOYMENTS, deployment("edge", 1, 1))
    cluster(PODS, pod("edge", "a"))
    cluster(HPAS, hpa("rel-voicestack-edge", "rel-voicestack-edge", 1, 4, 1, 1))
    cluster(DEPLOYMENTS, deployment("vad", 1, 1))
    cluster(PODS, pod("vad", "a"))
    # STT on GPUs under KEDA, at its maximum of 3; the third pod waits for a GPU.
    cluster(DEPLOYMENTS, deployment("stt", 3, 2, gpus=1))
    cluster(PODS, pod("stt", "a"))
    cluster(PODS, pod("stt", "b"))
    cluster(PODS, pod("stt", "c", pending_because=GPU_SHORTAGE))
    cluster(SCALED_OBJECTS, {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": meta("rel-voicestack-stt"),
                             "spec": {"scaleTargetRef": {"name": "rel-voicestack-stt"}, "minReplicaCount": 1,
                                      "maxReplicaCount": 3},
                             "status": {"hpaName": "keda-hpa-rel-voicestack-stt"}})
    cluster(HPAS, hpa("keda-hpa-rel-voicestack-stt", "rel-voicestack-stt", 1, 3, 3, 3, limited=True))
    cluster(EVENTS, event("e1", "HorizontalPodAutoscaler", "keda-hpa-rel-voicestack-stt", "SuccessfulRescale",
                          "New size: 2; reason: external metric above target", "2026-01-01T00:01:00Z"))
    cluster(EVENTS, event("e2", "HorizontalPodAutoscaler", "keda-hpa-rel-voicestack-stt", "SuccessfulRescale",
                          "New size: 3; reason: external metric above target", "2026-01-01T00:05:00Z"))
    # LLM: two pods ready, one replica on the bus.
    cluster(DEPLOYMENTS, deployment("llm", 2, 2, gpus=1))
    cluster(PODS, pod("llm", "a"))
    cluster(PODS, pod("llm", "b"))
    cluster(DEPLOYMENTS, deployment("tts", 1, 1, gpus=1))
    cluster(PODS, pod("tts", "a"))
    # Another release's STT in the same namespace is not ours.
    cluster(DEPLOYMENTS, deployment("stt", 5, 5, release="other"))

    code, view = await status_json(bus.url, *cluster.args)

    assert code == 1 and view["kube"] == {"release": RELEASE, "namespace": NAMESPACE, "error": None}
    kube = {stage: view["stages"][stage]["kube"] for stage in SERVICES}
    assert kube["edge"]["autoscaler"]["kind"] == "hpa" and not kube["edge"]["autoscaler"]["at_max"]
    assert kube["vad"] == {"deployment": "rel-voicestack-vad", "desired": 1, "ready": 1, "autoscaler": None,
                           "gpus_per_pod": 0, "gpus_requested": 0, "pods_not_ready": [], "gpu_starved": False}
    stt = kube["stt"]
    assert (stt["deployment"], stt["desired"], stt["ready"], stt["gpus_requested"]) == ("rel-voicestack-stt", 3, 2, 3)
    assert stt["autoscaler"] == {
        "kind": "keda", "name": "rel-voicestack-stt", "hpa": "keda-hpa-rel-voicestack-stt", "min": 1, "max": 3,
        "current": 3, "desired": 3, "at_max": True,
        "last_scaled": {"time": "2026-01-01T00:05:00Z", "message": "New size: 3; reason: external metric above target"}}
    [pending] = stt["pods_not_ready"]
    assert pending["name"] == "rel-voicestack-stt-c" and pending["phase"] == "Pending"
    assert "Insufficient nvidia.com/gpu" in pending["reason"] and stt["gpu_starved"]

    problems = {(p["stage"], p["level"], p["message"].split(":")[0]) for p in view["problems"]}
    assert problems == {
        ("stt", "error", "pod rel-voicestack-stt-c not ready"),
        ("stt", "warning", "autoscaler at its maximum (3 replicas)"),
        ("llm", "error", "2 pods ready but 1 replica on the bus"),
    }

    code, text = await run_status("--nats-url", bus.url, *cluster.args)
    assert code == 1
    assert f"cluster: namespace {NAMESPACE}, release {RELEASE}" in text
    [stt_row] = [line for line in text.splitlines() if line.startswith("stt ") and "keda" in line]
    assert stt_row.split()[:7] == ["stt", "2/3", "keda", "1-3", "3", "->", "3"]
    assert "1/pod, 3 total" in stt_row
    # Deployments and pods were selected by the release label, not by name.
    selectors = {r.url.path: r.params.get("labelSelector") for r in cluster.api}  # kmock logs every request
    assert selectors[f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"] == f"app.kubernetes.io/instance={RELEASE}"
    assert selectors[f"/api/v1/namespaces/{NAMESPACE}/pods"] == f"app.kubernetes.io/instance={RELEASE}"


async def test_cluster_without_keda_and_an_unreachable_cluster(bus, cluster):
    for stage in SERVICES:
        await bus(stage, f"{stage}-1")
        cluster(DEPLOYMENTS, deployment(stage, 1, 1))
        cluster(PODS, pod(stage, "a"))
    cluster(HPAS, hpa("rel-voicestack-llm", "rel-voicestack-llm", 1, 6, 1, 1))

    code, view = await status_json(bus.url, *cluster.args)  # no keda.sh API: a 404, not an error
    assert code == 0 and view["problems"] == [] and view["kube"]["error"] is None
    assert view["stages"]["llm"]["kube"]["autoscaler"]["max"] == 6

    code, view = await status_json(bus.url, "--kube", "--kubeconfig", "/nonexistent/kubeconfig")
    assert code == 2 and view["kube"]["error"] and view["stages"]["llm"]["live"] == 1
