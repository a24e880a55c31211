"""Shared fixtures: real processes (nats-server + voicestack services) and real speech."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest

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
