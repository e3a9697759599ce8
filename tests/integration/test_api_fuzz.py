"""Schemathesis against the operator API's and the bridge ingress's own OpenAPI
documents, served by the real services (PostgreSQL, NATS, a bridge behind them):
zero 5xx, and every 4xx is JSON ``{"error", "message"}``.

A short run per operation in the default suite; ``-m fuzz`` runs long ones
(``EDGESYNC_FUZZ_EXAMPLES`` per operation, 2,000 by default). Hypothesis runs in
a thread with blocking HTTP, so the services keep serving on the test's loop.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from broker.runtime.embedded_nats import EmbeddedNats
from tests.integration.control_harness import ControlPlane, control_plane
from tests.integration.harness import bridge_settings, running_bridge
from tests.integration.test_api_auth import operator

SHORT = 25
LONG = int(os.environ.get("EDGESYNC_FUZZ_EXAMPLES", "2000"))


def _fuzz(document: dict[str, Any], base_url: str, headers: dict[str, str], examples: int
          ) -> Counter[int]:
    """Every operation of ``document``, ``examples`` cases each; returns status counts.

    A live stream (``text/event-stream``: the records tail never ends by design) is
    requested as a stream: its status is checked, and a refusal's body read, but a
    stream that was accepted is closed unread.

    Raises:
        AssertionError: a 5xx, or a 4xx without the JSON refusal shape (with the case).
    """
    schema = schemathesis.openapi.from_dict(document)
    live = {
        (method.upper(), path)
        for path, operations in document.get("paths", {}).items()
        for method, spec in operations.items()
        if "text/event-stream" in spec.get("responses", {}).get("200", {}).get("content", {})
    }
    statuses: Counter[int] = Counter()
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        for result in schema.get_all_operations():
            operation = result.ok()
            streaming = (operation.method.upper(), operation.path) in live
            _fuzz_operation(client, operation, base_url, headers, examples, streaming,
                            statuses)
    return statuses


def _fuzz_operation(client: httpx.Client, operation: Any, base_url: str,
                    headers: dict[str, str], examples: int, streaming: bool,
                    statuses: Counter[int]) -> None:
    """``examples`` cases of one operation (see :func:`_fuzz`)."""

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def check(case: Any) -> None:
        kwargs = case.as_transport_kwargs(base_url=base_url)
        with client.stream(
            kwargs["method"], kwargs["url"], params=kwargs.get("params"),
            content=_body(kwargs), headers={**(kwargs.get("headers") or {}), **headers},
        ) as response:
            status = response.status_code
            text = "" if streaming and status < 400 else response.read().decode(
                "utf-8", "replace")
        statuses[status] += 1
        where = f"{case.method} {case.formatted_path} -> {status}"
        assert status < 500, f"{where}: {text[:500]}"
        if status >= 400:
            body = json.loads(text)
            assert isinstance(body.get("error"), str), f"{where}: {body}"
            assert isinstance(body.get("message"), str), f"{where}: {body}"

    check()


def _body(kwargs: dict[str, Any]) -> bytes | None:
    if "json" in kwargs:
        return json.dumps(kwargs["json"]).encode()
    data = kwargs.get("data") or kwargs.get("content")
    if isinstance(data, str):
        return data.encode()
    return data if isinstance(data, bytes) else None


@pytest.fixture
async def plane(tmp_path: Path, nats_server: EmbeddedNats, pg_dsn: str):  # type: ignore[no-untyped-def]
    async with (
        control_plane(tmp_path, nats_server.url, pg_dsn) as plane,
        running_bridge(bridge_settings(tmp_path, heartbeat_interval_s=0.1),
                       nats_server.url) as bridge,
    ):
        await plane.wait_edge("edge-1")
        yield plane, bridge


async def _fuzz_both(plane: ControlPlane, bridge: Any, examples: int) -> None:
    api_doc = (await plane.http.get("/openapi.json")).json()
    auth = {"Authorization": f"Bearer {plane.token}"}
    api = await asyncio.to_thread(_fuzz, api_doc, plane.api.url, auth, examples)
    async with httpx.AsyncClient(base_url=bridge.url) as http:
        ingress_doc = (await http.get("/openapi.json")).json()
    ingress = await asyncio.to_thread(_fuzz, ingress_doc, bridge.url, {}, examples)
    # The runs reached past validation, not only refusals.
    assert any(200 <= s < 300 for s in api), api
    assert sum(api.values()) >= examples and sum(ingress.values()) >= examples


async def test_the_api_and_the_ingress_never_answer_5xx_and_refuse_in_json(
        plane: tuple[ControlPlane, Any]) -> None:
    await _fuzz_both(*plane, SHORT)


@pytest.mark.fuzz
async def test_the_api_and_the_ingress_long_fuzz(plane: tuple[ControlPlane, Any]) -> None:
    await _fuzz_both(*plane, LONG)


async def test_what_the_fuzzers_found_stays_fixed(plane: tuple[ControlPlane, Any]) -> None:
    """Each was a 500: ids and cursors beyond int64 or NUL in text reached PostgreSQL
    (now 422); a non-ASCII payload_b64 escaped base64's own error (now 422)."""
    api, bridge = plane
    for path in ("/v1/dead-letters/99999999999999999999999",
                 "/v1/dead-letters?before=99999999999999999999999",
                 "/v1/edges?after=a%00b", "/v1/audit?before=99999999999999999999999",
                 "/v1/edges?lagging_after_s=1e300"):
        response = await api.http.get(path)
        assert response.status_code == 422, (path, response.text)
        assert set(response.json()) >= {"error", "message"}
    async with httpx.AsyncClient(base_url=bridge.url) as http:
        response = await http.post("/v1/streams/s/records",
                                   json={"records": [{"payload_b64": "Zm9v\U0007867a"}]})
        assert response.status_code == 422 and response.json()["error"] == "invalid_records"


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
async def test_a_non_finite_number_in_a_body_is_a_422_for_any_operator(
        plane: tuple[ControlPlane, Any], number: str) -> None:
    """Python's JSON parser takes NaN and Infinity (and reads 1e400 as infinity); such a
    value made every write route answer 500, read-only operators included, because the
    422 echoing it could not be written. Now it is a JSON error: 422, for everyone."""
    api, _ = plane
    reader = await operator(api, f"reader-{number.strip('-').lower()}", "read")
    writes = [
        ("POST", "/v1/edges/edge-1/commands", '{"kind": "bridge.configure", "spec": '
                                               f'{{"linger_ms": {number}}}}}'),
        ("POST", "/v1/edges/edge-1/commands", f'{{"kind": {number}}}'),
        ("PUT", "/v1/edges/edge-1/labels", f'{{"labels": {{"tier": {number}}}}}'),
        ("POST", "/v1/rollouts", f'{{"version_id": 1, "max_failures": {number}}}'),
        ("PUT", "/v1/subscriptions/reports", f'{{"cursor": {number}}}'),
    ]
    async with reader:
        for client in (api.http, reader):
            for method, path, body in writes:
                response = await client.request(
                    method, path, content=body, headers={"content-type": "application/json"})
                assert response.status_code == 422, (method, path, body, response.text)
                refusal = response.json()
                assert refusal["error"] == "invalid_request"
                assert refusal["message"].startswith("the body is not JSON: "), refusal
                assert number.strip("-") in refusal["message"], refusal
