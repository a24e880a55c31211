"""Who may open a session, and how many: API keys and per-key limits at the edge.

Keys are never stored or logged: the edge keeps their sha256 digests, loaded from a
file (VOICESTACK_API_KEYS_FILE), one a line:

    <sha256 hex of the key>  <name>  [sessions=N]  [per_minute=N]

`voicestack hash-key` prints the line for a key read from stdin. Clients send the key
as gRPC metadata `authorization: Bearer <key>`. A missing or wrong key gets
UNAUTHENTICATED with no detail of why; a key over its limits gets RESOURCE_EXHAUSTED
with a retry hint.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import time
from collections import deque
from dataclasses import dataclass, field

import grpc

from voicestack.errors import ServiceError

DEFAULT_SESSIONS = 20
DEFAULT_PER_MINUTE = 60


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class ApiKey:
    name: str
    sha256: str
    max_sessions: int = DEFAULT_SESSIONS
    per_minute: int = DEFAULT_PER_MINUTE
    active: int = 0
    recent_opens: deque = field(default_factory=deque)


def load_keys(path: str) -> list[ApiKey]:
    keys = []
    with open(path) as lines:
        for number, line in enumerate(lines, 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields[0]) != 64 or any(c not in "0123456789abcdef" for c in fields[0].lower()):
                raise SystemExit(f"{path}:{number}: expected a sha256 hex digest first (see `voicestack hash-key`)")
            key = ApiKey(name=fields[1] if len(fields) > 1 else f"key-{number}", sha256=fields[0].lower())
            for option in fields[2:]:
                name, _, value = option.partition("=")
                if name not in ("sessions", "per_minute") or not value.isdigit():
                    raise SystemExit(f"{path}:{number}: unknown option {option!r}; use sessions=N or per_minute=N")
                setattr(key, "max_sessions" if name == "sessions" else "per_minute", int(value))
            keys.append(key)
    if not keys:
        raise SystemExit(f"{path}: no API keys; remove the setting to run without authentication")
    return keys


def bearer_token(metadata) -> str:
    for name, value in metadata or ():
        if name.lower() == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return ""


class Admission:
    """Authenticates a call and holds its place under the key's limits."""

    def __init__(self, keys_file: str = ""):
        self.keys = load_keys(keys_file) if keys_file else []

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def authenticate(self, metadata) -> ApiKey | None:
        if not self.keys:
            return None
        offered = digest(bearer_token(metadata))
        for key in self.keys:
            if hmac.compare_digest(key.sha256, offered):
                return key
        raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")

    @contextlib.contextmanager
    def admitted(self, key: ApiKey | None):
        """The call holds a place under its key's limits for the block."""
        self._admit(key)
        try:
            yield
        finally:
            if key is not None:
                key.active -= 1

    def _admit(self, key: ApiKey | None) -> None:
        if key is None:
            return
        now = time.monotonic()
        while key.recent_opens and now - key.recent_opens[0] > 60:
            key.recent_opens.popleft()
        if key.active >= key.max_sessions:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"API key {key.name!r} has {key.active} sessions open, its limit; "
                             "close one or retry in a few seconds")
        if len(key.recent_opens) >= key.per_minute:
            retry = int(60 - (now - key.recent_opens[0])) + 1
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"API key {key.name!r} opened {key.per_minute} sessions in the last minute, "
                             f"its limit; retry in {retry} s")
        key.active += 1
        key.recent_opens.append(now)

