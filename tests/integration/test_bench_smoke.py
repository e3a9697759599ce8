"""`python -m bench` keeps working: a tiny run of every scenario yields the table and the JSON.

Speed is never asserted here (bench/ does the measuring); only that each
scenario ran against the real servers and reported its figures and targets.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.results import TARGETS_TITLE
from bench.scenarios import SCENARIOS


def test_bench_smoke_run_reports_every_scenario_in_the_table_and_the_json(
    tmp_path: Path,
) -> None:
    """A smoke-sized run exits 0, prints both tables, and writes one JSON with all scenarios."""
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--profile", "smoke", "--results-dir", str(results)],
        capture_output=True,
        text=True,
        timeout=600,  # eight scenarios, each starting its own servers and services
        check=False,
        env={**os.environ, "COLUMNS": "240"},
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]

    assert "edgesync beside its baselines" in proc.stdout
    assert TARGETS_TITLE in proc.stdout
    for scenario in SCENARIOS:
        assert scenario.title in proc.stdout, f"{scenario.title!r} missing from the table"

    files = list(results.glob("*.json"))
    assert len(files) == 1, files
    document = json.loads(files[0].read_text())
    assert document["profile"] == "smoke"
    assert document["machine"]["nproc"] >= 1
    assert set(document["scenarios"]) == {s.key for s in SCENARIOS}
    for key, scenario in document["scenarios"].items():
        assert scenario["error"] is None, (key, scenario["error"])
        assert scenario["figures"], f"{key} reported no figures"
    checked = {(t["figure"], t["target"]) for t in document["targets"]}
    # Every threshold of bench/README.md's "Targets" table, each once (the fleet scenario
    # adds five to the thirteen of the single-edge scenarios, the edge's lighter-bridge
    # targets four, consume five and the console two more).
    assert len(checked) == 29, sorted(checked)
    labels = {f["label"] for f in document["scenarios"]["ingest"]["figures"]}
    assert "framework (c): FastStream + executemany" in labels  # measured or skipped, with a note
    edge = {f["label"]: f["value"] for f in document["scenarios"]["edge_path"]["figures"]}
    # The SDK's target is shown beside the floor under it, measured in the same run.
    assert edge["floor: JSON + event time + keep, per record"] > 0
    assert edge["EdgeClient.send without I/O, per record"] > 0
    assert edge["floor: durable append CPU per record"] > 0
    # The fleet's fan-in / bulk ratio is the median of back-to-back pairs (smoke: 2), each
    # drained on its own servers; the CPU split names every drain.
    fleet = document["scenarios"]["fleet"]
    pairs = fleet["data"]["drain_pairs"]
    assert len(pairs) == 2 and all(b > 0 and f > 0 for b, f in pairs), pairs
    figures = {f["label"]: f["value"] for f in fleet["figures"]}
    assert figures["fan-in / bulk"] == statistics.median(f / b for b, f in pairs)
    assert {"fleet-bulk", "fleet-fanin", "fleet-bulk-r2", "fleet-fanin-r2"} <= set(
        fleet["cpu_seconds"])


async def test_the_tls_cost_script_runs_both_configurations() -> None:
    """`python -m bench.tls_cost` measures the open and the secured server in one run
    (a few records: this proves it runs, speed is not asserted)."""
    from bench.tls_cost import OPEN, SECURED, measure

    results = await measure(300, rounds=1)
    assert set(results) == {OPEN, SECURED}
    assert all(edge > 0 and ingest > 0 for edge, ingest in results.values())


async def test_the_ingest_cpu_script_times_every_stage_of_both_shapes() -> None:
    """`python -m bench.ingest_cpu` runs the worker's stages on a fan-in and a bulk group
    against real servers, every record written once (it checks the row count), and
    reports CPU for each stage (speed is not asserted)."""
    from bench.ingest_cpu import BULK, FAN_IN, STAGES, measure

    results = await measure(1)
    assert set(results) == {FAN_IN, BULK}
    for stages in results.values():
        assert set(stages) == set(STAGES)
        assert all(stages[s] > 0 for s in ("fetch", "decode", "commit"))


def test_the_ingest_cpu_script_refuses_no_rounds() -> None:
    """`--rounds 0` would have no group to take a median of: a usage error, not a crash."""
    proc = subprocess.run([sys.executable, "-m", "bench.ingest_cpu", "--rounds", "0"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "--rounds must be at least 1, got 0" in proc.stderr
