"""Record batches as the ingest receives them, for tests that drive a ``GroupWriter``
without NATS: a :class:`~broker.protocol.wire.Batch` encoded into a NATS message on its
records subject."""

from __future__ import annotations

from nats.aio.msg import Msg

from broker.protocol.topology import Topology
from broker.protocol.wire import CT_JSON, Batch, Record, encode_batch

__all__ = ["batch_msg", "json_batch_msg"]


def batch_msg(batch: Batch) -> Msg:
    """``batch`` encoded as the shipper sends it, on its edge's and stream's subject."""
    body, headers = encode_batch(batch)
    return Msg(_client=None,  # type: ignore[arg-type]  # never acked or replied to
               subject=Topology().records_subject(batch.edge, batch.stream),
               data=body, headers=headers)


def json_batch_msg(edge: str, stream: str, epoch: int, first: int, n: int) -> Msg:
    """A batch of ``n`` JSON records ``{"n": seq}`` with seqs ``first..first+n-1``."""
    records = [Record(1_700_000_000_000_000 + s, CT_JSON, b'{"n": %d}' % s)
               for s in range(first, first + n)]
    return batch_msg(Batch(1, edge, stream, epoch, first, records))
