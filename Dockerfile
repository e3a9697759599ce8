# syntax=docker/dockerfile:1
# The edgesync image: one image for the bridge, the ingest and the API
# (`edgesync bridge|ingest|api`). Build with the package version as the tag:
#
#   VERSION=$(python3 -c 'import tomllib;print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')
#   docker build --build-arg VERSION="$VERSION" -t edgesync:"$VERSION" .
#
# tests/deploy/test_image.py replays the build stage's install steps in a fresh
# venv and checks the result answers `edgesync --help`.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# -- build: a self-contained virtualenv under /opt/edgesync ---------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/edgesync
WORKDIR /src
# Only what the distribution is built from (see .dockerignore): tests, bench
# and deploy/ stay out of the image.
COPY pyproject.toml README.md ./
COPY broker ./broker
COPY edge_bridge ./edge_bridge
COPY cloud_ingest ./cloud_ingest
# Every dependency ships manylinux wheels, so no compiler is needed here either.
RUN /opt/edgesync/bin/pip install --no-compile ".[kubernetes]" \
 && /opt/edgesync/bin/edgesync --help >/dev/null

# -- runtime: the venv on a slim base, non-root, state only under a volume ----------
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="edgesync" \
      org.opencontainers.image.description="Event-driven sync broker between edge sites and the cloud" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/edgesync"
COPY --from=build /opt/edgesync /opt/edgesync
# Numeric UID/GID so Kubernetes can verify runAsNonRoot without /etc/passwd.
# HOME and the working directory point at the state volume: with a read-only
# root filesystem nothing else is writable (Python writes no bytecode).
ENV PATH=/opt/edgesync/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/edgesync
WORKDIR /var/lib/edgesync
USER 10001:10001
VOLUME ["/var/lib/edgesync"]
EXPOSE 8787 8788 8789
ENTRYPOINT ["edgesync"]
CMD ["--help"]
