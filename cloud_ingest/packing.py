"""Array parameters packed into one text parameter each, for the per-key statements.

A fleet's group touches a thousand ``(edge, stream, epoch)`` keys, and each of its
per-key statements (the accounted-seq reads, the range merge, the feed entry) binds
five to nine arrays of that length. asyncpg encodes a list parameter element by
element and checks each element against ``collections.abc`` ABCs first (is it a
sub-array?): ~3.3 ms of the ingest's CPU per statement of five 1,000-element arrays,
a fifth of a fan-in group's Python time (profiled, issue 12). Joined into one string
and split by PostgreSQL (``string_to_array``), the same arrays cost ~0.9 ms.

Integers always pack. Strings pack when none holds the separator (``\\x1f``, which
no valid edge id or stream name can: :mod:`broker.protocol.tokens`) and the array is
not one empty string (which would split to no element); otherwise the list is bound
as before, so any value is still passed exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["int8_array", "text_array"]

_SEP = "\x1f"


def text_array(values: Sequence[str], n: int) -> tuple[str, str | list[str]]:
    """SQL reading parameter ``$n`` as ``text[]``, and the value to bind to it."""
    split = f"string_to_array(${n}, E'\\x1f')"
    if not values:
        return split, ""
    joined = _SEP.join(values)
    if joined and joined.count(_SEP) == len(values) - 1:
        return split, joined
    return f"${n}::text[]", list(values)


def int8_array(values: Iterable[int], n: int) -> tuple[str, str]:
    """SQL reading parameter ``$n`` as ``int8[]``, and the value to bind to it."""
    return f"string_to_array(${n}, ',')::int8[]", ",".join(map(str, values))
