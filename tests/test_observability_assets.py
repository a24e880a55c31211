"""k8s/observability: the Grafana dashboard, the alert rules and the collector configuration are
valid, every PromQL expression in them parses (promtool), the alerts fire when they should
(promtool test rules), and they name only metrics the services really export: checked against
a live scrape of all five services after a real turn, and by running every dashboard query and
every alert rule in a real Prometheus server that scraped them."""

from __future__ import annotations

import asyncio
import functools
import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import grpc
import httpx
import numpy as np
import pytest
import yaml
from opentelemetry import metrics as otel_metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import silence, speak
from voicestack import telemetry
from voicestack.client import converse
from voicestack.launcher import free_port
from voicestack.v1 import llm_pb2, llm_pb2_grpc

ASSETS = Path(__file__).resolve().parent.parent / "k8s" / "observability"
DASHBOARD = ASSETS / "grafana-dashboard.json"
ALERTS = ASSETS / "alerts.yaml"
PROMETHEUS_RULE = ASSETS / "alerts-prometheusrule.yaml"
COLLECTOR = ASSETS / "otel-collector.yaml"
README = ASSETS / "README.md"
SERVICES = ("edge", "vad", "stt", "llm", "tts")
NAMESPACE = "voicestack-test"  # what the kubernetes-pods scrape job would add, in the live Prometheus
METRIC_NAME = re.compile(r"\bvoicestack_[a-zA-Z0-9_]+")
# Grafana's variables, as Prometheus sees them with "All" selected.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "namespace": ".*", "stage": ".*"}


def need(tool: str) -> str:
    """A Prometheus binary; the test fails (never skips) without it."""
    path = shutil.which(tool)
    if not path:
        pytest.fail(f"`{tool}` not found: it comes with Debian's `prometheus` package "
                    "(`apt-get install prometheus`; the Makefile's APT_PACKAGES lists it)")
    return path


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def alert_groups() -> list[dict]:
    return yaml.safe_load(ALERTS.read_text())["groups"]


def alert_rules() -> list[dict]:
    return [rule for group in alert_groups() for rule in group["rules"]]


def panels(board: dict) -> list[dict]:
    flat = []
    for panel in board["panels"]:
        flat.append(panel)
        flat.extend(panel.get("panels", []))  # panels inside collapsed rows
    return flat


def dashboard_targets(board: dict) -> list[tuple[dict, dict]]:
    return [(panel, target) for panel in panels(board) for target in panel.get("targets", [])]


def as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, as Grafana sends it."""
    def value(match):
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VARIABLES, f"unknown Grafana variable ${name} in {expr!r}"
        return GRAFANA_VARIABLES[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def all_expressions() -> list[str]:
    board = dashboard()
    exprs = [target["expr"] for _, target in dashboard_targets(board)]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"])
    return exprs + [rule["expr"] for rule in alert_rules()]


def referenced_metrics() -> set[str]:
    return {name for expr in all_expressions() for name in METRIC_NAME.findall(expr)}


def series_names(text: str) -> dict[str, str]:
    """Sample name (what PromQL selects: ..._bucket, ..._total) -> its family's type."""
    return {sample.name: family.type for family in text_string_to_metric_families(text) for sample in family.samples}


def family_names(text: str) -> set[str]:
    """Metric names as the README documents them: counters with _total, histograms bare."""
    return {family.name + ("_total" if family.type == "counter" else "")
            for family in text_string_to_metric_families(text) if family.name.startswith("voicestack_")}


@functools.cache
def declared_exposition() -> str:
    """The Prometheus text of every instrument telemetry.Meters declares, rendered by the
    exporter the services use. Counters appear in a scrape only once added to, so each
    instrument gets one value here: this is the fallback for a counter no turn increments."""
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    labels = {"stage": "probe", "kind": "probe", "code": "OK"}
    with mock.patch.object(telemetry.metrics, "get_meter", provider.get_meter):
        meters = telemetry.Meters("probe")
        meters.observe_streams(lambda: 0, lambda: 1)
        meters.observe_conversation(lambda: 1.0)
        for instrument in vars(meters).values():
            if isinstance(instrument, otel_metrics.Histogram):
                instrument.record(0.1, labels)
            elif isinstance(instrument, otel_metrics.Counter):
                instrument.add(1, labels)
        text = generate_latest(registry).decode()
    provider.shutdown()
    return text


def samples(text: str, name: str, **labels) -> list[tuple[dict, float]]:
    return [(s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def value(text: str, name: str, **labels) -> float:
    found = samples(text, name, **labels)
    assert len(found) == 1, f"{name}{labels}: expected one sample, found {found}"
    return found[0][1]


def counter(text: str, name: str, **labels) -> float:
    """Summed over the matching samples; 0 for a series not (yet) exported."""
    return sum(v for _, v in samples(text, name, **labels))


# ------------------------------------------------------------------ the files themselves


def test_dashboard_is_a_grafana_json_model():
    board = dashboard()
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(board):
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"]["uid"] == "${datasource}"
    for name in ("namespace", "stage"):
        assert variables[name]["datasource"]["uid"] == "${datasource}"

    # The panels the issue asks for, by what they query.
    exprs = "\n".join(target["expr"] for _, target in dashboard_targets(board))
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (stage, kind, le) (rate(voicestack_stage_latency_seconds_bucket" in exprs
        assert f"histogram_quantile({quantile}, sum by (le) (rate(voicestack_voice_to_voice_seconds_bucket" in exprs
    for needle in ("sum by (stage) (voicestack_streams_active", "sum by (stage) (voicestack_streams_capacity",
                   "count by (stage) (voicestack_streams_capacity", "sum by (stage, code) (rate(voicestack_errors_total",
                   "rate(voicestack_stream_opens_refused_total", "rate(voicestack_streams_cancelled_total",
                   "rate(voicestack_compute_seconds_total", "rate(voicestack_audio_seconds_total"):
        assert needle in exprs, needle


def test_alert_rules_are_complete():
    rules = alert_rules()
    for rule in rules:
        assert {"alert", "expr", "for", "labels", "annotations"} <= set(rule), rule.get("alert")
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
    headings = set(re.findall(r"^### (\w+)$", README.read_text(), re.M))
    for rule in rules:  # each alert's runbook is its section of the README
        assert rule["alert"] in headings, f"README.md has no '### {rule['alert']}' section"
        assert rule["annotations"]["runbook_url"].endswith("README.md#" + rule["alert"].lower()), rule["alert"]
    by_name = {rule["alert"]: rule for rule in rules}
    assert set(by_name) >= {"VoicestackVoiceToVoiceSlow", "VoicestackStageAtCapacity", "VoicestackStageNoReplicas",
                            "VoicestackErrorRateHigh", "VoicestackStreamOpensRefused"}
    slo = by_name["VoicestackVoiceToVoiceSlow"]
    assert "histogram_quantile(0.95" in slo["expr"] and "> 1.5" in slo["expr"] and slo["for"] == "5m"
    assert by_name["VoicestackStageAtCapacity"]["for"] == "5m"
    # The PrometheusRule wrapper carries the very same groups.
    wrapper = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert wrapper["apiVersion"] == "monitoring.coreos.com/v1" and wrapper["kind"] == "PrometheusRule"
    assert wrapper["spec"]["groups"] == alert_groups(), "alerts-prometheusrule.yaml differs from alerts.yaml"


def test_every_promql_expression_parses(tmp_path):
    promtool = need("promtool")
    checked = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The dashboard's queries, as recording rules, so promtool parses them too.
    rules = [{"record": f"dashboard:panel{panel['id']}_{target['refId']}", "expr": as_promql(target["expr"])}
             for panel, target in dashboard_targets(dashboard())]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_assets_name_only_declared_metrics():
    """Quick and without processes: every name is one the services' exporter would write."""
    declared = series_names(declared_exposition())
    unknown = referenced_metrics() - set(declared)
    assert not unknown, f"not declared in services/voicestack/telemetry.py: {sorted(unknown)}"


def test_readme_documents_every_metric():
    documented = set(re.findall(r"^\|\s*`(voicestack_[a-z0-9_]+)`", README.read_text(), re.M))
    declared = family_names(declared_exposition())
    assert documented == declared, (f"missing from the README's table: {sorted(declared - documented)}; "
                                    f"not exported: {sorted(documented - declared)}")


def test_dashboard_shows_every_metric():
    exprs = "\n".join(target["expr"] for _, target in dashboard_targets(dashboard()))
    for family in family_names(declared_exposition()):
        assert family in exprs, f"{family} is on no dashboard panel"


def test_collector_configuration():
    import kubernetes_validate

    docs = [doc for doc in yaml.safe_load_all(COLLECTOR.read_text()) if doc]
    assert {doc["kind"] for doc in docs} == {"ConfigMap", "Deployment", "Service"}
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30", strict=True)
    [config_map] = [doc for doc in docs if doc["kind"] == "ConfigMap"]
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    service = config["service"]
    for kind in ("receivers", "processors", "exporters"):
        for pipeline, spec in service["pipelines"].items():
            for component in spec.get(kind, []):
                assert component in config[kind], f"pipeline {pipeline} names undefined {kind[:-1]} {component}"
    for extension in service.get("extensions", []):
        assert extension in config["extensions"]
    assert set(config["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    traces, metrics = service["pipelines"]["traces"], service["pipelines"]["metrics"]
    assert "otlp" in traces["receivers"] and "otlp" in metrics["receivers"]
    assert any(e.split("/")[0] in ("otlp", "otlphttp") for e in traces["exporters"])
    assert any(e.split("/")[0] in ("prometheus", "prometheusremotewrite") for e in metrics["exporters"])
    for pipeline in (traces, metrics):
        assert pipeline["processors"][0] == "memory_limiter" and pipeline["processors"][-1] == "batch"
    # The Service serves what the chart's otel.endpoint example names: otel-collector.observability:4317.
    [svc] = [doc for doc in docs if doc["kind"] == "Service"]
    assert svc["metadata"]["name"] == "otel-collector" and svc["metadata"]["namespace"] == "observability"
    assert {p["port"] for p in svc["spec"]["ports"]} >= {4317, 4318}


# promtool unit tests: synthetic series, the alert that must (or must not) fire.
ALERT_TESTS = {
    "interval": "1m",
    "input_series": [
        # namespace slow: 60 turns a minute, all between 2 and 3 s.
        *[{"series": f'voicestack_voice_to_voice_seconds_bucket{{namespace="slow",le="{le}"}}',
           "values": "0+60x20" if le in ("3.0", "5.0", "+Inf") else "0x20"} for le in ("1.0", "1.5", "2.0", "3.0", "5.0", "+Inf")],
        {"series": 'voicestack_voice_to_voice_seconds_count{namespace="slow"}', "values": "0+60x20"},
        # namespace fast: 60 turns a minute, all under 0.75 s.
        *[{"series": f'voicestack_voice_to_voice_seconds_bucket{{namespace="fast",le="{le}"}}',
           "values": "0+60x20" if le != "0.5" else "0x20"} for le in ("0.5", "0.75", "1.0", "+Inf")],
        {"series": 'voicestack_voice_to_voice_seconds_count{namespace="fast"}', "values": "0+60x20"},
        # namespace quiet: one slow turn every 5 minutes is too few to page anyone.
        *[{"series": f'voicestack_voice_to_voice_seconds_bucket{{namespace="quiet",le="{le}"}}',
           "values": "0 0 0 0 0 1 1 1 1 1 2 2 2 2 2 3 3 3 3 3 4" if le in ("5.0", "+Inf") else "0x20"}
          for le in ("1.0", "5.0", "+Inf")],
        {"series": 'voicestack_voice_to_voice_seconds_count{namespace="quiet"}',
         "values": "0 0 0 0 0 1 1 1 1 1 2 2 2 2 2 3 3 3 3 3 4"},
        # stt: two replicas, both full; llm: a quarter used. No tts replica at all.
        *[{"series": f'voicestack_streams_{kind}{{namespace="prod",stage="stt",pod="stt-{pod}"}}', "values": "8x20"}
          for kind in ("active", "capacity") for pod in "ab"],
        {"series": 'voicestack_streams_active{namespace="prod",stage="llm",pod="llm-a"}', "values": "1x20"},
        {"series": 'voicestack_streams_capacity{namespace="prod",stage="llm",pod="llm-a"}', "values": "4x20"},
        *[{"series": f'voicestack_streams_capacity{{namespace="prod",stage="{stage}",pod="{stage}-a"}}', "values": "200x20"}
          for stage in ("edge", "vad")],
        # errors: 6 a minute (0.1/s) of one code, 1 a minute of another.
        {"series": 'voicestack_errors_total{namespace="prod",stage="stt",code="UNAVAILABLE",pod="stt-a"}', "values": "0+6x20"},
        {"series": 'voicestack_errors_total{namespace="prod",stage="stt",code="INVALID_ARGUMENT",pod="stt-a"}', "values": "0+1x20"},
        # refusals: llm 2 a minute (10 in 5 min), vad none.
        {"series": 'voicestack_stream_opens_refused_total{namespace="prod",stage="llm",pod="llm-a"}', "values": "0+2x20"},
        {"series": 'voicestack_stream_opens_refused_total{namespace="prod",stage="vad",pod="vad-a"}', "values": "0x20"},
    ],
    "alert_rule_test": [
        {"eval_time": "3m", "alertname": "VoicestackVoiceToVoiceSlow", "exp_alerts": []},  # pending, not yet firing
        {"eval_time": "10m", "alertname": "VoicestackVoiceToVoiceSlow",
         "exp_alerts": [{"exp_labels": {"namespace": "slow", "severity": "critical", "component": "edge"}}]},
        {"eval_time": "10m", "alertname": "VoicestackStageAtCapacity",
         "exp_alerts": [{"exp_labels": {"namespace": "prod", "stage": "stt", "severity": "warning"}}]},
        {"eval_time": "10m", "alertname": "VoicestackStageNoReplicas",
         "exp_alerts": [{"exp_labels": {"stage": "tts", "severity": "critical"}}]},
        {"eval_time": "10m", "alertname": "VoicestackErrorRateHigh",
         "exp_alerts": [{"exp_labels": {"namespace": "prod", "stage": "stt", "code": "UNAVAILABLE", "severity": "warning"}}]},
        {"eval_time": "10m", "alertname": "VoicestackStreamOpensRefused",
         "exp_alerts": [{"exp_labels": {"namespace": "prod", "stage": "llm", "severity": "warning"}}]},
    ],
}


def test_alerts_fire_when_they_should(tmp_path):
    promtool = need("promtool")
    # promtool compares annotations too; these tests are about expr, for and labels.
    groups = alert_groups()
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    (tmp_path / "test.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m",
                                                        "tests": [ALERT_TESTS]}))
    tested = subprocess.run([promtool, "test", "rules", "test.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr


# ------------------------------------------------------------------ against the running services


class Prometheus:
    """A real Prometheus server scraping the stack's metrics ports, with the alert rules loaded."""

    def __init__(self, stack, workdir: Path):
        binary = need("prometheus")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        targets = [{"targets": [f"127.0.0.1:{stack.processes[name].metrics_port}"],
                    "labels": {"namespace": NAMESPACE, "pod": f"{name}-0"}} for name in SERVICES]
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(ALERTS)],
                  "scrape_configs": [{"job_name": "voicestack", "static_configs": targets}]}
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        self.process = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    def get(self, path: str, **params) -> dict:
        response = httpx.get(self.url + path, params=params, timeout=10)
        # A Prometheus still starting answers 503 "Service Unavailable" in plain text: not ready yet.
        assert response.headers.get("content-type", "").startswith("application/json"), \
            f"{path}: HTTP {response.status_code} {response.text[:200]}"
        reply = response.json()
        assert reply["status"] == "success", f"{path} {params}: {reply}\n{self.log.read_text()[-2000:]}"
        return reply["data"]

    def query(self, promql: str) -> list[tuple[dict, float]]:
        data = self.get("/api/v1/query", query=promql)
        assert data["resultType"] == "vector", (promql, data)
        return [(item["metric"], float(item["value"][1])) for item in data["result"]]

    async def until(self, what: str, predicate, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"prometheus exited:\n{self.log.read_text()[-2000:]}"
            try:
                if predicate():
                    return
            except (httpx.HTTPError, AssertionError, IndexError):
                pass
            assert time.monotonic() < deadline, f"Prometheus never saw {what}:\n{self.log.read_text()[-2000:]}"
            await asyncio.sleep(0.25)

    def close(self):
        self.process.terminate()
        self.process.wait(15)


def scrape_all(stack) -> dict[str, str]:
    return {name: httpx.get(f"http://127.0.0.1:{stack.processes[name].metrics_port}/metrics", timeout=10).text
            for name in SERVICES}


async def cancel_an_llm_stream(stack):
    """Open a generation on the LLM's own API and hang up after the first token (a cancel)."""
    request = llm_pb2.GenerateRequest(
        messages=[llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_USER, content="Tell me a long story about the sea.")],
        max_tokens=200)
    async with grpc.aio.insecure_channel(stack.processes["llm"].address) as channel:
        call = llm_pb2_grpc.LlmServiceStub(channel).Generate(request)
        async for _ in call:
            call.cancel()
            break


async def fail_an_llm_stream(stack):
    """An empty conversation: INVALID_ARGUMENT from the LLM stage, counted as an error."""
    async with grpc.aio.insecure_channel(stack.processes["llm"].address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in llm_pb2_grpc.LlmServiceStub(channel).Generate(llm_pb2.GenerateRequest()):
                pass
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def exercise(stack, speech_dir) -> dict[str, str]:
    """One real turn, one cancelled and one failed LLM stream; returns the scrape once all counted."""
    before = scrape_all(stack)
    question = np.concatenate([silence(300), speak("What is the capital of France?", speech_dir)])
    conversation = await converse(stack.processes["edge"].address, question, timeout=90)
    assert conversation.status.name == "OK" and len(conversation.replies) == 1, conversation.details
    await cancel_an_llm_stream(stack)
    await fail_an_llm_stream(stack)
    deadline = time.monotonic() + 10
    while True:  # the cancel is counted when the LLM's handler unwinds: wait for it
        scraped = scrape_all(stack)
        if (counter(scraped["llm"], "voicestack_streams_cancelled_total")
                > counter(before["llm"], "voicestack_streams_cancelled_total")):
            return scraped
        assert time.monotonic() < deadline, "the cancelled LLM stream was never counted"
        await asyncio.sleep(0.2)


async def caught_up(prometheus: Prometheus, scraped: dict[str, str]) -> None:
    """Wait until Prometheus holds what the services exported in `scraped`."""
    turns = value(scraped["edge"], "voicestack_voice_to_voice_seconds_count")
    errors = counter(scraped["llm"], "voicestack_errors_total")
    cancelled = counter(scraped["llm"], "voicestack_streams_cancelled_total")
    await prometheus.until("the turn", lambda: (
        prometheus.query("sum(voicestack_voice_to_voice_seconds_count)")[0][1] >= turns
        and prometheus.query('sum(voicestack_errors_total{stage="llm",pod="llm-0"})')[0][1] >= errors
        and prometheus.query('sum(voicestack_streams_cancelled_total{stage="llm"})')[0][1] >= cancelled))


@pytest.fixture(scope="module")
async def observed(stack, speech_dir, tmp_path_factory):
    """Prometheus scraping the stack while it serves a real turn and a cancelled and a failed LLM
    stream; a direct scrape of every service before and after.

    Twice: the SDK creates a series at its first value, so on a fresh stack the first turn only
    brings the series into being (rate() sees no increase in a series' first sample); the second
    turn's increase is what the dashboard's rate() queries must show."""
    prometheus = Prometheus(stack, tmp_path_factory.mktemp("prometheus"))
    try:
        await prometheus.until("all five services", lambda: len(prometheus.query("voicestack_streams_capacity")) == 5)
        before = await exercise(stack, speech_dir)
        await caught_up(prometheus, before)
        after = await exercise(stack, speech_dir)
        await caught_up(prometheus, after)
        await asyncio.sleep(2.5)  # two more scrapes and rule evaluations
        yield SimpleNamespace(before=before, after=after, prometheus=prometheus)
    finally:
        prometheus.close()


async def test_assets_name_only_metrics_in_a_real_scrape(observed):
    live = {}
    for text in observed.after.values():
        live.update(series_names(text))
    declared = series_names(declared_exposition())
    missing = referenced_metrics() - set(live)
    # A counter appears once incremented. The turn, the cancel and the failure above increment all
    # but voicestack_stream_opens_refused_total; a counter no turn reached must at least be declared
    # (and rendered under this name by the same exporter).
    not_declared = {name for name in missing if declared.get(name) != "counter"}
    assert not not_declared, f"referenced by k8s/observability but not in a real scrape: {sorted(not_declared)}"
    # What the turn did reach must be live, not only declared.
    assert {"voicestack_stage_latency_seconds_bucket", "voicestack_voice_to_voice_seconds_bucket",
            "voicestack_streams_active", "voicestack_streams_capacity", "voicestack_compute_seconds_total",
            "voicestack_audio_seconds_total", "voicestack_errors_total", "voicestack_streams_cancelled_total"} <= set(live)


async def test_histograms_and_gauges_after_a_turn(observed):
    after, before = observed.after, observed.before
    edge = after["edge"]
    assert value(edge, "voicestack_voice_to_voice_seconds_count") >= 1
    assert value(edge, "voicestack_voice_to_voice_seconds_count") >= value(before["edge"], "voicestack_voice_to_voice_seconds_count") + 1
    assert value(edge, "voicestack_voice_to_voice_seconds_sum") > 0
    assert_histogram(edge, "voicestack_voice_to_voice_seconds")
    for kind in ("endpointing", "stt_final", "llm_first_token", "tts_first_audio"):
        assert value(edge, "voicestack_stage_latency_seconds_count", stage="edge", kind=kind) >= 1, kind
    for stage, kinds in {"stt": ["final"], "llm": ["first_token", "generation"], "tts": ["clause"]}.items():
        for kind in kinds:
            assert value(after[stage], "voicestack_stage_latency_seconds_count", stage=stage, kind=kind) >= 1, (stage, kind)
            assert value(after[stage], "voicestack_stage_latency_seconds_sum", stage=stage, kind=kind) > 0, (stage, kind)
            assert_histogram(after[stage], "voicestack_stage_latency_seconds", stage=stage, kind=kind)
    for stage in ("stt", "tts"):
        assert value(after[stage], "voicestack_compute_seconds_total", stage=stage) > 0, stage
        assert value(after[stage], "voicestack_audio_seconds_total", stage=stage) > 0, stage
    for name in SERVICES:
        capacity = value(after[name], "voicestack_streams_capacity", stage=name)
        active = value(after[name], "voicestack_streams_active", stage=name)
        assert capacity > 0 and 0 <= active <= capacity, (name, active, capacity)
        # a replica reports its own stage only
        for family in ("voicestack_streams_active", "voicestack_streams_capacity", "voicestack_stage_latency_seconds_count"):
            assert {labels["stage"] for labels, _ in samples(after[name], family)} <= {name}, (name, family)
    assert counter(after["llm"], "voicestack_errors_total", stage="llm", code="INVALID_ARGUMENT") >= 1


def assert_histogram(text: str, name: str, **labels):
    """Cumulative buckets that end in +Inf == count."""
    buckets = sorted(((float(l["le"]), v) for l, v in samples(text, f"{name}_bucket", **labels)))
    assert buckets and buckets[-1][0] == math.inf, (name, labels)
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), f"{name}{labels}: buckets not cumulative: {buckets}"
    assert buckets[-1][1] == value(text, f"{name}_count", **labels)


async def test_dashboard_queries_return_the_turn(observed):
    prometheus = observed.prometheus
    results = {}
    for panel, target in dashboard_targets(dashboard()):
        results[panel["title"], target["refId"]] = prometheus.query(as_promql(target["expr"]))

    def by(title, ref="A", *labels):
        return {tuple(m.get(label, "") for label in labels): v for m, v in results[title, ref]}

    def finite_positive(values):
        return all(math.isfinite(v) and v > 0 for v in values)

    for ref in "ABC":  # p50, p95, p99
        v2v = results["Voice-to-voice latency", ref]
        assert len(v2v) == 1 and finite_positive([v2v[0][1]]), v2v
    assert finite_positive(by("Turns per second").values())
    for title in ("Stage latency p50", "Stage latency p95", "Stage latency p99"):
        seen = {key for key, v in by(title, "A", "stage", "kind").items() if math.isfinite(v) and v > 0}
        assert seen >= {("stt", "final"), ("llm", "first_token"), ("llm", "generation"), ("tts", "clause"),
                        ("edge", "endpointing"), ("edge", "stt_final"), ("edge", "llm_first_token"),
                        ("edge", "tts_first_audio")}, (title, seen)
    active, capacity = by("Active streams vs capacity", "A", "stage"), by("Active streams vs capacity", "B", "stage")
    assert set(active) == set(capacity) == {(s,) for s in SERVICES}
    assert all(v > 0 for v in capacity.values())
    utilisation = by("Stream utilisation", "A", "stage")
    assert set(utilisation) == {(s,) for s in SERVICES} and all(0 <= v <= 1 for v in utilisation.values())
    assert by("Replicas per stage", "A", "stage") == {(s,): 1.0 for s in SERVICES}
    assert by("Errors", "A", "stage", "code").get(("llm", "INVALID_ARGUMENT"), 0) > 0
    assert by("Streams cancelled", "A", "stage").get(("llm",), 0) > 0
    efficiency = by("Compute seconds per audio second", "A", "stage")
    assert {("stt",), ("tts",)} <= set(efficiency) and finite_positive([efficiency["stt",], efficiency["tts",]])
    assert finite_positive([by("Audio seconds per second", "A", "stage")[s,] for s in ("stt", "tts")])
    # The variables find the stack.
    assert {m["namespace"] for m, _ in prometheus.query("group by (namespace) (voicestack_streams_capacity)")} == {NAMESPACE}


async def test_alert_rules_evaluate_on_the_real_metrics(observed):
    prometheus = observed.prometheus
    groups = prometheus.get("/api/v1/rules")["groups"]
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(rules) == {rule["alert"] for rule in alert_rules()}
    for name, rule in rules.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
    # Every stage has its replica: nothing may be absent.
    assert rules["VoicestackStageNoReplicas"]["state"] == "inactive"
    assert not prometheus.query(next(r["expr"] for r in alert_rules() if r["alert"] == "VoicestackStageNoReplicas"))
    # An idle stack is far from capacity.
    assert rules["VoicestackStageAtCapacity"]["state"] == "inactive"
