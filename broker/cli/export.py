"""``edgesync export``: one stream's records over a time range, to NDJSON, CSV or Parquet.

Reads ``v_records``' rows straight from PostgreSQL in one read-only REPEATABLE READ
transaction (the count for the progress bar and the rows agree) through a server-side
cursor, so memory stays bounded whatever the range. The range is on ``received_at``
(the cloud clock the table is partitioned by: only the days asked for are read) or,
with ``--by event``, on ``event_time`` (the producer's clock; every partition that
may hold such rows is read). Rows come per edge in arrival order, then epoch and seq.

Columns, in every format: edge, stream, epoch, seq, event_time, received_at (ISO 8601
UTC in text formats), key, headers (JSON text), payload (JSON text; base64 for an
opaque payload) and payload_is_binary. Parquet needs the ``parquet`` extra
(``pip install 'edgesync[parquet]'``, i.e. pyarrow).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from broker.cli.database import Dsn, StateDir, exit_when_unavailable, resolve_dsn
from broker.cli.output import stderr_console
from broker.errors import InvalidInput
from broker.protocol.tokens import validate_token

__all__ = ["COLUMNS", "Format", "TimeBasis", "export", "export_cmd"]

COLUMNS = ("edge", "stream", "epoch", "seq", "event_time", "received_at", "key", "headers",
           "payload", "payload_is_binary")
"""The exported columns, in order."""
_CHUNK = 5_000
_QUERY = """
SELECT k.edge_id, k.stream, k.epoch, r.seq, r.event_time, r.received_at, r.key, r.headers::text,
       coalesce(r.payload::text, to_jsonb(encode(r.payload_raw, 'base64'))::text),
       r.payload IS NULL
FROM stream_keys k
JOIN records r ON r.stream_key = k.id
WHERE k.stream = $1 AND (cardinality($2::text[]) = 0 OR k.edge_id = ANY($2)) AND {where}
ORDER BY k.edge_id, r.received_at, k.epoch, r.seq
"""


class Format(StrEnum):
    ndjson = "ndjson"
    csv = "csv"
    parquet = "parquet"


class TimeBasis(StrEnum):
    received = "received"
    event = "event"


def _where(basis: TimeBasis) -> str:
    col = "r.received_at" if basis is TimeBasis.received else "r.event_time"
    return f"{col} >= $3 AND {col} < $4"


def _parse_time(text: str, what: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise InvalidInput(f"{what} {text!r} is not an ISO 8601 time (e.g. 2026-11-30 or "
                           "2026-11-30T12:00Z)", code="invalid_time") from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise InvalidInput("Parquet export needs pyarrow: pip install pyarrow (or the "
                           "project's extra: pip install -e '.[parquet]' in its clone)",
                           code="missing_extra") from exc
    return pyarrow


class _Writer:
    """Rows -> one output format."""

    def __init__(self, fmt: Format, out: IO[bytes]) -> None:
        self.fmt = fmt
        self.out = out
        self._parquet: Any = None
        if fmt is Format.csv:
            text = io.StringIO()
            csv.writer(text).writerow(COLUMNS)
            out.write(text.getvalue().encode())
        if fmt is Format.parquet:
            pa = _pyarrow()
            self._pa = pa
            ts = pa.timestamp("us", tz="UTC")
            self._schema = pa.schema([
                ("edge", pa.string()), ("stream", pa.string()), ("epoch", pa.int64()),
                ("seq", pa.int64()), ("event_time", ts), ("received_at", ts),
                ("key", pa.string()), ("headers", pa.string()), ("payload", pa.string()),
                ("payload_is_binary", pa.bool_())])
            self._parquet = pa.parquet.ParquetWriter(out, self._schema, compression="zstd")

    def write(self, rows: list[Any]) -> None:
        if self.fmt is Format.ndjson:
            self.out.write("".join(json.dumps(
                {"edge": r[0], "stream": r[1], "epoch": r[2], "epoch_str": str(r[2]),
                 "seq": r[3],
                 "event_time": r[4].isoformat(), "received_at": r[5].isoformat(),
                 "key": r[6], "headers": None if r[7] is None else json.loads(r[7]),
                 "payload": json.loads(r[8]), "payload_is_binary": r[9]},
                separators=(",", ":")) + "\n" for r in rows).encode())
        elif self.fmt is Format.csv:
            text = io.StringIO()
            w = csv.writer(text)
            w.writerows((r[0], r[1], r[2], r[3], r[4].isoformat(), r[5].isoformat(),
                         r[6] if r[6] is not None else "", r[7] or "", r[8],
                         "true" if r[9] else "false") for r in rows)
            self.out.write(text.getvalue().encode())
        else:
            columns = list(zip(*rows, strict=True))
            self._parquet.write_table(self._pa.Table.from_arrays(
                [self._pa.array(c, type=f.type) for c, f in zip(columns, self._schema,
                                                                 strict=True)],
                schema=self._schema))

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()


async def export(dsn: str, out: IO[bytes], *, stream: str, start: datetime, end: datetime,
                 fmt: Format, edges: list[str] | None = None,
                 basis: TimeBasis = TimeBasis.received,
                 on_total: Callable[[int], None] | None = None,
                 on_rows: Callable[[int], None] | None = None) -> int:
    """Write ``stream``'s records in ``[start, end)`` to ``out``; returns rows written.

    Raises:
        InvalidInput: a bad stream or edge name, an empty range, Parquet without pyarrow.
    """
    import asyncpg

    validate_token("stream", stream)
    for e in edges or ():
        validate_token("edge id", e)
    if end <= start:
        raise InvalidInput("--to must be after --from", code="invalid_range")
    writer = _Writer(fmt, out)  # before connecting: a missing extra fails fast
    conn = await asyncpg.connect(dsn)
    written = 0
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            args = (stream, list(edges or ()), start, end)
            where = _where(basis)
            if on_total is not None:
                on_total(int(await conn.fetchval(
                    f"SELECT count(*) FROM stream_keys k JOIN records r ON r.stream_key = k.id "
                    f"WHERE k.stream = $1 AND (cardinality($2::text[]) = 0 OR "
                    f"k.edge_id = ANY($2)) AND {where}", *args)))
            cursor = await conn.cursor(_QUERY.format(where=where), *args)
            while rows := await cursor.fetch(_CHUNK):
                writer.write(rows)
                written += len(rows)
                if on_rows is not None:
                    on_rows(len(rows))
    finally:
        writer.close()
        await conn.close()
    return written


@contextmanager
def _output(path: Path | None) -> Iterator[IO[bytes]]:
    if path is None:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    with path.open("wb") as f:
        yield f


def export_cmd(
    *,
    stream: Annotated[str, typer.Option(help="The stream to export.")],
    from_: Annotated[str, typer.Option("--from", help="Start (ISO 8601, inclusive; UTC "
                                                      "when no zone is given).")],
    to: Annotated[str, typer.Option(help="End (ISO 8601, exclusive).")],
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.ndjson,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="File to write (default: standard output).")] = None,
    edge: Annotated[list[str] | None, typer.Option(help="Only this edge (repeatable).")]
    = None,
    by: Annotated[TimeBasis, typer.Option(help=(
        "Which time --from/--to select on: received (cloud clock; reads only those "
        "days' partitions) or event (the producer's clock)."))] = TimeBasis.received,
    dsn: Dsn = None,
    state_dir: StateDir = Path(".edgesync"),
) -> None:
    """Export one stream's records over a time range to NDJSON, CSV or Parquet."""
    err = stderr_console()
    try:
        start, end = _parse_time(from_, "--from"), _parse_time(to, "--to")
        if fmt is Format.parquet:
            _pyarrow()
        if fmt is Format.parquet and output is None and sys.stdout.isatty():
            raise InvalidInput("Parquet is binary: give --output FILE", code="invalid_output")
    except InvalidInput as exc:
        err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from exc
    progress = Progress(TextColumn("export"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), console=err, transient=False)
    task = progress.add_task("rows", total=None)
    with exit_when_unavailable("export", dsn=dsn, state_dir=state_dir):
        try:
            with progress, _output(output) as out:
                written = asyncio.run(export(
                    resolve_dsn(dsn, state_dir), out, stream=stream, start=start, end=end,
                    fmt=fmt, edges=edge, basis=by,
                    on_total=lambda n: progress.update(task, total=n),
                    on_rows=lambda n: progress.advance(task, n)))
        except InvalidInput as exc:
            err.print(f"[red]{escape(str(exc))}[/red]")
            raise typer.Exit(1) from exc
    err.print(f"{written} records of {stream} exported"
              + (f" to {output}" if output else ""))
