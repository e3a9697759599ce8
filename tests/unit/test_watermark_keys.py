"""The watermark bucket's keys and subjects have one home (``Topology``): the ingest
publishes to the subject the bridge and the fleet driver parse back."""

from __future__ import annotations

import pytest

from broker.protocol.topology import Topology


def test_a_key_round_trips_through_its_subject() -> None:
    t, epoch = Topology(prefix="acme"), 7_000_000_000_000_000_001
    subject = t.watermark_subject("edge-1", "temps", epoch)
    assert subject == "$KV.ACME_WATERMARKS.edge-1.temps.7000000000000000001"
    assert subject == f"$KV.{t.watermarks_bucket}.{t.watermark_key('edge-1', 'temps', epoch)}"
    assert t.parse_watermark_subject(subject) == ("edge-1", "temps", epoch)


@pytest.mark.parametrize("subject", [
    "$KV.ES_WATERMARKS.edge-1.temps",  # no epoch
    "$KV.ES_WATERMARKS.edge-1.temps.7.8",  # one token too many
    "$KV.ES_WATERMARKS.edge-1.temps.seven",  # epoch not a number
    "$KV.ES_DESIRED.edge-1.temps.7",  # another bucket
    "$KV.ACME_WATERMARKS.edge-1.temps.7",  # another prefix
    "es.rec.edge-1.temps",
])
def test_a_subject_that_is_not_a_watermark_key_parses_to_none(subject: str) -> None:
    assert Topology().parse_watermark_subject(subject) is None
