"""Banners under `kill -9`: the delivery process killed three times in the middle of placing 2,000
banners. Every message ends with its banner placed once, or none: a message a dead process left
mid-send is `sent` when its banner is in place (the web channel can tell what went out), else
`outcome_unknown` (the email version, and what must hold: test_delivery_crash.py)."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from datetime import timedelta

import asyncpg
import grpc
from google.protobuf import duration_pb2

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from relevans.kit.server import ServiceHost
from relevans.kit.settings import Settings
from relevans.local.embedded import free_port
from relevans.profile.v1 import profile_pb2, profile_pb2_grpc
from tests.helpers import eventually
from tests.helpers.delivery import TENANT, token
from tests.integration.test_delivery_crash import DeliveryProcess, _dsn, _publish_requests, _statuses
from tests.integration.test_delivery_sms_crash import profile_host

SENDS = 2000
KILLS = 3
TEMPLATE_ID = "numbered-banner"

__all__ = ["profile_host"]  # the fixture, shared with the SMS version


async def _setup(profile_target: str, delivery_target: str) -> str:
    """The banner template, and the person the banners are for (transactional: no consent needed)."""
    lifetime = duration_pb2.Duration()
    lifetime.FromTimedelta(timedelta(days=1))
    async with grpc.aio.insecure_channel(delivery_target) as channel:
        await delivery_pb2_grpc.DeliveryServiceStub(channel).PutTemplate(
            delivery_pb2.PutTemplateRequest(
                template=delivery_pb2.Template(
                    template_id=TEMPLATE_ID,
                    channel=common_pb2.CHANNEL_WEB,
                    subject="numbered",
                    body_text="banner {{ event.n }}",
                    placement="numbered",
                    banner_lifetime=lifetime,
                )
            ),
            metadata=token(TENANT, "admin"),
        )
    async with grpc.aio.insecure_channel(profile_target) as channel:
        reply = await profile_pb2_grpc.ProfileServiceStub(channel).Identify(
            profile_pb2.IdentifyRequest(customer_id="ada", first_name="Ada"), metadata=token(TENANT, "ingest")
        )
    return str(reply.profile.profile_id)


async def _placed(settings: Settings) -> dict[str, str]:
    """Each placed banner's body by message id."""
    conn = await asyncpg.connect(_dsn(settings))
    try:
        rows = await conn.fetch("SELECT message_id, body_text FROM banners")
    finally:
        await conn.close()
    return {r["message_id"]: r["body_text"] for r in rows}


def _more_banners(settings: Settings, now: int, more: int) -> Callable[[], Awaitable[bool]]:
    """A probe: have `more` banners been placed since `now` (or all but the last 100, when fewer
    are left)?"""

    async def placed() -> bool:
        return len(await _placed(settings)) >= min(now + more, SENDS - 100)

    return placed


async def test_kill_9_during_2000_banners_places_each_once_or_records_it_unknown(
    settings: Settings, profile_host: ServiceHost
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    profile_target = f"127.0.0.1:{profile_host.port}"
    delivery = DeliveryProcess(settings, profile_target, free_port())
    try:
        await delivery.start()
        profile_id = await _setup(profile_target, delivery.target)
        await _publish_requests(settings, profile_id, channel=common_pb2.CHANNEL_WEB, template_id=TEMPLATE_ID)
        for _ in range(KILLS):
            # somewhere in the middle of this process's placing
            now = len(await _placed(settings))
            await eventually(_more_banners(settings, now, rng.randint(100, 450)), timeout=60, interval=0.01)
            await delivery.kill()
            await delivery.start()

        async def all_final() -> dict[str, tuple[str, str]]:
            found = await _statuses(settings)
            done = [s for s, _ in found.values() if s in ("sent", "failed", "suppressed")]
            return found if len(done) == SENDS else {}

        statuses = await eventually(all_final, timeout=90, interval=0.2)
    finally:
        await delivery.stop()

    note = f"(random seed {seed})"
    placed = await _placed(settings)
    bodies = sorted(placed.values())
    assert len(bodies) == len(set(bodies)), f"a banner placed twice {note}"
    sent = {k for k, (status, _) in statuses.items() if status == "sent"}
    unknown = {k for k, (s, why) in statuses.items() if s == "failed" and why.startswith("outcome_unknown")}
    assert sent | unknown == set(statuses), f"other outcomes: {set(statuses.values())} {note}"
    assert {f"crash-{int(b.removeprefix('banner '))}" for b in bodies} == sent, f"sent != placed {note}"
