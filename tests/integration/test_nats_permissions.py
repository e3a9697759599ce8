"""The NATS permission matrix, proven against a real nats-server.

The server runs as ``edgesync up`` runs it: TLS on, nkey identities, the
authorization rendered from :mod:`broker.protocol.permissions`. Every row of
``DENIED`` is an action an identity must not take: the server answers it with a
``Permissions Violation`` naming the subject. Every row of ``ALLOWED`` is a path
the system needs, and it works (a reply, a delivered message, an ack). An
anonymous or unknown client, and a client that does not trust the CA, are
refused at connect. ``docs/security.md`` states the same matrix in prose.

Denied actions are sent as the raw protocol operation a client library would
send (a publish to the JetStream API subject, a SUB), so a refusal is the
server's and not a client-side check.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
import structlog
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig

from broker.connecting import connect_once, connect_options
from broker.durable_files import write_private
from broker.identities import new_user_seed
from broker.protocol.permissions import Role, inbox_prefix
from broker.protocol.topology import Topology
from broker.runtime.secured_nats import SecuredNats, create_control_consumer
from broker.settings import NatsSettings
from tests.helpers import until

T = Topology()
EDGE, OTHER = "e1", "e2"
KV = T.watermarks_bucket
KV_STREAM = f"KV_{KV}"
JS = "$JS.API"


@dataclass
class Client:
    """A connection as one identity that remembers every error the server sent it."""

    nc: NATS
    errors: list[str]

    async def refused(self, subject: str, timeout: float = 5.0) -> None:
        """Until the server has reported a permissions violation naming ``subject``."""
        wanted = f'"{subject.lower()}"'
        await until(lambda: any("permissions violation" in e and wanted in e
                                for e in self.errors),
                    timeout=timeout, message=f"no violation for {subject}: {self.errors}")


async def connect(settings: NatsSettings, role: Role, edge: str | None = None) -> Client:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    nc = await nats.connect(settings.url, error_cb=on_error, allow_reconnect=False,
                            connect_timeout=3,
                            **connect_options(settings, inbox_prefix=inbox_prefix(T, role, edge)))
    return Client(nc, errors)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredNats]:
    """One secured server for the module, with the topology the cloud makes:
    streams and the watermark bucket (by the ingest identity), a control consumer per
    edge (by the admin identity), a watermark for each edge, a command for each edge."""
    tmp = tmp_path_factory.mktemp("secured")
    secured = SecuredNats(tmp / "state", T, log_file=tmp / "nats.log")
    secured.identities.add_edge(EDGE)
    secured.identities.add_edge(OTHER)

    async def setup() -> None:
        await secured.start()
        ingest = await connect(secured.settings_for("ingest"), "ingest")
        api = await connect(secured.settings_for("api"), "api")
        try:
            js = ingest.nc.jetstream(timeout=5)
            await T.ensure_streams(js)
            kv = await T.ensure_watermark_bucket(js)
            await T.ensure_desired_bucket(js)
            for edge in (EDGE, OTHER):
                await create_control_consumer(secured.settings_for("admin"), T, edge)
                await kv.put(f"{edge}.s.1", b"7")
            api_js = api.nc.jetstream(timeout=5)
            for edge in (EDGE, OTHER):
                await api_js.publish(T.control_subject(edge), b"cmd-" + edge.encode())
                await api_js.publish(T.desired_subject(edge), b"desired-" + edge.encode())
            assert not ingest.errors and not api.errors, (ingest.errors, api.errors)
        finally:
            await ingest.nc.close()
            await api.nc.close()

    asyncio.run(setup())
    try:
        yield secured
    finally:
        asyncio.run(secured.stop())


@pytest.fixture
async def as_role(secured: SecuredNats) -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    clients: list[Client] = []

    async def make(role: Role, edge: str | None = None) -> Client:
        client = await connect(secured.settings_for(role, edge), role, edge)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.nc.close()


# -- what each identity must not do ------------------------------------------------------------

CTL_OTHER = T.control_durable(OTHER)
CTL_OWN = T.control_durable(EDGE)
_consumer = json.dumps({"stream_name": T.control_stream, "config": {
    "durable_name": "spy", "filter_subject": T.control_subject(OTHER),
    "ack_policy": "explicit"}}).encode()

# (role, what it tries, "pub" or "sub", subject)
DENIED: list[tuple[Role, str, str, str]] = [
    # an edge, against other edges
    ("edge", "publish records as another edge", "pub", T.records_subject(OTHER, "s")),
    ("edge", "forge a heartbeat or status for another edge", "pub", T.events_subject(OTHER)),
    ("edge", "read every command", "sub", f"{T.prefix}.ctl.>"),
    ("edge", "read its own command subject past the consumer", "sub", T.control_subject(EDGE)),
    ("edge", "read other edges' records", "sub", f"{T.prefix}.rec.>"),
    ("edge", "read other edges' events", "sub", f"{T.prefix}.evt.>"),
    ("edge", "bind another edge's control consumer", "pub",
     f"{JS}.CONSUMER.MSG.NEXT.{T.control_stream}.{CTL_OTHER}"),
    ("edge", "read another edge's consumer info", "pub",
     f"{JS}.CONSUMER.INFO.{T.control_stream}.{CTL_OTHER}"),
    ("edge", "ack another edge's command", "pub",
     f"$JS.ACK.{T.control_stream}.{CTL_OTHER}.1.1.1.0.0"),
    ("edge", "watch another edge's watermark keys", "sub", f"$KV.{KV}.{OTHER}.>"),
    ("edge", "direct-get another edge's watermark key", "pub",
     f"{JS}.DIRECT.GET.{KV_STREAM}.$KV.{KV}.{OTHER}.s.1"),
    ("edge", "get any key through the message-get API", "pub", f"{JS}.STREAM.MSG.GET.{KV_STREAM}"),
    ("edge", "direct-get another edge's desired state", "pub",
     f"{JS}.DIRECT.GET.KV_{T.desired_bucket}.{T.desired_subject(OTHER)}"),
    ("edge", "watch another edge's desired state", "sub", T.desired_subject(OTHER)),
    ("edge", "get a desired state through the message-get API", "pub",
     f"{JS}.STREAM.MSG.GET.KV_{T.desired_bucket}"),
    ("edge", "read anybody's replies", "sub", "_INBOX.>"),
    ("edge", "read another edge's replies", "sub", f"{inbox_prefix(T, 'edge', OTHER)}.>"),
    ("edge", "read everything", "sub", ">"),
    # an edge, against the cloud's state
    ("edge", "forge a command", "pub", T.control_subject(EDGE)),
    ("edge", "kv put its own watermark (trim unsent records)", "pub", f"$KV.{KV}.{EDGE}.s.1"),
    ("edge", "kv put another edge's watermark", "pub", f"$KV.{KV}.{OTHER}.s.1"),
    ("edge", "write its own desired state", "pub", T.desired_subject(EDGE)),
    ("edge", "delete a stream", "pub", f"{JS}.STREAM.DELETE.{T.records_stream}"),
    ("edge", "purge a stream", "pub", f"{JS}.STREAM.PURGE.{T.records_stream}"),
    ("edge", "update a stream", "pub", f"{JS}.STREAM.UPDATE.{T.records_stream}"),
    ("edge", "create a stream", "pub", f"{JS}.STREAM.CREATE.SPY"),
    ("edge", "delete the watermark bucket", "pub", f"{JS}.STREAM.DELETE.{KV_STREAM}"),
    ("edge", "create a consumer on the control stream", "pub",
     f"{JS}.CONSUMER.CREATE.{T.control_stream}.spy.{T.control_subject(OTHER)}"),
    ("edge", "create a durable consumer (legacy API)", "pub",
     f"{JS}.CONSUMER.DURABLE.CREATE.{T.control_stream}.spy"),
    ("edge", "create a consumer on the records stream", "pub",
     f"{JS}.CONSUMER.CREATE.{T.records_stream}"),
    ("edge", "update its own control consumer", "pub",
     f"{JS}.CONSUMER.CREATE.{T.control_stream}.{CTL_OWN}.{T.control_subject(EDGE)}"),
    ("edge", "delete its own control consumer", "pub",
     f"{JS}.CONSUMER.DELETE.{T.control_stream}.{CTL_OWN}"),
    ("edge", "list streams", "pub", f"{JS}.STREAM.NAMES"),
    ("edge", "read account info", "pub", f"{JS}.INFO"),
    # the ingest: reads records and events, writes watermarks, nothing on the control path
    ("ingest", "forge a command", "pub", T.control_subject(EDGE)),
    ("ingest", "publish records as an edge", "pub", T.records_subject(EDGE, "s")),
    ("ingest", "forge a heartbeat", "pub", T.events_subject(EDGE)),
    ("ingest", "read commands", "sub", f"{T.prefix}.ctl.>"),
    ("ingest", "bind an edge's control consumer", "pub",
     f"{JS}.CONSUMER.MSG.NEXT.{T.control_stream}.{CTL_OWN}"),
    ("ingest", "create a consumer on the control stream", "pub",
     f"{JS}.CONSUMER.CREATE.{T.control_stream}.spy.{T.control_subject(EDGE)}"),
    ("ingest", "delete a stream", "pub", f"{JS}.STREAM.DELETE.{T.records_stream}"),
    ("ingest", "purge a stream", "pub", f"{JS}.STREAM.PURGE.{T.records_stream}"),
    ("ingest", "read other identities' replies", "sub", "_INBOX.>"),
    ("ingest", "write an edge's desired state", "pub", T.desired_subject(EDGE)),
    # the API: publishes commands and reads stream info
    ("api", "publish records as an edge", "pub", T.records_subject(EDGE, "s")),
    ("api", "forge a command status", "pub", T.events_subject(EDGE)),
    ("api", "kv put a watermark", "pub", f"$KV.{KV}.{EDGE}.s.1"),
    ("api", "read commands back", "sub", f"{T.prefix}.ctl.>"),
    ("api", "bind an edge's control consumer", "pub",
     f"{JS}.CONSUMER.MSG.NEXT.{T.control_stream}.{CTL_OWN}"),
    ("api", "create a consumer", "pub",
     f"{JS}.CONSUMER.CREATE.{T.control_stream}.spy.{T.control_subject(EDGE)}"),
    ("api", "delete a stream", "pub", f"{JS}.STREAM.DELETE.{T.control_stream}"),
    ("api", "update a stream", "pub", f"{JS}.STREAM.UPDATE.{T.control_stream}"),
    # the admin: JetStream administration, no data
    ("admin", "send a command", "pub", T.control_subject(EDGE)),
    ("admin", "publish records", "pub", T.records_subject(EDGE, "s")),
    ("admin", "read commands", "sub", f"{T.prefix}.ctl.>"),
]


@pytest.mark.parametrize(
    ("role", "action", "op", "subject"), DENIED,
    ids=[f"{role}: {action}" for role, action, _, _ in DENIED],
)
async def test_nats_refuses(as_role: Callable[..., Awaitable[Client]], role: Role,
                            action: str, op: str, subject: str) -> None:
    """The server refuses the action with a permissions violation naming its subject."""
    client = await as_role(role, EDGE if role == "edge" else None)
    if op == "sub":
        got: list[str] = []

        async def on_msg(msg: nats.aio.msg.Msg) -> None:
            got.append(msg.subject)

        await client.nc.subscribe(subject, cb=on_msg)
    else:
        body = _consumer if ".CONSUMER." in subject and "CREATE" in subject else b"{}"
        await client.nc.publish(subject, body, reply=client.nc.new_inbox())
    await client.nc.flush()
    await client.refused(subject)
    if op == "sub":
        assert got == [], f"a refused subscription delivered {got}"


# -- what each identity needs, working ---------------------------------------------------------

async def edge_ships_records(c: Callable[..., Awaitable[Client]]) -> None:
    js = (await c("edge", EDGE)).nc.jetstream(timeout=5)
    ack = await js.publish(T.records_subject(EDGE, "s"), b"batch")
    assert ack.stream == T.records_stream


async def edge_reports_events(c: Callable[..., Awaitable[Client]]) -> None:
    edge = await c("edge", EDGE)
    await edge.nc.publish(T.events_subject(EDGE), b"heartbeat")  # heartbeats: core publish
    ack = await edge.nc.jetstream(timeout=5).publish(T.events_subject(EDGE), b"status")
    assert ack.stream == T.events_stream
    assert not edge.errors


async def edge_verifies_topology(c: Callable[..., Awaitable[Client]]) -> None:
    js = (await c("edge", EDGE)).nc.jetstream(timeout=5)
    await T.ensure_streams(js)  # reads only: the cloud made them as configured
    info = await js.consumer_info(T.control_stream, CTL_OWN)
    assert info.config.filter_subject == T.control_subject(EDGE)


async def edge_pulls_and_acks_its_command(c: Callable[..., Awaitable[Client]]) -> None:
    js = (await c("edge", EDGE)).nc.jetstream(timeout=5)
    sub = await js.pull_subscribe_bind(CTL_OWN, stream=T.control_stream)
    msgs = await sub.fetch(1, timeout=5)
    assert msgs[0].data == b"cmd-" + EDGE.encode()
    await msgs[0].in_progress()
    await msgs[0].nak()  # back to the stream, for the next test that fetches


async def edge_reads_its_watermark(c: Callable[..., Awaitable[Client]]) -> None:
    js = (await c("edge", EDGE)).nc.jetstream(timeout=5)
    kv = await js.key_value(KV)
    assert (await kv.get(f"{EDGE}.s.1")).value == b"7"  # a direct get, by subject


async def edge_follows_watermark_updates(c: Callable[..., Awaitable[Client]]) -> None:
    edge, ingest = await c("edge", EDGE), await c("ingest")
    seen: list[bytes] = []

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        seen.append(msg.data)

    await edge.nc.subscribe(T.watermark_updates_subject(EDGE), cb=on_msg)
    await edge.nc.flush()
    kv = await ingest.nc.jetstream(timeout=5).key_value(KV)
    await kv.put(f"{EDGE}.s.2", b"42")
    await until(lambda: b"42" in seen)


async def edge_reads_its_desired_state(c: Callable[..., Awaitable[Client]]) -> None:
    edge, api = await c("edge", EDGE), await c("api")
    kv = await edge.nc.jetstream(timeout=5).key_value(T.desired_bucket)
    assert (await kv.get(EDGE)).value == b"desired-" + EDGE.encode()  # a direct get
    seen: list[bytes] = []

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        seen.append(msg.data)

    await edge.nc.subscribe(T.desired_subject(EDGE), cb=on_msg)
    await edge.nc.flush()
    await api.nc.jetstream(timeout=5).publish(T.desired_subject(EDGE), b"newer")
    await until(lambda: b"newer" in seen)
    assert not edge.errors


async def ingest_consumes_records_and_events(c: Callable[..., Awaitable[Client]]) -> None:
    js = (await c("ingest")).nc.jetstream(timeout=5)
    for stream, subject in ((T.records_stream, T.records_wildcard),
                            (T.events_stream, T.events_wildcard)):
        await js.add_consumer(stream, ConsumerConfig(durable_name="ingest-check",
                                                     filter_subject=subject))
        sub = await js.pull_subscribe_bind("ingest-check", stream=stream)
        for msg in await sub.fetch(1, timeout=5):
            await msg.ack_sync()


async def ingest_manages_topology(c: Callable[..., Awaitable[Client]]) -> None:
    js = (await c("ingest")).nc.jetstream(timeout=5)
    config = (await js.stream_info(T.events_stream)).config
    await js.update_stream(config)
    await T.ensure_watermark_bucket(js)


async def api_publishes_commands(c: Callable[..., Awaitable[Client]]) -> None:
    api = await c("api")
    js = api.nc.jetstream(timeout=5)
    await T.ensure_streams(js)
    ack = await js.publish(T.control_subject(OTHER), b"cmd")
    assert ack.stream == T.control_stream


async def admin_creates_control_consumers(c: Callable[..., Awaitable[Client]]) -> None:
    js = (await c("admin")).nc.jetstream(timeout=5)
    await js.add_consumer(T.control_stream, T.control_consumer_config("e3"))
    await js.delete_consumer(T.control_stream, T.control_durable("e3"))


ALLOWED: list[Callable[[Callable[..., Awaitable[Client]]], Awaitable[None]]] = [
    edge_ships_records, edge_reports_events, edge_verifies_topology,
    edge_pulls_and_acks_its_command, edge_reads_its_watermark, edge_follows_watermark_updates,
    edge_reads_its_desired_state,
    ingest_consumes_records_and_events, ingest_manages_topology, api_publishes_commands,
    admin_creates_control_consumers,
]


@pytest.mark.parametrize("path", ALLOWED, ids=[p.__name__ for p in ALLOWED])
async def test_nats_allows(
    as_role: Callable[..., Awaitable[Client]],
    path: Callable[[Callable[..., Awaitable[Client]]], Awaitable[None]],
) -> None:
    """Each path the system needs works under its identity's permissions."""
    await asyncio.wait_for(path(as_role), 20)


# -- who may connect at all ------------------------------------------------------------------

async def test_anonymous_client_is_refused(secured: SecuredNats) -> None:
    """A client without credentials is refused at connect, even over trusted TLS."""
    context = ssl.create_default_context(cafile=str(secured.ca.ca_file))
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(secured.url, tls=context, allow_reconnect=False, connect_timeout=3)


async def test_unknown_key_is_refused(secured: SecuredNats, tmp_path: Path) -> None:
    """A well-formed nkey the server was never told about is refused."""
    seed = tmp_path / "stranger.nk"
    write_private(seed, new_user_seed())
    settings = secured.settings_for("api", credentials_file=seed)
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(secured.url, allow_reconnect=False, connect_timeout=3,
                           **connect_options(settings))


async def test_client_not_trusting_the_ca_is_refused(secured: SecuredNats) -> None:
    """TLS is required: a client that cannot verify the server's certificate never
    gets to present its credentials."""
    settings = secured.settings_for("api")
    options = connect_options(settings)
    options["tls"] = ssl.create_default_context()  # system CAs: not our local CA
    with pytest.raises((ssl.SSLError, OSError, nats.errors.Error)):
        await nats.connect(secured.url, allow_reconnect=False, connect_timeout=3, **options)



async def test_connect_once_logs_the_errors_of_its_link(secured: SecuredNats) -> None:
    """``connect_once`` (the CLI's connections) keeps its failed tries quiet for the
    TimeoutError, but once connected an error of the link is logged as a warning:
    a refused permission must not pass as a bare timeout."""
    settings = secured.settings_for("edge", EDGE)
    with structlog.testing.capture_logs() as logs:
        nc = await connect_once([settings.url], timeout_s=5, **connect_options(
            settings, inbox_prefix=inbox_prefix(T, "edge", EDGE)))
        try:
            await nc.publish(T.control_subject(OTHER), b"not mine")
            await until(lambda: any(e["event"] == "nats_error" for e in logs), timeout=5,
                        message="the permission refused was not logged")
        finally:
            await nc.close()
    error = next(e for e in logs if e["event"] == "nats_error")
    assert error["log_level"] == "warning" and "permissions violation" in error["error"].lower()
