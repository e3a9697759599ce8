"""The control channel's memory: ``control.sqlite3``, remembered commands and the status outbox.

Kept in the buffer directory, apart from the record buffer. It remembers every
authentic command the edge took: id, digest, the stream sequence that carried
it, and its state (``applying``, then the final status), which is what lets
the channel act at most once per command id through any crash (see
:mod:`edge_bridge.commanding`).

Status outbox. Each status report (``delivered``, then ``applied`` /
``failed`` / ``rejected`` / ``expired``) is written to the outbox in the same
transaction as the state it reports, so a crash can lose neither without the
other; the channel publishes the outbox in order and deletes only what
JetStream acknowledged.

One connection, used from one worker thread, so operations are serialized and
never block the event loop; an operation in progress completes even if the
awaiting task is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from broker.errors import ClosedError
from broker.opening import Opened
from broker.protocol.command_status import FINAL_STATUSES
from broker.protocol.commands import OpenedCommand
from broker.protocol.events import CommandStatusReport, Event, encode_event
from edge_bridge.sqlite_files import connect_wal

__all__ = ["CONTROL_DB", "ControlStore", "Remembered"]

T = TypeVar("T")

CONTROL_DB = "control.sqlite3"
"""The store's file name, in the bridge's buffer directory."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    stream_seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    code TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    result TEXT,
    expires_at REAL NOT NULL,
    received_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event BLOB NOT NULL,
    created_at REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Remembered:
    """What the edge remembers of one command it took."""

    id: str
    digest: str
    stream_seq: int
    kind: str
    state: str
    code: str
    reason: str
    result: dict[str, Any] | None
    received_at: float
    finished_at: float | None


class ControlStore(Opened):
    """``control.sqlite3``: remembered command ids and the status outbox.

    One connection, used from one worker thread, so operations are serialized
    and never block the event loop. An operation in progress completes even if
    the awaiting task is cancelled.
    """

    def __init__(self, path: Path, *, sync_mode: str = "full") -> None:
        self.path = Path(path)
        self._sync_mode = sync_mode
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self.epoch = ""
        self.created_at = 0.0
        """When this store (the memory of command ids) was created, Unix seconds."""
        """Random id of this store file, part of every outbox message id."""
        self._state = "new"

    async def open(self) -> None:
        """Create or open the database (WAL, synchronous as configured)."""
        if self._state != "new":
            raise ClosedError(f"control store is {self._state}; it opens once")
        self._state = "open"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="control-store")
        self.epoch, self.created_at = await self._run(self._init)

    def _init(self) -> tuple[str, float]:
        conn = connect_wal(self.path, sync_mode=self._sync_mode)
        conn.executescript(_SCHEMA)
        self._conn = conn
        with _transaction(conn):
            row = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
            if row is None:
                epoch = secrets.token_hex(4)
                conn.execute("INSERT INTO meta(key, value) VALUES ('epoch', ?)", (epoch,))
            else:
                epoch = str(row[0])
            # A store made before this key existed gets "now": commands from before
            # its upgrade are refused once, like after a lost volume (safe side).
            conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('created_at', ?)",
                         (repr(time.time()),))
            created = conn.execute("SELECT value FROM meta WHERE key = 'created_at'").fetchone()
        return epoch, float(created[0])

    async def close(self) -> None:
        """Close the database; idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        executor, self._executor = self._executor, None
        if executor is None:
            return

        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(executor, shut)
        executor.shutdown(wait=True)

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._executor is None or self._state != "open":
            raise ClosedError("control store is closed")
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn)
        return await asyncio.shield(future)

    def _connection(self) -> sqlite3.Connection:
        assert self._conn is not None
        return self._conn

    async def lookup(self, command_id: str) -> Remembered | None:
        def select_command() -> Remembered | None:
            row = self._connection().execute(
                "SELECT id, digest, stream_seq, kind, state, code, reason, result, received_at,"
                " finished_at FROM commands WHERE id = ?", (command_id,)).fetchone()
            if row is None:
                return None
            result = json.loads(row[7]) if row[7] else None
            return Remembered(row[0], row[1], row[2], row[3], row[4], row[5], row[6], result,
                              row[8], row[9])
        return await self._run(select_command)

    async def remember(self, opened: OpenedCommand, *, stream_seq: int, state: str,
                       received_at: float, event: CommandStatusReport) -> None:
        """Remember a command the edge took (``applying`` or a refusal) and queue its status."""
        env = opened.envelope

        def insert_command_and_status() -> None:
            c = self._connection()
            with _transaction(c):
                c.execute(
                    "INSERT INTO commands(id, digest, stream_seq, kind, state, code, reason,"
                    " expires_at, received_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT(id) DO UPDATE SET state = excluded.state",
                    (env.id, opened.digest, stream_seq, env.kind, state, event.code, event.reason,
                     env.expires_at, received_at, received_at if state in FINAL_STATUSES else None),
                )
                _queue_status(c, event)
        await self._run(insert_command_and_status)

    async def finish(self, command_id: str, event: CommandStatusReport) -> None:
        """Record the final status of a command and queue its report, atomically."""
        def update_command_and_status() -> None:
            c = self._connection()
            with _transaction(c):
                c.execute(
                    "UPDATE commands SET state = ?, code = ?, reason = ?, result = ?,"
                    " finished_at = ? WHERE id = ?",
                    (event.status, event.code, event.reason,
                     None if event.result is None else json.dumps(event.result),
                     event.reported_at, command_id),
                )
                _queue_status(c, event)
        await self._run(update_command_and_status)

    async def enqueue(self, event: Event) -> None:
        """Queue a status report about something not remembered (or reported again), or
        another event that must reach the cloud in order (a desired-state report)."""
        def insert_status() -> None:
            _queue_status(self._connection(), event)
        await self._run(insert_status)

    async def outbox(self, limit: int = 64) -> list[tuple[int, bytes]]:
        """The oldest unsent status reports, in order."""
        def oldest_statuses() -> list[tuple[int, bytes]]:
            rows = self._connection().execute(
                "SELECT seq, event FROM outbox ORDER BY seq LIMIT ?", (limit,)).fetchall()
            return [(int(r[0]), bytes(r[1])) for r in rows]
        return await self._run(oldest_statuses)

    async def sent(self, seq: int) -> None:
        """Forget one report JetStream acknowledged."""
        def delete_status() -> None:
            self._connection().execute("DELETE FROM outbox WHERE seq = ?", (seq,))
        await self._run(delete_status)

    async def outbox_size(self) -> int:
        def count_statuses() -> int:
            return int(self._connection().execute("SELECT count(*) FROM outbox").fetchone()[0])
        return await self._run(count_statuses)

    async def forget_expired(self, before: float) -> int:
        """Drop remembered commands (not mid-apply) that expired before ``before``."""
        def delete_expired() -> int:
            cur = self._connection().execute(
                "DELETE FROM commands WHERE expires_at < ? AND state != 'applying'", (before,))
            return int(cur.rowcount)
        return await self._run(delete_expired)


def _queue_status(conn: sqlite3.Connection, event: Event) -> None:
    conn.execute("INSERT INTO outbox(event, created_at) VALUES (?, ?)",
                 (encode_event(event), time.time()))


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
