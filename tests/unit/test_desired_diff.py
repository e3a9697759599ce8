"""Desired-state documents: validated by the command specs, merged with per-edge
overrides as JSON merge patches, compared field by field, and turned into only the
commands that remove the drift."""

from __future__ import annotations

from typing import Any

import pytest

from broker.errors import InvalidInput
from broker.protocol.desired import (
    DesiredStateSpec,
    compare,
    merge_documents,
    parse_document,
)
from edge_bridge.desired_state import changes_for
from edge_bridge.observing import deployment_fields, deployment_health

DOC: dict[str, Any] = {
    "bridge": {"compression": "zstd", "streams": {"telemetry": {"ttl_s": 86400.0}}},
    "deployments": {"prod/web": {"replicas": 3, "containers": {"app": {
        "image": "registry.local/web:1.8", "env": {"MODE": "fast", "DEBUG": None,
                                                   "TOKEN": {"valueFrom": {"secretKeyRef": {
                                                       "name": "web", "key": "token"}}}}}}}},
    "configmaps": {"prod/settings": {"color": "green", "legacy": None}},
}


def deployment(replicas: int = 2, image: str = "registry.local/web:1.0",
               env: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "web", "generation": 4},
            "spec": {"replicas": replicas, "template": {"spec": {"containers": [
                {"name": "app", "image": image, "env": env or [
                    {"name": "MODE", "value": "normal"}, {"name": "DEBUG", "value": "0"}]}]}}},
            "status": {"observedGeneration": 4, "replicas": replicas,
                       "updatedReplicas": replicas, "availableReplicas": replicas}}


def observed(dep: dict[str, Any] | None, data: dict[str, str] | None,
             bridge: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"bridge": bridge or {"compression": "none", "streams": {}},
            "deployments": {"prod/web": deployment_fields(dep)},
            "configmaps": {"prod/settings": data}}


def test_every_field_that_differs_is_drift_with_both_values() -> None:
    doc = parse_document(DOC)
    drift = {d.path: (d.desired, d.observed) for d in compare(
        doc, observed(deployment(), {"color": "blue", "legacy": "yes"}))}
    assert drift == {
        "bridge.compression": ("zstd", "none"),
        "bridge.streams.telemetry.ttl_s": (86400.0, None),
        "deployments.prod/web.replicas": (3, 2),
        "deployments.prod/web.containers.app.image": ("registry.local/web:1.8",
                                                      "registry.local/web:1.0"),
        "deployments.prod/web.containers.app.env.MODE": ("fast", "normal"),
        "deployments.prod/web.containers.app.env.DEBUG": (None, "0"),
        "deployments.prod/web.containers.app.env.TOKEN": (
            {"valueFrom": {"secretKeyRef": {"name": "web", "key": "token"}}}, None),
        "configmaps.prod/settings.data.color": ("green", "blue"),
        "configmaps.prod/settings.data.legacy": (None, "yes"),
    }


def test_matching_state_has_no_drift_and_unmanaged_fields_are_ignored() -> None:
    doc = parse_document({"deployments": {"prod/web": {"replicas": 2}},
                          "configmaps": {"prod/settings": {"color": "blue"}}})
    assert compare(doc, observed(deployment(image="anything:9"),
                                 {"color": "blue", "other": "x"})) == []


def test_only_the_drifting_fields_become_commands() -> None:
    doc = parse_document(DOC)
    current = deployment(replicas=3, image="registry.local/web:1.8",
                         env=[{"name": "MODE", "value": "fast"}])
    drift = compare(doc, observed(current, {"color": "blue"},
                                  {"compression": "zstd", "streams": {"telemetry": {
                                      "ttl_s": 86400.0}}}))
    commands, problems = changes_for(doc, drift)
    assert problems == []
    assert commands == [
        ("configmap.patch", {"namespace": "prod", "name": "settings",
                             "data": {"color": "green"}}),
        ("deployment.set_env", {"namespace": "prod", "name": "web", "container": "app",
                                "env": {"TOKEN": {"valueFrom": {"secretKeyRef": {
                                    "name": "web", "key": "token"}}}}}),
    ]


def test_a_missing_object_is_a_problem_not_a_command() -> None:
    doc = parse_document({"deployments": {"prod/web": {"replicas": 1}}})
    commands, problems = changes_for(doc, compare(doc, observed(None, {})))
    assert commands == []
    assert problems == ["deployment prod/web does not exist"]


@pytest.mark.parametrize(("doc", "message"), [
    ({"deployments": {"web": {"replicas": 1}}}, "'web' is not 'namespace/name'"),
    ({"deployments": {"prod/web": {"replicas": "3"}}}, "replicas"),
    ({"deployments": {"prod/web": {"replicas": 100_001}}}, "replicas"),
    ({"deployments": {"Prod/web": {"replicas": 1}}}, "namespace"),
    ({"configmaps": {"prod/x": {"bad key!": "v"}}}, "bad key!"),
    ({"bridge": {"batch_max_records": 0}}, "batch_max_records"),
    ({"deployment": {}}, "deployment"),
    ({"deployments": {"prod/web": {"restarted_at": "yesterday"}}}, "restarted_at"),
])
def test_an_invalid_document_is_refused_naming_the_field(doc: dict[str, Any],
                                                         message: str) -> None:
    with pytest.raises(InvalidInput, match="document") as info:
        parse_document(doc)
    assert message in str(info.value)


def test_an_override_changes_one_field_and_null_removes_one() -> None:
    merged = merge_documents(DOC, {"deployments": {"prod/web": {"replicas": 5}},
                                   "configmaps": None})
    assert merged["deployments"]["prod/web"]["replicas"] == 5
    assert merged["deployments"]["prod/web"]["containers"] == DOC["deployments"]["prod/web"][
        "containers"]
    assert "configmaps" not in merged
    assert DOC["deployments"]["prod/web"]["replicas"] == 3  # the base is not modified


def test_the_signed_spec_refuses_an_invalid_document() -> None:
    with pytest.raises(InvalidInput):
        DesiredStateSpec.model_validate({"revision": 1, "version_id": 1, "document": {
            "deployments": {"prod/web": {"replicas": -1}}}})


@pytest.mark.parametrize(("patch", "why"), [
    ({}, None),
    ({"status": {"observedGeneration": 3}}, "the controller has not yet seen the newest spec"),
    ({"status": {"observedGeneration": 4, "updatedReplicas": 1, "replicas": 2,
                 "availableReplicas": 2}}, "1 of 2 replicas updated"),
    ({"status": {"observedGeneration": 4, "updatedReplicas": 2, "replicas": 3,
                 "availableReplicas": 2}}, "1 old replicas pending termination"),
    ({"status": {"observedGeneration": 4, "updatedReplicas": 2, "replicas": 2,
                 "availableReplicas": 0}}, "0 of 2 updated replicas available"),
])
def test_a_deployment_is_healthy_when_its_rollout_completed(patch: dict[str, Any],
                                                            why: str | None) -> None:
    assert deployment_health({**deployment(), **patch}) == why
