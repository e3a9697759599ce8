"""What an edge controls beyond its batch bodies: the subject's last token (an edge may
publish on ``es.rec.<own edge>.*``, which nats-server passes on whatever its bytes),
the message's NATS headers, and the seqs its envelope claims. Whatever it puts there,
the message ends as a dead letter with a reason and is acknowledged, and the other
edges' records keep flowing: one edge must not stall the ingest for all.

Messages are published as raw protocol frames (``PUB``/``HPUB``), as a hostile edge
would write them; nats-py cannot spell a subject that is not UTF-8."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg
import nats
import pytest

from broker.pg_connecting import connected
from broker.protocol.wire import CT_JSON, MAX_SEQ, Batch, Record, encode_batch
from tests.integration.harness import running_ingest, wait_for_records
from tests.support.waiting import until

GOOD = Record(1_700_000_000_000_000, CT_JSON, b'{"ok": 1}')
NOT_A_BATCH = b"garbage, not a batch"


async def raw_publish(url: str, frames: Sequence[tuple[bytes, bytes | None, bytes]]) -> None:
    """Publish ``(subject, header block or None, body)`` frames over a plain connection,
    byte for byte, and wait for the server's PONG (so they were all taken)."""
    host, port = url.removeprefix("nats://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        await reader.readline()  # INFO
        writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n')
        for subject, headers, body in frames:
            if headers is None:
                writer.write(b"PUB %s %d\r\n%s\r\n" % (subject, len(body), body))
            else:
                writer.write(b"HPUB %s %d %d\r\n%s%s\r\n" % (
                    subject, len(headers), len(headers) + len(body), headers, body))
        writer.write(b"PING\r\n")
        await writer.drain()
        answer = b""
        while b"PONG" not in answer:
            answer += await asyncio.wait_for(reader.read(4096), 5)
        assert b"-ERR" not in answer, answer
    finally:
        writer.close()


async def letters(dsn: str) -> list[asyncpg.Record]:
    async with connected(dsn) as conn:
        return await conn.fetch(
            "SELECT kind, subject, headers::text AS headers, data, reason FROM dead_letters "
            "ORDER BY id")


async def acked_all(js: nats.js.JetStreamContext) -> bool:
    info = await js.consumer_info("ES_RECORDS", "ingest")
    return info.num_ack_pending == 0 and info.num_pending == 0


def good_batch(first: int) -> bytes:
    return encode_batch(Batch(1, "e2", "s", 7, first, [GOOD] * 10))[0]


@pytest.mark.parametrize(("subject", "headers", "stored_subject", "stored_headers"), [
    (b"es.rec.e1.s\xff", None, "es.rec.e1.s\\xff", None),
    (b"es.rec.e1.s\x00x", None, "es.rec.e1.s\\x00x", None),
    (b"es.rec.e1.s", b"NATS/1.0\r\nX-A: a\x00b\r\n\r\n", "es.rec.e1.s", '{"X-A": "a\\\\x00b"}'),
    (b"es.rec.e1.s", b"NATS/1.0\r\nX\x00A: b\r\n\r\n", "es.rec.e1.s", '{"X\\\\x00A": "b"}'),
], ids=["subject not UTF-8", "NUL in the subject", "NUL in a header", "NUL in a header name"])
async def test_a_hostile_subject_or_header_is_dead_lettered_and_others_keep_flowing(
    nats_server: object, pg_dsn: str, subject: bytes, headers: bytes | None,
    stored_subject: str, stored_headers: str | None,
) -> None:
    url = nats_server.url  # type: ignore[attr-defined]
    async with running_ingest(pg_dsn, url, ack_wait_s=3.0) as ingest:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            await js.publish("es.rec.e2.s", good_batch(1))
            await raw_publish(url, [(subject, headers, NOT_A_BATCH)])
            for i in range(1, 4):  # another edge's batches, after the hostile one
                await js.publish("es.rec.e2.s", good_batch(1 + 10 * i))
            await wait_for_records(pg_dsn, 40, timeout=20)
            await until(lambda: letters(pg_dsn), timeout=20, message="no dead letter")
            await until(lambda: acked_all(js), timeout=20, message="a message left unacked")
        finally:
            await nc.close()
        assert ingest.ready
    [letter] = await letters(pg_dsn)
    assert (letter["kind"], letter["subject"]) == ("message", stored_subject)
    assert letter["headers"] == stored_headers
    assert bytes(letter["data"]) == NOT_A_BATCH
    assert letter["reason"]


async def test_a_batch_claiming_int8s_largest_value_as_a_seq_is_a_dead_letter(
    nats_server: object, pg_dsn: str,
) -> None:
    """A seq span is kept as ``int8range(first, last + 1)``: a last seq of 2^63-1 could
    be neither written nor dead-lettered with its span, so it is refused at decoding."""
    url = nats_server.url  # type: ignore[attr-defined]
    body = encode_batch(Batch(1, "e1", "s", 7, MAX_SEQ, [GOOD, GOOD]))[0]
    async with running_ingest(pg_dsn, url, ack_wait_s=3.0):
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            await js.publish("es.rec.e1.s", body)
            await js.publish("es.rec.e2.s", good_batch(1))
            await wait_for_records(pg_dsn, 10, timeout=20)
            await until(lambda: letters(pg_dsn), timeout=20, message="no dead letter")
            await until(lambda: acked_all(js), timeout=20, message="a message left unacked")
        finally:
            await nc.close()
    [letter] = await letters(pg_dsn)
    assert letter["kind"] == "message"
    assert "out of range 1..2^63-2" in letter["reason"]


async def test_a_letter_that_cannot_be_written_as_it_came_is_written_bare(
    nats_server: object, pg_dsn: str,
) -> None:
    """When even the dead letter is refused (here a constraint refuses any headers), it
    is written once more without the message's headers, and the message is acked."""
    url = nats_server.url  # type: ignore[attr-defined]
    async with running_ingest(pg_dsn, url, ack_wait_s=3.0, db_retry_max_s=0.05):
        async with connected(pg_dsn) as conn:
            await conn.execute("ALTER TABLE dead_letters ADD CONSTRAINT test_no_headers "
                               "CHECK (headers IS NULL)")
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            await raw_publish(url, [(b"es.rec.e1.s", b"NATS/1.0\r\nX-A: b\r\n\r\n",
                                     NOT_A_BATCH)])
            await until(lambda: letters(pg_dsn), timeout=30, message="no dead letter")
            await until(lambda: acked_all(js), timeout=20, message="a message left unacked")
        finally:
            await nc.close()
    [letter] = await letters(pg_dsn)
    assert (letter["kind"], letter["headers"]) == ("message", None)
    assert "could not be written with the message's headers" in letter["reason"]
