"""Command specs, the precise Kubernetes patches built from them, and bridge.configure's
merge/persist logic - all without a server."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
from prometheus_client import CollectorRegistry

from broker.errors import ApplyFailed, ConfigError, InvalidInput
from broker.protocol.command_specs import BridgeConfigure, DeploymentSetEnv, parse_spec
from broker.settings import BridgeSettings, ShipperSettings, StreamPolicy
from edge_bridge.applying import set_env_patch, set_image_patch
from edge_bridge.configuring import OVERRIDES_FILE, RuntimeConfig


def test_each_kind_has_a_spec_model_and_bad_specs_name_the_field() -> None:
    assert parse_spec("deployment.scale", {"namespace": "a", "name": "b", "replicas": 2})
    with pytest.raises(InvalidInput, match=r"spec\.replicas: Input should be greater"):
        parse_spec("deployment.scale", {"namespace": "a", "name": "b", "replicas": -2})
    with pytest.raises(InvalidInput, match=r"spec\.namespace: String should match"):
        parse_spec("deployment.restart", {"namespace": "Not_A_Label", "name": "b"})
    with pytest.raises(InvalidInput, match=r"spec\.extra: Extra inputs are not permitted"):
        parse_spec("deployment.restart", {"namespace": "a", "name": "b", "extra": 1})
    with pytest.raises(InvalidInput, match=r"unknown command kind 'deployment\.delete'"):
        parse_spec("deployment.delete", {})
    with pytest.raises(InvalidInput, match="at least one setting"):
        parse_spec("bridge.configure", {})


DEPLOYMENT: dict[str, Any] = {
    "metadata": {"name": "web", "namespace": "prod", "resourceVersion": "42"},
    "spec": {"replicas": 2, "template": {"spec": {"containers": [
        {"name": "app", "image": "app:1", "env": [
            {"name": "A", "value": "1"}, {"name": "B", "value": "2"},
            {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            {"name": "C", "value": "3"}]},
        {"name": "sidecar", "image": "proxy:7"},
    ]}}},
}


def patched(ops: list[dict[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = jsonpatch.apply_patch(copy.deepcopy(DEPLOYMENT), ops)
    return result


def env_of(deployment: dict[str, Any], index: int = 0) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"][index].get(
        "env", [])
    return env


def test_set_env_changes_only_the_named_variables_and_keeps_order_and_image() -> None:
    ops, summary = set_env_patch(DEPLOYMENT, "app", {"B": "two", "A": None, "D": "4"})
    out = patched(ops)
    assert env_of(out) == [
        {"name": "B", "value": "two"},
        {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        {"name": "C", "value": "3"},
        {"name": "D", "value": "4"},
    ]
    assert out["spec"]["template"]["spec"]["containers"][0]["image"] == "app:1"
    assert out["spec"]["template"]["spec"]["containers"][1] == {"name": "sidecar",
                                                               "image": "proxy:7"}
    assert ops[0] == {"op": "add", "path": "/metadata/resourceVersion", "value": "42"}
    assert summary == {"containers": ["app"], "set": ["B", "D"], "removed": ["A"],
                       "changed": True}


def test_set_env_without_a_container_applies_to_every_container() -> None:
    """As `kubectl set env`: a container without env gets the list created."""
    ops, summary = set_env_patch(DEPLOYMENT, None, {"LOG": "debug"})
    out = patched(ops)
    assert env_of(out, 0)[-1] == {"name": "LOG", "value": "debug"}
    assert env_of(out, 1) == [{"name": "LOG", "value": "debug"}]
    assert summary["containers"] == ["app", "sidecar"]


def test_set_env_replaces_a_value_from_and_collapses_duplicates() -> None:
    deployment = copy.deepcopy(DEPLOYMENT)
    env_of(deployment).append({"name": "A", "value": "dup"})
    ops, _ = set_env_patch(deployment, "app", {"A": "x", "S": "plain"})
    out: dict[str, Any] = jsonpatch.apply_patch(deployment, ops)
    assert [e for e in env_of(out) if e["name"] == "A"] == [{"name": "A", "value": "x"}]
    assert {"name": "S", "value": "plain"} in env_of(out)


def test_set_env_that_changes_nothing_makes_no_patch() -> None:
    ops, summary = set_env_patch(DEPLOYMENT, "app", {"A": "1", "ZZ": None})
    assert ops == []
    assert summary["changed"] is False


def test_set_env_on_a_missing_container_fails_listing_the_containers() -> None:
    with pytest.raises(ApplyFailed, match=r"container 'nope' not found \(containers: app, "
                                          r"sidecar\)"):
        set_env_patch(DEPLOYMENT, "nope", {"A": "1"})


def test_set_image_touches_one_container_image_only() -> None:
    ops, summary = set_image_patch(DEPLOYMENT, "sidecar", "proxy:8")
    out = patched(ops)
    assert out["spec"]["template"]["spec"]["containers"][1]["image"] == "proxy:8"
    assert env_of(out) == env_of(DEPLOYMENT)
    assert summary["previous_image"] == "proxy:7"
    assert set_image_patch(DEPLOYMENT, "app", "app:1")[0] == []


def test_env_spec_null_means_remove() -> None:
    spec = DeploymentSetEnv.model_validate({"namespace": "a", "name": "b", "env": {"X": None}})
    assert spec.env == {"X": None}


# -- bridge.configure ---------------------------------------------------------------------


class FakeShipper:
    def __init__(self, settings: ShipperSettings) -> None:
        self.settings = settings


def configure(config: RuntimeConfig, settings: BridgeSettings, shipper: FakeShipper,
              **change: Any) -> dict[str, Any]:
    return config.change(settings, shipper, BridgeConfigure.model_validate(change))


def test_configure_changes_live_objects_and_persists_the_merged_overrides(
        tmp_path: Path) -> None:
    settings = BridgeSettings(buffer_dir=tmp_path, streams={"audit": StreamPolicy(priority=9)})
    shipper = FakeShipper(settings.shipper)
    config = RuntimeConfig(tmp_path, CollectorRegistry())
    config.restore(settings, shipper)
    configure(config, settings, shipper, batch_max_records=10, streams={"alarms": {"priority": 5}})
    effective = configure(config, settings, shipper, linger_ms=7,
                          streams={"alarms": {"overflow": "drop_oldest"}, "audit": None})
    assert shipper.settings.batch_max_records == 10 and shipper.settings.linger_ms == 7
    assert settings.policy_for("alarms") == StreamPolicy(priority=5, overflow="drop_oldest")
    assert settings.policy_for("audit") == settings.default_policy
    assert effective["streams"] == {"alarms": {"overflow": "drop_oldest", "priority": 5,
                                               "ttl_s": None}}
    assert json.loads((tmp_path / OVERRIDES_FILE).read_text()) == {
        "batch_max_records": 10, "linger_ms": 7.0,
        "streams": {"alarms": {"priority": 5, "overflow": "drop_oldest"}, "audit": None},
    }
    # A restart: fresh settings from the environment, the overrides re-applied on top.
    again = BridgeSettings(buffer_dir=tmp_path, streams={"audit": StreamPolicy(priority=9)})
    shipper2 = FakeShipper(again.shipper)
    RuntimeConfig(tmp_path, CollectorRegistry()).restore(again, shipper2)
    assert shipper2.settings.batch_max_records == 10
    assert again.policy_for("alarms").overflow == "drop_oldest"
    assert "audit" not in again.streams


def test_a_corrupt_overrides_file_stops_start_up_naming_it(tmp_path: Path) -> None:
    (tmp_path / OVERRIDES_FILE).write_text('{"batch_max_records": -5}')
    settings = BridgeSettings(buffer_dir=tmp_path)
    with pytest.raises(ConfigError, match=OVERRIDES_FILE):
        RuntimeConfig(tmp_path, CollectorRegistry()).restore(settings,
                                                              FakeShipper(settings.shipper))
