"""What the edge bridge and the cloud ingest share: wire format, subjects and
stream topology, errors, settings, the service skeleton, the embedded runtime
and the CLI.

``__version__`` is read from the installed distribution's metadata, so
``pyproject.toml`` is the one place the version is written.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgesync")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
