"""The manifests set only settings that exist, and carry no NATS password.

pydantic-settings ignores an unknown ``EDGESYNC_*`` variable (``extra="ignore"``),
so a misspelt or guessed name in a manifest is a setting silently left at its
default (a bridge without credentials, TLS off). The valid names are derived
from :class:`broker.settings.Settings` itself, not from a list kept by hand.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from broker.settings import Settings
from tests.deploy.rendering import DEPLOY, OVERLAYS, containers, render, workloads

_PREFIX = str(Settings.model_config.get("env_prefix", ""))
_DELIMITER = str(Settings.model_config.get("env_nested_delimiter", ""))


def _models(annotation: Any) -> Iterator[type[BaseModel]]:
    """The pydantic models an annotation can hold (``X``, ``X | None``...)."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            yield candidate


def _is_mapping(annotation: Any) -> bool:
    """A dict field: nested variables below it are keys, not field names."""
    for candidate in (annotation, *typing.get_args(annotation)):
        origin = typing.get_origin(candidate) or candidate
        if origin is dict or (isinstance(origin, type) and issubclass(origin, dict)):
            return True
    return False


def settings_env_names(model: type[BaseModel] = Settings, prefix: str = _PREFIX
                       ) -> tuple[set[str], set[str]]:
    """(every settable variable name, the names of dict fields whose keys nest below)."""
    names: set[str] = set()
    mappings: set[str] = set()
    for field, info in model.model_fields.items():
        name = f"{prefix}{field.upper()}"
        names.add(name)  # a nested model can also be set whole, as JSON
        if _is_mapping(info.annotation):
            mappings.add(name)
        for nested in _models(info.annotation):
            inner, inner_maps = settings_env_names(nested, name + _DELIMITER)
            names |= inner
            mappings |= inner_maps
    return names, mappings


def _is_valid(name: str, names: set[str], mappings: set[str]) -> bool:
    return name in names or any(name.startswith(m + _DELIMITER) for m in mappings)


def _env_names(docs: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    for workload in workloads(docs):
        for container in containers(workload):
            for env in container.get("env", []):
                yield f"{workload['kind']}/{workload['metadata']['name']}", env["name"]


def test_the_settings_walk_finds_nested_and_mapping_fields() -> None:
    """(The derivation this module relies on.)"""
    names, mappings = settings_env_names()
    assert {"EDGESYNC_NATS__URL", "EDGESYNC_NATS__CREDENTIALS_FILE", "EDGESYNC_NATS__CA_FILE",
            "EDGESYNC_BRIDGE__EDGE_ID", "EDGESYNC_BRIDGE__CONTROL__ALLOWED_NAMESPACES",
            "EDGESYNC_INGEST__POSTGRES_DSN"} <= names
    assert "EDGESYNC_NATS__TLS_CA_FILE" not in names
    assert "EDGESYNC_NATS__CREDS_FILE" not in names
    assert not _is_valid("EDGESYNC_NATS__CREDS_FILE", names, mappings)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_edgesync_env_in_the_manifests_is_a_settings_field(overlay: str) -> None:
    """Every ``EDGESYNC_*`` variable of every container is one ``Settings`` reads."""
    names, mappings = settings_env_names()
    seen = [(where, name) for where, name in _env_names(render(overlay))
            if name.startswith(_PREFIX)]
    assert seen, overlay
    unknown = sorted({(w, n) for w, n in seen if not _is_valid(n, names, mappings)})
    assert not unknown, f"{overlay}: not settings fields: {unknown}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_nats_client_has_its_own_identity_and_tls(overlay: str) -> None:
    """Each edgesync container that talks to NATS names a credentials file and a CA
    on a mounted path, and a tls:// URL (or one from its Secret)."""
    for workload in workloads(render(overlay)):
        for container in containers(workload):
            env = {e["name"]: e for e in container.get("env", [])}
            if not any(n.startswith(_PREFIX) for n in env):
                continue
            where = f"{overlay}: {workload['metadata']['name']}/{container['name']}"
            for name in ("EDGESYNC_NATS__URL", "EDGESYNC_NATS__CREDENTIALS_FILE",
                         "EDGESYNC_NATS__CA_FILE"):
                assert name in env, f"{where} lacks {name}"
            url = env["EDGESYNC_NATS__URL"]
            assert "valueFrom" in url or url["value"].startswith("tls://"), where
            mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
            for name in ("EDGESYNC_NATS__CREDENTIALS_FILE", "EDGESYNC_NATS__CA_FILE"):
                path = env[name]["value"]
                assert any(path.startswith(m.rstrip("/") + "/") for m in mounts), (where, path)


# user:password@ in a URL, or a password field in YAML / nats-server configuration.
_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s@:]+:[^/\s@]+@|\bpass(?:word)?\s*[:=]",
                       re.IGNORECASE)


def test_no_nats_password_anywhere_in_deploy() -> None:
    """Neither the sources under deploy/ nor any rendered overlay carry a password:
    NATS identities are nkeys (the server holds public keys only)."""
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        text = path.read_text(errors="replace")
        assert not _PASSWORD.search(text), f"{path.relative_to(DEPLOY)}: {_PASSWORD.search(text)}"
    for overlay in OVERLAYS:
        rendered = yaml.safe_dump_all(render(overlay))
        assert not _PASSWORD.search(rendered), (overlay, _PASSWORD.search(rendered))
