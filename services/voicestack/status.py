"""`voicestack status`: is every stage healthy, how loaded is it, and is autoscaling
keeping up? One command instead of five dashboards.

Two sources, joined per stage:

  the bus      every live replica answers `$SRV.STATS` (see discovery.py): streams in
               flight, capacity, streams served, errors, draining, last-minute latency.
  the cluster  (--kube) what Kubernetes was asked for and what it has: the Deployment's
               desired/ready replicas, its autoscaler (an HPA, or a KEDA ScaledObject and
               the HPA KEDA made for it), GPUs requested, pods not ready and why.

Where the two disagree (replicas on the bus vs pods ready) the stage is flagged. A
stage with no replica is always shown, in red: an absent row reads as "fine".

`collect()` returns plain dicts (the --json output) and `render()` draws them; the
load tools call `collect()` too, to record replicas per stage during a run.
Exit status: 0 healthy, 1 a problem marked "error", 2 the bus or cluster unreachable.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from datetime import datetime, timezone

import nats

from voicestack import bus_permissions, discovery
from voicestack.config import SERVICES, load_settings
from voicestack.telemetry import LATENCY_BUCKETS

OPTIONAL_POOLS = ("llm-strong",)  # stages a deployment may leave out

# The latency a stage's row shows (the JSON has every kind a replica reports).
HEADLINE_LATENCY = {"edge": "voice_to_voice", "stt": "final", "llm": "first_token", "llm-strong": "first_token",
                    "tts": "clause"}
LATENCY_NOTE = ("p50/p95 over the last minute: edge voice-to-voice, stt final transcript, llm first token, tts per clause; "
                "compute/call-min: a stage's compute seconds per minute of calls, since its replicas started")
# The chart's labels (select by these, never by Deployment names).
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"

ERROR, WARNING = "error", "warning"


# ------------------------------------------------------------------ the bus


async def read_bus(nats_url: str, timeout: float = 1.0) -> list[dict]:
    """Every voicestack replica answering on the bus at `nats_url`."""
    # Credentials and CA come from the same VOICESTACK_NATS_* settings the services use (the
    # status role's user and password file); unset, the status role's of a `voicestack up` bus
    # on this machine (bus_permissions.local_dir), if `nats_url` is one.
    settings = load_settings("edge", {"nats_url": nats_url})
    options = bus_permissions.connect_options(settings, role="status")

    async def quiet(exc):  # a one-shot reader reports failure once, below, not per retry
        pass

    # One short-lived connection per reading: a bus that is down shows as such, not as stale numbers.
    # (nats-py retries a refused initial connect until max_reconnect_attempts, whatever allow_reconnect says.)
    nc = await nats.connect(servers=settings.nats_servers(), name="voicestack-status", connect_timeout=2.0,
                            allow_reconnect=False, max_reconnect_attempts=1, reconnect_time_wait=0.2,
                            error_cb=quiet, **options)
    try:
        return await discovery.discover(nc, timeout)
    finally:
        await nc.close()


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def quantile(counts: list[int], q: float) -> float | None:
    """The q-quantile of a histogram over LATENCY_BUCKETS, interpolated within its
    bucket as Prometheus' histogram_quantile does (so it matches the dashboards)."""
    total = sum(counts)
    if not total:
        return None
    rank, seen = q * total, 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i == len(LATENCY_BUCKETS):  # above the last bound: that bound is all we know
                return LATENCY_BUCKETS[-1]
            lower = LATENCY_BUCKETS[i - 1] if i else 0.0
            return lower + (LATENCY_BUCKETS[i] - lower) * (rank - seen) / count
        seen += count
    return LATENCY_BUCKETS[-1]


def stage_latency(replicas: list[dict], kind: str | None) -> dict:
    """One stage's last-minute p50/p95 of `kind`: a lone reporting replica's own exact
    figures, else all replicas' histograms merged (an estimate, as a dashboard's)."""
    reporting = [r["latency"][kind] for r in replicas if kind in (r.get("latency") or {})]
    if len(reporting) == 1:
        [only] = reporting
        return {"kind": kind, "count": only["count"], "p50": only["p50"], "p95": only["p95"], "estimated": False}
    merged = [0] * (len(LATENCY_BUCKETS) + 1)
    for latency in reporting:
        if len(latency.get("counts") or []) == len(merged):  # other buckets (another version) can't be merged
            merged = [a + b for a, b in zip(merged, latency["counts"])]
    return {"kind": kind, "count": sum(merged), "p50": quantile(merged, 0.50), "p95": quantile(merged, 0.95),
            "estimated": bool(reporting)}


def bus_stage(stage: str, replicas: list[dict]) -> dict:
    """One stage as the bus sees it. Capacity counts only replicas that take new streams."""
    # (An LLM replica whose model server is down takes no streams, as a draining one.)
    live = [r for r in replicas if not r.get("draining") and r.get("model_server_up", True)]
    draining = sum(bool(r.get("draining")) for r in replicas)
    active = sum(r.get("active", 0) for r in replicas)
    capacity = sum(r.get("capacity", 0) for r in live)
    problems = []
    if not live:
        problems.append((ERROR, "no replica on the bus" + (" (all draining or not ready)" if replicas else "")))
    elif active >= capacity:
        problems.append((WARNING, f"at capacity ({active}/{capacity} streams): new streams are refused"))
    for r in replicas:
        if r.get("draining"):
            problems.append((WARNING, f"replica {r.get('replica_id')} draining ({_n(r.get('active', 0), 'stream')} left)"))
        elif not r.get("model_server_up", True):
            problems.append((WARNING, f"replica {r.get('replica_id')}'s model server is down: it takes no streams"))
    return {
        "live": len(live), "draining": draining, "not_ready": len(replicas) - len(live) - draining,
        "active": active, "capacity": capacity,
        "utilisation": round(active / capacity, 3) if capacity else None,
        "served": sum(r.get("served", 0) for r in replicas),
        "errors": sum(r.get("errors", 0) for r in replicas),
        "latency": stage_latency(replicas, HEADLINE_LATENCY.get(stage)),
        "compute_seconds": round(sum(r.get("compute_seconds", 0.0) for r in replicas), 3),
        "conversation_seconds": round(sum(r.get("conversation_seconds", 0.0) for r in replicas), 3),
        "models": sorted({f"{r['model']} ({r.get('device', '?')})" for r in replicas
                          if r.get("model") not in (None, "", "-")}),
        "replicas": replicas,
        "problems": problems,
    }


# ------------------------------------------------------------------ the cluster


def kube_client(kubeconfig: str | None):
    """(ApiClient, default namespace): in-cluster config when running in a pod,
    else the kubeconfig (--kubeconfig, $KUBECONFIG or ~/.kube/config)."""
    from kubernetes import client, config

    if not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"):
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return client.ApiClient(configuration), f.read().strip()
    _, active = config.list_kube_config_contexts(config_file=kubeconfig)
    namespace = (active or {}).get("context", {}).get("namespace", "default")
    return config.new_client_from_config(config_file=kubeconfig), namespace


def read_cluster(kubeconfig: str | None, namespace: str | None, release: str) -> dict:
    """The release's objects as the API returns them (`kubectl get -o json` shapes, so
    one set of field names serves built-in and custom objects). Blocking: the
    kubernetes client is synchronous, so callers run this in a thread."""
    from kubernetes import client

    api, default_namespace = kube_client(kubeconfig)
    namespace = namespace or default_namespace
    apps, core, custom = client.AppsV1Api(api), client.CoreV1Api(api), client.CustomObjectsApi(api)

    def items(call, *args, missing_ok=False, **kwargs) -> list[dict]:
        try:
            return json.loads(call(*args, _preload_content=False, **kwargs).data).get("items") or []
        except client.ApiException as error:
            if missing_ok and error.status == 404:  # e.g. KEDA not installed
                return []
            raise

    selector = f"{INSTANCE_LABEL}={release}"
    with api:
        return {
            "namespace": namespace,
            "deployments": items(apps.list_namespaced_deployment, namespace, label_selector=selector),
            "pods": items(core.list_namespaced_pod, namespace, label_selector=selector),
            # Autoscalers are matched to Deployments by scaleTargetRef, as Kubernetes does.
            "hpas": items(custom.list_namespaced_custom_object, "autoscaling", "v2", namespace,
                          "horizontalpodautoscalers"),
            "scaled_objects": items(custom.list_namespaced_custom_object, "keda.sh", "v1alpha1", namespace,
                                    "scaledobjects", missing_ok=True),
            "events": items(core.list_namespaced_event, namespace),
        }


def _event_time(event: dict) -> str:
    return (event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp")
            or event.get("metadata", {}).get("creationTimestamp") or "")


def _latest_event(events: list[dict], kind: str, name: str, reason: str) -> dict | None:
    matching = [e for e in events if e.get("reason") == reason
                and e.get("involvedObject", {}).get("kind") == kind and e.get("involvedObject", {}).get("name") == name]
    return max(matching, key=_event_time, default=None)


def _gpus(pod_spec: dict) -> int:
    """GPUs one pod asks for (any vendor's <domain>/gpu extended resource)."""
    total = 0
    for container in pod_spec.get("containers") or []:
        resources = container.get("resources") or {}
        asked = {**(resources.get("requests") or {}), **(resources.get("limits") or {})}
        total += sum(int(value) for key, value in asked.items() if key.endswith("/gpu"))
    return total


def _ready(pod: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in pod.get("status", {}).get("conditions") or [])


def gpu_starved(reason: str) -> bool:
    """The scheduler's "0/3 nodes are available: 3 Insufficient nvidia.com/gpu"."""
    return "insufficient" in reason.lower() and "/gpu" in reason


def pod_not_ready_reason(pod: dict, events: list[dict]) -> str:
    """Why a pod is not ready, in the words `kubectl describe` would use."""
    status = pod.get("status", {})
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return "Terminating"
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    scheduled = conditions.get("PodScheduled")
    if scheduled and scheduled.get("status") == "False":
        event = _latest_event(events, "Pod", pod["metadata"]["name"], "FailedScheduling")
        message = scheduled.get("message") or (event or {}).get("message", "")
        return f"{status.get('phase', 'Pending')}: {scheduled.get('reason', 'Unschedulable')}: {message}".strip()
    for container in status.get("containerStatuses") or []:
        for state in ("waiting", "terminated"):
            detail = (container.get("state") or {}).get(state)
            if detail and detail.get("reason"):
                return f"{container.get('name')} {detail['reason']}: {detail.get('message', '')}".strip(": ")
    ready = conditions.get("Ready") or {}
    return " ".join(filter(None, [status.get("phase"), ready.get("reason"), ready.get("message")])) or "not ready"


def autoscaler(deployment_name: str, cluster: dict) -> dict | None:
    """The autoscaler of a Deployment: a KEDA ScaledObject (with the HPA KEDA drives)
    or a plain HPA, whichever targets it."""

    def targets(obj: dict) -> bool:
        ref = obj.get("spec", {}).get("scaleTargetRef") or {}
        return ref.get("name") == deployment_name and ref.get("kind", "Deployment") == "Deployment"

    hpas = {h["metadata"]["name"]: h for h in cluster["hpas"]}
    scaled_object = next((s for s in cluster["scaled_objects"] if targets(s)), None)
    if scaled_object:
        spec, name = scaled_object.get("spec", {}), scaled_object["metadata"]["name"]
        hpa = hpas.get(scaled_object.get("status", {}).get("hpaName") or f"keda-hpa-{name}")
        kind, low, high = "keda", spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    else:
        hpa = next((h for h in cluster["hpas"] if targets(h)), None)
        if hpa is None:
            return None
        spec, name = hpa.get("spec", {}), hpa["metadata"]["name"]
        kind, low, high = "hpa", spec.get("minReplicas", 1), spec.get("maxReplicas")
    status = (hpa or {}).get("status", {})
    current, desired = status.get("currentReplicas"), status.get("desiredReplicas")
    # ScalingLimited/TooManyReplicas: the HPA wants more than its maximum.
    limited = any(c.get("type") == "ScalingLimited" and c.get("status") == "True"
                  and c.get("reason") == "TooManyReplicas" for c in status.get("conditions") or [])
    event = _latest_event(cluster["events"], "HorizontalPodAutoscaler", hpa["metadata"]["name"],
                          "SuccessfulRescale") if hpa else None
    last = ({"time": _event_time(event), "message": event.get("message")} if event
            else {"time": status["lastScaleTime"], "message": None} if status.get("lastScaleTime") else None)
    return {
        "kind": kind, "name": name, "hpa": (hpa or {}).get("metadata", {}).get("name"),
        "min": low, "max": high, "current": current, "desired": desired,
        "at_max": bool(limited or (high is not None and max(current or 0, desired or 0) >= high)),
        "last_scaled": last,
    }


def cluster_stage(stage: str, cluster: dict, bus: dict | None) -> dict:
    """One stage as Kubernetes sees it, and where that disagrees with the bus."""
    deployments = [d for d in cluster["deployments"] if d["metadata"].get("labels", {}).get(COMPONENT_LABEL) == stage]
    pods = [p for p in cluster["pods"] if p["metadata"].get("labels", {}).get(COMPONENT_LABEL) == stage]
    problems = []
    if not deployments:
        return {"deployment": None, "problems": [(ERROR, "no Deployment in the cluster")]}
    deployment = deployments[0]
    name = deployment["metadata"]["name"]
    desired = deployment.get("spec", {}).get("replicas", 1)
    ready_pods = [p for p in pods if _ready(p)]
    not_ready = [{"name": p["metadata"]["name"], "phase": p.get("status", {}).get("phase"),
                  "reason": pod_not_ready_reason(p, cluster["events"])} for p in pods if not _ready(p)]
    gpus_per_pod = _gpus(deployment.get("spec", {}).get("template", {}).get("spec", {}))
    scaler = autoscaler(name, cluster)

    for pod in not_ready:
        starved = gpu_starved(pod["reason"])
        level = ERROR if starved or pod["phase"] == "Pending" else WARNING
        problems.append((level, f"pod {pod['name']} not ready: {pod['reason']}"
                                + (" (no GPU free for it: add GPU nodes or lower maxReplicas)" if starved else "")))
    if scaler and scaler["at_max"]:
        problems.append((WARNING, f"autoscaler at its maximum ({scaler['max']} replicas): it cannot add more"))
    if bus is not None and bus["live"] != len(ready_pods):
        problems.append((ERROR, f"{_n(len(ready_pods), 'pod')} ready but {_n(bus['live'], 'replica')} on the bus"))
    return {
        "deployment": name, "desired": desired, "ready": len(ready_pods),
        "autoscaler": scaler, "gpus_per_pod": gpus_per_pod, "gpus_requested": gpus_per_pod * desired,
        "pods_not_ready": not_ready, "gpu_starved": any(gpu_starved(p["reason"]) for p in not_ready),
        "problems": problems,
    }


# ------------------------------------------------------------------ both


async def collect(nats_url: str, *, kube: bool = False, kubeconfig: str | None = None,
                  namespace: str | None = None, release: str = "voicestack", timeout: float = 1.0) -> dict:
    """The whole view as plain data: what --json prints and render() draws."""
    view = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "nats_url": nats_url,
            "bus_error": None, "stages": {}, "problems": []}
    # The kubernetes client blocks: it reads the cluster in a thread while the bus is read.
    reading_cluster = (asyncio.create_task(asyncio.to_thread(read_cluster, kubeconfig, namespace, release))
                       if kube else None)
    try:
        replicas = await read_bus(nats_url, timeout)
    except Exception as error:  # noqa: BLE001 - whatever failed, the view says so
        replicas, view["bus_error"] = None, f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    cluster = None
    if reading_cluster:
        view["kube"] = {"release": release, "namespace": namespace, "error": None}
        try:
            cluster = await reading_cluster
            view["kube"]["namespace"] = cluster["namespace"]
        except Exception as error:  # noqa: BLE001
            view["kube"]["error"] = f"{type(error).__name__}: {error}"

    # The strong LLM pool is optional: shown when a replica of it is on the bus.
    optional = [pool for pool in OPTIONAL_POOLS if any(r.get("stage") == pool for r in replicas or [])]
    for stage in [*SERVICES, *optional]:
        entry = {"stage": stage}
        if replicas is not None:
            entry.update(bus_stage(stage, [r for r in replicas if r.get("stage") == stage]))
        if cluster is not None:
            entry["kube"] = cluster_stage(stage, cluster, entry if replicas is not None else None)
        problems = entry.pop("problems", []) + (entry.get("kube") or {}).pop("problems", [])
        view["problems"] += [{"stage": stage, "level": level, "message": message} for level, message in problems]
        view["stages"][stage] = entry
    compute_per_conversation_minute(view["stages"])
    return view


def compute_per_conversation_minute(stages: dict) -> None:
    """Each stage's compute seconds per minute of calls on the edges, since the replicas on the
    bus started (a replica that restarted starts again from 0): what a conversation-minute costs."""
    talked = (stages.get("edge") or {}).get("conversation_seconds", 0.0)
    for stage, entry in stages.items():
        if stage != "edge" and "compute_seconds" in entry:
            entry["compute_per_minute"] = round(60 * entry["compute_seconds"] / talked, 3) if talked else None


def exit_status(view: dict) -> int:
    if view["bus_error"] or (view.get("kube") or {}).get("error"):
        return 2
    return 1 if any(p["level"] == ERROR for p in view["problems"]) else 0


# ------------------------------------------------------------------ drawing


class Paint:
    """ANSI colours, or nothing (not a terminal, or NO_COLOR set)."""

    CODES = {"red": "31", "yellow": "33", "green": "32", "bold": "1", "dim": "2"}

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, text: str, colour: str | None) -> str:
        return f"\x1b[{self.CODES[colour]}m{text}\x1b[0m" if self.enabled and colour else text


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f}ms" if seconds < 10 else f"{seconds:.1f}s"


def _ago(timestamp: str | None) -> str:
    if not timestamp:
        return "-"
    try:
        then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return timestamp
    seconds = max(0, int(time.time() - then.timestamp()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _table(rows: list[tuple[list[str], str | None]], header: list[str], paint: Paint) -> list[str]:
    """Aligned columns; colour is applied after padding so escapes don't skew widths."""
    widths = [max(len(cells[i]) for cells, _ in [(header, None), *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [paint(line(header), "bold")] + [paint(line(cells), colour) for cells, colour in rows]


def render(view: dict, paint: Paint) -> str:
    lines = [paint(f"voicestack status  {view['nats_url']}  {view['time']}", "bold")]
    if view["bus_error"]:
        lines.append(paint(f"bus unreachable: {view['bus_error']}", "red"))
    else:
        rows = []
        for stage, s in view["stages"].items():
            replicas = str(s["live"]) + (f" (+{s['draining']} draining)" if s["draining"] else "") \
                + (f" (+{s['not_ready']} not ready)" if s.get("not_ready") else "")
            u = s["utilisation"]
            util = "-" if u is None else f"{u:.1%}" if 0 < u < 0.1 else f"{u:.0%}"
            full = s["active"] >= s["capacity"]
            colour = "red" if not s["live"] else "yellow" if s["draining"] or full else None
            per_minute = s.get("compute_per_minute")
            rows.append(([stage, replicas, f"{s['active']}/{s['capacity']}", util, _ms(s["latency"]["p50"]),
                          _ms(s["latency"]["p95"]), str(s["errors"]), str(s["served"]),
                          "-" if per_minute is None else f"{per_minute:.1f}s", ", ".join(s["models"]) or "-"],
                         colour))
        lines += _table(rows, ["STAGE", "REPLICAS", "ACTIVE/CAP", "UTIL", "P50", "P95", "ERRORS", "SERVED",
                               "COMPUTE/CALL-MIN", "MODEL"], paint)
        lines.append(paint(LATENCY_NOTE, "dim"))

    kube = view.get("kube")
    if kube:
        lines.append("")
        lines.append(paint(f"cluster: namespace {kube['namespace'] or '?'}, release {kube['release']}", "bold"))
        if kube["error"]:
            lines.append(paint(f"cluster unreachable: {kube['error']}", "red"))
        else:
            rows = []
            for stage, s in view["stages"].items():
                k = s["kube"]
                if not k["deployment"]:
                    rows.append(([stage, "-", "no Deployment", "-", "-", "-", "-"], "red"))
                    continue
                a = k["autoscaler"]
                scaler, scaling, last_text = "none", "-", "-"
                if a:
                    scaler = f"{a['kind']} {a['min']}-{a['max']}"
                    scaling = " -> ".join("?" if n is None else str(n) for n in (a["current"], a["desired"]))
                    if a["last_scaled"]:
                        last_text = _ago(a["last_scaled"]["time"])
                        if a["last_scaled"]["message"]:
                            last_text += ": " + a["last_scaled"]["message"][:48]
                gpus = f"{k['gpus_per_pod']}/pod, {k['gpus_requested']} total" if k["gpus_per_pod"] else "-"
                colour = ("red" if k["gpu_starved"] else
                          "yellow" if (a and a["at_max"]) or k["ready"] < k["desired"] else None)
                rows.append(([stage, f"{k['ready']}/{k['desired']}", scaler, scaling, last_text, gpus,
                              str(len(k["pods_not_ready"]))], colour))
            lines += _table(rows, ["STAGE", "READY/DESIRED", "AUTOSCALER", "CURRENT -> DESIRED", "LAST SCALED",
                                   "GPUS", "NOT READY"], paint)

    lines.append("")
    if not view["problems"] and not view["bus_error"]:
        lines.append(paint("all stages healthy", "green"))
    for problem in view["problems"]:
        colour = "red" if problem["level"] == ERROR else "yellow"
        lines.append(paint(f"{problem['level'].upper():7} {problem['stage']}: {problem['message']}", colour))
    return "\n".join(lines)


# ------------------------------------------------------------------ the command


async def _run(args) -> int:
    options = dict(kube=args.kube, kubeconfig=args.kubeconfig, namespace=args.namespace, release=args.release)
    tty = sys.stdout.isatty()
    paint = Paint(tty and not os.environ.get("NO_COLOR"))
    while True:
        view = await collect(args.nats_url, **options)
        if args.json:  # one JSON document per reading; with --watch, one per line
            print(json.dumps(view, indent=None if args.watch else 2), flush=True)
        elif args.watch and tty:
            # Redraw in place: home, overwrite each line and clear its tail, clear below.
            frame = render(view, paint).replace("\n", "\x1b[K\n")
            sys.stdout.write("\x1b[H" + frame + "\x1b[K\n\x1b[J")
            sys.stdout.flush()
        else:
            print(render(view, paint) + ("\n" if args.watch else ""), flush=True)
        if not args.watch:
            return exit_status(view)
        await asyncio.sleep(args.watch)


def run(args) -> int:
    """`voicestack status` (flags: see cli.py)."""
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # e.g. `voicestack status --watch --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
