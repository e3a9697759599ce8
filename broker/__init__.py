"""What the edge bridge and the cloud ingest share: wire format, subjects and
stream topology, errors, settings, the embedded runtime and the CLI."""

__version__ = "0.1.0"
