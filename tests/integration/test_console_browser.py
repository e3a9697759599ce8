"""The operator console in a real browser (headless Chromium driven by Playwright)
against a real ``edgesync up``: two simulated edges, NATS with TLS and auth, the
embedded PostgreSQL. One ``up`` serves the whole module; the tests run in order
and the last one takes the screenshots ``docs/console.md`` shows.

Skipped, saying why, where Debian's ``chromium`` (``/usr/bin/chromium``) or the
``playwright`` package is missing; ``.ci/run`` installs both.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import pytest_asyncio

from broker.connecting import connect_options
from broker.pg_connecting import connected
from broker.protocol.events import DesiredStateReport, Heartbeat, encode_event
from broker.protocol.permissions import inbox_prefix
from broker.protocol.topology import Topology
from broker.protocol.wire import CT_JSON, Batch, Record, encode_batch
from broker.settings import NatsSettings
from cloud_ingest.operators import add_operator, revoke_operator
from tests.support import UpProcess, edgesync_up, until

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"
TIMEOUT_MS = 30_000

playwright_api = pytest.importorskip(
    "playwright.async_api", reason="the console's browser tests need the playwright package "
    "(pip install -e '.[test]')")
if not CHROMIUM.exists():
    pytest.skip(f"the console's browser tests need Chromium at {CHROMIUM} (Debian: apt-get "
                "install chromium; .ci/run installs it)", allow_module_level=True)

expect = playwright_api.expect
expect.set_options(timeout=TIMEOUT_MS)  # conditions with a deadline, polled by Playwright
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def up() -> AsyncIterator[UpProcess]:
    """``edgesync up --edges 2 --simulate 200``, shared by every test here."""
    # As root the embedded PostgreSQL runs as another user: a directory it can traverse.
    base = Path(tempfile.mkdtemp(prefix="edgesync-console-"))
    os.chmod(base, 0o755)
    try:
        async with edgesync_up(base, "--edges", "2", "--simulate", "200", "--bridge-port", "0",
                               "--api-port", "0", state=base / "state") as running:
            yield running
            assert running.interrupt() == 0, running.log_tail()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as pw:
        # --no-sandbox: the tests may run as root, where Chromium's sandbox cannot start.
        launched = await pw.chromium.launch(executable_path=str(CHROMIUM),
                                            args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()


async def _logged_in(browser: Any, up: UpProcess, token: str | None = None,
                     viewport: tuple[int, int] = (1280, 800)) -> Any:
    context = await browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
    context.set_default_timeout(TIMEOUT_MS)
    page = await context.new_page()
    await page.goto(f"{up.runtime['api_url']}/ui/")
    await page.get_by_label("Operator token").fill(token or up.runtime["operator_token"])
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("heading", name="Fleet")).to_be_visible()
    return page


async def _edge_page(browser: Any, up: UpProcess) -> Any:
    page = await _logged_in(browser, up)
    await page.get_by_role("link", name="edge-1", exact=True).click()
    await expect(page.get_by_role("heading", name="Edge edge-1")).to_be_visible()
    return page


async def test_login_refuses_a_wrong_token_then_the_fleet_shows_both_edges(
    up: UpProcess, browser: Any
) -> None:
    """Without a session the console redirects to its login form (the JSON API still
    answers 401); a wrong token is refused on the form; the right one shows the fleet
    with edge-1 and edge-2 online."""
    url = up.runtime["api_url"]
    async with httpx.AsyncClient(base_url=url) as client:
        page_answer = await client.get("/ui/fleet")
        assert page_answer.status_code == 303
        assert page_answer.headers["location"].startswith("/ui/login?next=")
        assert (await client.get("/v1/edges")).status_code == 401
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    await page.goto(f"{url}/ui/fleet")
    await page.get_by_label("Operator token").fill("eso_" + "x" * 43)
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("alert")).to_have_text("Unknown or revoked operator token.")

    await page.get_by_label("Operator token").fill(up.runtime["operator_token"])
    await page.get_by_role("button", name="Log in").click()
    rows = page.locator("#fleet-rows tr[data-edge]")
    await expect(rows).to_have_count(2)  # both bridges have sent a heartbeat
    await expect(rows.nth(0).locator("th")).to_have_text("edge-1")
    await expect(rows.nth(1).locator("th")).to_have_text("edge-2")
    await expect(rows.nth(0)).to_contain_text("online")
    cookie = next(c for c in await context.cookies() if c["name"] == "edgesync_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    assert up.runtime["operator_token"] not in cookie["value"]  # sealed, not carried in clear
    await context.close()


async def test_fleet_search_sort_and_a_narrow_screen(up: UpProcess, browser: Any) -> None:
    """Searching narrows the rows without a reload; sorting by edge descending puts
    edge-2 first; at 390 px wide the page does not scroll sideways (the table does)."""
    page = await _logged_in(browser, up)
    await page.evaluate("window.notReloaded = true")
    await page.get_by_label("Search edge or version").fill("edge-2")
    rows = page.locator("#fleet-rows tr[data-edge]")
    await expect(rows).to_have_count(1)
    await expect(rows.first.locator("th")).to_have_text("edge-2")
    assert await page.evaluate("window.notReloaded === true")
    await page.goto(f"{up.runtime['api_url']}/ui/fleet?sort=edge&order=desc")
    await expect(page.locator("#fleet-rows tr[data-edge] th").first).to_have_text("edge-2")
    await page.set_viewport_size({"width": 390, "height": 844})
    await expect(page.get_by_role("heading", name="Fleet")).to_be_visible()
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    await page.keyboard.press("Tab")  # the first stop is the skip link
    assert await page.evaluate("document.activeElement.textContent") == "Skip to content"
    await page.goto(f"{up.runtime['api_url']}/ui/edges/edge-1")
    await expect(page.get_by_role("heading", name="Edge edge-1")).to_be_visible()
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    await page.get_by_role("link", name="Rollouts").click()  # the nav wraps, still there
    await expect(page.get_by_role("heading", name="Rollouts")).to_be_visible()
    await expect(page.locator("main")).to_contain_text("rollouts")
    await page.context.close()


async def test_a_streams_committed_count_rises_live_on_the_edge_view(
    up: UpProcess, browser: Any
) -> None:
    """The edge view's committed count of the simulated stream grows while the page
    stays open (Server-Sent Events, no reload)."""
    page = await _edge_page(browser, up)
    await page.evaluate("window.notReloaded = true")
    cell = page.locator('#edge-streams tr[data-stream="telemetry"] td[data-field="committed"]')
    await expect(cell).to_be_visible()
    first = int((await cell.inner_text()).replace(",", ""))

    async def grown() -> bool:
        return int((await cell.inner_text()).replace(",", "")) > first

    await until(grown, timeout=30, interval=0.25, message="committed count never rose")
    assert await page.evaluate("window.notReloaded === true")
    assert await page.locator("#edge-streams svg.chart").count() >= 1
    await page.context.close()


async def test_bridge_configure_from_the_form_shows_errors_inline_then_is_applied(
    up: UpProcess, browser: Any
) -> None:
    """An out-of-range value is refused on its field, nothing is sent; a valid
    ``bridge.configure`` is issued and its row in "Recent commands" reaches
    ``applied`` on its own."""
    page = await _edge_page(browser, up)
    form = page.locator("#command-form")
    await form.get_by_label("batch max records").fill("0")
    await form.get_by_role("button", name="Send bridge.configure to edge-1").click()
    field = page.locator("#command-form").get_by_label("batch max records")
    await expect(field).to_have_attribute("aria-invalid", "true")
    await expect(page.locator("#command-form .field-error")).to_contain_text(
        "greater than or equal to 1")
    assert await page.locator("#edge-commands tr[data-command]").count() == 0

    await page.locator("#command-form").get_by_label("batch max records").fill("500")
    await page.locator("#command-form").get_by_label("log level").select_option("debug")
    await page.locator("#command-form").get_by_role("button", name="Send").click()
    await expect(page.locator("#command-form [role=status]")).to_contain_text("issued")
    row = page.locator("#edge-commands tr[data-command]").first
    await expect(row).to_have_attribute("data-status", "applied")
    await expect(row).to_contain_text("bridge.configure")
    await page.context.close()


async def test_scale_to_zero_asks_for_a_confirmation_before_it_is_sent(
    up: UpProcess, browser: Any
) -> None:
    """``deployment.scale`` to 0 replicas is not sent until confirmed; confirmed, it is
    issued (and the edge, which allows no namespace, rejects it: the lifecycle says so)."""
    page = await _edge_page(browser, up)
    await page.locator("#command-form").get_by_label("Kind").select_option("deployment.scale")
    form = page.locator("#command-form")
    await expect(form.get_by_label("replicas")).to_be_visible()
    await form.locator("[name='spec.namespace']").fill("prod")
    await form.locator("[name='spec.name']").fill("web")
    await form.get_by_label("replicas").fill("0")
    before = await page.locator("#edge-commands tr[data-command]").count()
    await form.get_by_role("button", name="Send deployment.scale to edge-1").click()
    dialog = page.get_by_role("alertdialog")
    await expect(dialog).to_contain_text("scales prod/web to zero replicas")
    assert await page.locator("#edge-commands tr[data-command]").count() == before
    await dialog.get_by_role("button", name="Confirm and send").click()
    await expect(page.locator("#command-form [role=status]")).to_contain_text("issued")
    row = page.locator("#edge-commands tr[data-command]").filter(has_text="deployment.scale")
    await expect(row).to_have_attribute("data-status", "rejected")
    await page.context.close()


async def test_a_read_only_operator_sees_no_command_form_and_cannot_post(
    up: UpProcess, browser: Any
) -> None:
    """An operator with the read scope sees the edge but no form, and a POST with a
    valid CSRF token is still refused (403) with the reason on the form."""
    async with connected(up.runtime["postgres_dsn"]) as conn:
        token = await add_operator(conn, "viewer", ["read"], created_by="test")
    page = await _logged_in(browser, up, token)
    await page.get_by_role("link", name="edge-1", exact=True).click()
    await expect(page.get_by_text("Your token has the read scope only")).to_be_visible()
    assert await page.locator("#command-form").count() == 0
    csrf = await page.locator("input[name=csrf]").first.get_attribute("value")
    answer = await page.request.post(
        f"{up.runtime['api_url']}/ui/edges/edge-1/commands",
        form={"csrf": csrf or "", "kind": "bridge.configure", "spec.linger_ms": "5"})
    assert answer.status == 403
    assert "may not send bridge.configure" in await answer.text()
    forged = await page.request.post(f"{up.runtime['api_url']}/ui/edges/edge-1/commands",
                                     form={"csrf": "forged", "kind": "bridge.configure"})
    assert forged.status == 403
    await page.context.close()


async def test_the_data_page_shows_completeness_and_a_live_tail(
    up: UpProcess, browser: Any
) -> None:
    """The data page lists edge-2's telemetry with its watermark, and its live tail
    fills with records as they commit (filtered to that edge)."""
    page = await _logged_in(browser, up)
    await page.goto(f"{up.runtime['api_url']}/ui/data?edge=edge-2&stream=telemetry")
    await expect(page.locator("table.completeness tbody tr")).to_have_count(1)
    await expect(page.locator("table.completeness tbody tr")).to_contain_text("edge-2")
    tail = page.locator("#tail-rows tr")
    await expect(tail.first).to_be_visible()
    assert set(await page.locator("#tail-rows tr td:nth-child(2)").all_inner_texts()) == {
        "edge-2"}
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / "data.png"))
    await page.context.close()


async def _publish_poison(runtime: dict[str, Any]) -> None:
    """A batch from edge-1 whose JSON payload PostgreSQL refuses (``\\u0000``), on the
    subject edge-1 may publish to, with edge-1's own credentials."""
    settings = NatsSettings(url=runtime["nats_url"], ca_file=runtime["nats_ca_file"],
                            credentials_file=runtime["nats_credentials"]["edge-1"])
    nc = await nats.connect(runtime["nats_url"], allow_reconnect=False, connect_timeout=5,
                            **connect_options(settings, inbox_prefix=inbox_prefix(
                                Topology(), "edge", "edge-1")))
    try:
        poison = Batch(1, "edge-1", "poison", 4242, 1,
                       [Record(0, CT_JSON, b'{"bad": "\\u0000"}')])
        data, headers = encode_batch(poison)
        await nc.jetstream().publish(Topology().records_subject("edge-1", "poison"), data,
                                     headers=headers or None)
    finally:
        await nc.close()


async def test_a_poison_records_dead_letter_appears_with_its_reason_then_screenshots(
    up: UpProcess, browser: Any
) -> None:
    """A record PostgreSQL refuses shows up under "Recent dead letters" of its edge,
    with its seq and reason, while the page is open. Then the screenshots of the
    fleet and of this edge view are written to docs/console/."""
    page = await _edge_page(browser, up)
    await _publish_poison(up.runtime)
    row = page.locator("#edge-deadletters tr[data-dead-letter]").first
    await expect(row).to_contain_text("poison")
    await expect(row.locator("td.reason")).to_contain_text("\\u0000")
    SHOTS.mkdir(parents=True, exist_ok=True)
    await expect(page.locator('#edge-commands tr[data-status="applied"]').first).to_be_visible()
    await page.screenshot(path=str(SHOTS / "edge.png"), full_page=True)
    await page.get_by_role("link", name="Fleet", exact=True).first.click()
    await expect(page.locator("#fleet-rows tr[data-edge]")).to_have_count(2)
    await page.screenshot(path=str(SHOTS / "fleet.png"), full_page=True)
    await page.context.close()


# -- what a hostile edge, a careless operator and a revoked token meet ----------------
# (after the screenshots: what these leave on edge-1 must not show in docs/console/)

HOSTILE = "<img src=x onerror=\"document.title='PWNED'\">\"><script>document.title='PWNED'</script>"
"""Markup an edge controls, in every free-text field it sends: shown, never run."""


async def _edge_1_nats(runtime: dict[str, Any]) -> Any:
    """A NATS connection with edge-1's own credentials: what a compromised edge-1 has."""
    settings = NatsSettings(url=runtime["nats_url"], ca_file=runtime["nats_ca_file"],
                            credentials_file=runtime["nats_credentials"]["edge-1"])
    return await nats.connect(runtime["nats_url"], allow_reconnect=False, connect_timeout=5,
                              **connect_options(settings, inbox_prefix=inbox_prefix(
                                  Topology(), "edge", "edge-1")))


async def _live(page: Any) -> None:
    """Until the page's live stream is open (htmx's SSE extension keeps its EventSource
    on the element; evaluated from outside the page, as the CSP allows no eval)."""
    script = ("(() => { const e = document.querySelector('[sse-connect]'); const d = e && "
              "e['htmx-internal-data']; return !!(d && d.sseEventSource && "
              "d.sseEventSource.readyState === 1); })()")

    async def open_() -> bool:
        return bool(await page.evaluate(script))

    await until(open_, timeout=30, interval=0.1, message="the live stream never opened")


async def _no_script_ran(page: Any) -> None:
    assert await page.locator("img[src='x']").count() == 0  # the markup stayed text
    assert "PWNED" not in await page.title()
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


async def test_what_a_hostile_edge_sends_is_shown_as_text_clipped_and_unreordered(
    up: UpProcess, browser: Any
) -> None:
    """edge-1 (its own credentials) sends records whose key and JSON payload are markup,
    and a heartbeat whose version is markup, a right-to-left override (U+202E) and
    20,000 characters. Nothing runs (no element is injected, the title stays); the
    tail shows the key as text; the fleet row shows at most 40 characters of the
    version, the edge page 200 with the override made visible as ``[U+202E]``, and
    neither page scrolls sideways."""
    dialogs: list[str] = []
    page = await _logged_in(browser, up)
    page.on("dialog", lambda d: dialogs.append(d.message))
    await page.goto(f"{up.runtime['api_url']}/ui/data?edge=edge-1&stream=hostile")
    await expect(page.get_by_role("heading", name="Live tail")).to_be_visible()
    await _live(page)
    nc = await _edge_1_nats(up.runtime)
    try:
        payload = json.dumps({"html": HOSTILE, "href": "javascript:alert(1)"}).encode()
        data, headers = encode_batch(Batch(1, "edge-1", "hostile", 4343, 1, [
            Record(0, CT_JSON, payload, key=HOSTILE)]))
        await nc.jetstream().publish(Topology().records_subject("edge-1", "hostile"), data,
                                     headers=headers or None)
        # Sent "50 s from now" by its clock: newer than edge-1's real heartbeats for as long.
        await nc.publish(Topology().events_subject("edge-1"), encode_event(Heartbeat(
            edge="edge-1", version=HOSTILE + "\u202egpj.exe" + "A" * 20_000,
            sent_at=time.time() + 50, buffer_records=1, buffer_bytes=1, buffer_max_bytes=10,
            unshipped_records=0, oldest_unshipped_age_s=0.0, disk_bytes=1, dropped={})))
        await nc.flush()
    finally:
        await nc.close()
    key_cell = page.locator("#tail-rows tr td:nth-child(5)").first
    await expect(key_cell).to_have_text(HOSTILE[:79] + "\u2026")
    await expect(page.locator("#tail-rows tr td:nth-child(6)").first).to_contain_text("<img src=x")
    await _no_script_ran(page)

    await page.goto(f"{up.runtime['api_url']}/ui/fleet?q=edge-1")
    version = page.locator('#fleet-rows tr[data-edge="edge-1"] td:last-child')
    await expect(version).to_have_text(HOSTILE[:39] + "\u2026")
    await _no_script_ran(page)
    await page.goto(f"{up.runtime['api_url']}/ui/edges/edge-1")
    summary = page.locator("#edge-summary")
    await expect(summary).to_contain_text(HOSTILE + "[U+202E]gpj.exeAAA")
    assert "\u202e" not in await summary.inner_text()
    shown = await summary.locator("dd").nth(2).inner_text()  # clipped to 200, U+202E shown
    assert shown.endswith("\u2026") and len(shown) == 200 - 1 + len("[U+202E]")
    await _no_script_ran(page)
    assert dialogs == []
    await page.context.close()


async def test_a_command_the_api_refuses_is_explained_on_the_form_which_stays(
    up: UpProcess, browser: Any
) -> None:
    """A ``configmap.patch`` whose signed command would pass what an edge accepts
    (256 KiB) is refused with the API's reason on the form, its values kept; one
    whose form passes the API's 1 MiB body limit gets the guard's JSON refusal, shown
    as its message on the form (not swapped in for the form); a request that gets no
    answer says so. Nothing is issued."""
    page = await _edge_page(browser, up)
    before = await page.locator("#edge-commands tr[data-command]").count()
    await page.locator("#command-form").get_by_label("Kind").select_option("configmap.patch")
    form = page.locator("#command-form")
    await expect(form.locator("[name='spec.data']")).to_be_visible()

    async def send(entries: int) -> None:
        await form.locator("[name='spec.namespace']").fill("prod")
        await form.locator("[name='spec.name']").fill("cfg")
        await form.locator("[name='spec.data']").fill(
            json.dumps({f"k{i}": "v" * 1000 for i in range(entries)}))
        await form.get_by_role("button", name="Send configmap.patch to edge-1").click()

    await send(300)
    await expect(form.get_by_role("alert")).to_contain_text("an edge accepts at most 262144")
    await expect(form.locator("[name='spec.namespace']")).to_have_value("prod")
    await send(1100)
    await expect(form.get_by_role("alert")).to_contain_text(
        re.compile(r"^Refused \(413\): request body of \d+ bytes is above the 1048576-byte limit$"))
    await expect(form.locator("[name='spec.data']")).to_be_visible()

    await page.route("**/ui/edges/edge-1/commands", lambda route: route.abort())
    await send(1)
    await expect(form.get_by_role("alert")).to_contain_text("No answer from the console")
    assert await page.locator("#edge-commands tr[data-command]").count() == before
    await page.context.close()


async def test_an_operator_allowed_one_kind_is_offered_only_that_kind(
    up: UpProcess, browser: Any
) -> None:
    """An operator with ``operate:deployment.restart`` only is offered that kind alone
    (not a ``bridge.configure`` form it would be refused), and can send it."""
    async with connected(up.runtime["postgres_dsn"]) as conn:
        token = await add_operator(conn, "restarter", ["operate:deployment.restart"],
                                   created_by="test")
    page = await _logged_in(browser, up, token)
    await page.goto(f"{up.runtime['api_url']}/ui/edges/edge-1")
    form = page.locator("#command-form")
    assert await form.get_by_label("Kind").locator("option").all_inner_texts() == [
        "deployment.restart"]
    await form.locator("[name='spec.namespace']").fill("prod")
    await form.locator("[name='spec.name']").fill("web")
    await form.get_by_role("button", name="Send deployment.restart to edge-1").click()
    await expect(page.locator("#command-form [role=status]")).to_contain_text("issued")
    await page.context.close()


async def test_an_open_page_says_when_its_session_ends_and_stops_reconnecting(
    up: UpProcess, browser: Any
) -> None:
    """Revoking an operator while its fleet page is open ends the page's live updates
    within seconds: the page says the session has ended, with a link to log in again,
    and no longer reconnects (no stream refused with 401 over and over, no stale
    numbers passed off as live)."""
    async with connected(up.runtime["postgres_dsn"]) as conn:
        token = await add_operator(conn, "leaver", ["read"], created_by="test")
    page = await _logged_in(browser, up, token)
    await _live(page)
    async with connected(up.runtime["postgres_dsn"]) as conn:
        await revoke_operator(conn, "leaver", revoked_by="test")
    alert = page.get_by_role("alert")
    await expect(alert).to_contain_text("Your console session has ended")
    await expect(alert.get_by_role("link", name="Log in again")).to_have_attribute(
        "href", "/ui/login?next=%2Fui%2F")
    # Nothing left for the SSE extension to reconnect to: no loop of refused streams.
    assert await page.locator("[sse-connect]").count() == 0
    assert (await page.request.get(f"{up.runtime['api_url']}/ui/session")).status == 401
    await page.context.close()


async def test_the_consoles_live_tail_counts_against_the_apis_stream_limits(
    up: UpProcess, browser: Any
) -> None:
    """Each live tail holds a PostgreSQL connection of its own: the console's counts
    against the same limits as ``/v1/records/tail``. With its 10 streams open
    (``api.max_streams_per_operator``), an operator's data page gets no 11th: the page
    says why. Once they close, its next try gets one and the message goes."""
    async with connected(up.runtime["postgres_dsn"]) as conn:
        token = await add_operator(conn, "tailer", ["read"], created_by="test")
    page = await _logged_in(browser, up, token)
    cookie = next(c["value"] for c in await page.context.cookies()
                  if c["name"] == "edgesync_console")
    readers = []  # each stream's reader kept: one let go closes its connection
    async with contextlib.AsyncExitStack() as held, httpx.AsyncClient(
            base_url=up.runtime["api_url"], cookies={"edgesync_console": cookie},
            timeout=30) as client:
        for _ in range(10):
            answer = await held.enter_async_context(client.stream(
                "GET", "/ui/data/tail", headers={"Accept": "text/event-stream"}))
            assert answer.status_code == 200
            readers.append(answer.aiter_lines())
            assert await anext(readers[-1]) == "retry: 2000"  # a tail, not a refusal
        await page.goto(f"{up.runtime['api_url']}/ui/data")
        await expect(page.get_by_role("alert")).to_contain_text(
            "Live updates refused: operator 'tailer' has 10 live tails and NDJSON streams "
            "open")
        for reader in readers:
            await reader.aclose()
    await expect(page.get_by_role("alert")).to_have_count(0)  # retried, and let in
    await page.context.close()


async def test_the_data_page_says_when_it_shows_only_the_first_streams(
    up: UpProcess, browser: Any
) -> None:
    """With more (edge, stream, epoch) rows than the data page shows (100: a fleet of
    10,000 edges has 20,000), the page says it shows only the first ones and how to
    reach the others; filtered to one edge, all of that edge's rows fit and it does not."""
    dsn = up.runtime["postgres_dsn"]
    async with connected(dsn) as conn:  # streams of edges with no bridge: nothing acts on them
        await conn.execute(
            "INSERT INTO committed_ranges (edge_id, stream, epoch, ranges)"
            " SELECT format('crowd-%s', lpad(i::text, 3, '0')), 'telemetry', i,"
            " int8multirange(int8range(1, 10)) FROM generate_series(1, 101) AS i")
    try:
        page = await _logged_in(browser, up)
        await page.goto(f"{up.runtime['api_url']}/ui/data")
        await expect(page.locator("table.completeness tbody tr")).to_have_count(100)
        await expect(page.locator("#compl-h + p")).to_have_text(
            "Showing the first 100 streams by edge id, not all of them: filter by edge or "
            "stream to see the others.")
        await page.goto(f"{up.runtime['api_url']}/ui/data?edge=edge-2")
        await expect(page.locator("table.completeness tbody tr").first).to_contain_text("edge-2")
        assert "Showing the first" not in await page.locator("main").inner_text()
        await page.context.close()
    finally:
        async with connected(dsn) as conn:
            await conn.execute("DELETE FROM committed_ranges WHERE edge_id LIKE 'crowd-%'")


async def test_the_session_cookie_is_secure_behind_a_proxy_that_terminated_tls(
    up: UpProcess,
) -> None:
    """Behind an Ingress that terminates TLS (``X-Forwarded-Proto: https``, from an
    address uvicorn does not trust for it) the login's cookie is ``Secure``, so a
    browser never sends it over plain HTTP. Reached
    over plain HTTP without such a proxy (``edgesync up`` on loopback), it is not:
    the browser could not send it back."""
    url = up.runtime["api_url"]
    form = {"token": up.runtime["operator_token"], "next": "/ui/fleet"}
    # From 127.0.0.2, as a proxy would come from its own address: uvicorn trusts
    # X-Forwarded-Proto from 127.0.0.1 only (forwarded_allow_ips).
    proxy = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(base_url=url, transport=proxy) as client:
        behind = await client.post("/ui/login", data=form,
                                   headers={"X-Forwarded-Proto": "https"})
        assert behind.status_code == 303
        flags = [f.strip().lower() for f in behind.headers["set-cookie"].split(";")]
        assert "secure" in flags and "httponly" in flags and "samesite=strict" in flags
    async with httpx.AsyncClient(base_url=url) as client:
        plain = await client.post("/ui/login", data=form)
        assert "secure" not in plain.headers["set-cookie"].lower()


async def test_the_consoles_own_script_and_style_are_served_nosniff(up: UpProcess) -> None:
    """The static files carry ``X-Content-Type-Options: nosniff`` as the pages do."""
    async with httpx.AsyncClient(base_url=up.runtime["api_url"]) as client:
        for path in ("/ui/static/console.js", "/ui/static/console.css",
                     "/ui/static/vendor/htmx.min.js"):
            answer = await client.get(path)
            assert answer.status_code == 200, path
            assert answer.headers["x-content-type-options"] == "nosniff", path


async def test_a_not_found_page_does_not_read_out_the_text_of_its_link(
    up: UpProcess,
) -> None:
    """A link to ``/ui/edges/<a sentence>`` or ``/ui/commands/<a sentence>`` gets a 404
    that does not repeat the sentence (it would be said in the console's own voice);
    a well-formed id that names nothing is still named."""
    lure = "Session expired: call 555-0100 and read out your operator token"
    async with httpx.AsyncClient(base_url=up.runtime["api_url"]) as client:
        await client.post("/ui/login", data={"token": up.runtime["operator_token"],
                                             "next": "/ui/fleet"})
        for path in (f"/ui/edges/{lure}", f"/ui/commands/{lure}"):
            answer = await client.get(path)
            assert answer.status_code == 404
            assert "555-0100" not in answer.text, path
        answer = await client.get("/ui/edges/edge-99")
        assert answer.status_code == 404 and "No edge &#39;edge-99&#39;" in answer.text


async def test_the_console_refuses_an_idempotency_key_the_api_would_refuse(
    up: UpProcess, browser: Any
) -> None:
    """A hand-made POST with a 201-character idempotency key (the API's bound is 200) is
    refused on the form with the bound, and nothing is issued."""
    page = await _edge_page(browser, up)
    csrf = await page.locator("input[name=csrf]").first.get_attribute("value")
    answer = await page.request.post(
        f"{up.runtime['api_url']}/ui/edges/edge-1/commands",
        form={"csrf": csrf or "", "kind": "bridge.configure", "spec.linger_ms": "5",
              "idempotency_key": "k" * 201})
    assert answer.status == 422
    assert "an idempotency key is at most 200 characters (this one has 201)" in (
        await answer.text())
    async with connected(up.runtime["postgres_dsn"]) as conn:
        assert await conn.fetchval("SELECT count(*) FROM commands WHERE idempotency_key"
                                   " LIKE 'kkk%'") == 0
    await page.context.close()


async def test_a_hand_edited_fleet_url_still_shows_the_fleet(up: UpProcess) -> None:
    """``page=0``, ``page=last`` or ``per_page=all`` typed into the URL fall back to their
    defaults, as an unknown sort or filter does: the fleet page, not a JSON 422."""
    async with httpx.AsyncClient(base_url=up.runtime["api_url"]) as client:
        await client.post("/ui/login", data={"token": up.runtime["operator_token"],
                                             "next": "/ui/fleet"})
        for query in ("page=0", "page=last&per_page=all", "page=99999999999999999999999"):
            answer = await client.get(f"/ui/fleet?{query}")
            assert answer.status_code == 200, (query, answer.text[:200])
            assert answer.headers["content-type"].startswith("text/html")
            assert '<h1>Fleet</h1>' in answer.text


async def test_an_edge_reporting_thousands_of_drifted_fields_gets_a_page_of_them(
    up: UpProcess, browser: Any
) -> None:
    """With a desired state set for edge-1, edge-1 (its own credentials) reports 1,500
    drifted fields of markup: the edge page lists the first 200 by path, as text, and
    says there are more and where to read them all."""
    url, token = up.runtime["api_url"], up.runtime["operator_token"]
    async with httpx.AsyncClient(base_url=url,
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        answer = await client.post("/v1/desired/edges/edge-1",
                                   json={"document": {"bridge": {"compression": "zstd"}}})
        assert answer.status_code == 201, answer.text
        revision = answer.json()["revision"]
    drift = [{"path": f"bridge.x{i:04d}", "desired": HOSTILE, "observed": i}
             for i in range(1500)]
    nc = await _edge_1_nats(up.runtime)
    try:  # "50 s from now": newer than edge-1's own reports, which would prune it
        await nc.publish(Topology().events_subject("edge-1"), encode_event(DesiredStateReport(
            edge="edge-1", revision=revision, version_id=0, digest="0" * 64, status="drifted",
            reported_at=time.time() + 50, drift=drift, reason=HOSTILE)))
        await nc.flush()
    finally:
        await nc.close()
    page = await _logged_in(browser, up)
    rows = page.locator("section:has(#desired-h) tbody tr")

    async def reported() -> bool:
        await page.goto(f"{url}/ui/edges/edge-1")
        return await rows.count() > 0

    await until(reported, timeout=30, interval=0.5, message="the drift never showed")
    assert await rows.count() == 200
    await expect(rows.first).to_contain_text("bridge.x0000")
    await expect(page.locator("#desired-h ~ p.note")).to_contain_text(
        "Showing the first 200 drifted fields by path, not all of them: "
        "GET /v1/desired/edges/edge-1/diff lists every one.")
    await _no_script_ran(page)
    await page.context.close()


async def test_absurd_numbers_in_one_edges_heartbeat_do_not_take_the_fleet_page_down(
    up: UpProcess, browser: Any
) -> None:
    """edge-1 (its own credentials) reports 2^62 records dropped twice, a buffer cap of 0
    and a NaN age. The fleet page still shows the whole fleet, sorted by drops too,
    edge-1's total held at int8's largest value; its own page opens."""
    nc = await _edge_1_nats(up.runtime)
    try:
        await nc.publish(Topology().events_subject("edge-1"), encode_event(Heartbeat(
            edge="edge-1", version="absurd", sent_at=time.time() + 55, buffer_records=-5,
            buffer_bytes=2**62, buffer_max_bytes=0, unshipped_records=-1,
            oldest_unshipped_age_s=float("nan"), disk_bytes=-1,
            dropped={"telemetry": {"overflow": 2**62, "ttl": 2**62}})))
        await nc.flush()
    finally:
        await nc.close()
    page = await _logged_in(browser, up)
    edge_1 = page.locator('#fleet-rows tr[data-edge="edge-1"]')

    async def reported() -> bool:
        await page.goto(f"{up.runtime['api_url']}/ui/fleet?sort=drops&order=desc")
        return await edge_1.count() == 1 and "absurd" in await edge_1.inner_text()

    await until(reported, timeout=30, interval=0.5, message="the heartbeat never showed")
    await expect(page.locator("#fleet-rows tr[data-edge]")).to_have_count(2)
    await expect(edge_1.locator("td:nth-child(8)")).to_have_text("9,223,372,036,854,775,807")
    await page.goto(f"{up.runtime['api_url']}/ui/edges/edge-1")
    await expect(page.get_by_role("heading", name="Edge edge-1")).to_be_visible()
    await page.context.close()
