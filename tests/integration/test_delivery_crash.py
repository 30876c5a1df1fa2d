"""Delivery under faults: `kill -9` of the delivery process in the middle of thousands of sends and
in the middle of retries, and PostgreSQL going away right after the SMTP server accepted a mail.

What must hold (docs/architecture.md, "Effects happen once"): every mail is sent at most once; a
message whose outcome cannot be known after a kill is recorded `outcome_unknown`, and there are at
most as many of those as messages were in flight (one per SMTP connection of each sending loop:
the request consumer's and the retry worker's); a scheduled retry survives the kill; an outcome
the server accepted is written once PostgreSQL is back, never dropped, never re-sent.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest_asyncio
from aiosmtpd.smtp import SMTP
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from prometheus_client import REGISTRY

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import bus_pb2, delivery_pb2, delivery_pb2_grpc
from relevans.kit.bus import Bus
from relevans.kit.clock import ManualClock
from relevans.kit.proto import to_struct
from relevans.kit.server import ServiceHost
from relevans.kit.settings import Settings, env_name
from relevans.local.embedded import free_port
from relevans.local.smtp_sink import SmtpScript, SmtpSink
from services.delivery.consumers import DURABLE, FILTER_SUBJECT, STREAM
from services.profile.app import build as build_profile
from tests.helpers import eventually, serving, stays
from tests.helpers.delivery import TENANT, Harness, token

SENDS = 2000
KILLS = 3
TEMPLATE_ID = "numbered"
# A message is in flight from its claim (`sending`, right before SMTP DATA) until its outcome is
# written: at most one per SMTP connection of the one worker a delivery process runs.
IN_FLIGHT = Settings.smtp_connections
RETRIES = "relevans_delivery_outcome_write_retries_total"


def _dsn(settings: Settings) -> str:
    return settings.database_url("delivery").replace("postgresql+asyncpg://", "postgresql://")


class DeliveryProcess:
    """`relevans serve delivery` as its own process, started again after each kill."""

    def __init__(
        self, settings: Settings, profile_target: str, smtp_port: int, *, retry_delay_s: float = 30.0
    ) -> None:
        self.target = f"127.0.0.1:{free_port()}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RELEVANS_")}
        self.env.update(
            {
                env_name("nats_url"): settings.nats_url,
                env_name("token_secret"): settings.token_secret,
                env_name("delivery_database_url"): settings.delivery_database_url,
                env_name("delivery_listen"): self.target,
                # not the fixed default: tests in other workers (and other stacks) use it too
                env_name("delivery_http_listen"): "127.0.0.1:0",
                env_name("delivery_metrics_port"): "0",
                env_name("profile_target"): profile_target,
                env_name("smtp_port"): str(smtp_port),
                env_name("shutdown_grace"): "1",
                env_name("log_level"): "error",
                env_name("delivery_retry_delay"): str(retry_delay_s),
            }
        )
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relevans.cli.main", "serve", "delivery", env=self.env
        )
        proc = self.proc

        async def up() -> bool:
            assert proc.returncode is None, f"relevans serve delivery exited with {proc.returncode}"
            return await serving(self.target)

        await eventually(up, timeout=60, interval=0.1)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no shutdown code runs
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await self.kill()


@pytest_asyncio.fixture
async def profile_host(settings: Settings, clock: ManualClock) -> AsyncIterator[ServiceHost]:
    host = await build_profile(settings, clock)
    await host.start()
    try:
        yield host
    finally:
        await host.stop()


async def _customer(target: str) -> str:
    from relevans.profile.v1 import profile_pb2, profile_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        reply = await profile_pb2_grpc.ProfileServiceStub(channel).Identify(
            profile_pb2.IdentifyRequest(email="ada@example.com", first_name="Ada"),
            metadata=token(TENANT, "ingest"),
        )
    return str(reply.profile.profile_id)


async def _put_template(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        await delivery_pb2_grpc.DeliveryServiceStub(channel).PutTemplate(
            delivery_pb2.PutTemplateRequest(
                template=delivery_pb2.Template(
                    template_id=TEMPLATE_ID,
                    channel=common_pb2.CHANNEL_EMAIL,
                    subject="mail {{ event.n }}",
                    body_text="Hello, this is mail {{ event.n }}.\n",
                )
            ),
            metadata=token(TENANT, "admin"),
        )


async def _publish_requests(
    settings: Settings,
    profile_id: str,
    sends: int = SENDS,
    channel: int = common_pb2.CHANNEL_EMAIL,
    template_id: str = TEMPLATE_ID,
) -> None:
    """`sends` transactional requests (no consent needed) on `channel` with `template_id`, request n
    (key "crash-n") asking for message "n"; the consumer is made first with a short ack wait, so what a killed
    process held comes back soon."""
    bus = Bus(settings.nats_url, "test")
    await bus.connect()
    try:
        await bus.ensure_streams()
        await bus.js.add_consumer(
            STREAM,
            ConsumerConfig(
                durable_name=DURABLE,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=2.0,
                max_ack_pending=2000,
                filter_subject=FILTER_SUBJECT,
            ),
        )
        requests = [
            (
                FILTER_SUBJECT,
                bus_pb2.DeliveryRequest(
                    idempotency_key=f"crash-{n}",
                    tenant_id=TENANT,
                    profile_id=profile_id,
                    trigger_id="crash-test",
                    channel=channel,
                    purpose=common_pb2.PURPOSE_TRANSACTIONAL,
                    template_id=template_id,
                    variables=to_struct({"event": {"n": n}}),
                ).SerializeToString(),
                f"crash-{n}",
            )
            for n in range(sends)
        ]
        for i in range(0, sends, 500):
            await bus.publish_batch(requests[i : i + 500])
    finally:
        await bus.close()


def _mail_count(mail_dir: Path) -> int:
    return sum(1 for _ in mail_dir.glob("*.eml"))


def _more_mail(mail_dir: Path, more: int) -> Callable[[], Awaitable[bool]]:
    """A probe: have `more` mails arrived since now?"""
    at = _mail_count(mail_dir) + more

    async def arrived() -> bool:
        return _mail_count(mail_dir) >= at

    return arrived


async def _statuses(settings: Settings) -> dict[str, tuple[str, str]]:
    conn = await asyncpg.connect(_dsn(settings))
    try:
        rows = await conn.fetch("SELECT idempotency_key, status, reason FROM messages")
    finally:
        await conn.close()
    return {r["idempotency_key"]: (r["status"], r["reason"]) for r in rows}


async def test_kill_9_during_2000_sends_sends_none_twice_and_loses_at_most_the_in_flight(
    settings: Settings, profile_host: ServiceHost, tmp_path: Path
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    async with SmtpSink(tmp_path / "mail") as sink:
        delivery = DeliveryProcess(settings, f"127.0.0.1:{profile_host.port}", sink.port)
        try:
            await delivery.start()
            await _put_template(delivery.target)
            await _publish_requests(settings, await _customer(f"127.0.0.1:{profile_host.port}"))
            for _ in range(KILLS):
                # somewhere in the middle of this process's sending
                await eventually(_more_mail(sink.mail_dir, rng.randint(100, 450)), timeout=60, interval=0.005)
                await delivery.kill()
                await delivery.start()

            async def all_final() -> dict[str, tuple[str, str]]:
                found = await _statuses(settings)
                done = [s for s, _ in found.values() if s in ("sent", "failed", "suppressed")]
                return found if len(done) == SENDS else {}

            statuses = await eventually(all_final, timeout=90, interval=0.2)
        finally:
            await delivery.stop()
        mails = Counter(str(m["Subject"]) for m in sink.messages())

    note = f"(random seed {seed})"
    assert [s for s, n in mails.items() if n > 1] == [], f"mails sent twice {note}"
    mailed = {int(s.removeprefix("mail ")) for s in mails}
    assert mailed <= set(range(SENDS))
    unknown = {k for k, (s, why) in statuses.items() if s == "failed" and why.startswith("outcome_unknown")}
    sent = {k for k, (status, _) in statuses.items() if status == "sent"}
    assert sent | unknown == set(statuses), f"other outcomes: {set(statuses.values())} {note}"
    assert {f"crash-{n}" for n in mailed} >= sent, f"recorded sent but never arrived {note}"
    lost = {f"crash-{n}" for n in range(SENDS)} - {f"crash-{n}" for n in mailed}
    assert lost <= unknown, f"lost without being recorded outcome_unknown {note}"
    assert len(unknown) <= KILLS * IN_FLIGHT, f"{len(unknown)} outcome_unknown, {len(lost)} lost {note}"


# ---- kill -9 during retries ----------------------------------------------------------------------

GREYLISTED = "451 4.7.1 greylisted, try again later"
# Real seconds (the process runs on the system clock): the first retry comes 1-2 s after the first
# attempt, the second 2-4 s after that.
RETRY_DELAY_S = 2.0


async def _attempts(settings: Settings, key: str) -> tuple[str, str, int] | None:
    conn = await asyncpg.connect(_dsn(settings))
    try:
        row = await conn.fetchrow(
            "SELECT status, reason, attempts FROM messages WHERE idempotency_key = $1", key
        )
    finally:
        await conn.close()
    return None if row is None else (row["status"], row["reason"], row["attempts"])


async def test_kill_9_between_retries_still_sends_exactly_one_mail(
    settings: Settings, profile_host: ServiceHost, tmp_path: Path
) -> None:
    script = SmtpScript(rcpt={"ada@example.com": [GREYLISTED, GREYLISTED]})
    async with SmtpSink(tmp_path / "mail", script=script) as sink:
        delivery = DeliveryProcess(
            settings, f"127.0.0.1:{profile_host.port}", sink.port, retry_delay_s=RETRY_DELAY_S
        )
        try:
            await delivery.start()
            await _put_template(delivery.target)
            await _publish_requests(settings, await _customer(f"127.0.0.1:{profile_host.port}"), sends=1)
            for made in (1, 2):
                # killed while the retry after attempt `made` is scheduled (or, at the latest, once
                # that retry was made): the next process takes the schedule from the row
                async def retrying(n: int = made) -> bool:
                    found = await _attempts(settings, "crash-0")
                    return found is not None and found[2] >= n

                await eventually(retrying, timeout=30, interval=0.02)
                await delivery.kill()
                await delivery.start()

            async def sent() -> tuple[str, str, int] | None:
                found = await _attempts(settings, "crash-0")
                return found if found is not None and found[0] == "sent" else None

            found = await eventually(sent, timeout=60, interval=0.1)
            await stays(lambda: _async(len(sink.messages()) > 1), duration=0.5)
        finally:
            await delivery.stop()
        assert len(sink.messages()) == 1
        assert sink.rcpt_attempts("ada@example.com") == 3
    assert found == ("sent", "smtp: 250 OK", 3)


RETRIED_SENDS = 300


async def test_kill_9_while_retries_are_being_sent_sends_none_twice(
    settings: Settings, profile_host: ServiceHost, tmp_path: Path
) -> None:
    """Every message's first DATA is answered 451, so every mail that arrives is a retry, sent by the
    retry worker; the process is killed while it sends them. A retry claimed when the process died
    has no bus message left to redeliver: the next process's retry worker finds it `sending` and
    records it `outcome_unknown`."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    script = SmtpScript(data=[GREYLISTED])
    async with SmtpSink(tmp_path / "mail", script=script) as sink:
        delivery = DeliveryProcess(settings, f"127.0.0.1:{profile_host.port}", sink.port, retry_delay_s=0.5)
        try:
            await delivery.start()
            await _put_template(delivery.target)
            profile_id = await _customer(f"127.0.0.1:{profile_host.port}")
            await _publish_requests(settings, profile_id, sends=RETRIED_SENDS)
            for _ in range(2):
                await eventually(_more_mail(sink.mail_dir, rng.randint(10, 60)), timeout=60, interval=0.005)
                await delivery.kill()
                await delivery.start()

            async def all_final() -> dict[str, tuple[str, str]]:
                found = await _statuses(settings)
                done = [s for s, _ in found.values() if s in ("sent", "failed")]
                return found if len(done) == RETRIED_SENDS else {}

            statuses = await eventually(all_final, timeout=90, interval=0.2)
        finally:
            await delivery.stop()
        mails = Counter(str(m["Subject"]) for m in sink.messages())

    note = f"(random seed {seed})"
    assert [s for s, n in mails.items() if n > 1] == [], f"mails sent twice {note}"
    mailed = {f"crash-{int(s.removeprefix('mail '))}" for s in mails}
    unknown = {k for k, (s, why) in statuses.items() if s == "failed" and why.startswith("outcome_unknown")}
    sent = {k for k, (status, _) in statuses.items() if status == "sent"}
    assert sent | unknown == set(statuses), f"other outcomes: {set(statuses.values())} {note}"
    assert mailed >= sent, f"recorded sent but never arrived {note}"
    assert set(statuses) - mailed <= unknown, f"lost without being recorded outcome_unknown {note}"
    assert len(unknown) <= 2 * 2 * IN_FLIGHT, f"{len(unknown)} outcome_unknown {note}"


async def _async(value: Any) -> Any:
    return value


# ---- PostgreSQL away when the SMTP server accepts ------------------------------------------------


class _OutageOnAccept:
    """Accepts each mail, but first takes the delivery database away: no new connections, and the
    open ones terminated — so the worker's write of that outcome fails until it is back."""

    def __init__(self, postgres_url: str, database: str) -> None:
        self.postgres_url = postgres_url
        self.database = database
        self.accepted: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        admin = await asyncpg.connect(f"{self.postgres_url}/postgres")
        try:
            await admin.execute(f'ALTER DATABASE "{self.database}" ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", self.database
            )
        finally:
            await admin.close()
        self.accepted.append(bytes(envelope.content))
        return "250 OK"


async def _allow_connections(postgres_url: str, database: str) -> None:
    admin = await asyncpg.connect(f"{postgres_url}/postgres")
    try:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    finally:
        await admin.close()


def _retries() -> float:
    return REGISTRY.get_sample_value(RETRIES) or 0.0


async def test_an_accepted_mail_is_recorded_sent_once_postgres_is_back(
    settings: Settings, clock: ManualClock, nats_url: str, tmp_path: Path
) -> None:
    database = settings.database_url("delivery").rsplit("/", 1)[1]
    handler = _OutageOnAccept(settings.postgres_url, database)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler, hostname="flaky", loop=loop), "127.0.0.1", 0)
    h = Harness(settings, clock, nats_url, tmp_path / "mail")
    h.smtp_servers.append(server)
    try:
        await h.start(smtp_port=server.sockets[0].getsockname()[1], sink=False)
        profile_id = await h.customer()
        await h.put_template()
        before = _retries()
        key = await h.request(profile_id)
        await eventually(lambda: _async(handler.accepted))

        async def failed_again(times: int) -> bool:
            await clock.advance(timedelta(minutes=1))  # past any back-off
            return _retries() - before >= times

        await eventually(lambda: failed_again(3))
        await _allow_connections(settings.postgres_url, database)

        async def sent() -> bool:
            await clock.advance(timedelta(minutes=1))
            return (await _statuses(settings)).get(key, ("", ""))[0] == "sent"

        await eventually(sent)
        await eventually(h.requests_done)
        await stays(lambda: _async(len(handler.accepted) > 1), duration=0.3)
        [(subject, _)] = await eventually(h.status_events, timeout=20)
        assert subject == "rv.delivery.status.sent"
    finally:
        await _allow_connections(settings.postgres_url, database)
        await h.close()
