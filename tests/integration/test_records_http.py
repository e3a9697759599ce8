"""Committed records over HTTP and the CLI: pages with cursors, NDJSON, a live SSE
tail that resumes from Last-Event-ID, completeness, checkpoints, ``edgesync tail``."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from broker.protocol.topology import Topology
from broker.protocol.wire import CT_JSON, Batch, Record, encode_batch
from broker.runtime.embedded_nats import EmbeddedNats
from tests.helpers import until
from tests.integration.control_harness import ControlPlane, control_plane, run_cli
from tests.integration.harness import wait_for_records
from tests.integration.test_api_auth import operator

EPOCH = 3


async def publish(nats_url: str, edge: str, stream: str, first: int, n: int) -> None:
    records = [Record(1_700_000_000_000_000 + s, CT_JSON, b'{"v": %d}' % s, f"k{s}")
               for s in range(first, first + n)]
    nc = await nats.connect(nats_url)
    try:
        body, _ = encode_batch(Batch(1, edge, stream, EPOCH, first, records))
        await nc.jetstream().publish(Topology().records_subject(edge, stream), body)
    finally:
        await nc.close()


@pytest.fixture
async def plane(tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
                ) -> AsyncIterator[ControlPlane]:
    """API (reads need the token) and ingest, with 90 records committed in 3 groups."""
    async with control_plane(tmp_path, nats_server.url, pg_dsn,
                             read_requires_token=True) as plane:
        await publish(nats_server.url, "e1", "s", 1, 50)
        await wait_for_records(pg_dsn, 50)
        await publish(nats_server.url, "e1", "s", 51, 30)
        await wait_for_records(pg_dsn, 80)
        await publish(nats_server.url, "e2", "t", 1, 10)
        await wait_for_records(pg_dsn, 90)
        yield plane


def ids(records: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    return [(r["edge"], r["stream"], r["seq"]) for r in records]


async def test_pages_follow_the_cursor_and_reads_need_the_read_guard(
    plane: ControlPlane
) -> None:
    """Pages of 25 walk every record once in commit order; next_cursor moves even over
    records a filter skips; without the token the read is refused."""
    async with httpx.AsyncClient(base_url=plane.api.url) as anonymous:
        assert (await anonymous.get("/v1/records")).status_code == 401
    got: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 25} | ({"after": cursor} if cursor else {})
        page = (await plane.http.get("/v1/records", params=params)).json()
        got += page["records"]
        cursor = page["next_cursor"]
        if page["caught_up"]:
            break
    assert ids(got) == [*(("e1", "s", s) for s in range(1, 81)),
                        *(("e2", "t", s) for s in range(1, 11))]
    assert got[0]["payload"] == {"v": 1} and got[0]["key"] == "k1"
    # Epochs are 63-bit: a reader with doubles only takes the string form.
    assert all(r["epoch_str"] == str(r["epoch"]) for r in got)
    only_t = (await plane.http.get("/v1/records", params={"stream": "t"})).json()
    assert ids(only_t["records"]) == [("e2", "t", s) for s in range(1, 11)]
    nothing = (await plane.http.get("/v1/records", params={"stream": "none"})).json()
    assert nothing["records"] == [] and nothing["next_cursor"] == cursor
    bad = await plane.http.get("/v1/records", params={"after": "nope"})
    assert (bad.status_code, bad.json()["error"]) == (422, "invalid_cursor")


async def test_ndjson_streams_everything_then_the_next_cursor(plane: ControlPlane) -> None:
    """format=ndjson: one record per line up to the end of the feed, then next_cursor;
    resuming from it returns nothing new."""
    resp = await plane.http.get("/v1/records", params={"format": "ndjson", "edge": "e1"})
    lines = [json.loads(line) for line in resp.text.splitlines()]
    assert resp.headers["content-type"].startswith("application/x-ndjson")
    assert ids(lines[:-1]) == [("e1", "s", s) for s in range(1, 81)]
    rest = (await plane.http.get("/v1/records", params={
        "after": lines[-1]["next_cursor"]})).json()
    assert rest["records"] == []


async def test_ndjson_without_a_limit_streams_past_a_json_pages_default(
    plane: ControlPlane, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """With no limit, an NDJSON stream is not cut at the JSON page's default of 1,000
    records (it was: the documented "large range, streamed" stopped there); a JSON page
    still is."""
    await publish(nats_server.url, "e3", "big", 1, 1500)
    await wait_for_records(pg_dsn, 1590)
    resp = await plane.http.get("/v1/records", params={"format": "ndjson", "edge": "e3"})
    lines = [json.loads(line) for line in resp.text.splitlines()]
    assert ids(lines[:-1]) == [("e3", "big", s) for s in range(1, 1501)]
    page = (await plane.http.get("/v1/records", params={"edge": "e3"})).json()
    assert len(page["records"]) == 1000


class _Sse:
    """Reads an SSE response's events (one line iterator for its whole life)."""

    def __init__(self, resp: httpx.Response) -> None:
        self.lines = resp.aiter_lines()

    async def records(self, n: int) -> list[tuple[str, str, Any]]:
        return await _events(self.lines, n)


async def _events(lines: AsyncIterator[str], n: int) -> list[tuple[str, str, Any]]:
    """The next ``n`` record events of an SSE stream: (id, event, data)."""
    out: list[tuple[str, str, Any]] = []
    fields: dict[str, str] = {}
    async for line in lines:
        if line:
            key, _, value = line.partition(": ")
            fields[key] = value
            continue
        if fields.get("event") == "record":
            out.append((fields["id"], "record", json.loads(fields["data"])))
            if len(out) == n:
                return out
        fields = {}
    raise AssertionError("the stream ended")


async def test_the_sse_tail_resumes_from_last_event_id_and_goes_live(
    plane: ControlPlane
) -> None:
    """A client reads 30 events and drops; reconnecting with Last-Event-ID resumes at
    the 31st; a record committed while it listens arrives live."""
    async with plane.http.stream("GET", "/v1/records/tail",
                                 params={"from": "earliest"}, timeout=15) as resp:
        first = await _Sse(resp).records(30)
    assert [e[2]["seq"] for e in first] == list(range(1, 31))
    async with plane.http.stream("GET", "/v1/records/tail", timeout=15,
                                 headers={"Last-Event-ID": first[-1][0]}) as resp:
        sse = _Sse(resp)
        resumed = await sse.records(60)
        await publish(plane.nats_url, "e2", "t", 11, 1)
        live = await sse.records(1)
    assert ids([e[2] for e in resumed]) == [*(("e1", "s", s) for s in range(31, 81)),
                                            *(("e2", "t", s) for s in range(1, 11))]
    assert ids([live[0][2]]) == [("e2", "t", 11)]


async def test_completeness_and_checkpoints_over_http(plane: ControlPlane) -> None:
    """Completeness at the end of the feed and at a cursor; a checkpoint PUT and read
    back; records from a subscription's checkpoint."""
    now = (await plane.http.get("/v1/completeness")).json()["completeness"]
    assert {(c["edge"], c["stream"], c["watermark"]) for c in now} == {
        ("e1", "s", 80), ("e2", "t", 10)}
    assert all(c["epoch_str"] == str(c["epoch"]) for c in now)
    first = (await plane.http.get("/v1/records", params={"limit": 50})).json()
    at = (await plane.http.get("/v1/completeness",
                               params={"cursor": first["next_cursor"]})).json()
    assert [(c["edge"], c["watermark"]) for c in at["completeness"]] == [("e1", 50)]
    put = await plane.http.put("/v1/subscriptions/reports",
                               json={"cursor": first["next_cursor"]})
    assert put.status_code == 200 and put.json()["cursor"] == first["next_cursor"]
    got = (await plane.http.get("/v1/subscriptions/reports")).json()
    assert got["cursor"] == first["next_cursor"]
    rest = (await plane.http.get("/v1/records", params={"subscription": "reports"})).json()
    assert ids(rest["records"])[0] == ("e1", "s", 51)
    assert (await plane.http.get("/v1/subscriptions/nope")).status_code == 404


async def test_moving_a_checkpoint_needs_the_consume_scope(plane: ControlPlane) -> None:
    """A read-only token (a dashboard's) may read a subscription but not move or create
    one: moved, its consumer would skip records it never read."""
    assert (await plane.http.put("/v1/subscriptions/billing",
                                 json={"cursor": "earliest"})).status_code == 200
    reader = await operator(plane, "grafana", "read")
    consumer = await operator(plane, "billing-job", "consume")
    async with reader, consumer:
        moved = await reader.put("/v1/subscriptions/billing", json={"cursor": "latest"})
        assert (moved.status_code, moved.json()["error"]) == (403, "forbidden")
        assert "'consume'" in moved.json()["message"]
        made = await reader.put("/v1/subscriptions/new-one", json={"cursor": "latest"})
        assert made.status_code == 403
        assert (await reader.get("/v1/subscriptions/billing")).status_code == 200
        committed = await consumer.put("/v1/subscriptions/billing", json={"cursor": "latest"})
        assert committed.status_code == 200, committed.text
        assert (await consumer.get("/v1/records", params={"limit": 1})).status_code == 200


async def test_edgesync_tail_prints_ndjson(plane: ControlPlane) -> None:
    """``edgesync tail --from earliest --stream t --no-follow`` prints t's records as
    NDJSON (not a TTY) and stops at the end of the feed."""
    result = await run_cli("tail", "--dsn", plane.pg_dsn, "--from", "earliest",
                           "--stream", "t", "--no-follow")
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert ids(lines) == [("e2", "t", s) for s in range(1, 11)]
    limited = await run_cli("tail", "--dsn", plane.pg_dsn, "--from", "earliest",
                            "--limit", "3")
    assert len(limited.output.splitlines()) == 3


async def test_live_tails_over_the_cap_are_refused_with_retry_after(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """With api.max_live_tails = 2, a third tail gets 503, a JSON reason and
    Retry-After, while the two go on; once one closes, a new tail is accepted."""
    async with control_plane(tmp_path, nats_server.url, pg_dsn, max_live_tails=2) as plane:
        async with contextlib.AsyncExitStack() as stack:
            _kept = await plane.open_tails(stack, 2)  # a dropped reader closes its tail
            assert plane.api.metrics.live_tails._value.get() == 2
            refused = await plane.http.get("/v1/records/tail", timeout=15)
            assert refused.status_code == 503
            assert refused.json()["error"] == "too_many_tails"
            assert "max_live_tails" in refused.json()["message"]
            assert refused.headers["retry-after"] == "5"

        async def accepted() -> bool:
            async with plane.http.stream("GET", "/v1/records/tail", timeout=15) as resp:
                return resp.status_code == 200

        await until(accepted, timeout=10, message="a closed tail never freed its slot")
        assert plane.api.metrics.tails_refused._value.get() == 1


async def test_tails_whose_client_hangs_up_at_once_give_their_slot_back(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """A client that sends the tail request and closes the socket before reading (what a
    flood of cheap connections would do) must not keep a slot or its database
    connection: the cap would otherwise fill with tails nobody reads."""
    async with control_plane(tmp_path, nats_server.url, pg_dsn, max_live_tails=2) as plane:
        host, port = plane.api.url.removeprefix("http://").split(":")
        request = (f"GET /v1/records/tail HTTP/1.1\r\nHost: {host}\r\n"
                   f"Authorization: Bearer {plane.token}\r\n\r\n").encode()
        for _ in range(10):
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(request)
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        await until(lambda: plane.api.metrics.live_tails._value.get() == 0, timeout=10,
                    message="hung-up tails still hold their slots")

        async def accepted() -> bool:
            async with plane.http.stream("GET", "/v1/records/tail", timeout=15) as resp:
                return resp.status_code == 200

        await until(accepted, timeout=10, message="the cap stayed full")
