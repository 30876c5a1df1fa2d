"""SMS under `kill -9`: the delivery process killed three times in the middle of 2,000 text messages
to the local SMS sink. Every message is sent at most once; one whose outcome cannot be known is
recorded `outcome_unknown`, at most one per lane of the SMS transport for each kill (the email
version, and what must hold: test_delivery_crash.py)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest_asyncio

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from relevans.kit.clock import ManualClock
from relevans.kit.server import ServiceHost
from relevans.kit.settings import Settings, env_name
from relevans.local.embedded import free_port
from relevans.local.sms_sink import SmsSink
from relevans.profile.v1 import profile_pb2, profile_pb2_grpc
from services.delivery.channels.sms import SMS_CONNECTIONS
from services.profile.app import build as build_profile
from tests.helpers import eventually
from tests.helpers.delivery import TENANT, token
from tests.integration.test_delivery_crash import DeliveryProcess, _publish_requests, _statuses

SENDS = 2000
KILLS = 3
TEMPLATE_ID = "numbered-sms"
PHONE = "+46701234567"


@pytest_asyncio.fixture
async def profile_host(settings: Settings, clock: ManualClock) -> AsyncIterator[ServiceHost]:
    host = await build_profile(settings, clock)
    await host.start()
    try:
        yield host
    finally:
        await host.stop()


async def _setup(profile_target: str, delivery_target: str) -> str:
    """The SMS template, and the person the texts go to (transactional: no consent needed)."""
    async with grpc.aio.insecure_channel(delivery_target) as channel:
        await delivery_pb2_grpc.DeliveryServiceStub(channel).PutTemplate(
            delivery_pb2.PutTemplateRequest(
                template=delivery_pb2.Template(
                    template_id=TEMPLATE_ID, channel=common_pb2.CHANNEL_SMS, body_text="text {{ event.n }}"
                )
            ),
            metadata=token(TENANT, "admin"),
        )
    async with grpc.aio.insecure_channel(profile_target) as channel:
        identify = profile_pb2.IdentifyRequest(customer_id="ada", first_name="Ada")
        identify.traits.update({"phone": PHONE})
        reply = await profile_pb2_grpc.ProfileServiceStub(channel).Identify(
            identify, metadata=token(TENANT, "ingest")
        )
    return str(reply.profile.profile_id)


def _more_texts(sms_dir: Path, more: int) -> Callable[[], Awaitable[bool]]:
    """A probe: have `more` texts arrived since now?"""

    def count() -> int:
        return sum(1 for _ in sms_dir.glob("*.json"))

    at = count() + more

    async def arrived() -> bool:
        return count() >= at

    return arrived


async def test_kill_9_during_2000_sms_sends_none_twice_and_loses_at_most_the_in_flight(
    settings: Settings, profile_host: ServiceHost, tmp_path: Path
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    profile_target = f"127.0.0.1:{profile_host.port}"
    async with SmsSink(tmp_path / "sms") as sink:
        delivery = DeliveryProcess(settings, profile_target, free_port())
        delivery.env[env_name("sms_provider_url")] = sink.url
        try:
            await delivery.start()
            profile_id = await _setup(profile_target, delivery.target)
            await _publish_requests(
                settings, profile_id, channel=common_pb2.CHANNEL_SMS, template_id=TEMPLATE_ID
            )
            for _ in range(KILLS):
                # somewhere in the middle of this process's sending
                await eventually(_more_texts(sink.sms_dir, rng.randint(100, 450)), timeout=60, interval=0.005)
                await delivery.kill()
                await delivery.start()

            async def all_final() -> dict[str, tuple[str, str]]:
                found = await _statuses(settings)
                done = [s for s, _ in found.values() if s in ("sent", "failed", "suppressed")]
                return found if len(done) == SENDS else {}

            statuses = await eventually(all_final, timeout=90, interval=0.2)
        finally:
            await delivery.stop()
        texts = Counter(t.body for t in sink.messages())

    note = f"(random seed {seed})"
    assert [body for body, n in texts.items() if n > 1] == [], f"texts sent twice {note}"
    texted = {int(body.removeprefix("text ")) for body in texts}
    assert texted <= set(range(SENDS))
    unknown = {k for k, (s, why) in statuses.items() if s == "failed" and why.startswith("outcome_unknown")}
    sent = {k for k, (status, _) in statuses.items() if status == "sent"}
    assert sent | unknown == set(statuses), f"other outcomes: {set(statuses.values())} {note}"
    assert {f"crash-{n}" for n in texted} >= sent, f"recorded sent but never arrived {note}"
    lost = {f"crash-{n}" for n in range(SENDS)} - {f"crash-{n}" for n in texted}
    assert lost <= unknown, f"lost without being recorded outcome_unknown {note}"
    assert len(unknown) <= KILLS * SMS_CONNECTIONS, f"{len(unknown)} outcome_unknown, {len(lost)} lost {note}"
