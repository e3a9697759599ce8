"""`edgesync status` on a fleet: a summary of every edge, then the rows that need
attention first, a screenful by default."""

from __future__ import annotations

from broker.pg_connecting import connected
from cloud_ingest.schema import migrate
from tests.integration.control_harness import run_cli

EDGES = 120
OFFLINE = ("edge-007", "edge-042", "edge-111")


async def seed_fleet(dsn: str) -> None:
    async with connected(dsn) as conn:
        await migrate(conn)
        await conn.executemany(
            "INSERT INTO edges (edge_id, last_seen, version, buffer_records, buffer_bytes, "
            "buffer_max_bytes, unshipped_records, oldest_unshipped_age_s, disk_bytes, "
            "dropped, streams, edge_clock) VALUES ($1, now() - make_interval(secs => $2), "
            "'1.0', $3::bigint, $3::bigint * 100, 1000000, $3::bigint, 0, 0, '{}', '{}', now())",
            [(f"edge-{i:03d}", 3600.0 if f"edge-{i:03d}" in OFFLINE else 1.0, i)
             for i in range(EDGES)],
        )


def edge_rows(output: str) -> list[str]:
    return [line for line in output.splitlines() if "edge-" in line]


async def test_status_summarises_the_fleet_and_lists_offline_edges_first(pg_dsn: str) -> None:
    await seed_fleet(pg_dsn)
    result = await run_cli("status", "--dsn", pg_dsn, "--limit", "5")
    assert result.exit_code == 0, result.stderr
    assert f"{EDGES} edges: {EDGES - 3} online, 3 offline" in result.output
    rows = edge_rows(result.output)
    assert len(rows) == 5
    # offline first, each group by its backlog (unshipped = the edge's number here)
    assert [r.split()[1] for r in rows[:3]] == sorted(OFFLINE, reverse=True)
    assert all("(offline)" in r for r in rows[:3])
    assert "edge-119" in rows[3]  # then the largest backlog
    assert f"{EDGES - 5} more edges" in result.output


async def test_status_limit_zero_lists_every_edge(pg_dsn: str) -> None:
    await seed_fleet(pg_dsn)
    result = await run_cli("status", "--dsn", pg_dsn, "--limit", "0")
    assert result.exit_code == 0, result.stderr
    assert len(edge_rows(result.output)) == EDGES
    assert "more edges" not in result.output
