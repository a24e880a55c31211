"""SIP digest authentication, server side (RFC 3261 22.4, RFC 2617/7616 computations, RFC
8760 SHA-256). Headers are parsed and written by sipmessage; the nonce is stateless: a time
stamp signed with a per-process key, good for NONCE_SECONDS, so a restart or another
replica just challenges again."""

from __future__ import annotations

import hashlib
import hmac
import os
import time

from sipmessage import AuthChallenge, AuthCredentials, AuthParameters

NONCE_SECONDS = 300
ALGORITHMS = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}


class DigestAuth:
    def __init__(self, username: str, password: str, realm: str, key: bytes | None = None):
        self.username, self.password, self.realm = username, password, realm
        self._key = key or os.urandom(32)

    def nonce(self, now: float | None = None) -> str:
        stamp = f"{int(now if now is not None else time.time()):x}"
        signature = hmac.new(self._key, stamp.encode(), hashlib.sha256).hexdigest()[:32]
        return f"{stamp}.{signature}"

    def _nonce_state(self, nonce: str) -> str:
        """'ok', 'stale' (ours, expired: the client retries without asking the user) or 'bad'."""
        stamp, _, signature = nonce.partition(".")
        expected = hmac.new(self._key, stamp.encode(), hashlib.sha256).hexdigest()[:32]
        if not signature or not hmac.compare_digest(signature, expected):
            return "bad"
        try:
            age = time.time() - int(stamp, 16)
        except ValueError:
            return "bad"
        return "ok" if -5 <= age <= NONCE_SECONDS else "stale"

    def challenge(self, stale: bool = False) -> str:
        """A WWW-Authenticate value (MD5: what every phone speaks)."""
        params = {"realm": self.realm, "nonce": self.nonce(), "algorithm": "MD5", "qop": "auth"}
        if stale:
            params["stale"] = "true"
        return str(AuthChallenge(scheme="Digest", parameters=AuthParameters(**params)))

    def check(self, method: str, authorization: str | None) -> str:
        """'ok', 'stale' (challenge again with stale=true) or 'missing'/'bad' (challenge again)."""
        if not authorization:
            return "missing"
        try:
            credentials = AuthCredentials.parse(authorization)
        except ValueError:
            return "bad"
        params = credentials.parameters
        if credentials.scheme.lower() != "digest" or params is None:
            return "bad"
        algorithm = params.get("algorithm", "MD5").upper()
        hash_fn = ALGORITHMS.get(algorithm)
        required = ("username", "realm", "nonce", "uri", "response")
        if hash_fn is None or any(k not in params for k in required):
            return "bad"
        if params["username"] != self.username or params["realm"] != self.realm:
            return "bad"

        def h(text: str) -> str:
            return hash_fn(text.encode()).hexdigest()

        ha1 = h(f"{self.username}:{self.realm}:{self.password}")
        ha2 = h(f"{method}:{params['uri']}")
        qop = params.get("qop")
        if qop:
            if qop != "auth" or "cnonce" not in params or "nc" not in params:
                return "bad"
            expected = h(f"{ha1}:{params['nonce']}:{params['nc']}:{params['cnonce']}:{qop}:{ha2}")
        else:
            expected = h(f"{ha1}:{params['nonce']}:{ha2}")
        if not hmac.compare_digest(expected, params["response"].lower()):
            return "bad"
        return self._nonce_state(params["nonce"])


def client_authorization(challenge: str, method: str, uri: str, username: str, password: str,
                         cnonce: str = "0a4f113b", nc: str = "00000001") -> str:
    """The Authorization a client sends for `challenge` (the tests' SIP client uses it)."""
    params = AuthChallenge.parse(challenge).parameters
    hash_fn = ALGORITHMS[params.get("algorithm", "MD5").upper()]

    def h(text: str) -> str:
        return hash_fn(text.encode()).hexdigest()

    ha1 = h(f"{username}:{params['realm']}:{password}")
    ha2 = h(f"{method}:{uri}")
    response = h(f"{ha1}:{params['nonce']}:{nc}:{cnonce}:auth:{ha2}")
    values = {"username": username, "realm": params["realm"], "nonce": params["nonce"], "uri": uri,
              "response": response, "algorithm": params.get("algorithm", "MD5"), "qop": "auth",
              "nc": nc, "cnonce": cnonce}
    return str(AuthCredentials(scheme="Digest", parameters=AuthParameters(**values)))
