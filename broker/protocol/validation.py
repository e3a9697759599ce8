"""The one record validator: what the cloud will store, checked wherever a record passes.

A record is valid when the ingest can write it into ``records`` and PostgreSQL
accepts it. These are exactly the rules checked here; the bridge's ingress
applies them before it acknowledges anything (422 with each bad record's index
and reason), the SDK applies the cheap ones at ``publish``, and the ingest
applies them after decoding, so a bad record is dead-lettered alone, with its
identity, instead of taking its batch (or the ingest) down with it.

| field     | rule                                                                     |
| --------- | ------------------------------------------------------------------------ |
| ``ts``    | integer microseconds in [0001-01-01, 9999-12-31T23:59:59.999999] UTC     |
| ``ct``    | 0 (opaque bytes) or 1 (JSON text)                                        |
| payload   | JSON (ct 1): UTF-8 JSON text PostgreSQL ``jsonb`` takes: no ``\\u0000``, |
|           | no lone surrogate, nesting at most :data:`MAX_JSON_DEPTH`                |
| ``key``   | ``None`` or at most :data:`MAX_KEY_CHARS` characters, no NUL             |
| headers   | ``None`` or ``str -> str``, no NUL, at most :data:`MAX_HEADERS_BYTES`    |

Why those time bounds: PostgreSQL's ``timestamptz`` reaches further (4713 BC to
294276 AD), but four-digit years are what every reader can represent (ISO 8601,
Python ``datetime``, JavaScript ``Date``), and the encoder's arithmetic cannot
overflow inside them. A ``ts`` of ``1e13`` (seconds given as microseconds' worth)
or ``-2^63`` is a producer bug, caught at the edge instead of in the cloud.

Every check here is total: it returns a reason or ``None`` and never raises,
whatever the input (including inputs that make a JSON parser recurse).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from operator import attrgetter
from typing import Any, Final

import msgspec

from broker.errors import InvalidRecords
from broker.protocol.wire import CT_JSON, CT_RAW, MAX_KEY_CHARS, MAX_TS_US, MIN_TS_US, Record

__all__ = [
    "MAX_HEADERS_BYTES",
    "MAX_JSON_DEPTH",
    "check_records",
    "headers_problem",
    "json_all_plainly_valid",
    "json_problem",
    "key_problem",
    "record_problem",
    "record_problems",
    "ts_problem",
]

MAX_JSON_DEPTH: Final = 256
"""Deepest nesting of JSON arrays/objects: far beyond real documents, and well
inside what a recursive parser (msgspec's, PostgreSQL's) handles on any stack."""
MAX_HEADERS_BYTES: Final = 64 * 1024
"""UTF-8 bytes of all header names and values of one record together."""

_NUMERIC_MAX_WEIGHT: Final = 131_071
"""PostgreSQL ``numeric`` (jsonb numbers) holds up to 131,072 digits before the point
(the leading digit's power of ten at most this)..."""
_NUMERIC_MAX_SCALE: Final = 16_383
"""... and 16,383 after it (trailing zeros count: ``1.0e-16383`` has 16,384)."""
_NUMERIC_MAX_EXPONENT: Final = (2**31 - 1) // 2 - 1
"""The largest exponent (either sign) PostgreSQL reads: it refuses any from ``INT_MAX / 2``
(1,073,741,823) up, even a zero's."""
_TOKENS = re.compile(rb'"(?:[^"\\]++|\\.)*+"?|[\[\]{}]', re.DOTALL)
_OPEN = frozenset(b"[{")
_CLOSE = frozenset(b"]}")
_json_plain = msgspec.json.Decoder()
_json_spans = msgspec.json.Decoder(list[msgspec.Raw])
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789E", b"000000000e")
_BIG_EXPONENT = b"e0000"
"""An exponent of four digits or more, once digits read ``0``, ``E`` reads ``e`` and the
signs are gone: what a number beyond PostgreSQL numeric needs in a payload of under
15,000 bytes (an exponent of at most three digits moves the point at most 999 places;
16,383 are needed)."""
_LONG_PAYLOAD = 15_000
_LONG_DIGITS: Final = b"0" * (_NUMERIC_MAX_SCALE + 1 - 999)
"""A run of 15,385 digits (once digits read ``0``). With an exponent of at most three
digits (``_BIG_EXPONENT`` finds the others), a number beyond ``numeric`` needs a run at
least that long: more than 16,383 - 999 digits after the point, or more than
131,072 - 999 before it. Only a payload holding one needs the number-by-number scan."""
_json_syntax = msgspec.json.Decoder(msgspec.Raw)
"""Checks JSON syntax without building a value (numbers are skimmed, not converted)."""
_STRING_OR_NUMBER = re.compile(
    rb'"(?:[^"\\]++|\\.)*+"|-?([0-9]+)(?:\.([0-9]+))?(?:[eE]([+-]?[0-9]+))?')
"""A JSON string (skipped) or a number, its integer part, fraction and exponent apart."""


def ts_problem(ts: object) -> str | None:
    """Why ``ts`` (integer microseconds since the Unix epoch) is not storable, or None."""
    if type(ts) is not int:
        return f"ts must be integer microseconds, not {type(ts).__name__}"
    if not MIN_TS_US <= ts <= MAX_TS_US:
        return (f"ts {ts} µs is outside 0001-01-01..9999-12-31 UTC "
                f"({MIN_TS_US}..{MAX_TS_US} microseconds since the Unix epoch)")
    return None


def key_problem(key: object) -> str | None:
    """Why ``key`` is not a storable record key, or None."""
    if key is None:
        return None
    if not isinstance(key, str):
        return f"key must be a string or null, not {type(key).__name__}"
    if len(key) > MAX_KEY_CHARS:
        return f"key of {len(key)} characters exceeds {MAX_KEY_CHARS}"
    return _text_problem("key", key)


def headers_problem(headers: object) -> str | None:
    """Why ``headers`` are not storable (as ``jsonb``), or None."""
    if headers is None:
        return None
    if not isinstance(headers, dict):
        return f"headers must be a map of strings, not {type(headers).__name__}"
    size = 0
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            return f"headers must map strings to strings; {name!r} does not"
        problem = _text_problem("header name", name) or _text_problem(f"header {name!r}", value)
        if problem:
            return problem
        size += len(name) + len(value)
    if size > MAX_HEADERS_BYTES:  # characters <= bytes: exact check only when close
        size = sum(len(n.encode()) + len(v.encode()) for n, v in headers.items())
        if size > MAX_HEADERS_BYTES:
            return f"headers of {size} bytes exceed {MAX_HEADERS_BYTES}"
    return None


def json_problem(payload: bytes) -> str | None:
    """Why ``payload`` is not JSON text PostgreSQL's ``jsonb`` accepts, or None.

    The common case costs one C-speed parse; the slower checks (depth, NUL,
    huge numbers) run only when a cheap scan says they might apply. The scans
    themselves are guarded by cheaper ones (a profile of the bridge showed this
    function as its largest per-record cost, the scans a third of it): a body of at
    most twice ``MAX_JSON_DEPTH`` bytes cannot nest deeper than that, and a body
    without a backslash has no ``\\u0000`` escape.
    """
    if len(payload) > 2 * MAX_JSON_DEPTH and (
            payload.count(b"[") + payload.count(b"{") > MAX_JSON_DEPTH):
        depth = _json_depth(payload)
        if depth > MAX_JSON_DEPTH:
            return f"JSON nested {depth} deep; at most {MAX_JSON_DEPTH}"
    value: Any = None
    built = True
    try:
        value = _json_plain.decode(payload)
    except msgspec.ValidationError:  # a number beyond float or int: syntax checked apart
        built = False
        try:
            _json_syntax.decode(payload)
            if not payload.isascii():
                payload.decode()  # the skim leaves strings' UTF-8 unchecked
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
            return f"invalid JSON: {exc}"
    except msgspec.DecodeError as exc:
        return f"invalid JSON: {exc}"
    except RecursionError:
        return f"JSON nested deeper than this process can parse (limit {MAX_JSON_DEPTH})"
    # Only a number of 4,300 digits or more (beyond msgspec's int), an exponent of four
    # digits or more, or a run of more digits than numeric holds after the point can
    # be beyond PostgreSQL numeric: the number-by-number scan (Python) runs only then.
    skim = payload.translate(_DIGITS_AS_ZERO, b"+-")
    if not built or skim.rfind(_BIG_EXPONENT) >= 0 or (
            len(payload) >= len(_LONG_DIGITS) and skim.find(_LONG_DIGITS) >= 0):
        problem = _numbers_problem(payload)
        if problem:
            return problem
    if b"\\" in payload and b"\\u0000" in payload and (
            _has_nul(value) if built else _strings_hold_nul(payload)):
        return "JSON text contains \\u0000, which PostgreSQL jsonb cannot store"
    return None


def record_problem(rec: Record, *, max_payload_bytes: int | None = None,
                   json_syntax: bool = True) -> str | None:
    """Why ``rec`` cannot be stored, or None when it can (``json_syntax``: see
    :func:`record_problems`)."""
    problem = ts_problem(rec.ts)
    if problem:
        return problem
    if rec.ct not in (CT_RAW, CT_JSON):
        return f"unknown content type {rec.ct} (0 = bytes, 1 = JSON)"
    if max_payload_bytes is not None and len(rec.payload) > max_payload_bytes:
        return f"payload of {len(rec.payload)} bytes exceeds {max_payload_bytes}"
    if rec.ct == CT_JSON:
        problem = (json_problem if json_syntax else _json_problem_beyond_syntax)(rec.payload)
        if problem:
            return problem
    return key_problem(rec.key) or headers_problem(rec.headers)


def json_all_plainly_valid(payloads: Sequence[bytes], *, syntax: bool = True) -> bool:
    """True only when :func:`json_problem` finds nothing wrong with any of ``payloads``,
    decided in a few passes over them all instead of a parse per payload (which built
    every payload's Python objects: most of the bridge's validation cost, with the
    garbage collections those allocations trigger). False says nothing: ask
    :func:`json_problem` of each; a property test keeps the two in agreement.

    With ``syntax=False``, JSON syntax and UTF-8 are not checked (no skim): only what
    PostgreSQL's ``json`` input would let through, nesting, ``\\u0000`` and
    surrogate escapes, numbers beyond ``numeric``. The ingest checks so, for the
    ``json`` column refuses the rest itself (:mod:`cloud_ingest.writing`).

    The payloads are joined as one JSON array and skimmed (syntax, escapes, surrogate
    pairs; no object built): the array has exactly as many elements as payloads and
    each element is exactly as long as its payload only when every element *is* its
    payload, the commas packed so tightly that no element can span two payloads.
    Then what the skim does not check, over the joined text at once: UTF-8 (JSON is
    ASCII outside strings), ``\\u0000`` and numbers beyond PostgreSQL numeric
    (``_BIG_EXPONENT``, for payloads under ``_LONG_PAYLOAD`` bytes); nesting, as in
    :func:`json_problem`, needs a look only at payloads longer than twice
    ``MAX_JSON_DEPTH`` (shorter ones cannot nest deeper).
    """
    if not payloads:
        return True
    lengths = list(map(len, payloads))
    longest = max(lengths)
    if longest >= _LONG_PAYLOAD or (longest > 2 * MAX_JSON_DEPTH and any(
            len(p) > 2 * MAX_JSON_DEPTH and p.count(b"[") + p.count(b"{") > MAX_JSON_DEPTH
            for p in payloads)):
        return False
    if syntax:
        joined = b"[" + b",".join(payloads) + b"]"
        try:
            spans = _json_spans.decode(joined)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            return False
        if len(spans) != len(payloads) or list(map(len, spans)) != lengths:
            return False
        if not joined.isascii():
            try:
                joined.decode()
            except UnicodeDecodeError:
                return False
    else:  # joined as they are: a pattern found across two payloads only costs a check
        joined = b"".join(payloads)
        if 92 in joined and (b"\\ud" in joined or b"\\uD" in joined):  # a surrogate?
            return False
    if 92 in joined and b"\\u0000" in joined:  # a backslash first: memchr, ~50x faster
        return False
    # rfind, not ``in``: CPython's backward search tests the needle's first byte, the
    # rarer ``e``, where the forward one tests its last, a ``0`` (about half as fast).
    return joined.translate(_DIGITS_AS_ZERO, b"+-").rfind(_BIG_EXPONENT) < 0


def record_problems(records: Iterable[Record], *, json_syntax: bool = True,
                    plain: bool = False) -> list[tuple[int, str]]:
    """``(index, reason)`` of every record that cannot be stored.

    With ``json_syntax=False``, JSON syntax and UTF-8 are left unchecked in payloads
    that have nothing else wrong (see :func:`json_all_plainly_valid`): the ingest asks
    so, since PostgreSQL's ``json`` input parses every payload it stores and refuses
    those, and asks again in full only when PostgreSQL refuses a group.

    ``plain``: every record came from a :attr:`~broker.protocol.wire.DecodedBatch.plain`
    batch, whose decoder checked event times, content types, key lengths and the
    absence of headers already; only keys' characters and payloads are then looked at
    (the answer is the same)."""
    records = records if isinstance(records, list) else list(records)
    if _all_plainly_storable(records, json_syntax=json_syntax, plain=plain):
        return []
    json_ok = json_all_plainly_valid([r.payload for r in records if r.ct == CT_JSON],
                                     syntax=json_syntax)
    check_json = json_problem if json_syntax else _json_problem_beyond_syntax
    found = []
    for i, rec in enumerate(records):
        # The common record, inline: the bridge checks every record of every request.
        ts, ct, key = rec.ts, rec.ct, rec.key
        if (type(ts) is int and MIN_TS_US <= ts <= MAX_TS_US and rec.headers is None
                and (ct == CT_RAW or (ct == CT_JSON and (
                    json_ok or check_json(rec.payload) is None)))
                and (key is None or (type(key) is str and len(key) <= MAX_KEY_CHARS
                                     and key.isascii() and "\x00" not in key))):
            continue
        problem = record_problem(rec, json_syntax=json_syntax)
        if problem:
            found.append((i, problem))
    return found


def _json_problem_beyond_syntax(payload: bytes) -> str | None:
    """:func:`json_problem` of a payload that :func:`json_all_plainly_valid` with
    ``syntax=False`` does not pass, else None (its syntax left unchecked)."""
    return None if json_all_plainly_valid([payload], syntax=False) else json_problem(payload)


def _all_plainly_storable(records: list[Record], *, json_syntax: bool = True,
                          plain: bool = False) -> bool:
    """True only when :func:`record_problems`' per-record check would pass every record
    (the common case: no headers, JSON or opaque payloads, ASCII keys), decided by
    whole columns at C speed (``map``, ``min``, ``count``, one join of the keys)
    instead of a dozen bytecodes per record: ~0.5 µs per record less for the ingest and
    the bridge. False says nothing; the per-record check then decides. ``plain``: as
    :func:`record_problems`' (the columns its decoder checked are not passed over)."""
    n = len(records)
    if not n:
        return True
    try:
        if not plain:
            if list(map(_HEADERS, records)).count(None) != n:
                return False
            stamps = list(map(_TS, records))
            if (set(map(type, stamps)) != {int}
                    or min(stamps) < MIN_TS_US or max(stamps) > MAX_TS_US):
                return False
        types = list(map(_CT, records))
        json_count = types.count(CT_JSON)
        if not plain and json_count + types.count(CT_RAW) != n:
            return False
        keys = list(map(_KEY, records))
        absent = keys.count(None)
        if absent != n:
            if absent:
                keys = [k for k in keys if k is not None]
            if not plain and (set(map(type, keys)) != {str}
                              or max(map(len, keys)) > MAX_KEY_CHARS):
                return False
            joined = "".join(keys)
            if not joined.isascii() or "\x00" in joined:
                return False
        if json_count == n:
            payloads = list(map(_PAYLOAD, records))
        else:
            payloads = [r.payload for r in records if r.ct == CT_JSON]
        return json_all_plainly_valid(payloads, syntax=json_syntax)
    except Exception:  # e.g. a record built by hand with values min() cannot order
        return False


_TS = attrgetter("ts")
_CT = attrgetter("ct")
_KEY = attrgetter("key")
_HEADERS = attrgetter("headers")
_PAYLOAD = attrgetter("payload")


def check_records(records: Iterable[Record]) -> None:
    """Raise :class:`InvalidRecords` naming every record that cannot be stored."""
    problems = record_problems(records)
    if problems:
        raise InvalidRecords(problems)


def _text_problem(what: str, text: str) -> str | None:
    if "\x00" in text:
        return f"{what} contains NUL (\\x00), which PostgreSQL text cannot store"
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            return f"{what} is not valid Unicode (lone surrogate)"
    return None


def _json_depth(payload: bytes) -> int:
    """Deepest array/object nesting of ``payload``, outside strings (rarely needed)."""
    depth = deepest = 0
    for token in _TOKENS.finditer(payload):
        char = token.group()[0]
        if char in _OPEN:
            depth += 1
            deepest = max(deepest, depth)
        elif char in _CLOSE:
            depth -= 1
    return deepest


def _has_nul(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for k, v in item.items():
                if "\x00" in k:
                    return True
                stack.append(v)
    return False


def _strings_hold_nul(payload: bytes) -> bool:
    """Whether a string of ``payload`` (valid JSON) holds NUL, without building its value."""
    for token in _STRING_OR_NUMBER.finditer(payload):
        text = token.group()
        if text[:1] == b'"' and b"\\u0000" in text:
            try:
                if "\x00" in _json_plain.decode(text):
                    return True
            except msgspec.DecodeError:  # not storable either way; never raise here
                return True
    return False


def _numbers_problem(payload: bytes) -> str | None:
    """Why a number of ``payload`` (valid JSON) is beyond PostgreSQL ``numeric``, or None.

    Read from each number's text, as PostgreSQL reads it: the digits after the point
    are the fraction's digits less the exponent, the leading digit's power of ten is
    where the first non-zero digit stands plus the exponent (a zero has none)."""
    for token in _STRING_OR_NUMBER.finditer(payload):
        whole, fraction, exponent_text = token.groups()
        if whole is None:
            continue  # a string
        shown = token.group() if len(token.group()) <= 24 else token.group()[:20] + b"..."
        number = shown.decode()
        if exponent_text is not None and len(exponent_text.lstrip(b"+-").lstrip(b"0")) > 10:
            return f"JSON number {number} has an exponent PostgreSQL numeric refuses"
        exponent = int(exponent_text) if exponent_text is not None else 0
        if abs(exponent) > _NUMERIC_MAX_EXPONENT:
            return f"JSON number {number} has an exponent PostgreSQL numeric refuses"
        fraction = fraction or b""
        scale = len(fraction) - exponent
        if scale > _NUMERIC_MAX_SCALE:
            return (f"JSON number {number} has {scale} digits after the point; PostgreSQL "
                    f"numeric holds {_NUMERIC_MAX_SCALE}")
        significant = whole.lstrip(b"0")
        if significant:
            weight = len(significant) - 1 + exponent
        elif fraction.strip(b"0"):
            weight = -(len(fraction) - len(fraction.lstrip(b"0"))) - 1 + exponent
        else:
            continue  # zero
        if weight > _NUMERIC_MAX_WEIGHT:
            return (f"JSON number {number} has {weight + 1} digits before the point; "
                    f"PostgreSQL numeric holds {_NUMERIC_MAX_WEIGHT + 1}")
    return None
