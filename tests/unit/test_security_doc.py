"""docs/security.md states the permission matrix the code grants and the test proves."""

from __future__ import annotations

import re
from pathlib import Path

from broker.protocol.permissions import permissions_for
from broker.protocol.topology import Topology
from tests.integration.test_nats_permissions import ALLOWED, DENIED

DOC = (Path(__file__).parents[2] / "docs" / "security.md").read_text()


def test_every_edge_and_admin_permission_is_in_the_doc() -> None:
    """Each subject an edge (or the admin) may use appears in the matrix, verbatim."""
    t = Topology()
    edge = permissions_for(t, "edge", "OWN")
    admin = permissions_for(t, "admin")
    for subject in (*edge.publish, *edge.subscribe, *admin.publish, *admin.subscribe):
        assert f"`{subject.replace('OWN', '<own>')}`" in DOC, subject
    assert "`es.ctl.*`" in DOC  # the API's one data subject


def test_the_doc_counts_match_the_matrix_test() -> None:
    """The refused/allowed counts quoted in the doc are the test's."""
    assert re.search(rf"\*\*{len(DENIED)} refused actions\*\*", DOC)
    assert re.search(rf"\*\*{len(ALLOWED)} allowed paths\*\*", DOC)
