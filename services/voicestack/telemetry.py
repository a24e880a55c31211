"""Telemetry for every process: W3C trace context across NATS and gRPC, OTel traces
and metrics. Configured the OpenTelemetry way: OTEL_EXPORTER_OTLP_ENDPOINT turns on
OTLP export, OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES / OTEL_TRACES_SAMPLER work
unchanged. Every service also serves Prometheus metrics on its metrics port.

Metric names (Prometheus form) are a contract with the chart's autoscalers and the
dashboards in k8s/observability: change them only together.
"""

from __future__ import annotations

import contextlib
import os
import time

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.sdk.trace import SpanProcessor

_tracer = trace.get_tracer("voicestack")
# Seconds; dense around the 300 ms a human pause takes.
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0]


def inject(headers: dict) -> None:
    """Add the current trace context (traceparent) to NATS headers or gRPC metadata.
    Nothing when no span is current: the propagators cost more than the message."""
    if trace.get_current_span().get_span_context().is_valid:
        propagate.inject(headers)


@contextlib.contextmanager
def attach(headers: dict):
    """Make the trace context carried in `headers` current for the block."""
    token = otel_context.attach(propagate.extract(headers or {}))
    try:
        yield
    finally:
        otel_context.detach(token)


def tracer():
    return _tracer


def start_span(name: str, parent=None, start_time: float | None = None, links=None, **attributes):
    """A span under `parent` (a span, or None for the current context). start_time is a
    time.monotonic() reading, for spans that begin at an event already past. Attribute
    names use "__" for "." (voicestack__turn__index -> voicestack.turn.index)."""
    context = trace.set_span_in_context(parent) if parent is not None else None
    start_ns = None
    if start_time is not None:
        start_ns = time.time_ns() - int((time.monotonic() - start_time) * 1e9)
    return _tracer.start_span(name, context=context, start_time=start_ns, links=links,
                              attributes={k.replace("__", "."): v for k, v in attributes.items()} or None)


def end_span(span, end_time: float | None = None) -> None:
    """End `span`, at a past time.monotonic() reading if given."""
    if span is None:
        return
    end_ns = None
    if end_time is not None:
        end_ns = time.time_ns() - int((time.monotonic() - end_time) * 1e9)
    span.end(end_time=end_ns)


@contextlib.contextmanager
def in_span(span):
    """Make `span` current, so stage streams opened inside become its children."""
    if span is None:
        yield
        return
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield
    finally:
        otel_context.detach(token)


class TurnSpans(SpanProcessor):
    """Keeps this process's finished spans by trace id for a little while, so the edge
    can send a turn's waterfall to its client from the very spans it exports."""

    def __init__(self, max_traces: int = 512):
        self.max_traces = max_traces
        self.by_trace: dict[int, list] = {}

    def on_end(self, span) -> None:
        spans = self.by_trace.setdefault(span.context.trace_id, [])
        spans.append(span)
        while len(self.by_trace) > self.max_traces:
            self.by_trace.pop(next(iter(self.by_trace)))

    def take(self, trace_id: int) -> list:
        return self.by_trace.pop(trace_id, [])


turn_spans = TurnSpans()


class Meters:
    """The instruments every service records into (see README, Observability)."""

    def __init__(self, service: str):
        meter = metrics.get_meter("voicestack")
        self.service = service
        self.stage_latency = meter.create_histogram(
            "voicestack.stage.latency", unit="s",
            description="Latency of a stage's work, by stage and kind (e.g. stt final, llm first token)",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        self.voice_to_voice = meter.create_histogram(
            "voicestack.voice_to_voice", unit="s",
            description="End of user speech to first agent audio byte out of the edge",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        self.opens_refused = meter.create_counter(
            "voicestack.stream.opens.refused", description="Stream opens refused (capacity or draining)",
        )
        self.streams_cancelled = meter.create_counter(
            "voicestack.streams.cancelled", description="Streams cancelled by their opener (barge-in, hang-up)",
        )
        self.errors = meter.create_counter("voicestack.errors", description="Errors by stage and gRPC code")
        self.tool_calls = meter.create_counter(
            "voicestack.tool.calls", description="The agent's tool calls, by tool and outcome (ok, error, timeout, cancelled)",
        )
        self.processor_errors = meter.create_counter(
            "voicestack.processor.errors", description="Fail-open processors that raised (their input passed on), by processor and place",
        )
        self.compute_seconds = meter.create_counter(
            "voicestack.compute", unit="s", description="Model compute time",
        )
        self.audio_seconds = meter.create_counter(
            "voicestack.audio", unit="s", description="Seconds of audio processed (STT in, TTS out)",
        )
        self._gauges: dict[str, object] = {}

    def observe_conversation(self, seconds) -> None:
        """The edge's seconds of calls (ended and ongoing), the denominator of a
        conversation-minute's cost: 60 * rate(compute) / rate(conversation)."""
        meter = metrics.get_meter("voicestack")
        meter.create_observable_counter(
            "voicestack.conversation", unit="s",
            callbacks=[lambda options: [metrics.Observation(seconds(), {"stage": self.service})]],
            description="Seconds of calls on this edge (ended and ongoing)",
        )

    def observe_streams(self, active, capacity) -> None:
        """Register callbacks reporting streams in flight and capacity for this replica."""
        meter = metrics.get_meter("voicestack")
        labels = {"stage": self.service}
        meter.create_observable_gauge(
            "voicestack.streams.active",
            callbacks=[lambda options: [metrics.Observation(active(), labels)]],
            description="Streams (sessions, for the edge) in flight on this replica",
        )
        meter.create_observable_gauge(
            "voicestack.streams.capacity",
            callbacks=[lambda options: [metrics.Observation(capacity(), labels)]],
            description="Streams this replica takes before refusing",
        )


def _otlp_wanted(signal: str) -> bool:
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
    return bool(endpoint) and os.environ.get(f"OTEL_{signal}_EXPORTER", "otlp").strip().lower() != "none"


def setup(service: str, metrics_port: int, metrics_host: str = "127.0.0.1") -> Meters:
    """Install the SDK providers for this process. Call once, at start-up."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    os.environ.setdefault("OTEL_SERVICE_NAME", f"voicestack-{service}")
    resource = Resource.create({"voicestack.service": service})
    readers = []
    if metrics_port > 0:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=os.environ.get("VOICESTACK_METRICS_HOST", metrics_host))
        readers.append(PrometheusMetricReader())
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(turn_spans)
    # OTLP export when an endpoint is configured; OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER
    # = "none" turn either off (e.g. metrics scraped by Prometheus, traces pushed).
    if _otlp_wanted("TRACES"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if _otlp_wanted("METRICS"):
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
    global _tracer
    _tracer = trace.get_tracer("voicestack")
    return Meters(service)


def shutdown() -> None:
    for provider in (trace.get_tracer_provider(), metrics.get_meter_provider()):
        with contextlib.suppress(Exception):
            provider.shutdown()
