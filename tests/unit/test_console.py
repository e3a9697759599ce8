"""The console's pure parts: the sealed session cookie, CSRF tokens, the command form
generated from the specs and what it asks to confirm, a command's page, the fleet
query's defaults, and the charts."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from broker.protocol.command_specs import SPEC_MODELS
from cloud_ingest.console.charts import completeness_bar, history_chart
from cloud_ingest.console.forms import destructive_reason, form_fields, parse_form
from cloud_ingest.console.pages import Viewer
from cloud_ingest.console.queries import FleetQuery, parse_multirange
from cloud_ingest.console.rendering import Renderer
from cloud_ingest.console.sessions import SESSION_MAX_AGE_S, SessionKeys
from cloud_ingest.operators import Operator

KEYS = SessionKeys.derive(b"a signing key, for the test")


def test_a_sealed_session_opens_to_the_same_token_and_hides_it() -> None:
    """The cookie carries the token sealed: it opens to the same session, and the
    token's characters are not in it."""
    session = KEYS.new_session("eso_secret-token-value")
    cookie = KEYS.seal(session)
    assert "secret" not in cookie
    assert KEYS.open(cookie) == session


@pytest.mark.parametrize("damage", [
    lambda c: c[:-2] + ("A" if c[-2] != "A" else "B") + c[-1],  # one character changed
    lambda c: c[:20],                                            # truncated
    lambda c: "",                                                # empty
    lambda c: "%%%not base64%%%",                                # garbage
    lambda c: "A" * 5000,                                        # oversized
])
def test_a_damaged_or_forged_cookie_opens_to_nothing(damage: object) -> None:
    cookie = KEYS.seal(KEYS.new_session("eso_token"))
    assert KEYS.open(damage(cookie)) is None  # type: ignore[operator]


def test_another_key_and_an_old_session_open_to_nothing() -> None:
    """A cookie sealed by another API key does not open; nor one past its max age."""
    session = KEYS.new_session("eso_token")
    assert SessionKeys.derive(b"another key").open(KEYS.seal(session)) is None
    later = time.time() + SESSION_MAX_AGE_S + 1
    assert KEYS.open(KEYS.seal(session), now=later) is None


def test_csrf_tokens_belong_to_their_session() -> None:
    one, two = KEYS.new_session("eso_a"), KEYS.new_session("eso_a")
    assert KEYS.csrf_ok(one, KEYS.csrf_token(one))
    assert not KEYS.csrf_ok(one, KEYS.csrf_token(two))
    assert not KEYS.csrf_ok(one, None) and not KEYS.csrf_ok(one, "")


def test_every_kind_has_a_form_with_its_models_fields() -> None:
    """The form is generated from the specs: one input per model field, bounds and
    enums carried over."""
    for kind, model in SPEC_MODELS.items():
        assert [f.name for f in form_fields(kind)] == list(model.model_fields), kind
    fields = {f.name: f for f in form_fields("bridge.configure")}
    assert fields["batch_max_records"].widget == "integer"
    assert (fields["batch_max_records"].minimum, fields["batch_max_records"].maximum) == (
        1, 100_000)
    assert fields["compression"].widget == "select"
    assert fields["compression"].options == ("none", "zstd")
    assert fields["streams"].widget == "json"
    assert {f.name for f in form_fields("deployment.scale") if f.required} == {
        "namespace", "name", "replicas"}


def test_a_valid_form_becomes_the_spec_with_only_the_fields_given() -> None:
    parsed = parse_form("bridge.configure", {
        "spec.batch_max_records": "500", "spec.linger_ms": "2.5", "spec.log_level": "debug",
        "spec.streams": '{"telemetry": {"overflow": "drop_oldest"}}', "spec.zstd_level": ""})
    assert parsed.errors == {}
    assert parsed.spec == {"batch_max_records": 500, "linger_ms": 2.5, "log_level": "debug",
                           "streams": {"telemetry": {"overflow": "drop_oldest"}}}


def test_each_bad_field_gets_its_own_error_and_no_spec() -> None:
    """Conversion errors and the model's own refusals land on the offending field."""
    parsed = parse_form("bridge.configure", {"spec.batch_max_records": "many",
                                             "spec.streams": "{nope"})
    assert parsed.spec is None
    assert parsed.errors["batch_max_records"] == "'many' is not a whole number"
    assert parsed.errors["streams"].startswith("not valid JSON")
    parsed = parse_form("bridge.configure", {"spec.batch_max_records": "0"})
    assert "greater than or equal to 1" in parsed.errors["batch_max_records"]
    parsed = parse_form("bridge.configure", {})
    assert "at least one setting" in parsed.errors[""]
    parsed = parse_form("deployment.scale", {"spec.namespace": "Bad_NS", "spec.name": "web"})
    assert parsed.errors["replicas"] == "required"
    parsed = parse_form("no.such.kind", {})
    assert "unknown command kind" in parsed.errors[""]


def test_json_too_deep_or_not_finite_is_a_fields_error_not_a_500() -> None:
    """A textarea of 200,000 brackets raised RecursionError (a 500), and NaN or
    Infinity in a JSON or number field passed on to a spec JSON cannot hold."""
    parsed = parse_form("bridge.configure", {"spec.streams": "[" * 200_000 + "]" * 200_000})
    assert parsed.errors["streams"] == "not valid JSON: nested too deeply"
    parsed = parse_form("bridge.configure", {"spec.streams": '{"s": {"ttl_s": NaN}}'})
    assert parsed.errors["streams"].startswith("not valid JSON: NaN is not a JSON number")
    parsed = parse_form("bridge.configure", {"spec.linger_ms": "inf"})
    assert parsed.errors["linger_ms"] == "'inf' is not a finite number"
    assert parsed.spec is None


def test_scale_to_zero_and_image_changes_need_a_confirmation() -> None:
    scale = {"namespace": "prod", "name": "web"}
    assert destructive_reason("deployment.scale", {**scale, "replicas": 0}) is not None
    assert destructive_reason("deployment.scale", {**scale, "replicas": 3}) is None
    assert destructive_reason("deployment.set_image", {
        **scale, "container": "app", "image": "registry/app:2"}) is not None
    assert destructive_reason("bridge.configure", {"linger_ms": 5}) is None


@pytest.mark.parametrize("spec", [
    {"default_policy": {"ttl_s": 0.001}},
    {"default_policy": {"overflow": "drop_oldest"}},
    {"streams": {"audit": {"ttl_s": 60}}},
    {"linger_ms": 5, "streams": {"audit": {"overflow": "drop_oldest"}}},
])
def test_a_configure_that_deletes_unshipped_records_needs_a_confirmation(
    spec: dict[str, object],
) -> None:
    reason = destructive_reason("bridge.configure", spec)
    assert reason is not None and "shipped or not" in reason


@pytest.mark.parametrize("spec", [
    {"default_policy": {"ttl_s": 7 * 86400.0, "overflow": "block"}},
    {"streams": {"audit": None}}, {"streams": {"audit": {"priority": 3}}},
])
def test_a_configure_that_keeps_unshipped_records_needs_none(spec: dict[str, object]) -> None:
    assert destructive_reason("bridge.configure", spec) is None


def test_a_commands_history_names_the_edge_of_each_report() -> None:
    """Another edge may report on a command (on its own subject): the report is ignored
    (not effective), and the page says whose it was instead of showing it as the
    command's edge's."""
    now = datetime.now(UTC)
    command = {"id": "0b3c9a3e-1111-4222-8333-444455556666", "edge": "victim",
               "kind": "bridge.configure", "status": "pending", "issuer": "alice",
               "issued_at": now, "expires_at": now, "delivered_at": None,
               "finished_at": None, "finished_by": None, "spec": {"linger_ms": 5},
               "result": None, "code": None, "reason": None, "history": [
                   {"status": "applied", "edge": "mallory", "reported_at": now,
                    "received_at": now, "reason": "<b>done</b>", "effective": False},
                   {"status": "delivered", "edge": "victim", "reported_at": now,
                    "received_at": now, "reason": "", "effective": True}]}
    viewer = Viewer(Operator("alice", frozenset({"admin"})), None, "csrf")  # type: ignore[arg-type]
    html = Renderer().text("command.html", viewer.context(nav="fleet", command=command))
    rows = html[html.index("<h2>History"):].split("<tr>")[2:]
    assert "<td>mallory <strong>(not the command's edge: ignored)</strong></td>" in rows[0]
    assert "&lt;b&gt;done&lt;/b&gt;" in rows[0]
    assert "<td>victim</td>" in rows[1]


def test_what_an_edge_writes_is_escaped_clipped_and_never_reorders_the_page() -> None:
    """A record key of markup, a right-to-left override and 10,000 characters: escaped,
    its U+202E shown as ``[U+202E]`` (it would reverse what follows it), cut to 80
    characters in the tail (the payload to 160, as before)."""
    key = "<img src=x onerror=alert(1)>\u202egpj.exe" + "A" * 10_000
    html = Renderer().text("_tail_rows.html", {"rows": [{
        "received_at": "2026-01-01T00:00:00.000000Z", "edge": "edge-1", "stream": "s",
        "seq": 1, "key": key, "payload_text": "{}"}]})
    cell = html.split("<td")[5]
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;[U+202E]gpj.exe" in cell
    assert "\u202e" not in html
    assert cell.count("A") == 80 - len("<img src=x onerror=alert(1)>\u202egpj.exe") - 1
    assert "A\u2026</td>" in cell


def test_an_operator_allowed_some_kinds_is_offered_those_only() -> None:
    """The form offers the kinds the operator may send, ``bridge.configure`` first when
    it is one of them; a kind asked for (``?kind=``) that it may not send falls back."""
    restart = Viewer(Operator("r", frozenset({"operate:deployment.restart"})), None, "")  # type: ignore[arg-type]
    assert restart.kinds == ("deployment.restart",) and restart.can_operate
    assert restart.kind_or_default(None) == "deployment.restart"
    assert restart.kind_or_default("bridge.configure") == "deployment.restart"
    admin = Viewer(Operator("a", frozenset({"admin"})), None, "")  # type: ignore[arg-type]
    assert admin.kind_or_default(None) == "bridge.configure"
    assert admin.kind_or_default("deployment.scale") == "deployment.scale"
    reader = Viewer(Operator("v", frozenset({"read"})), None, "")  # type: ignore[arg-type]
    assert reader.kinds == () and not reader.can_operate


def test_a_fleet_query_falls_back_to_defaults_for_unknown_parameters() -> None:
    """A stale or hand-edited URL still shows the fleet; nothing of it reaches SQL but
    the closed lists' keys."""
    query = FleetQuery.of(q="  edge-1 ", state="bogus", sort="edge_id; DROP TABLE edges",
                          order="sideways", page=-3, per_page=7)
    assert query == FleetQuery(q="edge-1")
    assert query.params() == {"q": "edge-1"}
    assert FleetQuery.of(q=None, state="gaps", sort="backlog", order="desc", page=2,
                         per_page=100).params() == {
        "state": "gaps", "sort": "backlog", "order": "desc", "page": "2", "per_page": "100"}


def test_multiranges_parse_and_charts_say_their_numbers() -> None:
    assert parse_multirange("{[1,5),[7,9)}") == [(1, 5), (7, 9)]
    assert parse_multirange("{}") == []
    bar = completeness_bar({"committed": [(1, 5), (7, 9)], "missing": [(5, 7)]}, 8)
    assert 'aria-label="seqs 1 to 8: 6 committed' in bar and "2 missing" in bar
    assert "style=" not in bar  # the console's CSP forbids inline style
    chart = history_chart([(0.0, 0, 10), (15.0, 10, 20)])
    assert "role=\"img\"" in chart and "watermark rose to 10" in chart
    assert "No commits" in history_chart([])
