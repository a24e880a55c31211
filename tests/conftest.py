"""Shared fixtures: real processes (nats-server + voicestack services) and real speech."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from voicestack.audio import PIPELINE_RATE, read_wav
from voicestack.client import silence  # noqa: F401 (the tests take it from here)
from voicestack.launcher import START_ORDER, Stack

HUMAN_RECORDING = "/usr/share/sounds/alsa/Front_Center.wav"


def speak(text: str, tmp_dir: Path, speed: int = 150) -> np.ndarray:
    """`text` spoken by espeak-ng, as float32 at 16 kHz."""
    assert shutil.which("espeak-ng"), "espeak-ng is needed: make test installs it"
    path = tmp_dir / f"say-{abs(hash((text, speed)))}.wav"
    subprocess.run(["espeak-ng", "-s", str(speed), "-w", str(path), text], check=True)
    audio = read_wav(path)
    # espeak pads with silence; trim it so a test's pauses are the pauses it asks for.
    loud = np.flatnonzero(np.abs(audio) > 0.02 * np.abs(audio).max())
    pad = PIPELINE_RATE // 50
    return audio[max(0, loud[0] - pad): loud[-1] + pad]


def words(text: str) -> list[str]:
    return "".join(c.lower() if c.isalnum() or c == "'" else " " for c in text).split()


def metric(port: int, name: str, **labels) -> float:
    """The sum of a metric's samples (those with all `labels`) on a service's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("speech")


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The embedded default on free ports: nats-server and all five services."""
    logs = tmp_path_factory.mktemp("logs")
    with Stack(ports="free", log_dir=logs) as running:
        running.start(START_ORDER)
        yield running


@pytest.fixture(scope="session")
def edge_address(stack) -> str:
    return stack.processes["edge"].address


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    """The OTLP/gRPC trace and metrics services, keeping every span it is sent."""

    def __init__(self):
        self.spans = []  # (service name, span)

    def Export(self, request, context):
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
            return trace_service_pb2.ExportTraceServiceResponse()
        return metrics_service_pb2.ExportMetricsServiceResponse()


@pytest.fixture(scope="module")
def receiver():
    """An OTLP receiver on a free port: (the sink with its spans, the port)."""
    sink = OtlpReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield sink, port
    server.stop(None)


@pytest.fixture(scope="session")
def helm() -> str:
    """helm v3 from the venv (tools/get_helm.py puts it there); fetched once if missing."""
    path = Path(os.environ.get("HELM") or Path(sys.executable).parent / "helm")
    if not path.exists():
        fetched = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "get_helm.py"), str(path)],
                                 capture_output=True, text=True, timeout=600)
        if fetched.returncode != 0:
            pytest.fail(f"helm is not installed at {path} and tools/get_helm.py could not fetch it "
                        f"(`make test` installs it):\n{fetched.stderr[-2000:]}")
    version = subprocess.run([str(path), "version", "--template", "{{.Version}}"],
                             capture_output=True, text=True).stdout.strip()
    assert version.startswith("v3."), f"{path} is helm {version!r}; the chart is tested with helm 3 (`make test` installs it)"
    return str(path)
