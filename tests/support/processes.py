"""Services as OS processes in a test, and the two port helpers that are not port 0.

Children bind port 0 and report the port they got (:mod:`broker.runtime.children`,
shared with ``bench/``). Two things cannot work that way, and each has its helper:

- :func:`refused_port`: a port where nothing answers, for "the peer is down" tests.
  The socket stays bound (never listening) while the test runs, so connections are
  refused and no other process can take the port meanwhile.
- :func:`port_for_config`: a port chosen *before* its server starts, for servers
  whose peers must be told the address up front (the routes of a nats-server
  cluster name each other's ports in their command lines). It binds and releases,
  so another process could take it first: use it only where a config needs it.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

from broker.runtime.children import ServiceProcess, settings_env
from broker.settings import BridgeSettings, LogSettings, NatsSettings

__all__ = ["BridgeProcess", "port_for_config", "refused_port"]


class BridgeProcess(ServiceProcess):
    """``python -m broker bridge`` as a child process (for kill -9 tests), configured by
    the same settings an in-process bridge takes; ``url`` is known once started."""

    def __init__(self, settings: BridgeSettings, nats_url: str, log_file: Path) -> None:
        nats = NatsSettings(url=nats_url, publish_timeout_s=2)
        env = settings_env(bridge=settings, nats=nats, log=LogSettings(level="info"))
        super().__init__("bridge", env, log_file=log_file)
        self.settings = settings


@contextlib.contextmanager
def refused_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A loopback port that refuses connections for as long as the block runs."""
    with socket.socket() as sock:
        sock.bind((host, 0))  # bound, never listening: a SYN is answered with RST
        yield int(sock.getsockname()[1])


def port_for_config(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago, for a server whose peers need it in advance.

    Prefer port 0 and the server's report; see the module docstring for why this
    exists at all.
    """
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
