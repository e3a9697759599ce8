"""TLS on the NATS hop: the settings' CA, client certificate and key are used.

The server requires TLS and, here, a client certificate (``verify: true``):
``connect_with_retry`` gets through with ``ca_file`` + ``cert_file`` + ``key_file``,
and the same client without its certificate is refused.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import nats
import pytest

from broker.connecting import close_nats, connect_options, connect_with_retry
from broker.runtime.certificates import CertificateAuthority
from broker.runtime.embedded_nats import EmbeddedNats
from broker.settings import NatsSettings


async def test_mutual_tls_connects_with_the_settings_certificate(tmp_path: Path) -> None:
    """A client presenting a certificate from the CA connects over TLS; without one
    it is refused."""
    ca = CertificateAuthority(tmp_path / "tls")
    server, client = ca.issue("nats-server"), ca.issue("bridge", client=True)
    assert (client.key_file.stat().st_mode & 0o777) == 0o600
    assert ((tmp_path / "tls").stat().st_mode & 0o777) == 0o700
    config = tmp_path / "nats.conf"
    config.write_text(
        f"tls {{ cert_file: {json.dumps(str(server.cert_file))}, "
        f"key_file: {json.dumps(str(server.key_file))}, "
        f"ca_file: {json.dumps(str(ca.ca_file))}, verify: true }}\n")
    async with EmbeddedNats(tmp_path / "store", config_file=config,
                            log_file=tmp_path / "nats.log") as nats_server:
        settings = NatsSettings(url=nats_server.url, ca_file=ca.ca_file,
                                cert_file=client.cert_file, key_file=client.key_file)
        nc = await connect_with_retry(settings, name="tls-test")
        try:
            assert nc.is_connected
            assert nc.connected_url is not None
            await nc.publish("hello", b"over tls")
            await nc.flush(timeout=3)
        finally:
            await close_nats(nc)

        no_cert = NatsSettings(url=nats_server.url, ca_file=ca.ca_file)
        with pytest.raises((ssl.SSLError, OSError, nats.errors.Error)):
            await nats.connect(nats_server.url, allow_reconnect=False, connect_timeout=3,
                               **connect_options(no_cert))


def test_client_certificate_needs_its_key() -> None:
    """cert_file without key_file is a settings error, named at start-up."""
    with pytest.raises(ValueError, match="set both or neither"):
        NatsSettings(cert_file=Path("c.pem"))
