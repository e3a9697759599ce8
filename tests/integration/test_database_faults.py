"""A fault of the database (its own files failing, or it taking no writes) is an outage
the ingest waits out, not a reason to dead-letter good records.

First the data files of the ``records`` relations vanish (a lost volume, a bad restore
of part of the data directory): every write then fails with SQLSTATE 58P01 ("could not
open file"), a system error of class 58 (I/O errors, 58030, are the same class). The
ingest used to take it for something wrong with the group, bisect it and dead-letter
every record one by one. It keeps the group and retries, and once the files are back
every record commits exactly once, with no dead letter.

Then the database takes no writes (a standby behind the DSN during a failover, or
``default_transaction_read_only``): SQLSTATE 25006. The ingest split every group down
to single messages, failed to write even their dead letters and abandoned them to
redelivery, logging errors for each. It waits for a primary instead.

Last, the database refuses the ingest's connections (its role's password changed, the
role or database gone, a privilege revoked): the operator's mistake to mend, never the
records' fault. The ingest waits until it can write again."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.js.api import ConsumerInfo

from broker.pg_connecting import connected
from broker.protocol.topology import Topology
from broker.protocol.wire import CT_JSON, Batch, Record, encode_batch
from broker.runtime.embedded_nats import EmbeddedNats
from broker.runtime.embedded_postgres import EmbeddedPostgres
from cloud_ingest.schema import migrate
from cloud_ingest.service import Ingest
from tests.helpers import until
from tests.integration.harness import running_ingest, wait_for_records
from tests.support import database_setting, end_other_sessions

GOOD = Record(1_700_000_000_000_000, CT_JSON, b'{"ok": true}')


@pytest.fixture
async def own_pg(tmp_path: Path) -> AsyncIterator[EmbeddedPostgres]:
    """A cluster of this test's own: its files are taken away and put back."""
    pg = EmbeddedPostgres(tmp_path / "pg", synchronous_commit=True)
    await pg.start()
    try:
        yield pg
    finally:
        await pg.close()


async def _publish(nats_url: str, first: int, count: int) -> None:
    nc = await nats.connect(nats_url)
    try:
        body, headers = encode_batch(Batch(1, "edge-1", "s", 7, first, [GOOD] * count))
        await nc.jetstream().publish("es.rec.edge-1.s", body, headers=headers)
    finally:
        await nc.close()


async def test_missing_relation_files_stall_the_ingest_instead_of_dead_lettering(
        tmp_path: Path, own_pg: EmbeddedPostgres, nats_server: EmbeddedNats) -> None:
    dsn = own_pg.dsn
    async with running_ingest(dsn, nats_server.url) as ingest:
        await _publish(nats_server.url, 1, 10)
        await wait_for_records(dsn, 10)
        async with connected(dsn) as conn:
            files = [row["path"] for row in await conn.fetch(
                "SELECT pg_relation_filepath(c.oid) AS path FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND c.relname LIKE 'records%' "
                "AND c.relkind IN ('r', 'i') AND pg_relation_filepath(c.oid) IS NOT NULL")]
        assert files
        data = (own_pg.data_dir).resolve()
        aside = tmp_path / "aside"
        aside.mkdir()
        await own_pg.stop()
        for i, rel in enumerate(files):
            shutil.move(data / rel, aside / str(i))
        await own_pg.start()
        await _publish(nats_server.url, 11, 10)

        await _waits_it_out(ingest, "UndefinedFileError")
        async with connected(dsn) as conn:
            assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 0
        await own_pg.stop()
        for i, rel in enumerate(files):
            shutil.move(aside / str(i), data / rel)
        await own_pg.start()
        await wait_for_records(dsn, 20)
        async with connected(dsn) as conn:
            assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 0
            assert await conn.fetchval(
                "SELECT count(DISTINCT seq) FROM v_records WHERE edge_id = 'edge-1'") == 20


async def test_a_database_that_takes_no_writes_stalls_the_ingest_instead_of_failing_groups(
        pg_dsn: str, nats_server: EmbeddedNats) -> None:
    async with running_ingest(pg_dsn, nats_server.url) as ingest, connected(pg_dsn) as admin:
        await _publish(nats_server.url, 1, 10)
        await wait_for_records(pg_dsn, 10)
        # The ingest reconnects: read-only now.
        async with database_setting(admin, "default_transaction_read_only", "on"):
            await _publish(nats_server.url, 11, 10)
            await _waits_it_out(ingest, "ReadOnlySQLTransactionError")
        await end_other_sessions(admin)
        await wait_for_records(pg_dsn, 20)
        assert await admin.fetchval("SELECT count(*) FROM dead_letters") == 0


ACK_WAIT_S = 2.0


async def _records_consumer(nats_url: str, ingest: Ingest) -> ConsumerInfo:
    nc = await nats.connect(nats_url)
    try:
        return await nc.jetstream().consumer_info(
            Topology().records_stream, ingest.settings.consumer)
    finally:
        await nc.close()


async def _waits_it_out(ingest: Ingest, error: str) -> None:
    """The ingest takes ``error`` for an outage (``db_up`` 0), never for the group's
    fault (no group failure of that type)."""

    def waiting_out_an_outage() -> bool:
        return ingest.metrics.db_up._value.get() == 0  # type: ignore[attr-defined]

    await until(waiting_out_an_outage, timeout=30,
                message=f"the ingest did not take {error} for an outage")
    failures = ingest.metrics.group_failures.labels(error)
    assert failures._value.get() == 0  # type: ignore[attr-defined]


async def test_refused_connections_stall_the_ingest_instead_of_failing_groups(
        own_pg: EmbeddedPostgres, nats_server: EmbeddedNats) -> None:
    dsn = own_pg.dsn
    async with running_ingest(dsn, nats_server.url) as ingest, connected(dsn) as admin:
        await _publish(nats_server.url, 1, 10)
        await wait_for_records(dsn, 10)
        role = await admin.fetchval("SELECT current_user")
        password = own_pg.password
        # A password rotated on the server, not yet in the ingest's DSN.
        await admin.execute(f'ALTER ROLE "{role}" PASSWORD \'rotated-{password}\'')
        try:
            await end_other_sessions(admin)
            await _publish(nats_server.url, 11, 10)

            await _waits_it_out(ingest, "InvalidPasswordError")
        finally:
            await admin.execute(f'ALTER ROLE "{role}" PASSWORD \'{password}\'')
        await wait_for_records(dsn, 20)
        assert await admin.fetchval("SELECT count(*) FROM dead_letters") == 0


async def test_a_lock_held_past_lock_timeout_is_waited_out_not_dead_lettered(
        pg_dsn: str, nats_server: EmbeddedNats) -> None:
    """A DBA's ``lock_timeout`` and a maintenance statement holding ``records``: every
    write of the group fails with 55P03 while the lock is held. The ingest took that for
    the group's fault, split it and dead-lettered its good records (the dead letter
    itself does not touch ``records``). It retries until the lock is released, and keeps
    JetStream from redelivering the group meanwhile (a lock held past ``ack_wait``)."""
    async with (running_ingest(pg_dsn, nats_server.url, ack_wait_s=ACK_WAIT_S) as ingest,
                connected(pg_dsn) as admin):
        await _publish(nats_server.url, 1, 10)
        await wait_for_records(pg_dsn, 10)
        # The ingest reconnects with the timeout.
        async with (database_setting(admin, "lock_timeout", "100ms"),
                    connected(pg_dsn) as holder, holder.transaction()):
            await holder.execute("SET LOCAL lock_timeout = 0")  # the holder waits its turn
            await holder.execute("LOCK TABLE records IN ACCESS EXCLUSIVE MODE")
            await _publish(nats_server.url, 11, 10)
            contentions = ingest.metrics.group_contentions

            def retried_well_past_a_split() -> bool:
                # A split came after 3 failures, the dead letter after 3 more.
                return contentions._value.get() >= 8  # type: ignore[attr-defined]

            await until(retried_well_past_a_split, timeout=30,
                        message="the ingest did not retry the locked-out group")
            first = contentions._value.get()  # type: ignore[attr-defined]

            def held_past_ack_wait() -> bool:  # at most 0.5 s between retries
                return contentions._value.get() >= first + 3 * ACK_WAIT_S / 0.5  # type: ignore[attr-defined]

            await until(held_past_ack_wait, timeout=60,
                        message="the ingest stopped retrying the locked-out group")
            info = await _records_consumer(nats_server.url, ingest)
            assert info.num_redelivered == 0, info
            failures = ingest.metrics.group_failures.labels("LockNotAvailableError")
            assert failures._value.get() == 0  # type: ignore[attr-defined]
            assert ingest.metrics.db_up._value.get() == 1  # type: ignore[attr-defined]
            assert await admin.fetchval("SELECT count(*) FROM dead_letters") == 0
        await wait_for_records(pg_dsn, 20)
        assert await admin.fetchval("SELECT count(*) FROM dead_letters") == 0
        assert await admin.fetchval(
            "SELECT count(DISTINCT seq) FROM v_records WHERE edge_id = 'edge-1'") == 20


async def test_a_group_that_outlasts_statement_timeout_is_split_not_retried_for_ever(
        pg_dsn: str, nats_server: EmbeddedNats) -> None:
    """A DBA's ``statement_timeout`` shorter than a big group's write (here: a row trigger
    that takes 10 ms a row, 200 one-record messages, a 500 ms timeout): every write of
    the whole group is canceled (57014), which the ingest waited out as an outage, for
    ever. It writes the group in halves until the parts fit, each committed once."""
    async with connected(pg_dsn) as admin:
        await migrate(admin)
        await admin.execute(
            "CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_sleep(0.01); RETURN NEW; END $$")
        await admin.execute("CREATE TRIGGER slow BEFORE INSERT ON records "
                            "FOR EACH ROW EXECUTE FUNCTION slow_row()")
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await Topology().ensure_all(js)
            for seq in range(1, 201):  # all waiting before the ingest's first fetch
                body, headers = encode_batch(Batch(1, "edge-1", "s", 7, seq, [GOOD]))
                await js.publish("es.rec.edge-1.s", body, headers=headers)
        finally:
            await nc.close()
        async with (database_setting(admin, "statement_timeout", "500ms"),
                    running_ingest(pg_dsn, nats_server.url) as ingest):
            await wait_for_records(pg_dsn, 200, timeout=60)
            assert ingest.metrics.group_contentions._value.get() >= 1  # type: ignore[attr-defined]
        assert await admin.fetchval("SELECT count(*) FROM dead_letters") == 0
        assert await admin.fetchval(
            "SELECT count(DISTINCT seq) FROM v_records WHERE edge_id = 'edge-1'") == 200


async def test_serialization_failures_under_a_serializable_default_are_retried_not_blamed(
        pg_dsn: str, nats_server: EmbeddedNats) -> None:
    """A database whose ``default_transaction_isolation`` is ``serializable``: the
    ingest's two workers, writing a fleet's batches, fail each other's transactions
    with 40001 now and then. Those are retried (contention), never counted as the
    group's failures (which split groups and dead-letter what still fails). Five runs
    here met 2 to 4 serialization failures each; without the fix three of three failed."""
    async with connected(pg_dsn) as admin:
        await migrate(admin)
        async with (database_setting(admin, "default_transaction_isolation", "serializable"),
                    running_ingest(pg_dsn, nats_server.url) as ingest):
            nc = await nats.connect(nats_server.url)
            try:
                js = nc.jetstream()
                for round_ in range(20):
                    for edge in range(50):
                        body, headers = encode_batch(
                            Batch(1, f"edge-{edge}", "s", 7, round_ * 10 + 1, [GOOD] * 10))
                        await js.publish(f"es.rec.edge-{edge}.s", body, headers=headers)
            finally:
                await nc.close()
            await wait_for_records(pg_dsn, 10_000, timeout=120)
            failures = ingest.metrics.group_failures.labels("SerializationError")
            assert failures._value.get() == 0  # type: ignore[attr-defined]
            # Not vacuous: the workers did get in each other's way.
            assert ingest.metrics.group_contentions._value.get() >= 1  # type: ignore[attr-defined]
        assert await admin.fetchval("SELECT count(*) FROM dead_letters") == 0
