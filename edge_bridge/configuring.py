"""``bridge.configure``: tuning a running bridge, live, in a way that survives a restart.

What can change: the shipper's batch size / bytes / linger / compression, the
default and per-stream policies, the log level and the heartbeat interval.
The shipper reads its settings object on every batch and the buffer asks
``BridgeSettings.policy_for`` on every decision, so replacing those objects is
the whole of "live" - no restart, no lost record.

Every change is merged into the overrides persisted in the buffer directory
(``runtime-config.json``, written atomically) *before* it takes effect, so a
restart re-applies exactly what the operator asked for, on top of whatever the
environment says. An explicit ``null`` for a stream removes that stream's own
policy, and that removal is persisted too.

The effective values are exported as gauges, so a dashboard shows what a
bridge is running with, not what it was started with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import structlog
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from broker.durable_files import write_atomically
from broker.errors import ConfigError, InvalidInput
from broker.logs import set_level
from broker.protocol.command_specs import (
    BridgeConfigure,
    StreamPolicyChange,
    describe_validation_error,
)
from broker.settings import BridgeSettings, ShipperSettings, StreamPolicy
from edge_bridge.metrics import RuntimeConfigMetrics

__all__ = ["OVERRIDES_FILE", "RuntimeConfig"]

log = structlog.get_logger(__name__)

OVERRIDES_FILE = "runtime-config.json"
_DEFAULT_LABEL = "(default)"
"""Stream label of the default policy; cannot clash with a stream name (not a token)."""


class _HasShipperSettings(Protocol):
    settings: ShipperSettings


class RuntimeConfig:
    """The live-tunable settings of one bridge, their persisted overrides and gauges."""

    def __init__(self, directory: Path, registry: CollectorRegistry) -> None:
        self.path = Path(directory) / OVERRIDES_FILE
        self.log_level: str | None = None
        """The log level set by a command, if any (the process default otherwise)."""
        self._overrides: dict[str, Any] = {}
        self.metrics = RuntimeConfigMetrics(registry)

    # -- start-up --------------------------------------------------------------------

    def restore(self, settings: BridgeSettings, shipper: _HasShipperSettings) -> None:
        """Re-apply the persisted overrides (if any) to ``settings`` and the shipper.

        Raises:
            ConfigError: the overrides file exists but cannot be read or is invalid.
        """
        if self.path.exists():
            try:
                overrides = json.loads(self.path.read_text(encoding="utf-8"))
                change = BridgeConfigure.model_validate(overrides)
            except (OSError, ValueError) as exc:
                detail = (describe_validation_error(exc) if isinstance(exc, ValidationError)
                          else str(exc))
                raise ConfigError(f"cannot use {self.path}: {detail} (fix or remove it)"
                                  ) from exc
            self._overrides = overrides
            self._apply(settings, shipper, change)
            log.info("bridge_config_restored", path=str(self.path), overrides=overrides)
        self._export(settings)

    # -- changes -----------------------------------------------------------------------

    def change(self, settings: BridgeSettings, shipper: _HasShipperSettings, change: BridgeConfigure
               ) -> dict[str, Any]:
        """Persist ``change`` merged into the overrides, then apply it live.

        Returns:
            The effective configuration after the change.

        Raises:
            InvalidInput: the change does not combine into valid settings.
            OSError: the overrides could not be persisted (nothing changed).
        """
        merged = _merge(self._overrides, change.model_dump(exclude_unset=True, mode="json"))
        try:
            _effective(settings, change)  # validates before anything is written
        except ValidationError as exc:
            raise InvalidInput(describe_validation_error(exc)) from exc
        self._persist(merged)
        self._overrides = merged
        self._apply(settings, shipper, change)
        self.metrics.changes.inc()
        effective = self.effective(settings)
        log.info("bridge_configured", change=change.model_dump(exclude_unset=True, mode="json"),
                 effective=effective)
        return effective

    def effective(self, settings: BridgeSettings) -> dict[str, Any]:
        """What the bridge runs with now (the ``applied`` result of ``bridge.configure``)."""
        s = settings.shipper
        return {
            "batch_max_records": s.batch_max_records,
            "batch_max_bytes": s.batch_max_bytes,
            "linger_ms": s.linger_ms,
            "compression": s.compression,
            "zstd_level": s.zstd_level,
            "heartbeat_interval_s": settings.heartbeat_interval_s,
            "log_level": self.log_level,
            "default_policy": settings.default_policy.model_dump(mode="json"),
            "streams": {k: v.model_dump(mode="json") for k, v in sorted(settings.streams.items())},
        }

    def _apply(self, settings: BridgeSettings, shipper: _HasShipperSettings,
               change: BridgeConfigure) -> None:
        new_shipper, default_policy, streams, heartbeat = _effective(settings, change)
        # Assignments, not mutation of shared objects: the shipper picks the new
        # settings up on its next batch; policy_for reads these attributes each call.
        settings.shipper = new_shipper
        shipper.settings = new_shipper
        settings.default_policy = default_policy
        settings.streams = streams
        settings.heartbeat_interval_s = heartbeat
        if change.log_level is not None:
            set_level(change.log_level)
            self.log_level = change.log_level
        self._export(settings)

    def _persist(self, overrides: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(
            self.path, json.dumps(overrides, indent=2, sort_keys=True).encode() + b"\n"
        )

    def _export(self, settings: BridgeSettings) -> None:
        s = settings.shipper
        self.metrics.batch_records.set(s.batch_max_records)
        self.metrics.batch_bytes.set(s.batch_max_bytes)
        self.metrics.linger.set(s.linger_ms / 1000)
        self.metrics.compression.clear()
        self.metrics.compression.labels(s.compression).set(1)
        self.metrics.heartbeat.set(settings.heartbeat_interval_s)
        self.metrics.priority.clear()
        self.metrics.ttl.clear()
        self.metrics.overflow.clear()
        for name, policy in [(_DEFAULT_LABEL, settings.default_policy),
                             *sorted(settings.streams.items())]:
            self.metrics.priority.labels(name).set(policy.priority)
            self.metrics.ttl.labels(name).set(policy.ttl_s or 0)
            self.metrics.overflow.labels(name, policy.overflow).set(1)


def _effective(settings: BridgeSettings, change: BridgeConfigure
               ) -> tuple[ShipperSettings, StreamPolicy, dict[str, StreamPolicy], float]:
    """The settings objects ``change`` leads to (validated); nothing is modified."""
    shipper_update = {
        field: getattr(change, field)
        for field in ("batch_max_records", "batch_max_bytes", "linger_ms", "compression",
                      "zstd_level")
        if field in change.model_fields_set and getattr(change, field) is not None
    }
    shipper = ShipperSettings.model_validate({**settings.shipper.model_dump(), **shipper_update})
    default_policy = settings.default_policy
    if change.default_policy is not None:
        default_policy = change.default_policy.merged_into(default_policy)
    streams = dict(settings.streams)
    for name, policy_change in (change.streams or {}).items():
        if policy_change is None:
            streams.pop(name, None)
        else:
            streams[name] = policy_change.merged_into(streams.get(name, default_policy))
    heartbeat = change.heartbeat_interval_s or settings.heartbeat_interval_s
    return shipper, default_policy, streams, heartbeat


def _merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Accumulate two ``bridge.configure`` changes: later fields win, policies merge field
    by field, and a stream set to null stays null (its removal must persist)."""
    merged = dict(old)
    for key, value in new.items():
        if key == "streams" and value is not None:
            streams = dict(merged.get("streams") or {})
            for name, policy in value.items():
                before = streams.get(name)
                streams[name] = (policy if policy is None or before is None
                                 else _merge_policy(before, policy))
            merged["streams"] = streams
        elif key == "default_policy" and value is not None and merged.get("default_policy"):
            merged["default_policy"] = _merge_policy(merged["default_policy"], value)
        else:
            merged[key] = value
    return merged


def _merge_policy(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    combined = {**old, **new}
    StreamPolicyChange.model_validate(combined)
    return combined
