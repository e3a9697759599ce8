"""``edgesync export``: one stream over a time range, in NDJSON, CSV and Parquet, gives
back exactly the rows ``v_records`` holds (issue 13)."""

from __future__ import annotations

import asyncio
import base64
import csv
import json
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg

from broker.pg_connecting import connected
from broker.protocol.topology import Topology
from broker.protocol.wire import CT_JSON, CT_RAW, Batch, Record
from cloud_ingest.ingesting import init_connection
from cloud_ingest.schema import migrate
from cloud_ingest.writing import GroupWriter
from tests.support.batches import batch_msg

T0 = 1_764_000_000_000_000


def _msg(edge: str, stream: str, records: list[Record]) -> Msg:
    return batch_msg(Batch(1, edge, stream, 9, 1, records))


@pytest.fixture
async def dsn(pg_dsn: str) -> AsyncIterator[str]:
    async with connected(pg_dsn) as conn:
        await migrate(conn)
        await init_connection(conn)
        temps = [Record(T0 + i, CT_JSON, json.dumps({"t": i / 2, "s": "a,\"b\"\n"}).encode(),
                        f"k{i}" if i % 2 else None, {"unit": "C"} if i % 3 == 0 else None)
                 for i in range(250)]
        temps.append(Record(T0 + 999, CT_RAW, b"\x00\xffraw,\n"))
        gw = GroupWriter(Topology())
        await gw.write(conn, [gw.decode(m) for m in (
            _msg("e1", "temps", temps), _msg("e2", "temps", temps[:7]),
            _msg("e1", "other", temps[:5]))])
    yield pg_dsn


async def _expected(dsn: str, edges: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    async with connected(dsn) as conn:
        rows = await conn.fetch(
            "SELECT edge_id AS edge, stream, epoch, seq, event_time, received_at, key, "
            "headers, payload, payload_is_binary FROM v_records WHERE stream = 'temps' "
            "AND (cardinality($1::text[]) = 0 OR edge_id = ANY($1)) "
            "ORDER BY edge_id, seq", list(edges))
    return [{**dict(r), "headers": json.loads(r["headers"]) if r["headers"] else None,
             "payload": json.loads(r["payload"])} for r in rows]


async def _export(dsn: str, *args: str, env: dict[str, str] | None = None
                  ) -> tuple[int, str]:
    today = datetime.now(UTC).date()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "export", "--stream", "temps",
        "--from", today.isoformat(), "--to", (today + timedelta(days=1)).isoformat(),
        "--dsn", dsn, *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, (out + err).decode(errors="replace")


def _normal(row: dict[str, Any]) -> dict[str, Any]:
    """A row as the text formats carry it (times in ISO 8601)."""
    return {**row, "event_time": row["event_time"].isoformat(),
            "received_at": row["received_at"].isoformat()}


async def test_ndjson_export_round_trips_every_row(dsn: str, tmp_path: Path) -> None:
    """Every row of the stream, edges filtered, payloads and headers as JSON, opaque
    payloads as base64; the progress goes to stderr, never into the data."""
    out = tmp_path / "t.ndjson"
    code, text = await _export(dsn, "--format", "ndjson", "-o", str(out))
    assert code == 0, text
    assert "258 records of temps exported" in text
    got = [json.loads(line) for line in out.read_text().splitlines()]
    # NDJSON also carries the epoch as a string, for readers whose numbers are doubles.
    want = [{**_normal(r), "epoch_str": str(r["epoch"])} for r in await _expected(dsn)]
    assert sorted(got, key=lambda r: (r["edge"], r["seq"])) == want
    raw = next(r for r in got if r["payload_is_binary"])
    assert base64.b64decode(raw["payload"]) == b"\x00\xffraw,\n"

    code, text = await _export(dsn, "--edge", "e2")
    assert code == 0, text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert [r["seq"] for r in lines] == list(range(1, 8))


async def test_csv_export_round_trips_every_row(dsn: str, tmp_path: Path) -> None:
    """A header, then one line per row; commas, quotes and newlines inside payloads
    survive the quoting."""
    out = tmp_path / "t.csv"
    code, text = await _export(dsn, "--format", "csv", "-o", str(out))
    assert code == 0, text
    with out.open(newline="") as f:
        got = list(csv.DictReader(f))
    want = [_normal(r) for r in await _expected(dsn)]
    assert len(got) == len(want)
    for g, w in zip(sorted(got, key=lambda r: (r["edge"], int(r["seq"]))), want, strict=True):
        assert (g["edge"], int(g["epoch"]), int(g["seq"])) == (w["edge"], w["epoch"], w["seq"])
        assert (g["event_time"], g["received_at"]) == (w["event_time"], w["received_at"])
        assert (g["key"] or None) == w["key"]
        assert (json.loads(g["headers"]) if g["headers"] else None) == w["headers"]
        assert json.loads(g["payload"]) == w["payload"]
        assert g["payload_is_binary"] == ("true" if w["payload_is_binary"] else "false")


async def test_parquet_export_round_trips_every_row(dsn: str, tmp_path: Path) -> None:
    """Typed columns: int64 identities, UTC microsecond timestamps, JSON as text."""
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "t.parquet"
    code, text = await _export(dsn, "--format", "parquet", "-o", str(out))
    assert code == 0, text
    got = pq.read_table(out).to_pylist()
    want = await _expected(dsn)
    assert len(got) == len(want) == 258
    got.sort(key=lambda r: (r["edge"], r["seq"]))
    for g, w in zip(got, want, strict=True):
        assert g["event_time"] == w["event_time"] and g["received_at"] == w["received_at"]
        assert (json.loads(g["headers"]) if g["headers"] else None) == w["headers"]
        assert json.loads(g["payload"]) == w["payload"]
        assert {k: g[k] for k in ("edge", "stream", "epoch", "seq", "key",
                                  "payload_is_binary")} == {
            k: w[k] for k in ("edge", "stream", "epoch", "seq", "key", "payload_is_binary")}


async def test_parquet_without_pyarrow_and_bad_input_fail_clearly(
    dsn: str, tmp_path: Path
) -> None:
    """Without the extra: a message naming it, exit 1, no file. A reversed range or a
    malformed time: exit 1 with the reason."""
    blocker = tmp_path / "no_pyarrow" / "pyarrow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('pyarrow blocked by the test')\n")
    out = tmp_path / "t.parquet"
    code, text = await _export(dsn, "--format", "parquet", "-o", str(out),
                               env={"PYTHONPATH": str(blocker.parent)})
    assert code == 1 and "pip install pyarrow" in text
    assert not out.exists()
    today = datetime.now(UTC).date().isoformat()
    code, text = await _export(dsn, "--from", today, "--to", today)
    assert code == 1 and "--to must be after --from" in text
    code, text = await _export(dsn, "--from", "yesterday")
    assert code == 1 and "not an ISO 8601 time" in text
