"""What the numbers were measured on, and what the processes spent: /proc and nats-server's
monitoring port (no psutil)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine() -> dict:
    """CPU count and model, commit, date: the header of every result."""
    model = ""
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model or platform.processor() or "unknown",
        "python": platform.python_version(),
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg": loadavg(),
    }


def loadavg() -> str:
    """1, 5 and 15 minute load averages: how busy the machine was besides us."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15)


class CpuMeter:
    """CPU used by a set of processes between two samples, in cores (1.0 = one core busy)."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.last = self._sample()

    def _sample(self) -> tuple[float, dict[str, float]]:
        used = {}
        for name, pid in self.pids.items():
            try:
                used[name] = cpu_seconds(pid)
            except (OSError, ValueError):
                used[name] = float("nan")
        return time.monotonic(), used

    def read(self) -> tuple[float, dict[str, float]]:
        """(seconds since the last read, {name: cores used meanwhile})."""
        then, before = self.last
        self.last = now, after = self._sample()
        elapsed = max(now - then, 1e-9)
        return elapsed, {name: (after[name] - before[name]) / elapsed for name in after}


def nats_varz(monitor_port: int, timeout: float = 2.0) -> dict:
    """nats-server's /varz (in_msgs, out_msgs, in_bytes, ... since it started)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/varz", timeout=timeout) as reply:
        return json.loads(reply.read())
