"""Webhooks under `kill -9`: the delivery process killed three times in the middle of 2,000 webhooks
to the local receiver. Every message is posted at most once (no webhook-id twice); one whose outcome
cannot be known is recorded `outcome_unknown`, at most one per lane of the webhook transport for
each kill (the email version, and what must hold: test_delivery_crash.py)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from relevans.kit.server import ServiceHost
from relevans.kit.settings import Settings, env_name
from relevans.local.embedded import free_port
from relevans.local.webhook_receiver import WebhookReceiver
from relevans.profile.v1 import profile_pb2, profile_pb2_grpc
from services.delivery.channels.webhook import WEBHOOK_CONNECTIONS
from tests.helpers import eventually
from tests.helpers.delivery import TENANT, token
from tests.integration.test_delivery_crash import DeliveryProcess, _publish_requests, _statuses
from tests.integration.test_delivery_sms_crash import profile_host

SENDS = 2000
KILLS = 3
TEMPLATE_ID = "numbered-hook"
ENDPOINT_ID = "crm"

__all__ = ["profile_host"]  # the fixture, shared with the SMS version


async def _setup(profile_target: str, delivery_target: str, receiver: WebhookReceiver) -> str:
    """The endpoint (its secret handed to the receiver), the template, and the person the webhooks
    are about (transactional: no consent needed)."""
    admin = token(TENANT, "admin")
    async with grpc.aio.insecure_channel(delivery_target) as channel:
        stub = delivery_pb2_grpc.DeliveryServiceStub(channel)
        reply = await stub.PutWebhookEndpoint(
            delivery_pb2.PutWebhookEndpointRequest(
                endpoint=delivery_pb2.WebhookEndpoint(endpoint_id=ENDPOINT_ID, url=receiver.url(ENDPOINT_ID))
            ),
            metadata=admin,
        )
        receiver.write_secret(ENDPOINT_ID, reply.endpoint.secret)
        await stub.PutTemplate(
            delivery_pb2.PutTemplateRequest(
                template=delivery_pb2.Template(
                    template_id=TEMPLATE_ID,
                    channel=common_pb2.CHANNEL_WEBHOOK,
                    subject="numbered",
                    body_text="hook {{ event.n }}",
                    webhook_endpoint_id=ENDPOINT_ID,
                )
            ),
            metadata=admin,
        )
    async with grpc.aio.insecure_channel(profile_target) as channel:
        reply = await profile_pb2_grpc.ProfileServiceStub(channel).Identify(
            profile_pb2.IdentifyRequest(customer_id="ada", first_name="Ada"), metadata=token(TENANT, "ingest")
        )
    return str(reply.profile.profile_id)


def _more_hooks(receiver: WebhookReceiver, more: int) -> Callable[[], Awaitable[bool]]:
    """A probe: have `more` webhooks arrived since now (or all but the last 100, when fewer are
    left: webhooks go out fast, and a kill near the end is as good a test)?"""
    folder = receiver.root / ENDPOINT_ID

    def count() -> int:
        return sum(1 for _ in folder.glob("*.json"))

    at = min(count() + more, SENDS - 100)

    async def arrived() -> bool:
        return count() >= at

    return arrived


async def test_kill_9_during_2000_webhooks_posts_none_twice_and_loses_at_most_the_in_flight(
    settings: Settings, profile_host: ServiceHost, tmp_path: Path
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    profile_target = f"127.0.0.1:{profile_host.port}"
    async with WebhookReceiver(tmp_path / "hooks") as receiver:
        delivery = DeliveryProcess(settings, profile_target, free_port())
        delivery.env[env_name("webhook_allow_addresses")] = f"{receiver.host}:{receiver.port}"
        try:
            await delivery.start()
            profile_id = await _setup(profile_target, delivery.target, receiver)
            await _publish_requests(
                settings, profile_id, channel=common_pb2.CHANNEL_WEBHOOK, template_id=TEMPLATE_ID
            )
            for _ in range(KILLS):
                # somewhere in the middle of this process's sending
                await eventually(_more_hooks(receiver, rng.randint(100, 450)), timeout=60, interval=0.005)
                await delivery.kill()
                await delivery.start()

            async def all_final() -> dict[str, tuple[str, str]]:
                found = await _statuses(settings)
                done = [s for s, _ in found.values() if s in ("sent", "failed", "suppressed")]
                return found if len(done) == SENDS else {}

            statuses = await eventually(all_final, timeout=90, interval=0.2)
        finally:
            await delivery.stop()
        hooks = receiver.deliveries(ENDPOINT_ID)

    note = f"(random seed {seed})"
    assert all(h["verified"] for h in hooks), f"a webhook failed its signature check {note}"
    ids = Counter(h["webhook_id"] for h in hooks)
    assert [i for i, n in ids.items() if n > 1] == [], f"webhooks posted twice {note}"
    posted = {int(h["payload"]["data"]["text"].removeprefix("hook ")) for h in hooks}
    assert posted <= set(range(SENDS))
    unknown = {k for k, (s, why) in statuses.items() if s == "failed" and why.startswith("outcome_unknown")}
    sent = {k for k, (status, _) in statuses.items() if status == "sent"}
    assert sent | unknown == set(statuses), f"other outcomes: {set(statuses.values())} {note}"
    assert {f"crash-{n}" for n in posted} >= sent, f"recorded sent but never arrived {note}"
    lost = {f"crash-{n}" for n in range(SENDS)} - {f"crash-{n}" for n in posted}
    assert lost <= unknown, f"lost without being recorded outcome_unknown {note}"
    assert len(unknown) <= KILLS * WEBHOOK_CONNECTIONS, (
        f"{len(unknown)} outcome_unknown, {len(lost)} lost {note}"
    )
