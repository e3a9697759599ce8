"""The Secrets the manifests reference are the Secrets deploy/secrets/generate.py
writes: same names, same keys, in the right namespaces; and what it writes for
NATS is edgesync's own identity scheme (nkeys, IdentityStore's auth.conf), each
Secret holding only its own identity."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from broker.identities import IdentityStore, public_key_of
from broker.protocol.topology import Topology
from tests.deploy.rendering import DEPLOY, OVERLAYS, ROOT, containers, pod_spec, render, renderer

# Not ours to generate: CloudNativePG writes the database's (its app user's DSN, its
# CA), cert-manager (or the operator, by hand) the Ingress certificate.
EXTERNAL = {"edgesync-pg-app", "edgesync-pg-ca", "edgesync-api-tls"}


def _references(docs: list[dict[str, Any]]) -> set[tuple[str, str, str | None]]:
    """(namespace, secret, key or None for a whole-Secret mount) the objects use."""
    found: set[tuple[str, str, str | None]] = set()
    for doc in docs:
        namespace = doc["metadata"].get("namespace", "")
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for volume in pod_spec(doc).get("volumes", []):
                if "secret" in volume:
                    found.add((namespace, volume["secret"]["secretName"], None))
            for container in containers(doc):
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        found.add((namespace, ref["name"], ref["key"]))
        if doc["kind"] == "Ingress":
            found |= {(namespace, t["secretName"], None) for t in doc["spec"]["tls"]}
        if doc["kind"] == "ServiceMonitor":
            for endpoint in doc["spec"]["endpoints"]:
                creds = endpoint.get("authorization", {}).get("credentials")
                if creds:
                    found.add((namespace, creds["name"], creds["key"]))
    return found


def _generate(out: Path, *edges: str) -> None:
    subprocess.run([sys.executable, str(DEPLOY / "secrets" / "generate.py"), "--out", str(out),
                    "--nats-host", "nats.example.com", *edges],
                   check=True, capture_output=True, cwd=ROOT, timeout=60)


def _secrets(directory: Path) -> dict[tuple[str, str], dict[str, str]]:
    """(namespace, name) -> {key: decoded value} of a generated kustomize directory."""
    command = renderer()
    if command is None:
        pytest.skip("neither kubectl nor kustomize is on PATH")
    done = subprocess.run([*command, str(directory)], capture_output=True, text=True,
                          check=True, timeout=60)
    found = {}
    for doc in yaml.safe_load_all(done.stdout):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
        found[doc["metadata"]["namespace"], doc["metadata"]["name"]] = {
            k: base64.b64decode(v).decode() for k, v in doc["data"].items()}
    return found


_USER = re.compile(r'# (\S+) \((\w+)\)\n\s*\{ nkey: "(U[A-Z2-7]+)", permissions: \{\n'
                   r"\s*publish: \{ allow: (\[.*?\]) \},\n\s*subscribe: \{ allow: (\[.*?\]) \}")


_SEED = re.compile(r"SU[A-Z2-7]{50,}")


def _users(auth_conf: str) -> dict[str, tuple[str, str, list[str]]]:
    """name -> (role, public key, publish allow-list) from a rendered auth.conf."""
    return {m[1]: (m[2], m[3], json.loads(m[4])) for m in _USER.finditer(auth_conf)}


def test_generated_secrets_cover_every_reference(tmp_path: Path) -> None:
    """Rendered from the generator's output for two sites, the Secrets validate and
    include every Secret and key the cloud and edge overlays use."""
    out = tmp_path / "secrets"
    _generate(out, "site-001", "site-002")
    generated: dict[tuple[str, str], set[str]] = {}
    for directory in (out / "cloud", out / "edges" / "site-001"):
        generated |= {k: set(v) for k, v in _secrets(directory).items()}
    for overlay in OVERLAYS:
        for namespace, name, key in _references(render(overlay)):
            if name in EXTERNAL:
                continue
            assert (namespace, name) in generated, (overlay, namespace, name)
            assert key is None or key in generated[namespace, name], (overlay, name, key)
    for path in out.rglob("*"):
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"


def test_nats_secrets_are_nkey_identities_each_holding_only_its_own(tmp_path: Path) -> None:
    """auth.conf is IdentityStore's (an nkey user per service and edge, no password);
    each service's and each site's Secret holds its own seed only, the admin's is in
    no Secret; the bridges and the API get no stream or consumer administration."""
    out = tmp_path / "secrets"
    _generate(out, "site-001", "site-002")
    cloud = _secrets(out / "cloud")
    auth_conf = cloud["edgesync", "edgesync-nats-auth"]["auth.conf"]
    store = IdentityStore(out / "state" / "nats-auth", Topology())
    assert auth_conf == store.auth_conf.read_text()
    assert "password" not in auth_conf.lower()
    users = _users(auth_conf)
    assert set(users) == {"ingest", "api", "admin", "edge-site-001", "edge-site-002"}
    assert {n: (u[0], u[1]) for n, u in users.items()} == {
        i.name: (i.role, i.public_key) for i in store.identities().values()}
    seeds = {public_key_of(d["nats.nk"].encode()): name
             for (_, name), d in cloud.items() if "nats.nk" in d}
    assert seeds == {users["ingest"][1]: "edgesync-ingest-nats",
                     users["api"][1]: "edgesync-api-nats"}
    ca = (out / "state" / "tls" / "ca.pem").read_text()
    for site in ("site-001", "site-002"):
        edge = _secrets(out / "edges" / site)
        assert {ns for ns, _ in edge} == {"edgesync-edge"}
        nats = edge["edgesync-edge", "edgesync-edge-nats"]
        assert set(nats) == {"nats.nk", "ca.crt", "url"}
        assert public_key_of(nats["nats.nk"].encode()) == users[f"edge-{site}"][1]
        assert nats["ca.crt"] == ca and nats["url"] == "tls://nats.example.com:4222"
        every_value = "".join(v for d in edge.values() for v in d.values())
        assert len(_SEED.findall(every_value)) == 1, "one seed, its own"
    admin_seed = store.credentials_file("admin").read_text().strip()
    for path in (out / "cloud").rglob("*"):
        assert not path.is_file() or admin_seed not in path.read_text(), path
    stream_admin = re.compile(r"^\$JS\.API\.(STREAM\.(CREATE|UPDATE|DELETE|PURGE)|"
                              r"CONSUMER\.(DURABLE\.)?CREATE|\>)")
    for name, (role, _, publish) in users.items():
        if role in ("edge", "api"):
            assert not [s for s in publish if stream_admin.match(s) or s == "$JS.API.>"], name


def test_revoking_an_edge_removes_it_from_the_next_generation(tmp_path: Path) -> None:
    """`edgesync edges revoke` on the generator's state, then the generator again:
    the site's directory is gone and auth.conf no longer names its key."""
    out = tmp_path / "secrets"
    _generate(out, "site-001", "site-002")
    revoked = subprocess.run([sys.executable, "-m", "broker", "edges", "revoke", "site-002",
                              "--state-dir", str(out / "state")],
                             check=False, capture_output=True, text=True, cwd=ROOT,
                             timeout=60)
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    _generate(out)  # no ids: every registered edge is kept
    assert sorted(p.name for p in (out / "edges").iterdir()) == ["site-001"]
    users = _users(_secrets(out / "cloud")["edgesync", "edgesync-nats-auth"]["auth.conf"])
    assert set(users) == {"ingest", "api", "admin", "edge-site-001"}
