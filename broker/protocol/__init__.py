"""The protocol both sides speak: record batches, events, signed commands and
their specs, subjects and streams, name rules, and the ingress request shapes.

Nothing here does I/O; every module is cheap to import from the SDK, the
bridge and the cloud alike.
"""
