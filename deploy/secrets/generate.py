"""Write the Secrets deploy/ needs, as kustomize directories to `kubectl apply -k`.

    python deploy/secrets/generate.py --nats-host nats.example.com site-001 site-002

writes, under --out (default .edgesync/deploy-secrets, git-ignored):

    cloud/            namespace edgesync
      edgesync-command-signing   command-signing.key   the API signs commands with it
      edgesync-operator          operator-token        the API's operator bearer token
      edgesync-metrics-token     token                 Prometheus' token for the API's /metrics
      edgesync-nats-tls          tls.crt tls.key ca.crt   NATS server + route certificate
      edgesync-nats-auth         auth.conf             NATS users (cloud services, every edge)
      edgesync-ingest-nats       url ca.crt            the ingest's NATS identity
      edgesync-api-nats          url ca.crt            the API's NATS identity
    edges/<edge-id>/  namespace edgesync-edge, one per site
      edgesync-command-public-key  command-signing.pub the bridge verifies commands with it
      edgesync-edge-nats           url ca.crt          the edge's own NATS identity

Run it again with more edge ids to add sites: what exists (CA, keys, passwords,
in state/) is kept, so running sites are not disturbed; apply cloud/ again so
NATS learns the new users (the reloader picks the Secret up without a restart).

PROVISIONAL (until issue 11 lands `edgesync edges add`): identities are NATS
users with random passwords carried in the `url`, and auth.conf grants no
per-subject permissions yet; issue 11's generator replaces auth.conf and the
client credentials with per-edge least-privilege ones (deploy/components/nats-client).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import secrets
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.protocol.commands import generate_key_pair
from broker.protocol.tokens import validate_token

CLOUD_NS, EDGE_NS = "edgesync", "edgesync-edge"
_TEN_YEARS = datetime.timedelta(days=3650)
_TWO_YEARS = datetime.timedelta(days=730)


def _write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _ca(state: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = state / "ca.key", state / "ca.crt"
    if key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgesync NATS CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + _TEN_YEARS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(key_path, _pem_key(key))
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _server_cert(state: Path, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate,
                 hosts: list[str]) -> tuple[bytes, bytes]:
    """The NATS certificate: clients (server auth) and routes (mutual, client auth)."""
    key_path, cert_path = state / "nats.key", state / "nats.crt"
    if key_path.exists():
        return cert_path.read_bytes(), key_path.read_bytes()
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + _TWO_YEARS)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(key_path, _pem_key(key))
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path.read_bytes(), key_path.read_bytes()


def _kustomization(directory: Path, namespace: str, secrets_: dict[str, dict[str, str]]
                   ) -> None:
    """A kustomization of Secrets from files in ``directory`` (fixed names: the
    workloads reference them by name; restart them after a rotation)."""
    lines = ["# Generated by deploy/secrets/generate.py: do not commit.",
             "apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization",
             f"namespace: {namespace}", "generatorOptions:", "  disableNameSuffixHash: true",
             "  labels: {app.kubernetes.io/part-of: edgesync}", "secretGenerator:"]
    for name, files in secrets_.items():
        lines.append(f"  - name: {name}")
        lines.append("    files:")
        for key, value in files.items():
            path = directory / name / key
            _write(path, value)
            lines.append(f"      - {key}={name}/{key}")
    _write(directory / "kustomization.yaml", "\n".join(lines) + "\n")


def generate(out: Path, *, nats_host: str, edges: list[str]) -> None:
    state = out / "state"
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    out.chmod(0o700)
    users_path = state / "nats-users.json"
    users: dict[str, str] = json.loads(users_path.read_text()) if users_path.exists() else {}
    for user in ["ingest", "api", *(f"edge-{e}" for e in edges)]:
        users.setdefault(user, secrets.token_urlsafe(32))
    _write(users_path, json.dumps(users, indent=2, sort_keys=True))
    tokens_path = state / "tokens.json"
    tokens = json.loads(tokens_path.read_text()) if tokens_path.exists() else {}
    tokens.setdefault("operator", secrets.token_urlsafe(32))
    tokens.setdefault("metrics", secrets.token_urlsafe(32))
    _write(tokens_path, json.dumps(tokens, indent=2))
    if not (state / "command-signing.key").exists():
        generate_key_pair(state, "command-signing")

    ca_key, ca = _ca(state)
    ca_pem = ca.public_bytes(serialization.Encoding.PEM).decode()
    internal = [f"edgesync-nats.{CLOUD_NS}.svc", "edgesync-nats", f"edgesync-nats.{CLOUD_NS}",
                f"*.edgesync-nats-headless.{CLOUD_NS}.svc",
                f"*.edgesync-nats-headless.{CLOUD_NS}.svc.cluster.local"]
    cert, key = _server_cert(state, ca_key, ca, [nats_host, *internal])
    auth = ["# PROVISIONAL: users without subject permissions until issue 11's",
            "# `edgesync edges add` writes per-edge least-privilege authorisation.",
            "authorization {", "  users = ["]
    auth += [f'    {{user: "{u}", password: "{p}"}}' for u, p in sorted(users.items())]
    auth += ["  ]", "}"]
    internal_url = f"edgesync-nats.{CLOUD_NS}.svc:4222"
    _kustomization(out / "cloud", CLOUD_NS, {
        "edgesync-command-signing": {
            "command-signing.key": (state / "command-signing.key").read_text()},
        "edgesync-operator": {"operator-token": tokens["operator"]},
        "edgesync-metrics-token": {"token": tokens["metrics"]},
        "edgesync-nats-tls": {"tls.crt": cert.decode(), "tls.key": key.decode(),
                              "ca.crt": ca_pem},
        "edgesync-nats-auth": {"auth.conf": "\n".join(auth) + "\n"},
        "edgesync-ingest-nats": {"url": f"tls://ingest:{users['ingest']}@{internal_url}",
                                 "ca.crt": ca_pem},
        "edgesync-api-nats": {"url": f"tls://api:{users['api']}@{internal_url}",
                              "ca.crt": ca_pem},
    })
    for edge in edges:
        user = f"edge-{edge}"
        _kustomization(out / "edges" / edge, EDGE_NS, {
            "edgesync-command-public-key": {
                "command-signing.pub": (state / "command-signing.pub").read_text()},
            "edgesync-edge-nats": {"url": f"tls://{user}:{users[user]}@{nats_host}:4222",
                                   "ca.crt": ca_pem},
        })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("edges", nargs="*", help="edge ids of the sites")
    parser.add_argument("--nats-host", required=True,
                        help="the name edges reach the cloud's NATS by (its certificate's name)")
    parser.add_argument("--out", type=Path, default=Path(".edgesync/deploy-secrets"))
    args = parser.parse_args(argv)
    for edge in args.edges:
        validate_token("edge id", edge)
    os.umask(0o077)  # every directory and file written is the owner's only
    generate(args.out, nats_host=args.nats_host, edges=args.edges)
    print(f"wrote {args.out}/cloud and {len(args.edges)} edge(s) under {args.out}/edges; "
          f"keep {args.out}/state private (CA key, signing key, passwords)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
