"""GroupWriter.decode: every record that cannot be stored is named by its own index,
whether the wire decoder already refused it or the record checks do."""

from __future__ import annotations

import msgspec
from nats.aio.msg import Msg

from broker.protocol.topology import Topology
from cloud_ingest.writing import VALIDATE_CHUNK_RECORDS, GroupWriter

GOOD = [1_700_000_000_000_000, 1, b'{"ok": true}']


def _msg(records: list[object]) -> Msg:
    body = msgspec.msgpack.encode({"v": 1, "edge": "e", "stream": "s", "epoch": 1,
                                   "first_seq": 1, "records": records})
    return Msg(_client=None, subject=Topology().records_subject("e", "s"),  # type: ignore[arg-type]
               data=body)


def test_record_problems_keep_their_indexes_beside_undecodable_records() -> None:
    records = [GOOD, "not a record", GOOD, [0, 1, b"{nope"], [0, 7, b"x"], GOOD,
               ["ts", 1, b"1"], [0, 1, b'{"a": "x\\u0000"}'], GOOD]
    decoded = GroupWriter(Topology()).decode(_msg(records))
    assert decoded.batch is not None and decoded.reason is None
    assert sorted(decoded.bad) == [1, 3, 4, 6, 7]
    assert "JSON" in decoded.bad[3] and "content type" in decoded.bad[4]
    assert "\\u0000" in decoded.bad[7]


def test_a_batch_of_good_records_has_nothing_bad() -> None:
    decoded = GroupWriter(Topology()).decode(_msg([GOOD] * 5))
    assert decoded.batch is not None and decoded.bad == {}


def test_a_part_validated_together_names_each_bad_record_in_its_own_batch() -> None:
    """The ingest checks a part's records together (GroupWriter.validate), across
    batches and chunks: each refusal lands on its batch and index, as decode alone."""
    writer = GroupWriter(Topology())
    batches = [[GOOD] * 3, [GOOD, [0, 1, b"{nope"], GOOD],
               ["not a record", GOOD, [0, 7, b"x"]], [GOOD] * 2,
               [GOOD] * (VALIDATE_CHUNK_RECORDS + 1), [GOOD, [0, 1, b'"x\\u0000"']]]
    part = [writer.decode(_msg(records), validate=False) for records in batches]
    assert all(d.bad == {} for i, d in enumerate(part) if i != 2)
    writer.validate(part)
    alone = [writer.decode(_msg(records)) for records in batches]
    assert [d.bad for d in part] == [d.bad for d in alone]
    assert [sorted(d.bad) for d in part] == [[], [1], [0, 2], [], [], [1]]


def test_a_big_batch_of_bad_records_beside_an_undecodable_one_names_each_once() -> None:
    """Mapping each refusal back to its index past an undecodable record is done once
    per batch (it was rebuilt per refusal: a crafted batch of 100,000 bad records held
    the ingest's event loop for minutes)."""
    n = 20_000
    records: list[object] = ["not a record", *([0, 1, b"{"] for _ in range(n))]
    decoded = GroupWriter(Topology()).decode(_msg(records))
    assert decoded.batch is not None and len(decoded.bad) == n + 1
    assert sorted(decoded.bad) == list(range(n + 1))
    assert all("JSON" in decoded.bad[i] for i in range(1, n + 1))


def test_a_batch_of_a_chunk_or_more_is_checked_as_it_is_decoded() -> None:
    """A batch that is a validation chunk by itself is checked by decode even with
    validate=False (while its records are in the CPU's cache); a later validate of the
    part leaves it as it is and checks the small ones."""
    writer = GroupWriter(Topology())
    big = [GOOD] * VALIDATE_CHUNK_RECORDS + [[0, 1, b"{nope"]]
    part = [writer.decode(_msg(big), validate=False),
            writer.decode(_msg([GOOD, [0, 1, b"{nope"]]), validate=False)]
    assert part[0].checked and list(part[0].bad) == [VALIDATE_CHUNK_RECORDS]
    assert not part[1].checked and part[1].bad == {}
    writer.validate(part)
    assert [sorted(d.bad) for d in part] == [[VALIDATE_CHUNK_RECORDS], [1]]
    assert all(d.checked for d in part)
