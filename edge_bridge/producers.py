"""Who may publish through the bridge's ingress, and to which streams.

Loopback with no tokens configured: anyone on the host (the default, as before).
With producer tokens (``bridge.producer_tokens`` and/or ``producer_tokens_file``),
every publish carries ``Authorization: Bearer <token>`` (401 otherwise) and may
only write the streams its token lists (403 otherwise). A non-loopback ingress
without tokens refuses to start unless ``allow_anonymous_producers`` says the
network is trusted. Checked from the headers, before the body is read.
"""

from __future__ import annotations

import fnmatch
import hmac
import ipaddress
import json
from dataclasses import dataclass

from pydantic import TypeAdapter, ValidationError

from broker.errors import ConfigError, Forbidden, InvalidInput, Unauthorized
from broker.settings import BridgeSettings, ProducerToken
from broker.token_strength import check_token_strength

__all__ = ["ProducerGate", "is_loopback"]

_TOKENS = TypeAdapter(list[ProducerToken])


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the ingress on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: assume it is reachable from elsewhere


@dataclass(frozen=True, slots=True)
class _Producer:
    name: str
    token: bytes
    streams: tuple[str, ...]


class ProducerGate:
    """The ingress's check of a publish's token against its stream."""

    def __init__(self, producers: list[ProducerToken]) -> None:
        self._producers = [_Producer(p.name, p.token.get_secret_value().encode(),
                                     tuple(p.streams)) for p in producers]

    @property
    def required(self) -> bool:
        return bool(self._producers)

    @classmethod
    def from_settings(cls, settings: BridgeSettings) -> ProducerGate:
        """The gate of these settings.

        Raises:
            ConfigError: an unreadable tokens file, a weak token, a duplicate name, or
                a non-loopback ingress without tokens nor ``allow_anonymous_producers``.
        """
        producers = list(settings.producer_tokens)
        path = settings.producer_tokens_file
        if path is not None:
            try:
                producers += _TOKENS.validate_python(json.loads(path.read_text()))
            except (OSError, ValueError, ValidationError) as exc:
                raise ConfigError(f"bridge.producer_tokens_file {path}: {exc}") from exc
        names = [p.name for p in producers]
        if len(set(names)) != len(names):
            raise ConfigError(f"bridge.producer_tokens: duplicate names in {names}")
        for p in producers:
            try:
                check_token_strength(p.token.get_secret_value(), what=f"producer {p.name}'s token")
            except InvalidInput as exc:
                raise ConfigError(f"bridge.producer_tokens: {exc}") from exc
        if not producers and not is_loopback(settings.host) and (
                not settings.allow_anonymous_producers):
            raise ConfigError(
                f"bridge.host is {settings.host!r}, reachable from other machines, and no "
                "producer tokens are configured: set bridge.producer_tokens_file (or "
                "producer_tokens), or allow_anonymous_producers=true on a trusted network")
        return cls(producers)

    def check(self, stream: str, authorization: str | None) -> str | None:
        """The producer's name (None when no tokens are required).

        Raises:
            Unauthorized: no token, or an unknown one. Forbidden: not this stream.
        """
        if not self._producers:
            return None
        scheme, _, given = (authorization or "").partition(" ")
        token = given.strip().encode()
        found = None
        if scheme.lower() == "bearer" and token:
            for p in self._producers:  # compare with each: the time says nothing
                if hmac.compare_digest(token, p.token) and found is None:
                    found = p
        if found is None:
            raise Unauthorized("this ingress needs a producer token (Authorization: Bearer "
                               "<token>)")
        if not any(fnmatch.fnmatchcase(stream, g) for g in found.streams):
            raise Forbidden(f"producer {found.name!r} may not publish to stream {stream!r} "
                            f"(allowed: {', '.join(found.streams)})")
        return found.name
