"""Every overlay in ``deploy/`` renders, passes strict schema validation, and runs
restricted: the checks an operator would otherwise learn from a failed rollout."""

from __future__ import annotations

import json
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from broker.protocol.commands import generate_key_pair
from broker.settings import (
    ApiSettings,
    BridgeSettings,
    ControlSettings,
    IngestSettings,
    NatsSettings,
)
from tests.deploy.rendering import (
    CRD_KINDS,
    OVERLAYS,
    ROOT,
    containers,
    pod_spec,
    render,
    workloads,
)

# The Kubernetes release the manifests are validated against: the newest the
# installed kubernetes-validate knows (pyproject pins a floor).
KUBERNETES_VERSION = kubernetes_validate.latest_version()
EDGESYNC_IMAGE = "registry.example.com/edgesync"
# Pods that need the API token: the control applier, and nothing else.
TOKEN_PODS = {"edgesync-bridge"}


def _all() -> list[tuple[str, dict[str, Any]]]:
    return [(o, d) for o in OVERLAYS for d in render(o)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_and_passes_strict_validation(overlay: str) -> None:
    """Each object validates strictly (unknown fields fail) against the current
    Kubernetes schema; only the listed custom resources are skipped."""
    docs = render(overlay)
    assert docs
    skipped = set()
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_KINDS:
            skipped.add(key)
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            name = doc["metadata"]["name"]
            pytest.fail(f"{overlay}: {doc['kind']}/{name}: {exc.message} at "
                        f"{'.'.join(str(p) for p in exc.path)}")
    assert skipped <= CRD_KINDS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_passes_pod_security_restricted(overlay: str) -> None:
    """runAsNonRoot, no privilege escalation, ALL capabilities dropped, RuntimeDefault
    seccomp and a read-only root filesystem on every container; the API token is
    mounted only where the applier needs it."""
    for workload in workloads(render(overlay)):
        name = workload["metadata"]["name"]
        pod = pod_spec(workload)
        pod_ctx = pod.get("securityContext", {})
        assert pod_ctx.get("runAsNonRoot") is True, name
        assert pod_ctx.get("seccompProfile") == {"type": "RuntimeDefault"}, name
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), name
        assert all("hostPath" not in v for v in pod.get("volumes", [])), name
        assert pod.get("automountServiceAccountToken") is (name in TOKEN_PODS), name
        for container in containers(workload):
            where = f"{name}/{container['name']}"
            ctx = container.get("securityContext", {})
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert ctx.get("readOnlyRootFilesystem") is True, where
            assert ctx.get("runAsNonRoot") is True, where
            assert ctx.get("capabilities") == {"drop": ["ALL"]}, where
            assert ctx.get("seccompProfile") == {"type": "RuntimeDefault"}, where
            assert ctx.get("privileged") is not True, where
            assert container.get("resources", {}).get("requests"), f"{where}: no requests"
            assert container.get("imagePullPolicy") == "IfNotPresent", where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_namespace_enforces_restricted_and_denies_by_default(overlay: str) -> None:
    """Each namespace the overlay creates enforces PSA restricted, and each namespace
    it runs pods in has a default-deny NetworkPolicy for both directions."""
    docs = render(overlay)
    created = [d for d in docs if d["kind"] == "Namespace"]
    assert created
    for ns in created:
        labels = ns["metadata"].get("labels", {})
        assert labels.get("pod-security.kubernetes.io/enforce") == "restricted", ns
    for workload in workloads(docs):
        namespace = workload["metadata"]["namespace"]
        assert namespace in {n["metadata"]["name"] for n in created}
        denies = [d for d in docs if d["kind"] == "NetworkPolicy"
                  and d["metadata"]["namespace"] == namespace
                  and d["spec"]["podSelector"] == {}
                  and set(d["spec"]["policyTypes"]) == {"Ingress", "Egress"}
                  and not d["spec"].get("ingress") and not d["spec"].get("egress")]
        assert denies, f"no default deny in {namespace}"


def test_the_image_tag_is_the_package_version() -> None:
    """Every edgesync container runs the versioned image (never :latest), so an
    upgrade is a tag change and an offline site restarts from its local copy."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for overlay, doc in _all():
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for container in containers(doc):
            if container["image"].startswith(("edgesync", EDGESYNC_IMAGE)):
                assert container["image"] == f"{EDGESYNC_IMAGE}:{version}", (
                    overlay, container["image"])


def _apps(tmp: Path) -> dict[str, Starlette]:
    """The HTTP apps the three services really serve, built without starting them
    (FastAPI applications are Starlette's; the bridge's is Starlette's alone)."""
    from cloud_ingest.api import Api
    from cloud_ingest.api import create_app as api_app
    from cloud_ingest.service import Ingest
    from edge_bridge.bridge import Bridge
    from edge_bridge.ingress import create_app as bridge_app

    _, public = generate_key_pair(tmp / "keys")
    bridge = Bridge(BridgeSettings(buffer_dir=tmp / "buffer",
                                   control=ControlSettings(public_key_file=public)),
                    NatsSettings())
    return {
        "bridge": bridge_app(bridge),
        "ingest": Ingest(IngestSettings(), NatsSettings()).health_app(),
        "api": api_app(Api(ApiSettings(), NatsSettings())),
    }


def test_probe_paths_and_ports_are_served_by_the_services() -> None:
    """Every probe of an edgesync container asks a route its service serves (GET),
    on a named port that is the port the service is configured to listen on."""
    with tempfile.TemporaryDirectory() as tmp:
        apps = _apps(Path(tmp))
    routes = {service: {r.path for r in app.routes
                        if isinstance(r, Route) and r.methods and "GET" in r.methods}
              for service, app in apps.items()}
    checked = 0
    for overlay, doc in _all():
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for container in containers(doc):
            if not container["image"].startswith(EDGESYNC_IMAGE):
                continue
            service = container["args"][0]
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                assert probe is not None, f"{overlay}: {service} has no {kind}"
                get = probe["httpGet"]
                assert get["path"] in routes[service], (overlay, service, kind, get["path"])
                port = ports[get["port"]]
                assert env[f"EDGESYNC_{service.upper()}__PORT"] == str(port)
                checked += 1
    assert checked >= 3 * 3


def test_monitors_scrape_ports_their_pods_expose() -> None:
    """A PodMonitor's or ServiceMonitor's port is a named port of what it selects."""
    for overlay in OVERLAYS:
        docs = render(overlay)
        for mon in (d for d in docs if d["kind"] in ("PodMonitor", "ServiceMonitor")):
            selector = mon["spec"]["selector"]["matchLabels"]
            if mon["kind"] == "PodMonitor":
                if "cnpg.io/cluster" in selector:   # the operator's pods: port "metrics"
                    continue
                pods = [w for w in workloads(docs) if selector.items()
                        <= w["spec"]["template"]["metadata"]["labels"].items()]
                names = {p["name"] for w in pods for c in containers(w)
                         for p in c.get("ports", [])}
                wanted = {e["port"] for e in mon["spec"]["podMetricsEndpoints"]}
            else:
                services = [s for s in docs if s["kind"] == "Service"
                            and selector.items() <= s["metadata"].get("labels", {}).items()]
                names = {p["name"] for s in services for p in s["spec"]["ports"]}
                wanted = {e["port"] for e in mon["spec"]["endpoints"]}
            assert names, f"{overlay}: {mon['metadata']['name']} selects nothing"
            assert wanted <= names, (overlay, mon["metadata"]["name"], wanted, names)


@pytest.mark.parametrize("overlay", ["edge-k3s", "edge-k3s-site-002"])
def test_the_applier_has_a_role_in_exactly_its_allowed_namespaces(overlay: str) -> None:
    """The bridge's namespace allow-list and the namespaces holding the applier's
    Role and RoleBinding are the same set, the binding names the bridge's account."""
    docs = render(overlay)
    (bridge,) = [d for d in docs if d["kind"] == "StatefulSet"]
    env = {e["name"]: e.get("value") for e in containers(bridge)[0]["env"]}
    allowed = set(json.loads(env["EDGESYNC_BRIDGE__CONTROL__ALLOWED_NAMESPACES"]))
    roles = {d["metadata"]["namespace"] for d in docs if d["kind"] == "Role"}
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert allowed and roles == allowed == {b["metadata"]["namespace"] for b in bindings}
    account = pod_spec(bridge)["serviceAccountName"]
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account,
                                        "namespace": bridge["metadata"]["namespace"]}]
        assert binding["roleRef"]["name"] in {r["metadata"]["name"] for r in docs
                                              if r["kind"] == "Role"}
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_the_second_site_differs_only_where_a_site_does() -> None:
    """site-002 is site-001 with its own edge id, allow-list, storage and one more
    Role; everything else renders identically."""
    one = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
           for d in render("edge-k3s")}
    two = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
           for d in render("edge-k3s-site-002")}
    assert set(two) - set(one) == {("Role", "lab", "edgesync-applier"),
                                   ("RoleBinding", "lab", "edgesync-applier")}
    changed = {k for k in one if one[k] != two[k]}
    assert changed == {("StatefulSet", "edgesync-edge", "edgesync-bridge")}
    bridge = two["StatefulSet", "edgesync-edge", "edgesync-bridge"]
    env = {e["name"]: e.get("value") for e in containers(bridge)[0]["env"]}
    assert env["EDGESYNC_BRIDGE__EDGE_ID"] == "site-002"
    assert bridge["spec"]["template"]["metadata"]["labels"]["edgesync.io/edge-id"] == "site-002"
    BridgeSettings(edge_id=env["EDGESYNC_BRIDGE__EDGE_ID"])  # a valid edge id


def test_the_cloud_services_verify_postgresqls_certificate() -> None:
    """The ingest and the API talk to PostgreSQL over TLS with its certificate checked
    against CloudNativePG's CA (PGSSLMODE=verify-full, which asyncpg reads when the DSN
    says nothing of TLS), and see that CA's certificate only, never its key."""
    for doc in render("cloud"):
        if doc["kind"] != "Deployment" or doc["metadata"]["name"] not in (
                "edgesync-ingest", "edgesync-api"):
            continue
        (container,) = containers(doc)
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["PGSSLMODE"] == "verify-full", doc["metadata"]["name"]
        root = Path(env["PGSSLROOTCERT"])
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(root.parent))
        volume = next(v for v in pod_spec(doc)["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == "edgesync-pg-ca"
        assert [i["key"] for i in volume["secret"]["items"]] == ["ca.crt"]
        assert volume["secret"]["items"][0]["path"] == root.name
