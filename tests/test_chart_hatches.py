"""The chart's escape hatches, monitoring, autoscaling and vLLM, as the anchor charts (vLLM
production-stack, NVIDIA NIM, NATS) have them (issue #17, "It installs").

Each hatch is rendered with `helm template` and checked in the manifests: runtimeClassName, per-stage
GPU resource names, envFrom, init and extra containers, ServiceAccount annotations, image digests; vLLM
as a native sidecar (or an ordinary container), non-root with USER/HOME, a pinned revision and
HF_HUB_OFFLINE when the weights come from a volume, an init container or the image, the Job that fills a
ReadWriteMany claim, and the refusal of a ReadWriteOnce claim that more than one replica would mount;
PodMonitors (stages, edge, gateways, vLLM); KEDA on a smoothed signal with ignoreNullValues false, its
TriggerAuthentication and the HPA-ownership transfer; values-gpu.yaml's two zone-spread GPU replicas.
The helpers and the general policies come from test_chart.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml

import test_chart as base

RELEASE, NAMESPACE = base.RELEASE, base.NAMESPACE
DIGEST = "sha256:" + "ab" * 32
VLLM_DIGEST = "sha256:" + "cd" * 32
REVISION = "989aa7980e4cf806f80c7fef2b1adb7bc71aa306"
PROMETHEUS_PEERS = '[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]'
TMP_MOUNT = [{"name": "tmp", "mountPath": "/tmp"}]
SMALL = {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}}
HARDENED = {"runAsNonRoot": True, "runAsUser": 10001, "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
INIT = [{"name": "wait-for-config", "image": "busybox:1.36", "command": ["true"], "resources": SMALL,
         "volumeMounts": TMP_MOUNT}]
EXTRA = [
    # No securityContext: the chart gives it its own.
    {"name": "log-shipper", "image": "fluent/fluent-bit:3.1", "resources": SMALL, "volumeMounts": TMP_MOUNT,
     "livenessProbe": {"tcpSocket": {"port": 2020}}, "readinessProbe": {"tcpSocket": {"port": 2020}},
     "startupProbe": {"tcpSocket": {"port": 2020}},
     # Ships the logs of the whole drain (the edge's and the web gateway's: 5 s preStop + 300 s).
     "lifecycle": {"preStop": {"exec": {"command": ["sleep", "310"]}}}},
]
SA_ANNOTATIONS = {"iam.gke.io/gcp-service-account": "voicestack@project.iam.gserviceaccount.com"}

# Every hatch of the stages and gateways at once (the web gateway on, so the gateways' are rendered too).
HATCHES = [
    "--set", "gpuRuntimeClassName=nvidia", "--set", "stages.vad.runtimeClassName=kata",
    "--set", "stages.stt.gpuResourceName=nvidia.com/mig-1g.10gb", "--set", "stages.tts.gpuResourceName=nvidia.com/gpu.shared",
    "--set-json", 'stages.edge.envFrom=[{"configMapRef":{"name":"edge-env"}},{"secretRef":{"name":"edge-secrets"}}]',
    "--set-json", f"stages.edge.initContainers={json.dumps(INIT)}",
    "--set-json", f"stages.edge.extraContainers={json.dumps(EXTRA)}",
    "--set-json", f"stages.llm.initContainers={json.dumps(INIT)}",
    "--set-json", f"stages.llm.serviceAccount.annotations={json.dumps(SA_ANNOTATIONS)}",
    "--set", f"stages.edge.image.digest={DIGEST}", "--set", f"stages.llm.vllm.digest={VLLM_DIGEST}",
    "--set", "gateways.web.enabled=true", "--set", "gateways.web.runtimeClassName=kata",
    "--set-json", 'gateways.web.envFrom=[{"secretRef":{"name":"web-env"}}]',
    "--set-json", f"gateways.web.initContainers={json.dumps(INIT)}",
    "--set-json", f"gateways.web.extraContainers={json.dumps(EXTRA)}",
    "--set-json", f"gateways.web.serviceAccount.annotations={json.dumps(SA_ANNOTATIONS)}",
    "--set", f"gateways.web.image.digest={DIGEST}",
]

_cache: dict[tuple, list[dict]] = {}


def template(helm: str, *args: str, kube: str = base.KUBE_VERSION) -> list[dict]:
    key = (kube, *args)
    if key not in _cache:
        out = base.run_helm(helm, "template", RELEASE, ".", "--namespace", NAMESPACE, "--kube-version", f"{kube}.0", *args)
        assert out.returncode == 0, f"helm template {args} failed:\n{out.stderr}"
        _cache[key] = [d for d in yaml.safe_load_all(out.stdout) if d]
    return _cache[key]


def refused(helm: str, *args: str, kube: str = base.KUBE_VERSION) -> str:
    out = base.run_helm(helm, "template", RELEASE, ".", "--namespace", NAMESPACE, "--kube-version", f"{kube}.0", *args)
    assert out.returncode != 0, f"helm accepted {args}"
    return out.stderr


def validate(docs: list[dict]) -> None:
    """Every object of Kubernetes' own kinds against the 1.30 schemas (strict); CRDs are checked apart."""
    for doc in docs:
        if doc["apiVersion"].startswith(("keda.sh/", "monitoring.coreos.com/")):
            continue
        try:
            kubernetes_validate.validate(doc, base.KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {error.message} at {'.'.join(map(str, error.path))}")


def spec_of(docs: list[dict], stage: str) -> dict:
    return base.pod_spec(base.deployments(docs)[stage])


def by_name(containers: list[dict]) -> dict[str, dict]:
    return {c["name"]: c for c in containers}


def lint(helm: str, *args: str) -> None:
    out = base.run_helm(helm, "lint", ".", "--strict", "--namespace", NAMESPACE, *args)
    assert out.returncode == 0 and "0 chart(s) failed" in out.stdout, out.stdout + out.stderr


# ---------------------------------------------------------------- the hatches together: valid, hardened, linted


def test_every_hatch_at_once_renders_valid_and_hardened(helm):
    lint(helm, *HATCHES)
    docs = template(helm, *HATCHES)
    validate(docs)
    # The general policies of test_chart.py hold with every hatch open.
    base.test_every_container_is_hardened_and_sized(docs)
    base.test_every_container_has_probes(docs, "hatches")
    base.test_every_deployment_has_a_pdb(docs)
    base.test_drain_deadline_fits_the_grace_period(docs)
    base.test_environment_is_the_services_runtime_contract(docs)
    base.test_network_policies_expose_only_the_edge(docs, "hatches")


# ---------------------------------------------------------------- runtimeClassName, GPU resource names


def test_runtime_class_goes_to_gpu_pods_and_per_stage(helm):
    docs = template(helm, *HATCHES)
    classes = {stage: base.pod_spec(d).get("runtimeClassName") for stage, d in base.deployments(docs).items()}
    # gpuRuntimeClassName reaches every pod that holds a GPU; a stage's own value wins; CPU pods keep the default.
    assert classes == {"edge": None, "vad": "kata", "stt": "nvidia", "llm": "nvidia", "tts": "nvidia", "web": "kata"}
    assert all("runtimeClassName" not in base.pod_spec(d) for d in base.of_kind(template(helm), "Deployment"))


def gpu_claims(spec: dict) -> dict[str, int]:
    claims: dict[str, int] = {}
    for c in base.running_containers(spec):
        for name, count in c["resources"].get("limits", {}).items():
            if "/" in name:
                assert c["resources"]["requests"][name] == count, c["name"]
                claims[name] = claims.get(name, 0) + int(count)
    return claims


def test_gpu_resource_name_per_stage(helm):
    """MIG (mixed strategy) and time-slicing (renameByDefault) advertise other resource names."""
    docs = template(helm, *HATCHES)
    assert gpu_claims(spec_of(docs, "stt")) == {"nvidia.com/mig-1g.10gb": 1}
    assert gpu_claims(spec_of(docs, "tts")) == {"nvidia.com/gpu.shared": 1}
    assert gpu_claims(spec_of(docs, "llm")) == {"nvidia.com/gpu": 1}  # the global gpuResourceName
    docs = template(helm, "--set", "gpuResourceName=amd.com/gpu")
    assert {stage: gpu_claims(spec_of(docs, stage)) for stage in ("stt", "llm", "tts")} == \
        {stage: {"amd.com/gpu": 1} for stage in ("stt", "llm", "tts")}


# ---------------------------------------------------------------- env, containers, ServiceAccounts, digests


def test_env_from_reaches_the_service_container(helm):
    docs = template(helm, *HATCHES)
    edge = base.stage_container("edge", base.deployments(docs)["edge"])
    assert edge["envFrom"] == [{"configMapRef": {"name": "edge-env"}}, {"secretRef": {"name": "edge-secrets"}}]
    web = base.stage_container("web", base.deployments(docs)["web"])
    assert web["envFrom"] == [{"secretRef": {"name": "web-env"}}]
    # Beside the tools' Secret of the edge, not instead of it.
    docs = template(helm, "--set", "stages.edge.tools.secretName=tool-secrets",
                    "--set-json", 'stages.edge.envFrom=[{"configMapRef":{"name":"edge-env"}}]')
    edge = base.stage_container("edge", base.deployments(docs)["edge"])
    assert edge["envFrom"] == [{"secretRef": {"name": "tool-secrets"}}, {"configMapRef": {"name": "edge-env"}}]


def test_extra_env_reaches_vllm(helm):
    docs = template(helm, "--set-json", 'stages.llm.vllm.extraEnv=[{"name":"VLLM_ATTENTION_BACKEND","value":"FLASHINFER"}]',
                    "--set-json", 'stages.llm.vllm.envFrom=[{"secretRef":{"name":"vllm-env"}}]')
    vllm = base.vllm_container(base.deployments(docs)["llm"])
    assert {"name": "VLLM_ATTENTION_BACKEND", "value": "FLASHINFER"} in vllm["env"]
    assert vllm["envFrom"] == [{"secretRef": {"name": "vllm-env"}}]


def test_init_and_extra_containers(helm):
    docs = template(helm, *HATCHES)
    for stage in ("edge", "web"):
        spec = spec_of(docs, stage)
        assert [c["name"] for c in spec["initContainers"]] == ["wait-for-config"]
        assert [c["name"] for c in spec["containers"]] == [stage, "log-shipper"]
        shipper = by_name(spec["containers"])["log-shipper"]
        assert shipper["securityContext"] == {**HARDENED, "runAsGroup": 10001}, "the chart's, when it has none"
        assert shipper["image"] == "fluent/fluent-bit:3.1" and shipper["resources"] == SMALL
    # A user's init containers run before the vLLM native sidecar, and keep a securityContext of their own.
    own = [{**INIT[0], "securityContext": {**HARDENED, "runAsUser": 2000}}]
    docs = template(helm, "--set-json", f"stages.llm.initContainers={json.dumps(own)}")
    init = spec_of(docs, "llm")["initContainers"]
    assert [c["name"] for c in init] == ["wait-for-config", "vllm"]
    assert init[0]["securityContext"]["runAsUser"] == 2000


def test_service_account_annotations(helm):
    docs = template(helm, *HATCHES)
    accounts = {d["metadata"]["name"]: d for d in base.of_kind(docs, "ServiceAccount")}
    for name in (f"{RELEASE}-voicestack-llm", f"{RELEASE}-voicestack-web"):
        assert accounts[name]["metadata"]["annotations"] == SA_ANNOTATIONS
        assert accounts[name]["automountServiceAccountToken"] is False
    assert "annotations" not in accounts[f"{RELEASE}-voicestack-stt"]["metadata"]


def test_image_digest_pins_the_images(helm):
    docs = template(helm, *HATCHES)
    assert base.stage_container("edge", base.deployments(docs)["edge"])["image"] == \
        f"registry.example.com/voicestack-edge@{DIGEST}"
    assert base.stage_container("web", base.deployments(docs)["web"])["image"] == \
        f"registry.example.com/voicestack-edge@{DIGEST}"
    assert base.vllm_container(base.deployments(docs)["llm"])["image"] == f"vllm/vllm-openai@{VLLM_DIGEST}"
    assert base.stage_container("stt", base.deployments(docs)["stt"])["image"].endswith("-stt:0.1.0")


@pytest.mark.parametrize("args, where", [
    (["--set", "stages.edge.image.digest=latest"], "/stages/edge/image/digest"),
    (["--set", "stages.llm.vllm.digest=sha256:abc"], "/stages/llm/vllm/digest"),
    (["--set", "stages.stt.serviceAccount.name=x"], "/stages/stt/serviceAccount"),
    (["--set", "stages.llm.vllm.mode=deployment"], "/stages/llm/vllm/mode"),
    (["--set", "stages.llm.vllm.modelSource=s3"], "/stages/llm/vllm/modelSource"),
    (["--set", "stages.llm.vllm.modelClaim.accessMode=RWX"], "/stages/llm/vllm/modelClaim/accessMode"),
    (["--set", "autoscaling.keda.window=1 minute"], "/autoscaling/keda/window"),
    (["--set", "autoscaling.keda.authentication.modes=oauth"], "/autoscaling/keda/authentication/modes"),
    (["--set", "metrics.podMonitor.interval=often"], "/metrics/podMonitor/interval"),
    (["--set-json", 'gateways.web.initContainers=[{"image":"x"}]'], "/gateways/web/initContainers/0"),
])
def test_schema_is_strict_about_the_hatches(helm, args, where):
    error = refused(helm, *args)
    assert "values don't meet the specifications of the schema" in error and f"at '{where}'" in error, error


# ---------------------------------------------------------------- vLLM as the anchors run it


def test_vllm_is_a_native_sidecar_by_default(helm):
    spec = spec_of(template(helm), "llm")
    vllm = by_name(spec["initContainers"])["vllm"]
    assert vllm["restartPolicy"] == "Always", "a native sidecar"
    assert vllm["startupProbe"]["httpGet"] == {"path": "/health", "port": "vllm"}, "the stage starts once it passes"
    assert "lifecycle" not in vllm, "the kubelet stops it after the stage has drained"
    assert "vllm" not in by_name(spec["containers"])
    assert gpu_claims(spec) == {"nvidia.com/gpu": 1}


def test_vllm_container_mode_for_older_clusters(helm):
    error = refused(helm, kube="1.28")
    assert "stages.llm.vllm.mode is native" in error and "needs Kubernetes >= 1.29" in error, error
    docs = template(helm, "--set", "stages.llm.vllm.mode=container", kube="1.28")
    spec = spec_of(docs, "llm")
    assert "initContainers" not in spec
    vllm = by_name(spec["containers"])["vllm"]
    assert "restartPolicy" not in vllm
    drain = float(base.env_of(base.stage_container("llm", base.deployments(docs)["llm"]))["VOICESTACK_DRAIN_SECONDS"]["value"])
    assert base.prestop_sleep(vllm) >= drain, "outlives the stage's drain"
    base.test_drain_deadline_fits_the_grace_period(docs)
    base.test_every_container_has_probes(docs, "container-mode")


def test_vllm_runs_as_non_root_with_a_user_and_home(helm):
    spec = spec_of(template(helm), "llm")
    vllm = base.vllm_container({"spec": {"template": {"spec": spec}}})
    env = {e["name"]: e.get("value") for e in vllm["env"]}
    # torch's getpass.getuser() needs USER or LOGNAME when the uid has no passwd entry.
    assert env["USER"] == env["LOGNAME"] == "vllm"
    mounts = {m["mountPath"]: m["name"] for m in vllm["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert env["HOME"] == "/tmp" and "emptyDir" in volumes[mounts["/tmp"]], "HOME is a writable emptyDir"
    for name in ("XDG_CACHE_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "NUMBA_CACHE_DIR"):
        assert env[name].startswith("/tmp/"), name
    assert env["HF_HOME"].startswith("/models/") and "/models" in mounts
    assert env["VLLM_NO_USAGE_STATS"] == "1"
    security = {**spec["securityContext"], **vllm["securityContext"]}
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0 and security["readOnlyRootFilesystem"] is True
    # Another uid (an image built with its own user) merges over the chart's hardening, which stays.
    spec = spec_of(template(helm, "--set-json", 'stages.llm.vllm.securityContext={"runAsUser":1000,"runAsGroup":1000}'), "llm")
    security = base.vllm_container({"spec": {"template": {"spec": spec}}})["securityContext"]
    assert security["runAsUser"] == 1000 and security["runAsGroup"] == 1000
    assert security["readOnlyRootFilesystem"] is True and security["capabilities"] == {"drop": ["ALL"]}


def test_vllm_revision_is_pinned(helm):
    vllm = base.vllm_container(base.deployments(template(helm, "--set", f"stages.llm.vllm.revision={REVISION}"))["llm"])
    assert f"--revision={REVISION}" in vllm["args"] and f"--tokenizer-revision={REVISION}" in vllm["args"]
    assert not any(a.startswith("--revision") for a in base.vllm_container(base.deployments(template(helm))["llm"])["args"])
    # A path has no revision.
    docs = template(helm, "--set", "stages.llm.vllm.modelSource=image", "--set", "stages.llm.vllm.model=/opt/models/qwen",
                    "--set", f"stages.llm.vllm.revision={REVISION}")
    assert not any(a.startswith("--revision") for a in base.vllm_container(base.deployments(docs)["llm"])["args"])


def egress_ports(docs: list[dict], stage: str) -> set:
    policy = next(p for p in base.of_kind(docs, "NetworkPolicy") if p["metadata"]["name"] == f"{RELEASE}-voicestack-{stage}")
    return {port["port"] for rule in policy["spec"]["egress"] for port in rule["ports"]}


CLAIM = ["--set", "stages.llm.vllm.modelClaim.name=vllm-models"]


@pytest.mark.parametrize("source, args, offline, egress, downloader, volume", [
    ("download", [], False, True, False, "emptyDir"),
    ("initContainer", [], True, True, True, "emptyDir"),
    ("initContainer", CLAIM, True, True, True, "persistentVolumeClaim"),
    ("volume", CLAIM, True, False, False, "persistentVolumeClaim"),
    ("image", [], True, False, False, None),
])
def test_vllm_weights_sources(helm, source, args, offline, egress, downloader, volume):
    docs = template(helm, "--set", f"stages.llm.vllm.modelSource={source}", "--set", f"stages.llm.vllm.revision={REVISION}", *args)
    validate(docs)
    base.test_every_container_is_hardened_and_sized(docs)
    spec = spec_of(docs, "llm")
    vllm = base.vllm_container({"spec": {"template": {"spec": spec}}})
    env = {e["name"]: e.get("value") for e in vllm["env"]}
    assert (env.get("HF_HUB_OFFLINE") == "1") == offline
    assert (443 in egress_ports(docs, "llm")) == egress, "HTTPS out only for a pod that downloads"
    init = by_name(spec["initContainers"])
    assert ("vllm-download" in init) == downloader
    if downloader:
        # Before the sidecar, at the pinned revision, into the same volume.
        assert [c["name"] for c in spec["initContainers"]] == ["vllm-download", "vllm"]
        down = {e["name"]: e.get("value") for e in init["vllm-download"]["env"]}
        assert down["VLLM_MODEL"] == "Qwen/Qwen2.5-1.5B-Instruct" and down["VLLM_REVISION"] == REVISION
        assert down["HF_HOME"] == env["HF_HOME"] and down["USER"] == "vllm"
        assert "restartPolicy" not in init["vllm-download"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    if volume is None:
        assert "vllm-models" not in volumes and "HF_HOME" not in env, "the image's own HF_HOME"
        assert "/models" not in {m["mountPath"] for m in vllm["volumeMounts"]}
    else:
        assert volume in volumes["vllm-models"]
        if volume == "persistentVolumeClaim":
            assert volumes["vllm-models"]["persistentVolumeClaim"] == {"claimName": "vllm-models"}


def test_fill_job_fills_a_read_write_many_claim_once(helm):
    args = ["--set", "stages.llm.vllm.modelSource=volume", *CLAIM, "--set", "stages.llm.vllm.fillJob.enabled=true",
            "--set", f"stages.llm.vllm.revision={REVISION}",
            "--set-json", 'stages.llm.vllm.hfTokenSecret={"name":"hf-token","key":"token"}']
    lint(helm, *args)
    docs = template(helm, *args)
    validate(docs)
    jobs = base.of_kind(docs, "Job")
    assert [j["metadata"]["name"] for j in jobs] == [f"{RELEASE}-voicestack-llm-model"]
    job = jobs[0]
    # A hook: the weights are in the claim before the vLLM pods start offline.
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    spec = job["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False and spec["restartPolicy"] == "Never"
    [container] = spec["containers"]
    security = {**spec["securityContext"], **container["securityContext"]}
    assert {k: security[k] for k in HARDENED} == {**HARDENED, "runAsUser": security["runAsUser"]} and security["runAsUser"] != 0
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) & set(container["resources"]["limits"])
    tmp = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}["/tmp"]
    assert "emptyDir" in {v["name"]: v for v in spec["volumes"]}[tmp], "a read-only root needs a writable /tmp"
    env = {e["name"]: e for e in container["env"]}
    assert env["VLLM_REVISION"]["value"] == REVISION and env["HF_HOME"]["value"] == "/models/huggingface"
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert "snapshot_download" in container["args"][0]
    assert {v["name"]: v for v in spec["volumes"]}["vllm-models"]["persistentVolumeClaim"] == {"claimName": "vllm-models"}
    # Its own NetworkPolicy, a hook too: DNS and HTTPS out (the Hub), nothing in.
    policy = next(p for p in base.of_kind(docs, "NetworkPolicy") if p["metadata"]["name"] == job["metadata"]["name"])
    assert policy["metadata"]["annotations"]["helm.sh/hook-weight"] == "-1"
    assert base.selects(policy["spec"]["podSelector"], job["spec"]["template"]["metadata"]["labels"])
    assert policy["spec"]["ingress"] == []
    assert {p["port"] for r in policy["spec"]["egress"] for p in r["ports"]} == {53, 443}
    # No other object selects the Job's pod (PDBs, the stages' policies).
    for other in base.of_kind(docs, "PodDisruptionBudget") + base.of_kind(docs, "NetworkPolicy"):
        key = "selector" if other["kind"] == "PodDisruptionBudget" else "podSelector"
        if other is not policy:
            assert not base.selects(other["spec"][key], job["spec"]["template"]["metadata"]["labels"]), other["metadata"]["name"]
    # vLLM itself starts offline and needs no egress.
    vllm = base.vllm_container(base.deployments(docs)["llm"])
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in vllm["env"] and 443 not in egress_ports(docs, "llm")
    assert not base.of_kind(template(helm), "Job")


@pytest.mark.parametrize("args, ok", [
    (["--set", "stages.llm.vllm.modelClaim.accessMode=ReadWriteOnce"], False),  # autoscaled up to 8
    (["--set", "stages.llm.vllm.modelClaim.accessMode=ReadWriteOncePod"], False),
    (["--set", "stages.llm.vllm.modelClaim.accessMode=ReadWriteOnce", "--set", "stages.llm.autoscaling.enabled=false",
      "--set", "stages.llm.replicas=2"], False),
    (["--set", "stages.llm.vllm.modelClaim.accessMode=ReadWriteOnce", "--set", "stages.llm.autoscaling.maxReplicas=1"], True),
    (["--set", "stages.llm.vllm.modelClaim.accessMode=ReadWriteOnce", "--set", "autoscaling.enabled=false"], True),  # replicas: 1
    (["--set", "stages.llm.vllm.modelClaim.accessMode=ReadWriteMany"], True),
    (["--set", "stages.llm.vllm.modelClaim.accessMode=ReadOnlyMany"], True),
])
def test_a_read_write_once_claim_refuses_more_than_one_replica(helm, args, ok):
    full = ["--set", "stages.llm.vllm.modelSource=volume", *CLAIM, *args]
    if ok:
        template(helm, *full)
    else:
        error = refused(helm, *full)
        assert "stages.llm.vllm.modelClaim vllm-models is ReadWriteOnce" in error and "Multi-Attach" in error, error


@pytest.mark.parametrize("args, message", [
    (["--set", "stages.llm.vllm.modelSource=volume"], "the model volume is an emptyDir"),
    (["--set", "stages.llm.vllm.fillJob.enabled=true", *CLAIM], "fillJob fills an existing PVC"),
    (["--set", "stages.llm.vllm.modelSource=initContainer", "--set", "stages.llm.vllm.model=/models/qwen"],
     "initContainer downloads a Hugging Face model id"),
])
def test_template_rejects_vllm_weights_that_cannot_load(helm, args, message):
    error = refused(helm, *args)
    assert message in error, error


def notes(helm, tmp_path, *args: str) -> str:
    """NOTES.txt as rendered (helm template skips it; wrapped in a ConfigMap in a copy of the chart)."""
    chart = tmp_path / "voicestack"
    if not chart.exists():
        shutil.copytree(base.CHART, chart)
        text = (chart / "templates" / "NOTES.txt").read_text()
        (chart / "templates" / "_notes_check.tpl").write_text('{{- define "notes.check" }}' + text + "{{- end }}")
        (chart / "templates" / "notes-check.yaml").write_text(
            'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: |\n'
            '{{- include "notes.check" . | nindent 4 }}\n')
    out = subprocess.run([helm, "template", RELEASE, str(chart), "-n", NAMESPACE, "--kube-version", "1.30.0",
                          "--show-only", "templates/notes-check.yaml", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)["data"]["notes"]


def test_notes_warn_about_unpinned_and_downloaded_weights(helm, tmp_path):
    text = notes(helm, tmp_path)
    assert "WARNING: stages.llm.vllm.revision is empty" in text
    assert "NOTE: stages.llm.vllm downloads Qwen/Qwen2.5-1.5B-Instruct from Hugging Face at every pod start, into an emptyDir" in text
    text = notes(helm, tmp_path, "--set", f"stages.llm.vllm.revision={REVISION}", "--set", "stages.llm.vllm.modelSource=volume", *CLAIM)
    assert "vllm.revision is empty" not in text and "at every pod start" not in text
    assert "llmStrong" not in notes(helm, tmp_path)
    assert "WARNING: stages.llmStrong.vllm.revision is empty" in notes(helm, tmp_path, "--set", "stages.llmStrong.enabled=true")


# ---------------------------------------------------------------- PodMonitors


def test_pod_monitors_are_off_by_default(helm):
    assert not base.of_kind(template(helm), "PodMonitor")


def test_pod_monitors_scrape_stages_gateways_and_vllm(helm):
    args = ["--set", "metrics.podMonitor.enabled=true", "--set-json", 'metrics.podMonitor.labels={"release":"kube-prometheus-stack"}',
            "--set-json", f"networkPolicy.metricsFrom={PROMETHEUS_PEERS}", "--set", "gateways.web.enabled=true",
            "--set", "stages.llmStrong.enabled=true"]
    lint(helm, *args)
    docs = template(helm, *args)
    validate(docs)
    monitors = {m["metadata"]["name"]: m for m in base.of_kind(docs, "PodMonitor")}
    assert set(monitors) == {f"{RELEASE}-voicestack", f"{RELEASE}-voicestack-vllm"}
    for monitor in monitors.values():
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "voicestack", "app.kubernetes.io/instance": RELEASE}
    stages = monitors[f"{RELEASE}-voicestack"]
    [expression] = stages["spec"]["selector"]["matchExpressions"]
    assert expression["key"] == "app.kubernetes.io/component" and expression["operator"] == "In"
    assert set(expression["values"]) == set(base.deployments(docs)) == {"edge", "vad", "stt", "llm", "llm-strong", "tts", "web"}
    assert stages["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    vllm = monitors[f"{RELEASE}-voicestack-vllm"]
    assert set(vllm["spec"]["selector"]["matchExpressions"][0]["values"]) == {"llm", "llm-strong"}
    assert vllm["spec"]["podMetricsEndpoints"][0]["port"] == "vllm"
    for stage, deployment in base.deployments(docs).items():
        ports = {p["name"] for c in base.running_containers(base.pod_spec(deployment)) for p in c.get("ports", [])}
        assert "metrics" in ports, stage
        if stage in ("llm", "llm-strong"):
            assert "vllm" in ports, stage
    # vLLM's port (its unauthenticated API) opens to the Prometheus peers only.
    policy = next(p for p in base.of_kind(docs, "NetworkPolicy") if p["metadata"]["name"] == f"{RELEASE}-voicestack-llm")
    rule = next(r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == 8000)
    assert rule["from"] == json.loads(PROMETHEUS_PEERS)


def test_pod_monitor_of_vllm_needs_the_prometheus_peers(helm):
    error = refused(helm, "--set", "metrics.podMonitor.enabled=true")
    assert "set networkPolicy.metricsFrom to your Prometheus' peers first" in error, error
    docs = template(helm, "--set", "metrics.podMonitor.enabled=true", "--set", "metrics.podMonitor.vllm=false")
    assert [m["metadata"]["name"] for m in base.of_kind(docs, "PodMonitor")] == [f"{RELEASE}-voicestack"]
    base.test_network_policies_expose_only_the_edge(docs, "default")


# ---------------------------------------------------------------- KEDA


KEDA = ["-f", "values-keda.yaml"]


def scaled_objects(docs: list[dict]) -> dict[str, dict]:
    schema = json.loads(base.KEDA_SCHEMA.read_text())
    objects = {o["metadata"]["labels"]["app.kubernetes.io/component"]: o for o in base.of_kind(docs, "ScaledObject")}
    for obj in objects.values():
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(obj))
        assert not errors, [e.message for e in errors]
    return objects


def test_keda_scales_on_a_smoothed_signal_and_holds_on_missing_data(helm):
    objects = scaled_objects(template(helm, *KEDA))
    for stage, obj in objects.items():
        meta = obj["spec"]["triggers"][0]["metadata"]
        assert set(meta) <= base.PROMETHEUS_TRIGGER_KEYS
        query = meta["query"]
        assert query.count("avg_over_time(") == 2 and query.count("[1m])") == 2, query
        assert f'stage="{stage}"' in query
        # A Prometheus outage is an error (the HPA keeps its replicas), not a 0 that scales to the minimum.
        assert meta["ignoreNullValues"] == "false"
    instant = scaled_objects(template(helm, *KEDA, "--set", "autoscaling.keda.window=0s"))
    assert all("avg_over_time" not in o["spec"]["triggers"][0]["metadata"]["query"] for o in instant.values())
    windowed = scaled_objects(template(helm, *KEDA, "--set", "autoscaling.keda.window=3m"))
    assert all("[3m])" in o["spec"]["triggers"][0]["metadata"]["query"] for o in windowed.values())


def test_keda_adopts_the_hpa_it_replaces(helm):
    """helm upgrade from the CPU HPA to KEDA: the ScaledObject takes over the HPA of the same name."""
    hpas = {h["metadata"]["labels"]["app.kubernetes.io/component"]: h["metadata"]["name"]
            for h in base.of_kind(template(helm), "HorizontalPodAutoscaler")}
    objects = scaled_objects(template(helm, *KEDA))
    assert set(objects) == set(hpas)
    for stage, obj in objects.items():
        assert obj["metadata"]["annotations"]["scaledobject.keda.sh/transfer-hpa-ownership"] == "true"
        assert obj["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["name"] == hpas[stage]
    off = scaled_objects(template(helm, *KEDA, "--set", "autoscaling.keda.transferHpaOwnership=false"))
    assert all("annotations" not in o["metadata"] for o in off.values())


def test_keda_trigger_authentication(helm):
    assert not base.of_kind(template(helm, *KEDA), "TriggerAuthentication")
    assert all("authenticationRef" not in o["spec"]["triggers"][0] for o in scaled_objects(template(helm, *KEDA)).values())
    args = [*KEDA, "--set", "autoscaling.keda.authentication.modes=bearer",
            "--set-json", 'autoscaling.keda.authentication.secretTargetRef=[{"parameter":"bearerToken","name":"prom-token","key":"token"}]']
    lint(helm, *args)
    docs = template(helm, *args)
    [auth] = base.of_kind(docs, "TriggerAuthentication")
    assert auth["apiVersion"] == "keda.sh/v1alpha1" and auth["metadata"]["name"] == f"{RELEASE}-voicestack-prometheus"
    assert auth["spec"] == {"secretTargetRef": [{"parameter": "bearerToken", "name": "prom-token", "key": "token"}]}
    for obj in scaled_objects(docs).values():
        trigger = obj["spec"]["triggers"][0]
        assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
        assert trigger["metadata"]["authModes"] == "bearer"
    # Someone else's (e.g. a podIdentity for a managed Prometheus): referenced, nothing rendered.
    docs = template(helm, *KEDA, "--set-json",
                    'autoscaling.keda.authentication.existingRef={"name":"gmp","kind":"ClusterTriggerAuthentication"}')
    assert not base.of_kind(docs, "TriggerAuthentication")
    for obj in scaled_objects(docs).values():
        assert obj["spec"]["triggers"][0]["authenticationRef"] == {"name": "gmp", "kind": "ClusterTriggerAuthentication"}
        assert "authModes" not in obj["spec"]["triggers"][0]["metadata"]


@pytest.mark.parametrize("args, message", [
    (["--set", "autoscaling.keda.authentication.modes=basic"], "no credentials are given"),
    (["--set-json", 'autoscaling.keda.authentication.secretTargetRef=[{"parameter":"bearerToken","name":"t","key":"k"}]'],
     "modes is empty"),
    (["--set", "autoscaling.keda.authentication.modes=bearer", "--set", "autoscaling.keda.authentication.existingRef.name=x",
      "--set-json", 'autoscaling.keda.authentication.secretTargetRef=[{"parameter":"bearerToken","name":"t","key":"k"}]'],
     "not both"),
])
def test_template_rejects_keda_authentication_that_cannot_work(helm, args, message):
    error = refused(helm, *KEDA, *args)
    assert message in error, error


# ---------------------------------------------------------------- values-gpu.yaml


@pytest.mark.parametrize("args", [["-f", "values-gpu.yaml"], ["-f", "values-gpu.yaml", "-f", "values-keda.yaml"],
                                  ["-f", "values-gpu.yaml", "--set", "autoscaling.enabled=false"]])
def test_values_gpu_runs_two_zone_spread_replicas_of_the_gpu_stages(helm, args):
    docs = template(helm, *args)
    assert "nvidia.com/gpu.present" not in json.dumps(docs), "only GPU feature discovery sets it (not GKE)"
    floors = {}
    for _, obj in base.autoscalers(docs):
        spec = obj["spec"]
        floors[obj["metadata"]["labels"]["app.kubernetes.io/component"]] = spec.get("minReplicas", spec.get("minReplicaCount"))
    for stage in ("stt", "llm", "tts"):
        deployment = base.deployments(docs)[stage]
        assert (floors[stage] if floors else deployment["spec"]["replicas"]) >= 2, stage
        keys = [c["topologyKey"] for c in base.pod_spec(deployment)["topologySpreadConstraints"]]
        assert keys == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"], stage
        spec = base.pod_spec(deployment)
        assert "nodeSelector" not in spec, "the GPU request places it"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    for stage in ("edge", "vad"):
        spec = base.pod_spec(base.deployments(docs)[stage])
        assert not any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])), "the taint keeps it off GPU nodes"
    k3s = template(helm, *args, "--set", "gpuRuntimeClassName=nvidia")
    assert {s for s, d in base.deployments(k3s).items() if base.pod_spec(d).get("runtimeClassName") == "nvidia"} == {"stt", "llm", "tts"}
