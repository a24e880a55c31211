"""How replicas are found on the bus: each process (the edge and every stage replica)
registers itself with the NATS service API (`nats.micro`), so `$SRV.PING`, `$SRV.INFO`
and `$SRV.STATS` find every live replica with no registry of our own. `voicestack
status`, the `nats` CLI (`nats micro ls`, `nats micro stats voicestack-stt`) and the
load tools all read the same answers.

One micro service per replica:

  name      "voicestack-<stage>" (every replica of a stage shares it)
  version   voicestack.__version__
  metadata  stage, replica_id, model, device (fixed for the life of the process)
  endpoint  "status" on "vs.<stage>.status.<replica_id>" (within the stage's own subjects,
            which only its role may read: bus_permissions.py): answers the replica's status JSON.
            The same JSON is the endpoint's `data` in `$SRV.STATS`, so one STATS
            request gathers every replica's live numbers.

Status JSON: `service.snapshot()` plus uptime_seconds and latency, where latency is
{kind: {count, p50, p95, counts}} over the last minute, fed by `observe_latency()`;
`counts` are per bucket of telemetry.LATENCY_BUCKETS (the last one is "above them
all"), so a reader can merge replicas into one stage percentile.

A replica announces itself once it serves, shows `draining` from the moment SIGTERM
arrives, and leaves the bus when its drain is done.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import math
import time
from collections import defaultdict, deque

from nats import micro
from nats.micro.service import Service

import voicestack
from voicestack.telemetry import LATENCY_BUCKETS

SERVICE_PREFIX = "voicestack-"
STATS_SUBJECT = "$SRV.STATS"
WINDOW_SECONDS = 60.0
MAX_SAMPLES = 20000  # bounds memory on a busy replica; the newest samples are kept


def status_subject(stage: str, replica_id: str) -> str:
    return f"vs.{stage}.status.{replica_id}"


# ------------------------------------------------------------ latency, last minute


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of values sorted ascending (q in 0..100)."""
    rank = max(1, math.ceil(q / 100 * len(values)))
    return values[rank - 1]


class LatencyWindow:
    """Stage latency samples of the last minute, by kind (e.g. "final", "first_token")."""

    def __init__(self, seconds: float = WINDOW_SECONDS, max_samples: int = MAX_SAMPLES):
        self.seconds = seconds
        self.samples: deque[tuple[float, str, float]] = deque(maxlen=max_samples)

    def observe(self, seconds: float, kind: str = "") -> None:
        self.samples.append((time.monotonic(), kind, seconds))

    def summary(self) -> dict:
        horizon = time.monotonic() - self.seconds
        while self.samples and self.samples[0][0] < horizon:
            self.samples.popleft()
        by_kind: dict[str, list[float]] = defaultdict(list)
        for _, kind, seconds in self.samples:
            by_kind[kind].append(seconds)
        result = {}
        for kind, values in sorted(by_kind.items()):
            values.sort()
            counts = [0] * (len(LATENCY_BUCKETS) + 1)
            for value in values:
                counts[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
            result[kind] = {"count": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
                            "counts": counts}
        return result


# One process is one replica, so one window per process.
_latency = LatencyWindow()


def observe_latency(seconds: float, kind: str = "") -> None:
    """Record one stage latency (seconds) for `voicestack status`' last-minute p50/p95."""
    _latency.observe(seconds, kind)


# ------------------------------------------------------------ the replica's side


class Announcement:
    """A replica's registration on the bus; `draining` may be set before the service
    itself starts draining (runtime sets it the moment SIGTERM arrives)."""

    def __init__(self, service):
        self.service = service
        self.micro: Service | None = None
        self.draining = False

    def status(self) -> dict:
        snapshot = self.service.snapshot()
        return {
            **snapshot,
            "version": voicestack.__version__,
            "uptime_seconds": round(time.time() - snapshot["started_at"], 1) if snapshot.get("started_at") else None,
            "draining": bool(snapshot.get("draining") or self.draining),
            "latency": _latency.summary(),
        }

    async def _answer(self, request) -> None:
        await request.respond(json.dumps(self.status()).encode())

    async def stop(self) -> None:
        """Leave the bus: `$SRV.*` and the status endpoint stop answering."""
        await self.micro.stop()


async def announce(nc, service) -> Announcement:
    """Register `service` (anything with .name and .snapshot()) with the NATS service API."""
    snapshot = service.snapshot()
    metadata = {key: str(snapshot.get(key, "")) for key in ("stage", "replica_id", "model", "device")}
    announcement = Announcement(service)
    announcement.micro = await micro.add_service(
        nc, name=SERVICE_PREFIX + service.name, version=voicestack.__version__,
        description=f"voicestack {service.name} replica", metadata=metadata,
        stats_handler=lambda endpoint_stats: announcement.status(),  # becomes the endpoint's `data`
    )
    await announcement.micro.add_endpoint(
        name="status", subject=status_subject(service.name, snapshot["replica_id"]), handler=announcement._answer,
        metadata={"format": "json"},
    )
    return announcement


# ------------------------------------------------------------ the reader's side


async def discover(nc, timeout: float = 1.0, quiet: float = 0.25) -> list[dict]:
    """Every voicestack replica on the bus: one `$SRV.STATS`, all the answers.

    Answers are gathered until none has come for `quiet` seconds (after the first),
    or `timeout` at most. Each result is the replica's status JSON (see above) with
    the micro service's id; replicas of other services on the bus are ignored.
    """
    answers: asyncio.Queue = asyncio.Queue()
    inbox = nc.new_inbox()
    subscription = await nc.subscribe(inbox, cb=answers.put)
    replicas: dict[str, dict] = {}
    try:
        await nc.publish(STATS_SUBJECT, b"", reply=inbox)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            try:
                msg = await asyncio.wait_for(answers.get(), min(left, quiet) if replicas else left)
            except asyncio.TimeoutError:
                break
            replica = _replica_from_stats(msg.data)
            if replica:
                replicas[replica["service_id"]] = replica
    finally:
        await subscription.unsubscribe()
    return sorted(replicas.values(), key=lambda r: (r.get("stage", ""), r.get("replica_id", "")))


def _replica_from_stats(data: bytes) -> dict | None:
    try:
        stats = json.loads(data)
    except ValueError:
        return None  # e.g. the server's empty "no responders" status message
    if not isinstance(stats, dict) or not str(stats.get("name", "")).startswith(SERVICE_PREFIX):
        return None
    status = next((e.get("data") for e in stats.get("endpoints") or [] if e.get("name") == "status"), None)
    if not isinstance(status, dict):
        return None
    return {**status, "service_id": stats.get("id"), "version": stats.get("version")}
