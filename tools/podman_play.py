"""The chart's CPU profile, rendered for `podman kube play` on one machine.

`podman kube play` runs the chart's Deployments but nothing around them: no Services, no
cluster DNS, no kubelet to run gRPC probes or preStop hooks, no controller for replicas.
This step gives the pods what those would, and changes nothing else of the chart's output:

1. `helm template` with values-cpu-minimal.yaml, the local images, the NATS URL given, and
   the replica counts asked for (`--replicas stt=2`);
2. only the Deployments are kept (Services, NetworkPolicies, PDBs, ServiceAccounts and the
   helm test pod mean nothing to podman);
3. host networking instead of Services: each pod gets its own gRPC and metrics ports on the
   host (VOICESTACK_GRPC_PORT, VOICESTACK_METRICS_PORT), and meets the others on NATS;
4. a Deployment of N replicas becomes N one-replica Deployments (podman runs one pod per
   Deployment), <name>-0 .. <name>-N-1, so each replica is a pod of its own, as in a cluster;
5. what the kubelet fills in is filled in here: fieldRef values (the pod's name, namespace,
   node) and $(VAR) references in env values;
6. each pod's emptyDirs are named after the pod (podman 4.3 makes an emptyDir a named volume:
   alike names would be one volume shared by every pod);
7. probes (podman has no gRPC probes) and the preStop sleep (it only waits for endpoints
   to drop the pod) are removed: readiness is the service's gRPC health, which the caller
   checks from the host (tests/images).

    python tools/podman_play.py --nats nats://127.0.0.1:4222 --out build/images/play.yaml
    podman kube play build/images/play.yaml        # and: podman kube down build/images/play.yaml

It prints, as JSON, each pod's stage, its container's name and its ports (the edge's gRPC
port is where clients connect: 127.0.0.1:<port>).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "voicestack"
RELEASE = "vs"


def helm() -> str:
    found = shutil.which("helm") or shutil.which("helm", path=str(ROOT / ".venv" / "bin"))
    if not found:
        sys.exit("helm not found: `make helm` installs it into .venv/bin")
    return found


def render(nats_url: str, repository: str, tag: str, replicas: dict[str, int], sets: list[str]) -> list[dict]:
    """`helm template` of the CPU profile: every object it renders."""
    command = [helm(), "template", RELEASE, str(CHART), "-f", str(CHART / "values-cpu-minimal.yaml"),
               "--set", f"image.repository={repository}", "--set", f"nats.url={nats_url}"]
    if tag:
        command += ["--set", f"image.tag={tag}"]
    for stage, count in replicas.items():
        command += ["--set", f"stages.{stage}.replicas={count}"]
    for value in sets:
        command += ["--set", value]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def free_ports():
    """A free port on the host at each call, never the same twice."""
    given: set[int] = set()

    def port() -> int:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                if (found := s.getsockname()[1]) not in given:
                    given.add(found)
                    return found
    return port


def expand(env: list[dict], known: dict[str, str]) -> list[dict]:
    """Env with fieldRefs and $(VAR) references resolved, as the kubelet resolves them."""
    values: dict[str, str] = {}
    out = []
    for var in env:
        if "valueFrom" in var:
            field = var["valueFrom"].get("fieldRef", {}).get("fieldPath")
            if field not in known:
                raise SystemExit(f"{var['name']}: no value for {var['valueFrom']} under podman")
            value = known[field]
        else:
            value = re.sub(r"\$\((\w+)\)", lambda m: values.get(m[1], m[0]), str(var.get("value", "")))
        values[var["name"]] = value
        out.append({"name": var["name"], "value": value})
    return out


def set_env(env: list[dict], name: str, value: str) -> None:
    for var in env:
        if var["name"] == name:
            var["value"] = value
            return
    env.append({"name": name, "value": value})


def for_podman(objects: list[dict], ports: Callable[[], int]) -> tuple[list[dict], list[dict]]:
    """The Deployments, one per replica, on host networking; and what runs where."""
    deployments, pods = [], []
    for obj in objects:
        if obj.get("kind") != "Deployment":
            continue
        count = obj["spec"].get("replicas", 1)
        for index in range(count):
            d = copy.deepcopy(obj)
            name = f"{obj['metadata']['name']}-{index}"
            d["metadata"]["name"] = name
            d["spec"]["replicas"] = 1
            spec = d["spec"]["template"]["spec"]
            spec["hostNetwork"] = True
            pod_name = f"{name}-pod-0"  # what podman names a Deployment's (one) pod
            known = {"metadata.name": pod_name, "metadata.namespace": d["metadata"].get("namespace", "default"),
                     "spec.nodeName": socket.gethostname()}
            # podman 4.3 makes an emptyDir a named volume, by the volume's name: shared by every
            # pod that names it alike. Named after the pod, each is the pod's own again.
            renamed = {v["name"]: f"{name}-{v['name']}" for v in spec.get("volumes", []) if "emptyDir" in v}
            for volume in spec.get("volumes", []):
                volume["name"] = renamed.get(volume["name"], volume["name"])
            for container in spec["containers"]:
                for mount in container.get("volumeMounts", []):
                    mount["name"] = renamed.get(mount["name"], mount["name"])
                grpc_port, metrics_port = ports(), ports()
                container["env"] = expand(container.get("env", []), known)
                set_env(container["env"], "VOICESTACK_GRPC_PORT", str(grpc_port))
                set_env(container["env"], "VOICESTACK_METRICS_PORT", str(metrics_port))
                container.pop("ports", None)  # host networking: the env above says where it listens
                for key in ("startupProbe", "readinessProbe", "livenessProbe", "lifecycle"):
                    container.pop(key, None)
                pods.append({"pod": pod_name, "deployment": name, "container": f"{pod_name}-{container['name']}",
                             "stage": container["args"][-1], "image": container["image"],
                             "grpc_port": grpc_port, "metrics_port": metrics_port})
            deployments.append(d)
    return deployments, pods


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nats", required=True, help="NATS URL the pods use (host networking: e.g. nats://127.0.0.1:4222)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the YAML for `podman kube play`")
    parser.add_argument("--repository", default="localhost/voicestack", help="image.repository (make images' default)")
    parser.add_argument("--tag", default="", help="image.tag (default: the chart's appVersion)")
    parser.add_argument("--replicas", nargs="*", default=[], metavar="STAGE=N", help="replicas of a stage, e.g. stt=2")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="more helm --set values")
    parser.add_argument("--base-port", type=int, default=0,
                        help="ports from here up (the edge's gRPC first); 0 (default): free ports")
    args = parser.parse_args(argv)

    replicas = {stage: int(n) for stage, n in (item.split("=", 1) for item in args.replicas)}
    counter = iter(range(args.base_port, args.base_port + 1000))
    ports = free_ports() if args.base_port == 0 else lambda: next(counter)
    objects = render(args.nats, args.repository, args.tag, replicas, args.sets)
    # The edge first, so that --base-port gives it the first port.
    objects.sort(key=lambda o: o.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/component") != "edge")
    deployments, pods = for_podman(objects, ports)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(yaml.safe_dump_all(deployments, sort_keys=False))
    print(json.dumps(pods, indent=1))


if __name__ == "__main__":
    main()
