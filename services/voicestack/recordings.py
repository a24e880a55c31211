"""Stored call recordings: where they go, what one looks like, and their end of life.

The edge writes a recording with `RecordingWriter` (calling it through asyncio.to_thread);
the CLI applies retention, exports and erases with the functions at the bottom. Both reach
storage through one small sync interface (`put`, `get`, `list`, `delete`) with two stores:

  VolumeStore  files under a directory (a mounted volume); atomic writes.
  S3Store      any S3-compatible object store (AWS S3, MinIO, SeaweedFS, Ceph, ...).

S3 client: the `minio` package (minio==7.2.20), not boto3. We need five calls and any
S3-compatible endpoint; minio is one pure-Python module on urllib3 (and four small
dependencies), where boto3 brings botocore's ~20 MB of models for every AWS service.

One recording, per session id ([A-Za-z0-9_-]{1,128}):

  recordings/<session>/manifest.json    session, created_at, expires_at (ISO-8601 UTC),
                                        consent ("spoken" | "dtmf" | "client"), complete,
                                        gaps [{at, reason}], files [{name, bytes, sha256}]
  recordings/<session>/user.wav         16-bit PCM mono, 16 kHz (what the caller said)
  recordings/<session>/agent.wav        16-bit PCM mono, 24 kHz (what the agent said)
  recordings/<session>/transcript.json  [{turn, role, text}], text redacted by the caller

The manifest is written twice: a provisional one (complete: false, no files) before any
other file, so that every stored byte has an expiry that retention can act on even if the
edge dies mid-write, and the final one last, so that `complete: true` means every file
listed is there. Deleting goes the other way: the manifest last.
"""

from __future__ import annotations

import dataclasses
import getpass
import hashlib
import io
import json
import os
import re
import socket
import threading
import time
import wave
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath
from typing import Protocol
from urllib.parse import urlparse

PREFIX = "recordings/"
USER_RATE = 16_000
AGENT_RATE = 24_000
CONSENTS = ("spoken", "dtmf", "client")
MAX_SECONDS = 3600  # per call and track, see RecordingWriter
_SESSION_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")


class StoreUnavailable(Exception):
    """The store could not be reached or refused an operation. The message names the
    store (path, or endpoint and bucket), never a credential."""


def check_session(session: str) -> str:
    if not isinstance(session, str) or not _SESSION_RE.fullmatch(session):
        raise ValueError(f"bad session id {session!r}: want 1-128 of [A-Za-z0-9_-]")
    return session


def _utc(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _now() -> datetime:
    return datetime.now(timezone.utc)


# ---------------------------------------------------------------------------- stores


class Store(Protocol):
    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...  # KeyError if missing
    def list(self, prefix: str) -> list[str]: ...  # sorted keys
    def delete(self, key: str) -> None: ...  # idempotent


class VolumeStore:
    """Keys are relative POSIX paths under `root`."""

    _TMP = ".tmp-"  # in-flight writes; never listed

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        p = PurePosixPath(key)
        if not key or p.is_absolute() or any(part in ("", ".", "..") for part in key.split("/")):
            raise ValueError(f"bad store key {key!r}: want a relative path without '..'")
        return self.root.joinpath(*p.parts)

    def _fail(self, op: str, key: str, exc: OSError) -> StoreUnavailable:
        return StoreUnavailable(f"volume store {self.root}: {op} {key!r}: {exc.strerror or exc}")

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = path.with_name(f"{self._TMP}{path.name}-{os.getpid()}-{threading.get_ident()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Recordings are personal data: readable by the service's user only.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # readers see the old file or the new one, never half
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise self._fail("put", key, exc) from exc

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None
        except OSError as exc:
            raise self._fail("get", key, exc) from exc

    def list(self, prefix: str) -> list[str]:
        # Walk only the directory the prefix names, then filter on the rest.
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        top = self._path(head) if head else self.root
        keys = []

        def fail(exc: OSError) -> None:
            if not isinstance(exc, FileNotFoundError):  # a missing prefix is just empty
                raise exc

        try:
            for dirpath, _, names in os.walk(top, onerror=fail):
                rel = Path(dirpath).relative_to(self.root).as_posix()
                for name in names:
                    key = name if rel == "." else f"{rel}/{name}"
                    if not name.startswith(self._TMP) and key.startswith(prefix):
                        keys.append(key)
        except OSError as exc:
            raise self._fail("list", prefix, exc) from exc
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise self._fail("delete", key, exc) from exc
        # An empty recordings/<session>/ left behind would still say the session existed.
        parent = path.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


class S3Store:
    def __init__(self, endpoint_url: str, bucket: str, access_key: str, secret_key: str,
                 region: str = "us-east-1", timeout: float = 10.0):
        import certifi
        import urllib3
        from minio import Minio

        url = urlparse(endpoint_url)
        if url.scheme not in ("http", "https") or not url.netloc or url.path not in ("", "/"):
            raise ValueError(f"bad S3 endpoint {endpoint_url!r}: want http(s)://host[:port]")
        if not bucket:
            raise ValueError("S3 store needs a bucket")
        self.endpoint_url, self.bucket = endpoint_url, bucket
        self._secret = secret_key
        # minio's default pool waits 5 minutes and retries 5 times: far too long for a call
        # ending at the edge. Two quick retries on 5xx, then StoreUnavailable.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout, read=timeout), maxsize=10,
            cert_reqs="CERT_REQUIRED", ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        self._client = Minio(url.netloc, access_key=access_key or None, secret_key=secret_key or None,
                             secure=url.scheme == "https", region=region or None, http_client=http)

    def __repr__(self) -> str:
        return f"S3Store({self.endpoint_url!r}, bucket={self.bucket!r})"

    def _fail(self, op: str, key: str, exc: Exception) -> StoreUnavailable:
        from minio.error import S3Error

        reason = exc.code if isinstance(exc, S3Error) else f"{type(exc).__name__}: {exc}"
        msg = f"S3 store {self.endpoint_url} bucket {self.bucket}: {op} {key!r}: {reason}"
        if self._secret:
            msg = msg.replace(self._secret, "***")  # belt and braces: no client error carries it
        return StoreUnavailable(msg)

    def put(self, key: str, data: bytes) -> None:
        try:
            self._client.put_object(self.bucket, key, io.BytesIO(data), len(data))
        except Exception as exc:
            raise self._fail("put", key, exc) from exc

    def get(self, key: str) -> bytes:
        from minio.error import S3Error

        try:
            resp = self._client.get_object(self.bucket, key)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()
        except S3Error as exc:
            if exc.code == "NoSuchKey":
                raise KeyError(key) from None
            raise self._fail("get", key, exc) from exc
        except Exception as exc:
            raise self._fail("get", key, exc) from exc

    def list(self, prefix: str) -> list[str]:
        try:
            return sorted(o.object_name for o in self._client.list_objects(self.bucket, prefix, recursive=True))
        except Exception as exc:
            raise self._fail("list", prefix, exc) from exc

    def delete(self, key: str) -> None:
        try:
            self._client.remove_object(self.bucket, key)  # S3 deletes are idempotent
        except Exception as exc:
            raise self._fail("delete", key, exc) from exc


def open_store(settings) -> Store | None:
    """The store `settings.recording_store` names: "" none, "file:///path" or a path a
    VolumeStore, "s3://bucket" an S3Store on the recording_s3_* settings."""
    spec = (settings.recording_store or "").strip()
    if not spec:
        return None
    url = urlparse(spec)
    if url.scheme == "s3":
        if not url.netloc or url.path not in ("", "/"):
            raise ValueError(f"recording_store {spec!r}: want s3://bucket")
        if not settings.recording_s3_endpoint:
            raise ValueError("recording_store s3://... needs recording_s3_endpoint")
        return S3Store(settings.recording_s3_endpoint, url.netloc, settings.recording_s3_access_key,
                       settings.recording_s3_secret_key, settings.recording_s3_region or "us-east-1")
    if url.scheme == "file":
        if url.netloc not in ("", "localhost") or not url.path:
            raise ValueError(f"recording_store {spec!r}: want file:///absolute/path")
        return VolumeStore(Path(url.path))
    if url.scheme:
        raise ValueError(f"recording_store {spec!r}: want file:///path, a path or s3://bucket")
    return VolumeStore(Path(spec))


# ---------------------------------------------------------------------------- writing


def _wav(pcm: bytes, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm[: len(pcm) // 2 * 2])
    return buf.getvalue()


@dataclasses.dataclass
class CloseResult:
    complete: bool  # every file stored, no gap
    files: list[str]  # names stored under recordings/<session>/
    gaps: list[dict]


class RecordingWriter:
    """One call's recording, held in memory and written at close.

    Memory is bounded: each track keeps at most `max_seconds` (default 1 hour) of
    16-bit audio, 115 MB for the user at 16 kHz and 173 MB for the agent at 24 kHz;
    what comes after is dropped and marked as a gap. Close briefly needs one track's
    size again to build its WAV.

    add_*() and mark_gap() never raise, never block on the store and are ignored once
    close() has begun. start() (optional, early) and close() write, each from a worker
    thread. A failed write becomes a gap, is retried at close, and makes the recording
    incomplete. close() raises StoreUnavailable only if the final manifest cannot be
    written (the recording is then unusable; a provisional manifest, if stored, lets
    retention remove its files).
    """

    def __init__(self, store: Store, session_id: str, retention_days: float, consent: str,
                 *, now: datetime | None = None, max_seconds: float = MAX_SECONDS,
                 retry_delays: tuple[float, ...] = (0.2, 1.0)):
        if consent not in CONSENTS:
            raise ValueError(f"consent {consent!r}: want one of {', '.join(CONSENTS)}")
        if retention_days <= 0:
            raise ValueError("retention_days must be positive")
        self.store, self.session = store, check_session(session_id)
        self.consent = consent
        self.created_at = now or _now()
        self.expires_at = self.created_at + timedelta(days=retention_days)
        self.max_seconds = max_seconds
        self._caps = {"user": int(USER_RATE * max_seconds) * 2, "agent": int(AGENT_RATE * max_seconds) * 2}
        self._audio = {"user": bytearray(), "agent": bytearray()}
        self._full = {"user": False, "agent": False}
        self._transcript: list[dict] = []
        self._gaps: list[dict] = []
        self._retry_delays = retry_delays
        self._lock = threading.Lock()  # the buffers: add_* on the event loop, close in a thread
        self._io = threading.Lock()  # start() and close(): a late provisional manifest must
        self._started = False        # never overwrite the final one
        self._closing = False
        self._result: CloseResult | None = None

    def _key(self, name: str) -> str:
        return f"{PREFIX}{self.session}/{name}"

    def _manifest(self, complete: bool, files: list[dict]) -> bytes:
        with self._lock:
            gaps = list(self._gaps)
        return json.dumps({
            "version": 1, "session": self.session, "created_at": _utc(self.created_at),
            "expires_at": _utc(self.expires_at), "consent": self.consent, "complete": complete,
            "gaps": gaps, "files": files,
        }, indent=1).encode()

    def _gap(self, reason: str) -> None:  # caller holds self._lock
        self._gaps.append({"at": _utc(_now()), "reason": reason})

    def _add(self, track: str, pcm: bytes) -> None:
        with self._lock:
            if self._closing or self._full[track]:
                return
            buf = self._audio[track]
            room = self._caps[track] - len(buf)
            buf += pcm[:room]
            if len(pcm) > room:
                self._full[track] = True  # one gap, not one per frame
                self._gap(f"{track} audio over the {self.max_seconds:g} s cap: the rest is not recorded")

    def add_user_audio(self, pcm: bytes) -> None:
        """16-bit little-endian mono PCM at 16 kHz."""
        self._add("user", pcm)

    def add_agent_audio(self, pcm: bytes) -> None:
        """16-bit little-endian mono PCM at 24 kHz."""
        self._add("agent", pcm)

    def add_transcript(self, turn: int, role: str, text: str) -> None:
        """`text` must already be redacted: it is stored as given."""
        with self._lock:
            if not self._closing:
                self._transcript.append({"turn": turn, "role": role, "text": text})

    def mark_gap(self, reason: str) -> None:
        with self._lock:
            if not self._closing:
                self._gap(reason)

    def _put(self, name: str, data: bytes, retry: bool = True) -> bool:
        delays = (*self._retry_delays, None) if retry else (None,)
        for delay in delays:
            try:
                self.store.put(self._key(name), data)
                return True
            except Exception as exc:  # noqa: BLE001 - a store failure must not end the call
                last = exc
            if delay is not None:
                time.sleep(delay)
        with self._lock:
            self._gap(f"store write of {name} failed: {last}")
        return False

    def start(self) -> bool:
        """Write the provisional manifest now, so the recording has an expiry from its
        first second. Never raises; returns whether it is stored (else close retries)."""
        with self._io:
            if not self._started and not self._closing:
                self._started = self._put("manifest.json", self._manifest(False, []), retry=False)
            return self._started

    def close(self) -> CloseResult:
        with self._io:
            if self._result is not None:
                return self._result
            with self._lock:
                self._closing = True  # from here on only this thread touches the buffers
            if not self._started:
                # No file before a manifest: without one, retention would never see it.
                self._started = self._put("manifest.json", self._manifest(False, []))
                if not self._started:
                    self._result = CloseResult(False, [], list(self._gaps))
                    raise StoreUnavailable(self._gaps[-1]["reason"])
            parts = [("user.wav", lambda: _wav(self._audio["user"], USER_RATE)),
                     ("agent.wav", lambda: _wav(self._audio["agent"], AGENT_RATE)),
                     ("transcript.json", lambda: json.dumps(self._transcript, indent=1).encode())]
            files = []
            for name, build in parts:
                data = build()
                if self._put(name, data):
                    files.append({"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
                del data
            self._audio = {"user": bytearray(), "agent": bytearray()}  # free the call's audio now
            complete = not self._gaps and len(files) == len(parts)
            ok = self._put("manifest.json", self._manifest(complete, files))
            self._result = CloseResult(complete and ok, [f["name"] for f in files], list(self._gaps))
            if not ok:
                raise StoreUnavailable(self._gaps[-1]["reason"])
            return self._result


# ---------------------------------------------------------------------------- the CLI's operations


class AuditLog:
    """Append-only JSON lines: {at, action, session, actor, detail}, each on disk (fsync)
    before the call returns."""

    def __init__(self, path: Path | str, actor: str | None = None):
        self.path = Path(path)
        self.actor = actor or f"{getpass.getuser()}@{socket.gethostname()}"
        self._lock = threading.Lock()

    def write(self, action: str, session: str, detail: dict | None = None) -> dict:
        entry = {"at": _utc(_now()), "action": action, "session": session,
                 "actor": self.actor, "detail": detail or {}}
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        return entry


def sessions(store: Store) -> list[str]:
    """Sessions with a manifest (every session this module writes has one)."""
    names = (k[len(PREFIX):-len("/manifest.json")] for k in store.list(PREFIX)
             if k.endswith("/manifest.json") and k.count("/") == 2)
    return sorted(n for n in names if _SESSION_RE.fullmatch(n))


def read_manifest(store: Store, session: str) -> dict:
    return json.loads(store.get(f"{PREFIX}{check_session(session)}/manifest.json"))


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def expired(store: Store, now: datetime) -> list[str]:
    """Sessions whose expires_at is at or before `now` (naive times are UTC)."""
    now, out = _aware(now), []
    for s in sessions(store):
        try:
            expires = datetime.fromisoformat(read_manifest(store, s)["expires_at"])
        except KeyError:
            continue  # deleted meanwhile
        except ValueError:
            continue  # a malformed manifest is kept for a human (read_manifest shows it)
        if _aware(expires) <= now:
            out.append(s)
    return out


def _delete_session(store: Store, session: str) -> list[str]:
    manifest = f"{PREFIX}{check_session(session)}/manifest.json"
    # Manifest last: a deletion cut short is found again (and finished) by the next run.
    keys = sorted(store.list(f"{PREFIX}{session}/"), key=lambda k: k == manifest)
    for key in keys:
        store.delete(key)
    return keys


def retention(store: Store, now: datetime, audit: AuditLog) -> list[str]:
    deleted = []
    for s in expired(store, now):
        keys = _delete_session(store, s)
        audit.write("retention-delete", s, {"files": len(keys), "now": _utc(_aware(now))})
        deleted.append(s)
    return deleted


def export(store: Store, session: str, dest_dir: Path | str, audit: AuditLog) -> Path:
    """Copy every file of `session` to dest_dir/<session>/ (KeyError if it has none)."""
    prefix = f"{PREFIX}{check_session(session)}/"
    keys = store.list(prefix)
    if not keys:
        raise KeyError(session)
    out = Path(dest_dir) / session
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    for key in keys:
        name = key[len(prefix):]
        if "/" in name or name in (".", ".."):  # an S3 key may hold anything
            raise ValueError(f"unexpected key {key!r} in session {session}")
        fd = os.open(out / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(store.get(key))
    audit.write("export", session, {"dest": str(out), "files": [k[len(prefix):] for k in keys]})
    return out


def erase(store: Store, session: str, audit: AuditLog) -> list[str]:
    """Delete every file of `session` (a data-subject request); returns the keys deleted
    (none if there was nothing) and audits it either way."""
    keys = _delete_session(store, session)
    audit.write("erase", session, {"files": len(keys)})
    return keys
