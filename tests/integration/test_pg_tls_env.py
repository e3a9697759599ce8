"""The cloud's PostgreSQL connections honour libpq's ``PGSSLMODE`` and ``PGSSLROOTCERT``
(what deploy/ sets: verify-full against CloudNativePG's CA) whenever the DSN says
nothing of TLS: none of our connection code passes its own ``ssl`` argument, which
would silently override them."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from broker.pg_connecting import connected
from broker.runtime.certificates import CertificateAuthority


async def test_pgsslmode_verify_full_refuses_a_server_without_tls(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The embedded test server speaks no TLS: with verify-full demanded from the
    environment the connection must fail, not fall back to plain text."""
    monkeypatch.setenv("PGSSLMODE", "verify-full")
    monkeypatch.setenv("PGSSLROOTCERT", str(CertificateAuthority(tmp_path).ca_file))
    with pytest.raises((ConnectionError, OSError), match="SSL"):
        async with connected(pg_dsn) as conn:
            await conn.fetchval("SELECT 1")
    monkeypatch.setenv("PGSSLROOTCERT", "/nonexistent/ca.crt")  # a missing CA: no fallback
    with pytest.raises((asyncpg.ClientConfigurationError, OSError)):
        async with connected(pg_dsn):
            pass
    monkeypatch.setenv("PGSSLMODE", "disable")
    async with connected(pg_dsn) as conn:
        assert await conn.fetchval("SELECT 1") == 1
