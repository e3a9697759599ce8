"""The console's login session: an operator token sealed in a cookie, and its CSRF token.

A browser cannot send ``Authorization: Bearer``, so the login form trades the
operator's token for a cookie that carries it, sealed (AES-256-GCM, so it can
be neither read nor forged) with a key derived from the API's command-signing
key (HKDF, its own label: every API replica derives the same key, and nothing
is stored server-side). Every request re-authenticates the unsealed token with
:class:`~cloud_ingest.api.auth.Authenticator`, so revoking an operator ends its
console sessions at once; a session also ends after :data:`SESSION_MAX_AGE_S`.

The cookie is ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no other
site's page sends it), ``Path=/ui`` and ``Secure`` when the request came over
TLS. Every POST also carries a CSRF token (a form field or the
``X-CSRF-Token`` header htmx sends): an HMAC of the session's random id, checked
in constant time, so even a same-site page without the token cannot act.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["COOKIE", "SESSION_MAX_AGE_S", "Session", "SessionKeys"]

COOKIE: Final = "edgesync_console"
"""The session cookie's name."""

SESSION_MAX_AGE_S: Final = 12 * 3600
"""A session lasts a working day at most; then the operator logs in again."""

_LABEL: Final = b"edgesync console session v1"
_AAD: Final = b"edgesync-console"


@dataclass(frozen=True, slots=True)
class Session:
    """What a sealed cookie holds: the operator's token, a random id, when it began."""

    token: str
    sid: str
    issued_at: float


class SessionKeys:
    """Seals and opens session cookies, and makes and checks CSRF tokens."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a console session key is 32 bytes")
        self._aead = AESGCM(key)
        self._mac_key = hashlib.sha256(key + b"csrf").digest()

    @classmethod
    def derive(cls, secret: bytes) -> SessionKeys:
        """Keys derived from ``secret`` (the API's signing key) under the console's label."""
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_LABEL)
        return cls(hkdf.derive(secret))

    @classmethod
    def from_key_file(cls, path: Path) -> SessionKeys:
        """Keys derived from the command-signing key file (every replica has it)."""
        return cls.derive(path.read_bytes())

    def new_session(self, token: str) -> Session:
        return Session(token=token, sid=secrets.token_urlsafe(16), issued_at=time.time())

    def seal(self, session: Session) -> str:
        nonce = os.urandom(12)
        body = json.dumps({"t": session.token, "s": session.sid, "i": session.issued_at})
        sealed = self._aead.encrypt(nonce, body.encode(), _AAD)
        return base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def open(self, cookie: str | None, *, now: float | None = None) -> Session | None:
        """The session in ``cookie``, or None if absent, forged, damaged or too old."""
        if not cookie or len(cookie) > 4096:
            return None
        try:
            raw = base64.urlsafe_b64decode(cookie + "=" * (-len(cookie) % 4))
            body = json.loads(self._aead.decrypt(raw[:12], raw[12:], _AAD))
            session = Session(token=str(body["t"]), sid=str(body["s"]),
                              issued_at=float(body["i"]))
        except (ValueError, KeyError, TypeError, InvalidTag):
            return None
        age = (time.time() if now is None else now) - session.issued_at
        if not 0 <= age <= SESSION_MAX_AGE_S:
            return None
        return session

    def csrf_token(self, session: Session) -> str:
        return hmac.new(self._mac_key, session.sid.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, session: Session, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(self.csrf_token(session), given or "")
