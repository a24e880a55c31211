"""The chart's side of the bus permissions (nats.auth, nats.install; bus_permissions.py).

No cluster runs here, so what is proved is what a render and a real nats-server can show:
- the chart's permission model (files/nats-permissions.json) and the config it renders are
  bus_permissions' own, byte for byte;
- each stage's pod connects as its own role, with only its own password mounted;
- the rendered server config, loaded into a real nats-server with the rendered Secret's
  passwords, refuses what the embedded default refuses (the same checks,
  tests/test_bus_permissions.py); so does the config the official NATS chart would make from
  files/official-nats-chart-values.yaml (its `config.merge`, formatted as that chart does);
- the bundled server's objects validate against the Kubernetes schemas.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from test_bus_permissions import PermissionProbe, run_all
from test_chart import (CHART, KUBE_VERSION, NAMESPACE, RELEASE, deployments, env_of, helm_error,
                        of_kind, pod_spec, run_helm, stage_container)
from voicestack import bus_permissions
from voicestack.config import GATEWAYS
from voicestack.launcher import free_port, nats_server_binary, wait_for_port

FULLNAME = f"{RELEASE}-voicestack"
SECRET = f"{FULLNAME}-nats-users"
SERVER = f"{FULLNAME}-nats"
INSTALL = ["--set", "nats.install.enabled=true"]
INSTALL_CLUSTER_TLS = [*INSTALL, "--set", "nats.install.replicas=3", "--set", "nats.install.tlsSecretName=nats-tls",
                       "--set", "nats.tls.caSecretName=nats-ca", "--set", "stages.llmStrong.enabled=true"]
# The roles a release has users for: its stages (llm-strong only when that pool is on) and status.
DEFAULT_ROLES = tuple(r for r in bus_permissions.ROLES if r != "llm-strong")


def roles_of(args) -> tuple[str, ...]:
    return bus_permissions.ROLES if "stages.llmStrong.enabled=true" in args else DEFAULT_ROLES


def render(helm: str, *args: str) -> list[dict]:
    out = run_helm(helm, "template", RELEASE, ".", "--namespace", NAMESPACE, "--kube-version", f"{KUBE_VERSION}.0",
                   *args)
    assert out.returncode == 0, f"helm template {args} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def named(docs: list[dict], kind: str, name: str) -> dict:
    [doc] = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    return doc


def passwords(docs: list[dict]) -> dict[str, str]:
    return {role: base64.b64decode(value).decode() for role, value in named(docs, "Secret", SECRET)["data"].items()}


# ---------------------------------------------------------------- one model


def test_the_chart_carries_the_one_permission_model():
    shipped = json.loads((CHART / "files" / "nats-permissions.json").read_text())
    assert shipped == bus_permissions.definition(), \
        "regenerate it: python -m voicestack.bus_permissions --json > charts/voicestack/files/nats-permissions.json"
    official = (CHART / "files" / "official-nats-chart-values.yaml").read_text()
    made = subprocess.run([sys.executable, "-m", "voicestack.bus_permissions", "--official-chart-values"],
                          cwd=CHART.parents[1], capture_output=True, text=True, check=True).stdout
    assert official == made, "regenerate files/official-nats-chart-values.yaml (python -m voicestack.bus_permissions " \
                             "--official-chart-values > charts/voicestack/files/official-nats-chart-values.yaml)"


@pytest.mark.parametrize("args", [INSTALL, INSTALL_CLUSTER_TLS], ids=["install", "install-cluster-tls"])
def test_the_rendered_server_config_is_the_embedded_one(helm, args):
    docs = render(helm, *args)
    roles = roles_of(args)
    config = named(docs, "ConfigMap", SERVER)["data"]
    assert config["permissions.conf"] == bus_permissions.server_config(roles)
    assert 'include "permissions.conf"' in config["nats.conf"]
    statefulset = named(docs, "StatefulSet", SERVER)
    env = env_of(pod_spec(statefulset)["containers"][0])
    passwords_in_env = {k for k in env if k.startswith("VOICESTACK_NATS_PASSWORD_")}
    assert passwords_in_env == {bus_permissions.password_variable(r) for r in roles}
    for role in roles:  # every password the config names, from the Secret
        assert env[bus_permissions.password_variable(role)]["valueFrom"] == \
            {"secretKeyRef": {"name": SECRET, "key": role}}
    assert set(passwords(docs)) == set(roles)


# ---------------------------------------------------------------- each pod its role


YOURS = ["--set", "nats.auth.existingSecret=my-nats-users"]


@pytest.mark.parametrize("args", [YOURS, [*YOURS, "--set", "stages.llmStrong.enabled=true"], INSTALL],
                         ids=["existing-secret", "existing-secret-llm-strong", "install"])
def test_each_stage_connects_as_its_own_role_with_only_its_password(helm, args):
    docs = render(helm, *args)
    secret_name = "my-nats-users" if args[:2] == YOURS else SECRET
    if secret_name == SECRET:  # made by the chart for its own server
        secret = passwords(docs)
        assert all(re.fullmatch(r"vs[A-Za-z0-9]{40}", p) for p in secret.values()), "letters and digits after vs"
        assert len(set(secret.values())) == len(secret)
    else:  # yours: the chart renders none
        assert not of_kind(docs, "Secret")
    seen = set()
    for stage, deployment in deployments(docs).items():
        container = stage_container(stage, deployment)
        env = {k: e.get("value") for k, e in env_of(container).items()}
        if stage in GATEWAYS:
            assert "VOICESTACK_NATS_USER" not in env
            continue
        seen.add(stage)
        assert env["VOICESTACK_NATS_USER"] == stage and stage in bus_permissions.SERVICE_ROLES
        path = Path(env["VOICESTACK_NATS_PASSWORD_FILE"])
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
        assert mount["readOnly"]
        [volume] = [v for v in pod_spec(deployment)["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == secret_name
        assert volume["secret"]["items"] == [{"key": stage, "path": path.name}], "its own password, no other"
        if args == INSTALL:
            assert env["VOICESTACK_NATS_URL"] == f"nats://{SERVER}.{NAMESPACE}.svc:4222"
    assert seen >= {"edge", "vad", "stt", "llm", "tts"}
    if "stages.llmStrong.enabled=true" in args:
        assert "llm-strong" in seen


def test_no_users_without_passwords_or_with_a_creds_file_or_auth_off(helm):
    """The default (no Secret given, no bundled server) renders no Secret and no users: the
    chart never makes secrets but for its own server."""
    for args in ([], ["--set", "nats.credentials.secretName=nats-user", *YOURS], [*YOURS, "--set", "nats.auth.enabled=false"],
                 [*INSTALL, "--set", "nats.auth.enabled=false"]):
        docs = render(helm, *args)
        assert not of_kind(docs, "Secret"), args
        for stage, deployment in deployments(docs).items():
            assert "VOICESTACK_NATS_USER" not in env_of(stage_container(stage, deployment)), (args, stage)
    docs = render(helm, "--set", "nats.auth.existingSecret=my-nats-users", *INSTALL)
    assert not [s for s in of_kind(docs, "Secret") if s["metadata"]["name"] == SECRET]
    edge = deployments(docs)["edge"]
    assert any(v.get("secret", {}).get("secretName") == "my-nats-users" for v in pod_spec(edge)["volumes"])
    env = env_of(pod_spec(named(docs, "StatefulSet", SERVER))["containers"][0])
    assert env["VOICESTACK_NATS_PASSWORD_EDGE"]["valueFrom"]["secretKeyRef"]["name"] == "my-nats-users"


def test_schema_is_strict_about_the_nats_keys(helm):
    assert "at '/nats/auth': additional properties 'enable' not allowed" in \
        helm_error(helm, "--set", "nats.auth.enable=true")
    assert "at '/nats/install/replicas': minimum: got 0, want 1" in \
        helm_error(helm, "--set", "nats.install.replicas=0")


# ---------------------------------------------------------------- the bundled server


@pytest.mark.parametrize("args", [INSTALL, INSTALL_CLUSTER_TLS], ids=["install", "install-cluster-tls"])
def test_the_bundled_server_renders_and_validates(helm, args):
    docs = render(helm, *args)
    for doc in docs:
        if doc["metadata"]["name"].startswith(SERVER) or doc["kind"] == "Secret":
            try:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {error.message} at {list(error.path)}")
    statefulset = named(docs, "StatefulSet", SERVER)
    tls = "nats.install.tlsSecretName=nats-tls" in args
    replicas = 3 if tls else 1
    assert statefulset["spec"]["replicas"] == replicas
    config = named(docs, "ConfigMap", SERVER)["data"]["nats.conf"]
    assert ("cluster {" in config) == (replicas > 1) and config.count("-headless.") == (replicas if replicas > 1 else 0)
    assert ('cert_file: "/etc/nats-tls/tls.crt"' in config) == tls
    pods = pod_spec(statefulset)
    assert pods["securityContext"]["runAsNonRoot"] and pods["containers"][0]["securityContext"]["readOnlyRootFilesystem"]
    # The stages reach it (their NetworkPolicies), and it takes clients from them only.
    labels = pods and statefulset["spec"]["template"]["metadata"]["labels"]
    for policy in of_kind(docs, "NetworkPolicy"):
        component = policy["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component")
        if component in bus_permissions.SERVICE_ROLES:
            peers = [peer for rule in policy["spec"]["egress"] for peer in rule.get("to", [])
                     if any(p.get("port") == 4222 for p in rule.get("ports", []))]
            assert [p["podSelector"]["matchLabels"] for p in peers] == \
                [{"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/component": "nats"}]
            assert all(labels[k] == v for k, v in peers[0]["podSelector"]["matchLabels"].items())
    own = named(docs, "NetworkPolicy", SERVER)["spec"]
    clients = own["ingress"][0]
    assert clients["ports"] == [{"port": 4222, "protocol": "TCP"}]
    assert set(clients["from"][0]["podSelector"]["matchExpressions"][0]["values"]) == set(roles_of(args)) - {"status"}
    for stage, deployment in deployments(docs).items():
        url = env_of(stage_container(stage, deployment)).get("VOICESTACK_NATS_URL", {}).get("value")
        if stage not in GATEWAYS:
            assert url == f"{'tls' if tls else 'nats'}://{SERVER}.{NAMESPACE}.svc:4222"


# ---------------------------------------------------------------- the rendered configs, on a real server


def run_server(tmp_path: Path, config: dict[str, str], secret: dict[str, str]):
    """nats-server on a free loopback port with `config` (file name -> text; nats.conf is the
    main one) and the roles' passwords in its environment, as the pod would have them."""
    for name, text in config.items():
        (tmp_path / name).write_text(text)
    port, monitor = free_port(), free_port()
    env = {"POD_NAME": "nats-0", **{bus_permissions.password_variable(role): p for role, p in secret.items()}}
    # The rendered ports and pid file are the pod's; flags put them on this machine's free ones.
    with open(tmp_path / "nats.log", "wb") as log:
        server = subprocess.Popen([nats_server_binary(), "-c", str(tmp_path / "nats.conf"), "-a", "127.0.0.1",
                                   "-p", str(port), "-m", str(monitor), "-P", str(tmp_path / "nats.pid")],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_port(port, 10, server)
    except RuntimeError:
        raise AssertionError((tmp_path / "nats.log").read_text()) from None
    return server, f"nats://127.0.0.1:{port}"


def role_options(secret: dict[str, str]):
    def options(role):
        if role is None:
            return {}
        return {"user": role, "password": secret[role], "inbox_prefix": bus_permissions.inbox_prefix(role)}
    return options


async def run_checks(url: str, secret: dict[str, str], roles=bus_permissions.ROLES) -> None:
    await run_all(PermissionProbe(url, role_options(secret), roles))


async def test_the_rendered_chart_config_enforces_the_permissions(helm, tmp_path):
    docs = render(helm, *INSTALL)
    config = named(docs, "ConfigMap", SERVER)["data"]
    server, url = run_server(tmp_path, config, passwords(docs))
    try:
        await run_checks(url, passwords(docs), DEFAULT_ROLES)
        # No pool, no user: the llm-strong role of a release without that pool cannot connect.
        probe = PermissionProbe(url, role_options({**passwords(docs), "llm-strong": passwords(docs)["llm"]}))
        assert "uthorization" in await probe.refused_connect("llm-strong")
    finally:
        server.terminate()
        server.wait(10)


def official_chart_config(values: dict) -> str:
    """What the official NATS chart (1.x) writes for `config.merge`: the merged config as JSON
    (nats-server reads JSON), "<< X >>" unquoted (its nats.formatConfig helper)."""
    text = json.dumps({"port": 4222, **values["config"]["merge"]}, indent=2)
    return re.sub(r'"<<\s+(.*)\s+>>"', r"\1", text)


async def test_the_official_chart_values_enforce_the_permissions(tmp_path):
    values = yaml.safe_load((CHART / "files" / "official-nats-chart-values.yaml").read_text())
    env = values["container"]["env"]
    assert {k: v["valueFrom"]["secretKeyRef"] for k, v in env.items()} == \
        {bus_permissions.password_variable(r): {"name": "voicestack-nats-users", "key": r} for r in bus_permissions.ROLES}
    secret = {role: bus_permissions.new_password() for role in bus_permissions.ROLES}
    config = official_chart_config(values)
    assert "$VOICESTACK_NATS_PASSWORD_EDGE" in config and "<<" not in config
    server, url = run_server(tmp_path, {"nats.conf": config}, secret)
    try:
        await run_checks(url, secret)
    finally:
        server.terminate()
        server.wait(10)
