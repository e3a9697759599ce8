"""The durable edge buffer (SQLite WAL, group commit): one room per job.

Public surface: :class:`Buffer` and what its methods return. The rooms:

- :mod:`.store` - the :class:`Buffer` facade: lifecycle, appends, trims, reads;
- :mod:`.chunks` - the chunk codec and the byte charge per record;
- :mod:`.schema` - the tables and the named rows that cross modules;
- :mod:`.streams` - the in-memory stream table: identity, watermarks, sizes;
- :mod:`.writer` - the group-committing writer thread;
- :mod:`.policies` - overflow (``drop_oldest`` / ``block``) and TTL expiry;
- :mod:`.reads` - contiguous runs for the shipper;
- :mod:`.tail` - the rows just committed, kept in memory for the shipper's reads;
- :mod:`.recovery` - quick check, quarantine and salvage of a damaged file;
- :mod:`.stats` - what the buffer reports about itself.
"""

from edge_bridge.buffer.chunks import (
    encode_chunks,
    record_size,
    split_chunk,
)
from edge_bridge.buffer.reads import StoredRun
from edge_bridge.buffer.schema import DropRun
from edge_bridge.buffer.stats import BufferStats
from edge_bridge.buffer.store import AppendResult, Buffer
from edge_bridge.buffer.streams import StreamState

__all__ = [
    "AppendResult",
    "Buffer",
    "BufferStats",
    "DropRun",
    "StoredRun",
    "StreamState",
    "encode_chunks",
    "record_size",
    "split_chunk",
]
