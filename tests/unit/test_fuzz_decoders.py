"""Decoding is total: any bytes from the network become a valid value or our own
error (:class:`~broker.errors.DecodeError`, :class:`~broker.errors.InvalidInput`,
:class:`~broker.errors.CommandRejected`), never another exception.

Each property runs briefly in the default suite and long behind ``-m fuzz``
(``EDGESYNC_FUZZ_EXAMPLES`` sets how long; 20,000 examples each by default).
Inputs are random bytes and, more usefully, valid messages cut, spliced and
bit-flipped, compressed or not.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.errors import CommandRejected, DecodeError, InvalidInput
from broker.protocol.command_specs import KINDS, parse_spec
from broker.protocol.commands import CommandSigner, new_envelope, open_command
from broker.protocol.events import (
    CommandStatusReport,
    DropMarker,
    Heartbeat,
    StreamHealth,
    decode_event,
    encode_event,
)
from broker.protocol.wire import (
    CT_JSON,
    ENCODING_HEADER,
    Batch,
    Record,
    decode_batch,
    decode_records,
    encode_batch,
)

SHORT = 300
LONG = int(os.environ.get("EDGESYNC_FUZZ_EXAMPLES", "20000"))

_KEY = Ed25519PrivateKey.generate()
_SIGNER = CommandSigner(_KEY, issuer="fuzz")
_TRUSTED = [_KEY.public_key()]

_BATCH = encode_batch(Batch(1, "edge-1", "telemetry", 7, 1, [
    Record(1_700_000_000_000_000, CT_JSON, b'{"a":1}', "k", {"h": "v"}),
    Record(1_700_000_000_000_001, CT_JSON, b"[1,2,3]", None, None)]))[0]
_EVENTS = [encode_event(e) for e in (
    Heartbeat("edge-1", "0.1.0", 1.0, 1, 2, 3, 4, 5.0, 6, {"s": {"overflow": 1, "ttl": 0}},
              {"s": StreamHealth(7, 8, 7, 6, 1, 10, 0, 0, 0.5)}),
    DropMarker("edge-1", "s", 7, 1, 10, 10, "overflow", 1.0),
)]
_COMMAND = _SIGNER.sign(new_envelope(edge="edge-1", kind="deployment.scale", spec={
    "namespace": "prod", "name": "web", "replicas": 3}, ttl_s=60, issuer="fuzz"))[0]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A valid message, damaged: truncated, spliced with random bytes, bits flipped."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["cut", "flip", "insert", "replace"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if how == "cut":
            del data[at:]
        elif how == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif data:
            data[at] = draw(st.integers(0, 255))
    return bytes(data)


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=1).compress(data)


wire_inputs = st.one_of(
    st.tuples(st.binary(max_size=2048), st.just(None)),
    st.tuples(mutated([_BATCH]), st.just(None)),
    st.tuples(mutated([_BATCH]).map(_zstd), st.just({ENCODING_HEADER: "zstd"})),
    st.tuples(mutated([_zstd(_BATCH)]), st.just({ENCODING_HEADER: "zstd"})),
    st.tuples(st.binary(max_size=256), st.sampled_from([{ENCODING_HEADER: "gzip"},
                                                         {ENCODING_HEADER: ""}])),
)
event_inputs = st.one_of(st.binary(max_size=2048), mutated(_EVENTS))
command_inputs = st.one_of(st.binary(max_size=1024), mutated([_COMMAND]))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=4),
    max_leaves=20)
spec_inputs = st.tuples(
    st.sampled_from([*KINDS, "deployment.delete"]),
    st.one_of(json_values, st.fixed_dictionaries({
        "namespace": st.sampled_from(["prod", "Prod!", ""]), "name": st.text(max_size=10)},
        optional={"replicas": json_values, "env": json_values, "image": json_values,
                  "container": json_values, "data": json_values, "linger_ms": json_values,
                  "streams": json_values})))


def wire_property(data_headers: tuple[bytes, dict[str, str] | None]) -> None:
    data, headers = data_headers
    for strict in (False, True):
        try:
            batch = decode_batch(data, headers, strict=strict)
        except DecodeError:
            pass
        else:
            assert isinstance(batch, Batch) and batch.records
    with contextlib.suppress(DecodeError):
        decode_records(data, headers)


def event_property(data: bytes) -> None:
    try:
        event = decode_event(data)
    except DecodeError:
        return
    assert isinstance(event, Heartbeat | DropMarker | CommandStatusReport)
    assert decode_event(encode_event(event)) == event


def command_property(data: bytes) -> None:
    try:
        opened = open_command(data, _TRUSTED)
    except CommandRejected:
        return
    assert opened.envelope.edge == "edge-1"


def spec_property(kind_spec: tuple[str, Any]) -> None:
    kind, spec = kind_spec
    with contextlib.suppress(InvalidInput):
        parse_spec(kind, spec)


PROPERTIES: dict[str, tuple[Callable[[Any], None], st.SearchStrategy[Any]]] = {
    "wire": (wire_property, wire_inputs),
    "event": (event_property, event_inputs),
    "command": (command_property, command_inputs),
    "spec": (spec_property, spec_inputs),
}


def _run(name: str, examples: int) -> None:
    prop, strategy = PROPERTIES[name]
    test = settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))(given(strategy)(prop))
    test()


@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_decoding_is_total_on_random_and_damaged_input(name: str) -> None:
    """Any bytes: a valid value or our own error (a short run; -m fuzz for a long one)."""
    _run(name, SHORT)


@pytest.mark.fuzz
@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_decoding_is_total_long_run(name: str) -> None:
    _run(name, LONG)


def test_the_seeds_are_valid_messages() -> None:
    """The damage starts from real messages (else the mutations prove little)."""
    assert decode_batch(_BATCH, strict=True).records
    assert all(decode_event(e) for e in _EVENTS)
    assert open_command(_COMMAND, _TRUSTED).envelope.kind == "deployment.scale"
    assert msgspec.msgpack.decode(_COMMAND)


@pytest.mark.parametrize(("first", "last", "count"), [
    (-10, 3, 14), (0, 3, 4), (1, 2**63 - 1, 1), (5, 6, -1)])
def test_a_drop_marker_outside_the_seq_range_is_malformed(first: int, last: int,
                                                            count: int) -> None:
    """A marker's range is of records' seqs (1 .. 2^63-2): anything else is refused at
    decoding, so its event is dead-lettered with the reason (not stored, or failing
    the range arithmetic later)."""
    with pytest.raises(DecodeError, match="malformed event"):
        decode_event(encode_event(DropMarker("edge-1", "s", 7, first, last, count, "ttl", 1.0)))


def test_a_reversed_drop_range_is_malformed() -> None:
    """As an edge could send it (the struct itself refuses to be built so)."""
    body = msgspec.msgpack.encode({
        "type": "drop", "edge": "edge-1", "stream": "s", "epoch": 7, "first_seq": 5,
        "last_seq": 4, "count": 0, "reason": "ttl", "dropped_at": 1.0})
    with pytest.raises(DecodeError, match="reversed"):
        decode_event(body)


def test_a_drop_marker_counting_more_records_than_its_run_is_malformed() -> None:
    """One edge's markers with counts near 2^62 made v_completeness's dropped counts
    overflow bigint: a run of n seqs drops at most n records."""
    body = msgspec.msgpack.encode({
        "type": "drop", "edge": "edge-1", "stream": "s", "epoch": 7, "first_seq": 5,
        "last_seq": 9, "count": 6, "reason": "overflow", "dropped_at": 1.0})
    with pytest.raises(DecodeError, match="exceeds the run"):
        decode_event(body)
    exact = decode_event(encode_event(DropMarker("edge-1", "s", 7, 5, 9, 5, "overflow", 1.0)))
    assert isinstance(exact, DropMarker) and exact.count == 5
