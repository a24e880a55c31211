"""Recording and compliance through real processes and real models: recording on, the
caller asked for consent and saying yes, both sides stored in a real S3-compatible server
(SeaweedFS) with the transcript redacted (a spoken card number is in no stored transcript,
no trace span and no log), then `voicestack export`, `erase` and `retention` as an operator
runs them, each in the audit log. The session also runs a processor from a separate
package (tests/processor_package, installed by its entry point) that changes what the
agent says."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest

from conftest import speak
from seaweed import ACCESS, SECRET, start_seaweed
from voicestack import recordings
from voicestack.audio import PIPELINE_RATE
from voicestack.client import LiveMicrophone
from voicestack.launcher import START_ORDER, Stack
from voicestack.v1 import audio_pb2, edge_pb2

# A Luhn-valid test card (Mastercard's), said digit by digit: tiny.en hears it so from espeak-ng.
CARD = "5105105105105100"
SPOKEN_CARD = ", ".join(" ".join(CARD[i:i + 4]) for i in range(0, 16, 4))


def holds_card(text: str) -> bool:
    return CARD in "".join(c for c in text if c.isdigit())


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    server = start_seaweed(tmp_path_factory.mktemp("seaweed-compliance"))
    server.make_bucket("calls")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def recording_env(weed, tmp_path_factory):
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    return {"VOICESTACK_RECORDING_STORE": "s3://calls", "VOICESTACK_RECORDING_S3_ENDPOINT": weed.endpoint,
            "VOICESTACK_RECORDING_S3_ACCESS_KEY": ACCESS, "VOICESTACK_RECORDING_S3_SECRET_KEY": SECRET,
            "VOICESTACK_RECORDING_AUDIT_LOG": str(audit)}


@pytest.fixture(scope="module")
def compliant_stack(receiver, recording_env, tmp_path_factory):
    _, port = receiver
    env = {**recording_env, "VOICESTACK_RECORDING": "true", "VOICESTACK_TRACE_TEXT": "true",
           "VOICESTACK_PROCESSORS": "pirate",
           "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
           "OTEL_BSP_SCHEDULE_DELAY": "200"}
    with Stack(ports="free", log_dir=tmp_path_factory.mktemp("logs-compliance"), env=env) as stack:
        stack.start(START_ORDER)
        yield stack


def voicestack(*args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "voicestack", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


async def test_a_recorded_call_keeps_no_card_number_and_an_operator_can_export_and_erase_it(
        compliant_stack, receiver, recording_env, weed, speech_dir, tmp_path):
    sink, _ = receiver
    yes = speak("Yes, I agree.", speech_dir)
    card = speak(f"My card number is {SPOKEN_CARD}.", speech_dir, speed=140)

    async def caller(mic: LiveMicrophone, send):
        await mic.wait_for(lambda: mic.turn_done(0), timeout=90)
        await send(yes)
        await mic.wait_for(lambda: mic.turn_done(1), timeout=90)
        await send(card)
        await mic.wait_for(lambda: mic.turn_done(2), timeout=120)

    config = edge_pb2.SessionConfig(input_format=audio_pb2.AudioFormat(
        encoding=audio_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=PIPELINE_RATE))
    conversation = await LiveMicrophone(config).run(compliant_stack.processes["edge"].address, caller)
    session = conversation.session_id
    opening, consent, answer = (conversation.turns[i] for i in range(3))
    assert "recorded" in opening.reply_text, opening.reply_text  # the consent question, after the disclosure
    assert consent.reply_text.strip() == "Thank you. This call is being recorded."
    assert holds_card(answer.transcript), f"the STT did not hear the card: {answer.transcript!r}"
    assert answer.reply_text.rstrip().endswith("Arr!"), "the pirate processor (its own package) spoke"

    # Stored when the call ended (off the event loop): both sides, the words redacted.
    store = weed.store("calls")
    deadline = time.monotonic() + 30
    while session not in recordings.sessions(store) or not recordings.read_manifest(store, session)["files"]:
        assert time.monotonic() < deadline, "the recording never reached the store"
        await asyncio.sleep(0.3)
    manifest = recordings.read_manifest(store, session)
    assert manifest["consent"] == "spoken" and manifest["complete"], manifest
    assert {"user.wav", "agent.wav", "transcript.json"} <= {f["name"] for f in manifest["files"]}
    transcript = json.loads(store.get(f"recordings/{session}/transcript.json"))
    user_lines = [t["text"] for t in transcript if t["role"] == "user"]
    # ([card] when the STT heard it exactly; [number] when it heard a digit group more or less)
    assert any("[card]" in line or "[number]" in line for line in user_lines), transcript
    assert not any(holds_card(t["text"]) for t in transcript), transcript
    # ... nor in any span (with trace_text on, transcripts are traced redacted) ...
    await asyncio.sleep(1.0)  # the batch exporters' last flush
    traced = [a.value.string_value for _, span in sink.spans for a in span.attributes if a.value.string_value]
    assert any("[card]" in value or "[number]" in value for value in traced), "no redacted transcript in the trace"
    assert not [v for v in traced if holds_card(v)]
    # ... nor in any log.
    for log in compliant_stack.log_dir.glob("*.log"):
        assert not holds_card(log.read_text(errors="replace")), f"{log.name} holds the card number"

    # The operator: an access request, an erasure, and retention of an expired recording.
    exported = voicestack("export", session, "--to", str(tmp_path), env=recording_env)
    assert exported.returncode == 0, exported.stderr
    assert {"user.wav", "agent.wav", "transcript.json", "manifest.json"} <= {
        p.name for p in (tmp_path / session).iterdir()}
    erased = voicestack("erase", session, env=recording_env)
    assert erased.returncode == 0 and "erased" in erased.stdout, erased.stderr
    assert session not in recordings.sessions(store)
    assert voicestack("export", session, "--to", str(tmp_path), env=recording_env).returncode == 1

    old = recordings.RecordingWriter(store, "expired-call", 1, "client",
                                     now=datetime.now(timezone.utc) - timedelta(days=2))
    old.add_user_audio(b"\0\0" * 1600)
    old.close()
    kept = recordings.RecordingWriter(store, "recent-call", 30, "client")
    kept.add_user_audio(b"\0\0" * 1600)
    kept.close()
    swept = voicestack("retention", env=recording_env)
    assert swept.returncode == 0 and "expired-call" in swept.stdout, swept.stderr
    assert recordings.sessions(store) == ["recent-call"]

    audit = [json.loads(line) for line in open(recording_env["VOICESTACK_RECORDING_AUDIT_LOG"])]
    assert [(a["action"], a["session"]) for a in audit] == [
        ("export", session), ("erase", session), ("retention-delete", "expired-call")], audit
    assert SECRET not in json.dumps(audit)
