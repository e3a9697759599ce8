"""Which seqs of a group the ingest already holds: the accounting behind step 1 of
:mod:`cloud_ingest.writing`, and the locked read of its redo after a race.

A key's ``committed_ranges`` row says which of its seqs are committed or
dead-lettered. The writer reads, per key, only the part of that inside the seqs the
group covers (:func:`windows_of`, :func:`accounted_seqs`) and leaves out the records
it already holds or an earlier batch of the group holds (:func:`skips`). Whether a
concurrent commit took some of the rest meanwhile is checked by the merge itself
(:func:`cloud_ingest.ranges.merge_committed`); when one did, the group is redone
with the keys locked by this module's read first.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING

from broker.protocol.wire import DecodedBatch
from cloud_ingest.db_errors import Connection
from cloud_ingest.packing import int8_array, text_array

if TYPE_CHECKING:
    from cloud_ingest.dead_letters import DeadLetter
    from cloud_ingest.writing import Decoded

__all__ = ["SeqRuns", "accounted_seqs", "key_of", "skips", "windows_of"]


def key_of(batch: DecodedBatch) -> tuple[str, str, int]:
    """A batch's key: ``(edge, stream, epoch)``, as ``committed_ranges`` is keyed."""
    return (batch.edge, batch.stream, batch.epoch)


SeqRuns = list[tuple[int, int]]
"""Half-open ``[lo, hi)`` runs of seqs, sorted."""


def windows_of(good: Sequence[Decoded], letters: Sequence[DeadLetter]
               ) -> dict[tuple[str, str, int], tuple[int, int]]:
    """Per key of the group, the half-open run of seqs its batches (and dead-lettered
    messages) cover: the part of the key's accounted seqs the group needs to know."""
    out: dict[tuple[str, str, int], tuple[int, int]] = {}
    for d in good:
        b = d.batch
        assert b is not None
        key, lo, hi = (b.edge, b.stream, b.epoch), b.first_seq, b.first_seq + len(b.records)
        if (had := out.get(key)) is not None:
            lo, hi = min(lo, had[0]), max(hi, had[1])
        out[key] = (lo, hi)
    for x in letters:
        if (s := x.span) is not None:
            key, lo, hi = s[:3], s[3], s[4] + 1
            if (had := out.get(key)) is not None:
                lo, hi = min(lo, had[0]), max(hi, had[1])
            out[key] = (lo, hi)
    return out


async def accounted_seqs(
    conn: Connection, keys: Sequence[tuple[str, str, int]],
    windows: dict[tuple[str, str, int], tuple[int, int]], *, lock: bool,
    existing: frozenset[tuple[str, str, int]] = frozenset(),
) -> dict[tuple[str, str, int], SeqRuns]:
    """Per key, the seqs already committed or dead-lettered (a redelivery skips them),
    within the key's window (:func:`windows_of`). Only those can matter: every seq the
    group may leave out (:func:`skips`) lies in the window, and the race check
    (:func:`cloud_ingest.ranges.merge_committed`) looks only at seqs the group
    inserts, so runs outside it change nothing; and a fleet's group reads a thousand keys,
    whose whole ranges cost the ingest more to decode than the group's records. A
    key whose row exists is in the result, with no runs when nothing in its window
    is accounted.

    With ``lock``, the keys' ``committed_ranges`` rows are created if missing and
    locked in key order (as :func:`merge_ranges` locks them, so never a deadlock)
    until the transaction ends: no other writer can commit seqs of those keys
    meanwhile. That lock is what keeps rows exactly once: ``records`` has no unique
    index (a partitioned table's must hold ``received_at``; migration 008).

    ``existing``: keys whose row this transaction has already read. The ingest never
    deletes a ``committed_ranges`` row, and inserting a row that exists does nothing
    and locks nothing (``ON CONFLICT DO NOTHING``), so only the other keys are
    inserted (in key order, as before); then every key is locked, in key order. A
    fleet's group touches a thousand keys that almost all exist: the insert is then
    skipped. Should a row vanish all the same since it was read (an operator's
    restore), the lock finds fewer rows than keys, and the whole step is redone
    with every key inserted, as it was without ``existing``.
    """
    if not keys:
        return {}
    if lock and (missing := [k for k in keys if k not in existing]):
        await conn.execute(
            "INSERT INTO committed_ranges (edge_id, stream, epoch, ranges) "
            "SELECT edge_id, stream, epoch, '{}' FROM unnest($1::text[], $2::text[], "
            "$3::int8[]) AS u(edge_id, stream, epoch) ORDER BY 1, 2, 3 "
            "ON CONFLICT (edge_id, stream, epoch) DO NOTHING",
            [k[0] for k in missing], [k[1] for k in missing], [k[2] for k in missing])
    spans = [windows[k] for k in keys]
    params = (text_array([k[0] for k in keys], 1), text_array([k[1] for k in keys], 2),
              int8_array([k[2] for k in keys], 3), int8_array([w[0] for w in spans], 4),
              int8_array([w[1] for w in spans], 5))
    rows = await conn.fetch(
        "SELECT u.ord, nullif((c.ranges + c.dead_lettered)"
        "  * int8multirange(int8range(u.lo, u.hi)), '{}') AS seen "
        f"FROM committed_ranges c JOIN unnest({', '.join(p[0] for p in params)})"
        "  WITH ORDINALITY AS u(edge_id, stream, epoch, lo, hi, ord) "
        "  USING (edge_id, stream, epoch) "
        "ORDER BY c.edge_id, c.stream, c.epoch" + (" FOR UPDATE OF c" if lock else ""),
        *(p[1] for p in params))
    if lock and existing and len(rows) < len(keys):
        return await accounted_seqs(conn, keys, windows, lock=True)
    return {keys[r[0] - 1]: [(x.lower, x.upper) for x in r[1]] if r[1] is not None else []
            for r in rows}


def skips(good: Sequence[Decoded], seen: dict[tuple[str, str, int], SeqRuns]
           ) -> list[frozenset[int]]:
    """Per batch of ``good`` (by index), the records to leave out: their seq is accounted
    already, or an earlier batch of the group holds it (overlapping retransmits)."""
    planned: dict[tuple[str, str, int], SeqRuns] = {}
    out: list[frozenset[int]] = []
    for d in good:
        b = d.batch
        assert b is not None
        key = key_of(b)
        lo, hi = b.first_seq, b.first_seq + len(b.records)
        runs = seen.get(key)
        # Fast path (a fleet's group: a thousand keys, a batch or two each): nothing
        # accounted reaches this batch, which only extends what the group plans.
        skip = _accounted_indexes(b, runs) if runs and runs[-1][1] > lo else _NONE
        mine = planned.get(key)
        if mine is None:
            planned[key] = [(lo, hi)]
        elif mine[-1][1] <= lo:
            if mine[-1][1] == lo:
                mine[-1] = (mine[-1][0], hi)
            else:
                mine.append((lo, hi))
        else:
            skip = skip | _accounted_indexes(b, mine)
            planned[key] = _merged([*mine, (lo, hi)])
        out.append(skip)
    return out


_NONE: frozenset[int] = frozenset()


def _merged(runs: SeqRuns) -> SeqRuns:
    out: SeqRuns = []
    for a, b in sorted(runs):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _accounted_indexes(batch: DecodedBatch | None, runs: SeqRuns) -> frozenset[int]:
    """Indexes of ``batch``'s records whose seq is in ``runs`` (sorted, disjoint)."""
    if batch is None or not runs:
        return frozenset()
    lo, hi = batch.first_seq, batch.first_seq + len(batch.records)
    out: set[int] = set()
    for a, b in runs[max(0, bisect.bisect_right(runs, (lo, lo)) - 1):]:
        if a >= hi:
            break
        out.update(range(max(a, lo) - lo, min(b, hi) - lo))
    return frozenset(out)
