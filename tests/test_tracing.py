"""One turn through five real services exporting OTLP to a receiver this test runs:
one trace across all of them, with the parent links and events an SRE reads."""

from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import silence, speak, words
from voicestack.client import converse
from voicestack.launcher import Stack

SERVICES = ("edge", "vad", "stt", "llm", "tts")


@pytest.fixture(scope="module")
def traced_stack(receiver, tmp_path_factory):
    _, port = receiver
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
           "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_METRIC_EXPORT_INTERVAL": "1000"}
    with Stack(ports="free", log_dir=tmp_path_factory.mktemp("traced"), env=env) as stack:
        stack.start()
        yield stack


def attribute_strings(span) -> list[str]:
    values = [a.value.string_value for a in span.attributes]
    for event in span.events:
        values += [a.value.string_value for a in event.attributes]
    return [v for v in values if v]


async def test_one_trace_across_all_five_services(receiver, traced_stack, tmp_path):
    sink, _ = receiver
    question = np.concatenate([silence(200), speak("What is the capital of France?", tmp_path)])
    conversation = await converse(traced_stack.processes["edge"].address, question, timeout=90)
    assert conversation.status.name == "OK", conversation.details
    turn = conversation.replies[0]
    trace_event = next(e.turn_trace for e in conversation.events
                       if e.WhichOneof("kind") == "turn_trace" and e.turn_trace.turn_index == 1)
    trace_id = bytes.fromhex(trace_event.trace_id)

    expected = {("edge", "turn"), ("edge", "tts.synthesize"), ("vad", "vad.detect"), ("stt", "stt.stream"),
                ("llm", "llm.stream"), ("tts", "tts.stream")}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # spans arrive in batches, the turn's last
        in_trace = [(svc, s) for svc, s in sink.spans if s.trace_id == trace_id]
        if {(svc.removeprefix("voicestack-"), s.name) for svc, s in in_trace} >= expected:
            break
        time.sleep(0.2)
    by_name = {}
    for service, span in in_trace:
        by_name.setdefault(span.name, []).append((service, span))
    assert {svc for svc, _ in in_trace} == {f"voicestack-{name}" for name in SERVICES}, sorted(by_name)

    def one(name, service):
        matches = [s for svc, s in by_name.get(name, []) if svc == f"voicestack-{service}"]
        assert matches, f"no {name} span from {service}; have {sorted(by_name)}"
        return matches[0]

    root = one("turn", "edge")
    assert not root.parent_span_id, "the turn is the root of its own trace"
    assert any(link.span_id for link in root.links), "the turn links to its session"
    for child in ("endpointing", "stt", "stt.finalize", "llm.generate", "tts.synthesize", "first_audio_out"):
        assert one(child, "edge").parent_span_id == root.span_id, child
    # Spans made in the stage processes are children of the edge's spans.
    assert one("stt.stream", "stt").parent_span_id == one("stt", "edge").span_id
    assert one("llm.stream", "llm").parent_span_id == one("llm.generate", "edge").span_id
    assert one("tts.stream", "tts").parent_span_id == one("tts.synthesize", "edge").span_id
    assert any(s.parent_span_id == root.span_id for svc, s in by_name["vad.detect"] if svc == "voicestack-vad")
    # Time to first token and to first audio are events on the spans that own them.
    for name, service, event in (("llm.generate", "edge", "first_token"), ("llm.stream", "llm", "first_token"),
                                 ("tts.synthesize", "edge", "first_audio"), ("tts.stream", "tts", "first_audio")):
        assert event in [e.name for e in one(name, service).events], (name, service)
    # No words of the conversation in any attribute, by default.
    said = {w for w in words(turn.transcript) + words(turn.reply_text) if len(w) > 3}
    leaked = [(s.name, v) for _, s in in_trace for v in attribute_strings(s) if said & set(words(v))]
    assert not leaked, leaked
    # The waterfall the client got is built from the same spans.
    assert {s.name for s in trace_event.spans} >= {"turn", "endpointing", "stt.finalize", "llm.generate"}
