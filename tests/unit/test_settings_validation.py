"""Settings that name NATS subject tokens take exactly one token, and an invalid setting
is refused at start-up naming the field, its variable and the value, with status 2:
never a traceback, never a service that half starts (opens its buffer, binds its port)
before it notices."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker.errors import ConfigError
from broker.settings import load_settings

TOKEN_SETTINGS = [
    ("EDGESYNC_NATS__PREFIX", "subject prefix"),
    ("EDGESYNC_BRIDGE__EDGE_ID", "edge id"),
    ("EDGESYNC_BRIDGE__CONTROL__DURABLE", "durable consumer name"),
    ("EDGESYNC_INGEST__CONSUMER", "durable consumer name"),
]


def clean_env(**settings: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("EDGESYNC_")},
            **settings}


@pytest.mark.parametrize(("variable", "what"), TOKEN_SETTINGS)
@pytest.mark.parametrize("value", ["not.valid", "a b", "x" * 65, "es>"])
def test_a_token_setting_takes_one_whole_token(
    monkeypatch: pytest.MonkeyPatch, variable: str, what: str, value: str
) -> None:
    """A dot would split the subjects built from it (a search for the pattern let
    ``not.valid`` through, as it holds a match)."""
    monkeypatch.setattr(os, "environ", clean_env(**{variable: value}))
    with pytest.raises(ConfigError) as refused:
        load_settings()
    message = str(refused.value)
    assert message.startswith("invalid settings: ")
    assert f"({variable}): invalid {what} {value!r}" in message


def test_every_invalid_setting_is_named_with_the_value_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "environ", clean_env(
        EDGESYNC_BRIDGE__PORT="-5", EDGESYNC_INGEST__CONSUMER="ok-token",
        EDGESYNC_BRIDGE__EDGE_ID="edge.1"))
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert str(refused.value) == (
        "invalid settings: bridge.edge_id (EDGESYNC_BRIDGE__EDGE_ID): invalid edge id "
        "'edge.1': must match [A-Za-z0-9_-]{1,64} (letters, digits, '_' and '-', 1 to 64 "
        "characters); bridge.port (EDGESYNC_BRIDGE__PORT): Input should be greater than "
        "or equal to 0 (given '-5')")


@pytest.mark.parametrize("command", [["-m", "broker", "bridge"], ["-m", "broker", "ingest"],
                                     ["-m", "broker", "status"],
                                     ["-m", "broker", "edges", "list"],
                                     ["-m", "broker", "cmd", "list"]])
def test_a_service_with_a_bad_setting_exits_2_naming_it_before_starting(
    tmp_path: Path, command: list[str]
) -> None:
    proc = subprocess.run(
        [sys.executable, *command], check=False, capture_output=True, text=True,
        timeout=60, cwd=tmp_path, env={**clean_env(
            EDGESYNC_BRIDGE__PORT="-5", EDGESYNC_INGEST__PORT="-5",
            EDGESYNC_BRIDGE__BUFFER_DIR=str(tmp_path / "buffer")), "COLUMNS": "200"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "(EDGESYNC_" in proc.stderr + proc.stdout
    assert "greater than or equal to 0 (given '-5')" in proc.stderr + proc.stdout
    assert any("invalid settings: " in line and "(given '-5')" in line  # one line
               for line in (proc.stderr + proc.stdout).splitlines())
    assert not (tmp_path / "buffer").exists()


def test_a_heartbeat_of_a_bridge_at_its_stream_limit_fits_one_nats_message() -> None:
    """``max_streams``' upper bound keeps the heartbeat (per-stream health for every
    stream) under nats-server's default 1 MiB message, at worst: 64-character names and
    every number at its largest."""
    from broker.protocol.events import Heartbeat, StreamHealth, encode_event
    from broker.settings import BridgeSettings

    limit = next(m.le for m in BridgeSettings.model_fields["max_streams"].metadata
                 if getattr(m, "le", None) is not None)
    big = 2**63 - 1
    names = [f"{i:06d}".ljust(64, "x") for i in range(limit)]
    beat = Heartbeat(
        "e" * 64, "0.1.0", 1.0, big, big, big, big, 1e300, big,
        {name: {"overflow": big, "ttl": big} for name in names},
        {name: StreamHealth(big, big, big, big, big, big, big, big, 1e300, big)
         for name in names})
    assert len(encode_event(beat)) < 1024 * 1024 - 4096  # room for subject and headers
