"""Settings travel to a child process as ``EDGESYNC_*`` variables and arrive unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker.runtime.children import ServiceProcess, settings_env
from broker.settings import (
    ApiSettings,
    BridgeSettings,
    ControlSettings,
    LogSettings,
    NatsSettings,
    Settings,
    ShipperSettings,
    StreamPolicy,
)


def test_settings_read_back_from_the_built_environment_equal_the_originals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nested groups, paths, lists, per-stream maps and secrets survive the round trip."""
    bridge = BridgeSettings(
        edge_id="site-7",
        port=0,
        buffer_dir=tmp_path / "buffer",
        streams={"alarms": StreamPolicy(overflow="drop_oldest", priority=5, ttl_s=30)},
        shipper=ShipperSettings(linger_ms=2, compression="zstd"),
        control=ControlSettings(public_key_file=tmp_path / "key.pub",
                                allowed_namespaces=["prod", "staging"]),
    )
    api = ApiSettings(operator_token="s3cret")
    nats = NatsSettings(url="nats://127.0.0.1:4333", publish_timeout_s=2)
    env = settings_env(bridge=bridge, api=api, nats=nats, log=LogSettings(level="debug"))
    for key in [k for k in os.environ if k.startswith("EDGESYNC_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.bridge == bridge
    assert settings.api.operator_token is not None
    assert settings.api.operator_token.get_secret_value() == "s3cret"
    assert settings.nats == nats
    assert settings.log.level == "debug"


def test_only_fields_set_explicitly_are_written() -> None:
    """Defaults stay the child's own: nothing is written for them."""
    env = settings_env(nats=NatsSettings(url="nats://h:1"))
    assert env == {"EDGESYNC_NATS__URL": "nats://h:1"}


def test_an_unknown_group_is_refused() -> None:
    with pytest.raises(ValueError, match="'brigde' is not one of the settings groups"):
        settings_env(brigde=NatsSettings())


def test_a_child_that_would_hide_its_start_up_line_is_refused(tmp_path: Path) -> None:
    """The port is read from the info-level start-up line: a quieter level is an error."""
    with pytest.raises(ValueError, match="hides the start-up line"):
        ServiceProcess("bridge", {"EDGESYNC_LOG__LEVEL": "warning"}, log_file=tmp_path / "l")
