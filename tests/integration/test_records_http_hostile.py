"""The read side against sloppy or hostile analytics clients: clients that stop reading,
many streams from one token, out-of-range inputs, tampered cursors, checkpoints moved
under a consumer. Each must cost the API bounded resources and get a JSON 4xx, never a
500, a hang, or another client's service."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from broker.errors import Conflict, InvalidInput
from broker.feed import Subscription
from broker.feed.positions import commit_of, end_of
from broker.pg_connecting import connected
from broker.protocol.topology import Topology
from broker.protocol.wire import CT_JSON, Batch, Record, encode_batch
from broker.runtime.embedded_nats import EmbeddedNats
from tests.helpers import until
from tests.integration.control_harness import ControlPlane, control_plane
from tests.integration.harness import wait_for_records
from tests.integration.test_api_auth import operator
from tests.integration.test_records_http import publish

EPOCH = 3


@pytest.fixture
async def small_plane(tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
                      ) -> AsyncIterator[ControlPlane]:
    """API and ingest, 20 records committed."""
    async with control_plane(tmp_path, nats_server.url, pg_dsn) as plane:
        await publish(nats_server.url, "e1", "s", 1, 20)
        await wait_for_records(pg_dsn, 20)
        yield plane


async def publish_padded(nats_url: str, edge: str, stream: str, batches: int, *,
                         per_batch: int = 100, pad: int = 2000) -> int:
    """``batches`` batches of ``per_batch`` records of ~``pad`` bytes each; returns how
    many records."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        filler = b"x" * pad
        for b in range(batches):
            first = b * per_batch + 1
            records = [Record(1_700_000_000_000_000 + s, CT_JSON,
                              b'{"v": %d, "pad": "%s"}' % (s, filler), None)
                       for s in range(first, first + per_batch)]
            body, _ = encode_batch(Batch(1, edge, stream, EPOCH, first, records))
            await js.publish(Topology().records_subject(edge, stream), body)
    finally:
        await nc.close()
    return batches * per_batch


@contextlib.asynccontextmanager
async def stalled_client(plane: ControlPlane, target: str
                         ) -> AsyncIterator[asyncio.StreamReader]:
    """A raw connection that sends ``GET target``, reads the first bytes of the answer
    and then stops reading (a tiny receive buffer: the server's sends block soon)."""
    host, port = plane.api.url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write((f"GET {target} HTTP/1.1\r\nHost: {host}\r\n"
                      f"Authorization: Bearer {plane.token}\r\n\r\n").encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
        assert head.startswith(b"HTTP/1.1 200"), head
        yield reader
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def test_a_stalled_ndjson_export_holds_no_pool_connection(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """With a pool of one connection, a client that starts a large NDJSON export and
    stops reading must not keep that connection while its send is blocked: another
    client's page is served meanwhile, and the stalled export, read at last, is whole."""
    async with control_plane(tmp_path, nats_server.url, pg_dsn, pool_size=1) as plane:
        # ~29 MB of NDJSON: far more than the socket buffers and a few pages hold
        total = await publish_padded(nats_server.url, "e1", "s", 130)
        await wait_for_records(pg_dsn, total, timeout=90)
        async with stalled_client(
                plane, "/v1/records?format=ndjson&limit=1000000") as stalled:
            page = await plane.http.get("/v1/records", params={"limit": 1}, timeout=20)
            assert page.status_code == 200, page.text
            assert len(page.json()["records"]) == 1
            body = await asyncio.wait_for(_read_chunked(stalled), timeout=60)
        lines = [json.loads(line) for line in body.splitlines()]
        assert sorted(r["seq"] for r in lines[:-1]) == list(range(1, total + 1))
        assert "next_cursor" in lines[-1]


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """The rest of a chunked HTTP body."""
    out = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return bytes(out)
        out += await reader.readexactly(size)
        await reader.readexactly(2)


OUT_OF_RANGE = [
    {"from": "99999999999d"},  # past timedelta's range
    {"from": "100000000d"},  # before year 1
    {"from": "0001-01-01T00:00:00+01:00"},  # year 0 in UTC
    {"from": "9999-12-31T23:59:59-10:00"},  # year 10000 in UTC
    {"after": str(2**63)},  # beyond a bigint position
    {"after": "١٢٣"},  # digits, not ASCII ones
]


async def test_out_of_range_times_and_cursors_are_a_json_422(
    small_plane: ControlPlane
) -> None:
    """Durations and times that leave datetime's range, and cursors beyond a bigint, are
    422 with a JSON reason, never a 500: on a page, on an NDJSON stream (before its 200;
    a bad since/until used to answer 200 and end without its next_cursor line), and on
    the live tail (which gives its slot back)."""
    cases: list[tuple[str, dict[str, str], dict[str, str]]] = [
        *(("/v1/records", {"format": f, **p}, {}) for f in ("json", "ndjson")
          for p in OUT_OF_RANGE),
        *(("/v1/records", {"format": f, "since": "0001-01-01T00:00:00+14:00"}, {})
          for f in ("json", "ndjson")),
        ("/v1/records", {"format": "ndjson", "until": "9999-12-31T23:59:59-14:00"}, {}),
        *(("/v1/records/tail", {"from": p.get("from", p.get("after", ""))}, {})
          for p in OUT_OF_RANGE),
        ("/v1/records/tail", {}, {"Last-Event-ID": str(2**63)}),
        ("/v1/completeness", {"cursor": str(2**63)}, {}),
    ]
    for path, params, headers in cases:
        resp = await small_plane.http.get(path, params=params, headers=headers, timeout=15)
        assert resp.status_code == 422, (path, params, headers, resp.status_code, resp.text)
        assert resp.json()["error"] in ("invalid_start", "invalid_time", "invalid_cursor")
        assert resp.json()["message"]
    assert small_plane.api.metrics.live_tails._value.get() == 0


async def test_a_checkpoint_put_over_a_lapsed_lease_is_not_overwritten_by_its_holder(
    small_plane: ControlPlane
) -> None:
    """An SDK consumer stalls past its lease; an operator moves the checkpoint back over
    HTTP (replay). The stalled holder's next commit must not silently put its own cursor
    back over it: it gets lease_lost, and a reopen resumes from the operator's cursor."""
    sub = Subscription(small_plane.pg_dsn, "billing", lease_ttl_s=0.3,
                       wait_for_lease=False)
    async with sub:
        batch = await anext(aiter(sub))
        assert len(batch) == 20

        async def lapsed() -> bool:
            async with connected(small_plane.pg_dsn) as conn:
                return bool(await conn.fetchval(
                    "SELECT lease_until < now() FROM feed_subscriptions WHERE name = $1",
                    "billing"))

        await until(lapsed, timeout=10, message="the lease never lapsed")
        put = await small_plane.http.put("/v1/subscriptions/billing",
                                         json={"cursor": "earliest"})
        assert put.status_code == 200, put.text
        with pytest.raises(Conflict) as refused:
            await sub.commit()
        assert refused.value.code == "lease_lost"
    got = (await small_plane.http.get("/v1/subscriptions/billing")).json()
    assert got["cursor"] == "0"
    async with Subscription(small_plane.pg_dsn, "billing", wait_for_lease=False,
                            stop_when_caught_up=True) as again:
        assert sum(len(b) for b in [b async for b in again]) == 20


async def test_one_token_cannot_take_every_tail_slot(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """With 10 tail slots and api.max_streams_per_operator = 2, an operator holding two
    streams gets 429 too_many_streams (JSON, Retry-After) for a third tail or an NDJSON
    stream, while another operator's tail is still accepted; closing one frees it."""
    async with control_plane(tmp_path, nats_server.url, pg_dsn, max_live_tails=10,
                             max_streams_per_operator=2) as plane:
        other = await operator(plane, "grafana", "read")
        async with other, contextlib.AsyncExitStack() as stack:
            _kept = await plane.open_tails(stack, 2)  # a dropped reader closes its tail
            for path, params in (("/v1/records/tail", {}),
                                 ("/v1/records", {"format": "ndjson"})):
                refused = await plane.http.get(path, params=params, timeout=15)
                assert refused.status_code == 429, (path, refused.text)
                assert refused.json()["error"] == "too_many_streams"
                assert "max_streams_per_operator" in refused.json()["message"]
                assert refused.headers["retry-after"] == "5"
            async with other.stream("GET", "/v1/records/tail", timeout=15) as theirs:
                assert theirs.status_code == 200
                assert (await anext(theirs.aiter_bytes())).startswith(b"retry:")
            # pages are not streams: still served
            assert (await plane.http.get("/v1/records")).status_code == 200

        async def accepted() -> bool:
            resp = await plane.http.get("/v1/records", params={"format": "ndjson"})
            return resp.status_code == 200

        await until(accepted, timeout=10, message="closed streams never freed their slots")
        assert plane.api.metrics.live_tails._value.get() == 0


async def test_a_cursor_beyond_the_end_of_the_feed_is_refused(
    small_plane: ControlPlane
) -> None:
    """A made-up cursor (or one from before a database restore) beyond every commit id
    handed out used to be accepted and echoed back: pages stayed empty, a tail stayed
    silent and a checkpoint PUT there made its consumer skip every commit until the ids
    caught up. It is 422 cursor_ahead; the real end of the feed still works."""
    head = (await small_plane.http.get("/v1/completeness")).json()["cursor"]
    ahead = str(end_of(commit_of(int(head)) + 1))  # the end of a commit yet to come
    for method, path, kwargs in [
        ("GET", "/v1/records", {"params": {"after": ahead}}),
        ("GET", "/v1/records", {"params": {"after": ahead, "format": "ndjson"}}),
        ("GET", "/v1/records", {"params": {"from": ahead}}),
        ("GET", "/v1/records/tail", {"headers": {"Last-Event-ID": ahead}}),
        ("GET", "/v1/records/tail", {"params": {"from": ahead}}),
        ("GET", "/v1/completeness", {"params": {"cursor": ahead}}),
        ("PUT", "/v1/subscriptions/reports", {"json": {"cursor": ahead}}),
        ("PUT", "/v1/subscriptions/reports", {"json": {"cursor": str(2**63 - 1)}}),
    ]:
        resp = await small_plane.http.request(method, path, timeout=15, **kwargs)
        assert resp.status_code == 422, (method, path, kwargs, resp.text)
        assert resp.json()["error"] == "cursor_ahead"
    assert (await small_plane.http.get("/v1/subscriptions/reports")).status_code == 404
    at_head = await small_plane.http.get("/v1/records", params={"after": head})
    assert at_head.status_code == 200 and at_head.json()["records"] == []
    put = await small_plane.http.put("/v1/subscriptions/reports", json={"cursor": head})
    assert put.status_code == 200, put.text
    with pytest.raises(InvalidInput) as refused:
        async with Subscription(small_plane.pg_dsn, "new", start_at=int(ahead)):
            pass
    assert refused.value.code == "cursor_ahead"
