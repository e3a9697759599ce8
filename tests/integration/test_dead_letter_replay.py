"""Dead letters are recoverable: listed, shown and replayed through the operator API
and `edgesync dead-letters`, and counted in `edgesync status --gaps`."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import msgspec
import nats

from broker.pg_connecting import connected
from broker.protocol.wire import CT_JSON, Batch, Record, encode_batch
from broker.runtime.embedded_nats import EmbeddedNats
from tests.helpers import until
from tests.integration.control_harness import control_plane, run_cli

GOOD = Record(1_700_000_000_000_000, CT_JSON, b'{"ok": 1}')


async def test_dead_letters_are_listed_shown_and_replayed_exactly_once(
    tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str
) -> None:
    """A record PostgreSQL refused is listed with its identity by the API and the CLI,
    counted by `status --gaps`; replay is refused while PostgreSQL still objects, then
    lands it once; an unidentified message is not replayable (409)."""
    records = [GOOD] * 5
    records[2] = Record(GOOD.ts, CT_JSON, b'{"ok": 2}', key="forbidden")
    async with (
        control_plane(tmp_path, nats_server.url, pg_dsn) as plane,
        connected(pg_dsn) as conn,
    ):
        await conn.execute("ALTER TABLE records ADD CONSTRAINT no_forbidden "
                           "CHECK (key IS DISTINCT FROM 'forbidden')")
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await js.publish("es.rec.e1.s",
                             encode_batch(Batch(1, "e1", "s", 9, 1, records))[0])
            await js.publish("es.rec.e1.s", b"garbage")
        finally:
            await nc.close()

        async def two_letters() -> list[dict[str, object]] | None:
            found = (await plane.http.get("/v1/dead-letters")).json()
            return found if len(found) == 2 else None

        letters = await until(two_letters, timeout=15)
        record = next(x for x in letters if x["kind"] == "record")
        garbage = next(x for x in letters if x["kind"] == "message")
        assert (record["edge"], record["stream"], record["epoch_str"], record["seq"]) == (
            "e1", "s", "9", 3)

        cli_list = await run_cli("dead-letters", "list", "--dsn", pg_dsn, "--json")
        gaps = await run_cli("status", "--gaps", "--dsn", pg_dsn)
        shown = (await plane.http.get(f"/v1/dead-letters/{record['id']}")).json()
        refused = await plane.http.post(f"/v1/dead-letters/{record['id']}/replay")
        await conn.execute("ALTER TABLE records DROP CONSTRAINT no_forbidden")
        replayed = await plane.http.post(f"/v1/dead-letters/{record['id']}/replay")
        again = await run_cli("dead-letters", "replay", str(record["id"]), "--dsn", pg_dsn)
        no_identity = await plane.http.post(f"/v1/dead-letters/{garbage['id']}/replay")
        unknown = await plane.http.get("/v1/dead-letters/999999")
        unauthorized = await plane.http.post(
            f"/v1/dead-letters/{record['id']}/replay", headers={"Authorization": ""})
        rows = await conn.fetch("SELECT seq, key FROM records ORDER BY seq")
        progress = await conn.fetchrow(
            "SELECT watermark, committed_records, dead_lettered_records FROM v_completeness")
    assert cli_list.exit_code == 0, cli_list.stderr
    assert {x["seq"] for x in json.loads(cli_list.output)} == {3, None}
    assert gaps.exit_code == 0, gaps.stderr
    assert "dead-lettered" in gaps.output and "1 [3-3]" in gaps.output
    assert msgspec.msgpack.decode(base64.b64decode(shown["data_b64"]), type=Record).key == (
        "forbidden")
    assert shown["record"]["key"] == "forbidden"
    assert (refused.status_code, refused.json()["error"]) == (422, "still_invalid")
    assert replayed.status_code == 200 and replayed.json()["inserted"] == 1
    assert again.exit_code == 0 and "already replayed" in again.output
    assert (no_identity.status_code, no_identity.json()["error"]) == (409, "no_identity")
    assert (unknown.status_code, unknown.json()["error"]) == (404, "unknown_dead_letter")
    assert unauthorized.status_code == 401
    assert [(r["seq"], r["key"]) for r in rows] == [
        (1, None), (2, None), (3, "forbidden"), (4, None), (5, None)]
    assert tuple(progress) == (5, 5, 0)
