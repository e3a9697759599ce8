"""Every metric an alert or a dashboard panel reads is one the code exports.

The names come from the services' real registries, instantiated (not grepped),
so a renamed metric fails here rather than as a silent, never-firing alert.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from broker.protocol.commands import generate_key_pair
from broker.settings import (
    ApiSettings,
    BridgeSettings,
    ControlSettings,
    IngestSettings,
    NatsSettings,
)
from tests.deploy.rendering import DEPLOY

MONITORING = DEPLOY / "base" / "monitoring"
# Series that do not come from edgesync's registries, each with its source.
EXTERNAL = {
    "up": "Prometheus itself (per scrape target)",
    "jetstream_consumer_num_pending": "prometheus-nats-exporter -jsz=all (NATS pod sidecar)",
}
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def _registries(tmp: Path) -> Iterator[CollectorRegistry]:
    from cloud_ingest.api import Api
    from cloud_ingest.command_status import CommandStatusWriter
    from cloud_ingest.service import Ingest
    from edge_bridge.bridge import Bridge

    _, public = generate_key_pair(tmp / "keys")
    # A bridge that takes commands: its control channel registers its metrics too.
    yield Bridge(BridgeSettings(buffer_dir=tmp / "buffer",
                                control=ControlSettings(public_key_file=public)),
                 NatsSettings()).metrics.registry
    ingest = Ingest(IngestSettings(), NatsSettings())
    # Registered when the ingest opens (Ingest.__aenter__): register them here the same way.
    CommandStatusWriter(ingest.metrics.registry)
    yield ingest.metrics.registry
    yield Api(ApiSettings(), NatsSettings()).metrics.registry


def exported_names() -> set[str]:
    """Every series name the bridge, the ingest and the API can expose."""
    names: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        for registry in _registries(Path(tmp)):
            for family in registry.collect():
                names.update(family.name + s for s in _SUFFIXES[family.type])
                names.update(sample.name for sample in family.samples)
    return names


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
             "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)               # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)                          # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                         # ranges, subqueries
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "",
                  expr)                                            # label lists
    found = set()
    for match in re.finditer(r"(?<![\w.$])([A-Za-z_:][\w:]*)\b(\s*\()?", expr):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        found.add(word)
    return found


def test_the_expression_parser_finds_metrics_not_functions_or_labels() -> None:
    """(The parser this module relies on.)"""
    expr = ('histogram_quantile(0.99, sum by (le) (rate(a_seconds_bucket{edge=~"$edge"}'
            '[$__rate_interval]))) > 1 and on (edge) max(b_total) unless c')
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c"}


def alert_expressions() -> dict[str, str]:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    return {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}


def panel_expressions() -> dict[str, str]:
    dashboard = json.loads((MONITORING / "edgesync-dashboard.json").read_text())
    found = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found[f"{panel['title']} / {target['refId']}"] = target["expr"]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            inner = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query["query"])
            assert inner, query
            found[f"variable {variable['name']}"] = inner.group(1)
    return found


def assert_reads_exported_series(expressions: dict[str, str], at_least: int) -> None:
    """At least ``at_least`` queries, each naming only exported (or listed external)
    series."""
    exported = exported_names() | set(EXTERNAL)
    assert len(expressions) >= at_least
    for name, expr in expressions.items():
        used = metric_names(expr)
        assert used, name
        assert used <= exported, f"{name} reads unknown series {sorted(used - exported)}"


def test_every_alert_reads_metrics_the_code_exports() -> None:
    """Each alert's expression names only exported series (or listed external ones)."""
    assert_reads_exported_series(alert_expressions(), at_least=10)


def test_every_dashboard_panel_reads_metrics_the_code_exports() -> None:
    """Each panel query and the edge variable name only exported series."""
    assert_reads_exported_series(panel_expressions(), at_least=20)


def test_the_alerts_cover_what_an_operator_needs() -> None:
    """Edge offline, buffer near its cap, oldest unshipped age, missing records,
    dead letters (messages and records), lost after commit, ingest group failures,
    forged or wrong watermarks, ingest lag and stuck commands each have an alert."""
    alerts = alert_expressions()
    assert {
        "EdgesyncEdgeOffline", "EdgesyncBufferNearCap", "EdgesyncOldestUnshippedAge",
        "EdgesyncRecordsMissingPersist", "EdgesyncDeadLetters", "EdgesyncIngestLag",
        "EdgesyncCommandsUnpublished", "EdgesyncCommandStatusStuck",
        "EdgesyncDeadLetteredRecords", "EdgesyncRecordsLostAfterCommit",
        "EdgesyncIngestGroupFailures", "EdgesyncWatermarkBeyondAssigned",
    } <= set(alerts)
    # Only the never-legitimate reason pages; above_shipped happens after a restart.
    assert 'reason="beyond_assigned"' in alerts["EdgesyncWatermarkBeyondAssigned"]
