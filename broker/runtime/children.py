"""Services as child processes: ``python -m broker <service>``, configured by environment.

This is how the test suites and ``bench/`` run a bridge, an ingest or the API as
an OS process of its own (to SIGKILL it, or to read its memory and CPU), exactly
as ``deploy/`` runs them: settings travel as ``EDGESYNC_*`` variables, which
:func:`settings_env` builds from the same settings objects the services take.

A child binds port 0 unless told otherwise, and :class:`ServiceProcess` learns
the port the kernel gave it from the service's own start-up log line
(``bridge_started url=…``, ``ingest_started health_port=…``, ``api_started
url=…``). Choosing a "free" port in advance (bind, release, pass the number on)
races with every other process on the machine; port 0 cannot. A *restart* binds
the port the first start reported again, because clients hold the URL, as the
clients of a real edge would (``SO_REUSEADDR`` lets it rebind past TIME_WAIT).

Every child is signalled by its pid only, runs in its own session (a
terminal's Ctrl-C reaches the parent first) and dies with its parent
(:mod:`broker.runtime.processes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, SecretStr
from pydantic_core import to_jsonable_python

from broker.durable_files import open_private_log
from broker.runtime.processes import die_with_parent
from broker.settings import Settings

__all__ = [
    "START_TIMEOUT_S",
    "STOP_TIMEOUT_S",
    "ServiceName",
    "ServiceProcess",
    "settings_env",
]

ServiceName = Literal["bridge", "ingest", "api"]
"""The services ``python -m broker`` runs; also their settings group."""

START_TIMEOUT_S: Final = 60.0
"""Seconds a child may take to report its port and answer ``/readyz`` 200: a cold
start on a busy 2-core machine (imports, migrations, stream set-up) takes a few."""

STOP_TIMEOUT_S: Final = 25.0
"""Seconds to wait after SIGTERM before SIGKILL: above the services' own 20 s
shutdown deadline, so a clean stop is never cut short."""

_KILL_WAIT_S: Final = 10.0
"""Seconds for the kernel to reap a SIGKILLed child."""

_POLL_S: Final = 0.05
"""Seconds between looks at a starting child's log and ``/readyz``."""

_PROBE_TIMEOUT_S: Final = 2.0
"""Seconds one ``/readyz`` request may take; a busy child is asked again."""

_STARTED: Final[Mapping[ServiceName, tuple[str, str]]] = {
    "bridge": ("bridge_started", "url"),
    "ingest": ("ingest_started", "health_port"),
    "api": ("api_started", "url"),
}
"""Per service: the start-up event and the field that carries its bound port."""

_PREFIX: Final = str(Settings.model_config.get("env_prefix", ""))
_DELIMITER: Final = str(Settings.model_config.get("env_nested_delimiter", "__"))


def settings_env(**groups: BaseModel) -> dict[str, str]:
    """``EDGESYNC_*`` variables from which ``Settings()`` reads ``groups`` back.

    Only fields set explicitly (on each model and, recursively, on its nested
    models) are written, so everything else keeps the defaults of the child's
    own code. Nested models use the ``__`` delimiter; other structured values
    (lists, maps) are JSON, which pydantic-settings parses; secrets are written
    in clear (the environment is how a child gets them).

    Args:
        groups: settings groups by their name in :class:`~broker.settings.Settings`,
            e.g. ``bridge=BridgeSettings(...)``, ``nats=NatsSettings(url=...)``.

    Raises:
        ValueError: a name that is not a settings group.
    """
    env: dict[str, str] = {}
    for group, model in groups.items():
        if group not in Settings.model_fields:
            raise ValueError(f"{group!r} is not one of the settings groups "
                             f"{sorted(Settings.model_fields)}")
        _flatten(f"{_PREFIX}{group}".upper(), model, env)
    return env


def _flatten(prefix: str, model: BaseModel, env: dict[str, str]) -> None:
    for name in sorted(model.model_fields_set):
        key = f"{prefix}{_DELIMITER}{name}".upper()
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            _flatten(key, value, env)
        elif isinstance(value, SecretStr):
            env[key] = value.get_secret_value()
        else:
            plain = to_jsonable_python(value)
            env[key] = plain if isinstance(plain, str) else json.dumps(plain)


class ServiceProcess:
    """One ``python -m broker <service>`` child, started and stopped by pid.

    Args:
        service: ``bridge``, ``ingest`` or ``api``.
        env: ``EDGESYNC_*`` settings (see :func:`settings_env`), added to this
            process's environment. Without a port setting the child binds port 0.
        log_file: where its output goes (appended to across restarts). The child
            logs JSON (this class reads it); a level above ``info`` would hide the
            start-up line, so it is refused.
        name: for messages (default: the service).
    """

    def __init__(self, service: ServiceName, env: Mapping[str, str], *, log_file: Path,
                 name: str | None = None) -> None:
        level = env.get(f"{_PREFIX}LOG{_DELIMITER}LEVEL", "info").lower()
        if level not in ("debug", "info"):
            raise ValueError(f"{service}: log level {level!r} hides the start-up line "
                             "that reports the port; use info or debug")
        self.service: ServiceName = service
        self.name = name or service
        self.env = dict(env)
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        """The bound port, once the first start reported it."""
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} not started"
        return self.proc.pid

    @property
    def url(self) -> str:
        assert self.port is not None, f"{self.name} not started"
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _child_env(self) -> dict[str, str]:
        port_key = f"{_PREFIX}{self.service}{_DELIMITER}port".upper()
        env = {**os.environ, port_key: "0", **self.env, f"{_PREFIX}LOG{_DELIMITER}FORMAT": "json"}
        if self.port is not None:  # a restart: clients hold the URL
            env[port_key] = str(self.port)
        return env

    async def start(self, *, timeout: float = START_TIMEOUT_S,
                    ready: Callable[[Any], bool] | None = None) -> None:
        """Start, learn the port, and wait until ``/readyz`` answers 200.

        Args:
            timeout: seconds for all of it.
            ready: also wait until this holds for the ``/readyz`` JSON body.

        Raises:
            RuntimeError: the child exited, or was not ready in time (it is stopped;
                the message carries the log's tail).
        """
        assert not self.running, f"{self.name} is already running"
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with open_private_log(self.log_file) as log:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - polled below, like EmbeddedNats
                [*die_with_parent(signal.SIGTERM), sys.executable, "-m", "broker", self.service],
                env=self._child_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(trust_env=False) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                       f"{self.log_tail()}")
                if time.monotonic() > deadline:
                    await self.stop()
                    raise RuntimeError(f"{self.name} not ready within {timeout} s:\n"
                                       f"{self.log_tail()}")
                port = self._reported_port(offset)
                if port is not None:
                    self.port = port
                    with contextlib.suppress(httpx.TransportError, ValueError):
                        answer = await client.get(f"{self.url}/readyz", timeout=_PROBE_TIMEOUT_S)
                        if answer.status_code == 200 and (ready is None or ready(answer.json())):
                            return
                await asyncio.sleep(_POLL_S)

    def _reported_port(self, offset: int) -> int | None:
        """The port in this start's start-up line (None: not logged yet)."""
        event, field = _STARTED[self.service]
        for entry in self._events(event, offset):
            value = entry.get(field)
            port = value if isinstance(value, int) else urlsplit(str(value)).port
            if port:
                return int(port)
        return None

    async def wait_ready(self, predicate: Callable[[Any], bool], *, what: str,
                         timeout: float = START_TIMEOUT_S) -> None:
        """Wait until ``predicate`` holds for the ``/readyz`` JSON body (any status).

        Raises:
            RuntimeError: not within ``timeout`` seconds; says ``what`` was awaited.
        """
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(trust_env=False) as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.TransportError, ValueError):
                    answer = await client.get(f"{self.url}/readyz", timeout=_PROBE_TIMEOUT_S)
                    if predicate(answer.json()):
                        return
                await asyncio.sleep(_POLL_S)
        raise RuntimeError(f"{self.name}: {what} not seen within {timeout} s")

    def kill(self) -> None:
        """SIGKILL now, as a crash or the OOM killer would, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(_KILL_WAIT_S)

    async def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; returns the exit code.

        Idempotent; None if it was never started.
        """
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, _KILL_WAIT_S)
        return proc.returncode

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _events(self, event: str, offset: int = 0) -> list[dict[str, Any]]:
        """The JSON log lines (from byte ``offset``) whose event is ``event``."""
        found: list[dict[str, Any]] = []
        with contextlib.suppress(OSError), self.log_file.open("rb") as log:
            log.seek(offset)
            for line in log:
                if event.encode() not in line:
                    continue
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if isinstance(entry, dict) and entry.get("event") == event:
                        found.append(entry)
        return found

    def started_at(self, event: str) -> float | None:
        """Wall time (Unix seconds) of the first log line whose event is ``event``."""
        for entry in self._events(event):
            with contextlib.suppress(KeyError, TypeError, ValueError):
                return datetime.fromisoformat(entry["timestamp"]).timestamp()
        return None
