"""The ingest sizes a group by work: records and bytes, with a message cap."""

from __future__ import annotations

from nats.aio.msg import Msg

from broker.settings import IngestSettings
from cloud_ingest.ingesting import _GroupBudget, _records_hint


def _msg(msg_id: str | None) -> Msg:
    return Msg(_client=None, subject="es.rec.e.s", data=b"x" * 100,  # type: ignore[arg-type]
               headers=None if msg_id is None else {"Nats-Msg-Id": msg_id})


def test_records_hint_reads_the_range_of_the_msg_id_with_or_without_a_generation() -> None:
    """A batch's records are counted from its Nats-Msg-Id; without one it counts as 1."""
    assert _records_hint(_msg("edge-1.telemetry.77.11-20")) == 10
    assert _records_hint(_msg("edge-1.telemetry.77.1-2000.r3")) == 2000
    assert _records_hint(_msg(None)) == 1
    assert _records_hint(_msg("not-a-batch-id")) == 1


def test_a_fleet_of_small_batches_grows_the_group_to_the_record_budget() -> None:
    """After 8 batches of 10 records, the next fetch asks for what fills 16,000 records,
    capped by the message budget."""
    budget = _GroupBudget(messages=1_000, records=16_000, bytes=8 * 1024**2)
    assert budget.next_ask(8, 80, 8 * 2_000) == 992
    uncapped = _GroupBudget(messages=10_000, records=16_000, bytes=8 * 1024**2)
    assert uncapped.next_ask(8, 80, 8 * 2_000) == 1_592


def test_by_default_a_fleets_10_record_batches_fill_a_group_by_records() -> None:
    """With the default budgets, 10-record batches make a group of group_max_records
    (16,000 records, 1,600 batches), as big batches do: the message cap does not cut
    a fleet's transactions short."""
    s = IngestSettings()
    budget = _GroupBudget(s.group_max_messages, s.group_max_records, s.group_max_bytes)
    asked = 8 + budget.next_ask(8, 80, 8 * 1_300)
    assert asked * 10 == s.group_max_records


def test_the_byte_budget_bounds_a_group_of_large_batches() -> None:
    """Batches of 1 MiB: a group of 8 MiB asks for no more than fits."""
    budget = _GroupBudget(messages=1_000, records=16_000, bytes=8 * 1024**2)
    assert budget.next_ask(2, 200, 2 * 1024**2) == 6
