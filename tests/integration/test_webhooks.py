"""Signed webhooks end to end: real PostgreSQL, NATS and HTTP on loopback; the resolver and the
connector injected, so no test connects to anything but loopback (tests/helpers/webhooks.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import grpc
import pytest
import pytest_asyncio
from aiohttp import web
from google.protobuf import duration_pb2
from standardwebhooks import Webhook, WebhookVerificationError

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import delivery_pb2
from relevans.kit.clock import ManualClock
from relevans.kit.db import create_engine
from relevans.kit.settings import Settings
from relevans.local.embedded import free_port
from relevans.local.webhook_receiver import WebhookReceiver
from relevans.profile.v1 import profile_pb2
from relevans.trigger.v1 import trigger_pb2
from services.delivery.domain import RetryPolicy
from services.delivery.domain.webhooks import WebhookEndpoint, new_secret
from services.delivery.webhook_rows import WebhookRows
from tests.helpers import eventually, field_violations, rpc_error, stays
from tests.helpers.auth import token
from tests.helpers.system import System
from tests.helpers.webhooks import (
    TENANT,
    FakeNet,
    final_message,
    lead,
    messages,
    put_endpoint,
    put_template,
    receiver,
    request,
    start_system,
)

Start = Callable[..., Awaitable[System]]


@pytest.fixture
def clock() -> ManualClock:
    """Near the wall clock: receivers (the reference library too) refuse stale signatures."""
    return ManualClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
def net() -> FakeNet:
    return FakeNet()


@pytest_asyncio.fixture
async def start(settings: Settings, clock: ManualClock, tmp_path: Path, net: FakeNet) -> AsyncIterator[Start]:
    """Starts the services with settings overrides; stops them after the test."""
    started: list[System] = []

    async def run(trigger: bool = False, **overrides: object) -> System:
        system = await start_system(replace(settings, **overrides), clock, tmp_path, net, trigger=trigger)
        started.append(system)
        return system

    yield run
    for system in started:
        await system.close()


@pytest_asyncio.fixture
async def hooks(tmp_path: Path, clock: ManualClock) -> AsyncIterator[WebhookReceiver]:
    async with receiver(tmp_path, clock) as r:
        yield r


async def save_endpoint(system: System, endpoint_id: str, url: str) -> None:
    """An endpoint as the database keeps it, e.g. one saved while a setting allowed it."""
    engine = create_engine(system.settings.database_url("delivery"), pool_size=1)
    try:
        await WebhookRows(engine).put(
            TENANT, WebhookEndpoint(endpoint_id, url, new_secret()), system.clock.now(), rotate_secret=False
        )
    finally:
        await engine.dispose()


# ---- a trigger fires, the receiver verifies -----------------------------------------------------


async def test_a_webhook_from_a_trigger_firing_reaches_the_receiver_signed(
    start: Start, hooks: WebhookReceiver, net: FakeNet
) -> None:
    system = await start(trigger=True, webhook_allow_private=True, webhook_allow_insecure=True)
    endpoint = await put_endpoint(system, "crm", hooks.url("crm"))
    assert endpoint.secret.startswith("whsec_") and endpoint.timeout.seconds == 10
    hooks.write_secret("crm", endpoint.secret)
    await put_template(system, "lead-to-crm", "crm")
    await system.triggers.CreateTrigger(
        trigger_pb2.CreateTriggerRequest(
            trigger=trigger_pb2.Trigger(
                trigger_id="white-paper",
                display_name="White paper downloaded",
                event=trigger_pb2.EventCondition(event_type="download"),
                channel=common_pb2.CHANNEL_WEBHOOK,
                purpose=common_pb2.PURPOSE_MARKETING,
                template_id="lead-to-crm",
            )
        ),
        metadata=token(TENANT, "admin"),
    )
    profile_id = await lead(system)
    event = profile_pb2.Event(type="download", email="ada@example.com")
    event.timestamp.FromDatetime(system.clock.now())
    event.properties.update({"paper": "Pricing 2026"})
    await system.profiles.Track(profile_pb2.TrackRequest(event=event), metadata=token(TENANT, "ingest"))

    async def delivered() -> list[dict]:  # type: ignore[type-arg]
        return hooks.deliveries("crm")

    [delivery] = await eventually(delivered)
    assert delivery["verified"] is True, delivery["problem"]
    headers = {
        k: delivery[k.replace("-", "_")] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")
    }
    document = Webhook(endpoint.secret).verify(delivery["body"], headers)
    [message] = await eventually(lambda: _sent(system))
    assert headers["webhook-id"] == message.message_id
    assert headers["webhook-timestamp"] == str(int(system.clock.now().timestamp()))
    assert document["type"] == "relevans.message"
    assert document["data"]["message_id"] == message.message_id
    assert document["data"]["trigger_id"] == "white-paper"
    assert document["data"]["profile_id"] == profile_id
    assert document["data"]["text"] == "Ada downloaded Pricing 2026."
    assert document["data"]["variables"]["event"]["paper"] == "Pricing 2026"
    assert message.recipient == "crm" and message.channel == common_pb2.CHANNEL_WEBHOOK
    assert net.connects == [("127.0.0.1", hooks.port)]

    # The same bytes with one character changed: the receiver stores it unverified, so does the library.
    tampered = delivery["body"].replace("Pricing", "Pr1cing")
    async with (
        aiohttp.ClientSession() as session,
        session.post(hooks.url("crm"), data=tampered.encode(), headers=headers) as answer,
    ):
        assert answer.status == 401
    assert [d["verified"] for d in hooks.deliveries("crm")] == [True, False]
    assert hooks.deliveries("crm")[1]["problem"] == "no matching signature"
    with pytest.raises(WebhookVerificationError):
        Webhook(endpoint.secret).verify(tampered, headers)


async def _sent(system: System) -> list[delivery_pb2.Message]:
    return [m for m in await messages(system) if m.status == delivery_pb2.MESSAGE_STATUS_SENT]


# ---- the address check --------------------------------------------------------------------------


async def test_without_the_allow_setting_a_receiver_on_loopback_gets_nothing(
    start: Start, hooks: WebhookReceiver, net: FakeNet
) -> None:
    system = await start(webhook_allow_insecure=True)
    err = await rpc_error(put_endpoint(system, "crm", hooks.url("crm")))
    assert field_violations(err) == {"endpoint.url": "127.0.0.1 is a loopback address"}
    await save_endpoint(system, "crm", hooks.url("crm"))  # saved while the setting was on
    await put_template(system, "lead-to-crm", "crm")
    key = await request(system, await lead(system), "lead-to-crm")
    message = await eventually(lambda: final_message(system, key))
    assert message.status == delivery_pb2.MESSAGE_STATUS_FAILED
    assert message.reason == "address_blocked: 127.0.0.1 is a loopback address"
    await stays(lambda: _any_delivery(hooks), duration=0.3)
    assert net.connects == []


async def _any_delivery(hooks: WebhookReceiver) -> list[dict]:  # type: ignore[type-arg]
    return hooks.deliveries("crm")


async def test_private_metadata_and_loopback_addresses_are_refused_before_any_connection(
    start: Start, net: FakeNet
) -> None:
    net.answers["crm.example.com"] = ["93.184.216.34"]  # public when the endpoint is saved
    system = await start()
    urls = {
        "ten": "https://10.0.0.1/hook",
        "metadata": "https://169.254.169.254/latest/meta-data/",
        "ipv6-loopback": "https://[::1]:8443/hook",
    }
    for endpoint_id, url in urls.items():
        await save_endpoint(system, endpoint_id, url)
    await put_endpoint(system, "rebound", "https://crm.example.com/hook")
    net.answers["crm.example.com"] = ["93.184.216.34", "10.9.9.9"]  # and private when it is sent
    person = await lead(system)
    keys = {}
    for endpoint_id in [*urls, "rebound"]:
        await put_template(system, f"to-{endpoint_id}", endpoint_id)
        keys[endpoint_id] = await request(system, person, f"to-{endpoint_id}")
    reasons = {}
    for endpoint_id, key in keys.items():
        message = await eventually(lambda key=key: final_message(system, key))  # type: ignore[misc]
        assert message.status == delivery_pb2.MESSAGE_STATUS_FAILED
        reasons[endpoint_id] = message.reason
    assert reasons == {
        "ten": "address_blocked: 10.0.0.1 is a private address",
        "metadata": "address_blocked: 169.254.169.254 is a cloud metadata address",
        "ipv6-loopback": "address_blocked: ::1 is a loopback address",
        "rebound": "address_blocked: crm.example.com resolves to 10.9.9.9, a private address",
    }
    assert net.connects == []
    assert net.asked == ["crm.example.com", "crm.example.com"]  # once saving, once sending


# ---- redirects ----------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def redirector() -> AsyncIterator[tuple[str, list[str]]]:
    """An HTTP server on loopback: /private redirects (307) to a name that resolves privately,
    /moved to /final on itself (308), /found answers 302, /gone 404, /busy-once 503 the first
    time, /hang never answers; it records each path hit."""
    hits: list[str] = []
    release = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        hits.append(request.path)
        if request.path == "/busy-once" and hits.count("/busy-once") == 1:
            return web.Response(status=503)
        if request.path == "/hang":
            await release.wait()
        if request.path == "/private":
            raise web.HTTPTemporaryRedirect("https://internal.example/hook")
        if request.path == "/moved":
            raise web.HTTPPermanentRedirect("/final")
        if request.path == "/found":
            raise web.HTTPFound("/final")
        if request.path in ("/final", "/busy-once"):
            return web.Response(status=204)
        return web.Response(status=404)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"127.0.0.1:{site.port}", hits
    finally:
        release.set()
        await runner.cleanup()


async def test_redirects_are_followed_only_to_addresses_that_pass_the_check(
    start: Start, net: FakeNet, redirector: tuple[str, list[str]]
) -> None:
    address, hits = redirector
    net.answers["internal.example"] = ["10.0.0.5"]
    system = await start(webhook_allow_addresses=address)
    person = await lead(system)
    keys = {}
    for path in ("private", "moved", "found", "gone"):
        await put_endpoint(system, path, f"http://{address}/{path}")
        await put_template(system, f"to-{path}", path)
        keys[path] = await request(system, person, f"to-{path}")
    outcomes = {}
    for path, key in keys.items():
        message = await eventually(lambda key=key: final_message(system, key))  # type: ignore[misc]
        outcomes[path] = (delivery_pb2.MessageStatus.Name(message.status), message.reason)
    assert outcomes == {
        "private": (
            "MESSAGE_STATUS_FAILED",
            "address_blocked: internal.example resolves to 10.0.0.5, a private address"
            " (a redirect from 127.0.0.1)",
        ),
        "moved": ("MESSAGE_STATUS_SENT", "webhook: 204 No Content"),
        "found": ("MESSAGE_STATUS_FAILED", "redirect_not_followed: 302 Found (only 307 and 308 are)"),
        "gone": ("MESSAGE_STATUS_FAILED", "webhook_rejected: 404 Not Found"),
    }
    assert sorted(hits) == sorted(["/private", "/moved", "/final", "/found", "/gone"])
    host, port = address.split(":")
    assert set(net.connects) == {(host, int(port))}  # never internal.example


# ---- the endpoints resource ---------------------------------------------------------------------


async def test_put_webhook_endpoint_names_each_bad_field(start: Start, net: FakeNet) -> None:
    net.answers.update({"crm.internal": ["192.168.4.2"], "crm.example.com": ["93.184.216.34"]})
    system = await start()
    cases = {
        "https://crm.example.com/hook?x=1": {},
        "http://crm.example.com/hook": {"endpoint.url": "must be an https URL"},
        "https://user:pass@crm.example.com/hook": {
            "endpoint.url": "must not carry credentials (user:password@)"
        },
        "https://10.0.0.1/hook": {"endpoint.url": "10.0.0.1 is a private address"},
        "https://169.254.169.254/": {"endpoint.url": "169.254.169.254 is a cloud metadata address"},
        "https://[::1]/hook": {"endpoint.url": "::1 is a loopback address"},
        "https://100.64.0.1/hook": {"endpoint.url": "100.64.0.1 is a carrier-grade NAT address"},
        "https://crm.internal/hook": {
            "endpoint.url": "crm.internal resolves to 192.168.4.2, a private address"
        },
        "https://nowhere.example/hook": {"endpoint.url": "nowhere.example does not resolve: no such host"},
    }
    for url, violations in cases.items():
        call = put_endpoint(system, "crm", url)
        if not violations:
            await call
            continue
        assert field_violations(await rpc_error(call)) == violations, url

    bad = delivery_pb2.WebhookEndpoint(endpoint_id="CRM!", url="", timeout=duration_pb2.Duration(seconds=31))
    err = await rpc_error(
        system.delivery.PutWebhookEndpoint(
            delivery_pb2.PutWebhookEndpointRequest(endpoint=bad), metadata=token(TENANT, "admin")
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(err)) == {"endpoint.endpoint_id", "endpoint.url", "endpoint.timeout"}
    err = await rpc_error(
        system.delivery.PutWebhookEndpoint(
            delivery_pb2.PutWebhookEndpointRequest(), metadata=token(TENANT, "admin")
        )
    )
    assert field_violations(err) == {"endpoint": "is required"}
    for seconds in (10**15, -1):
        huge = delivery_pb2.WebhookEndpoint(
            endpoint_id="crm", url="https://crm.example.com/", timeout=duration_pb2.Duration(seconds=seconds)
        )
        err = await rpc_error(
            system.delivery.PutWebhookEndpoint(
                delivery_pb2.PutWebhookEndpointRequest(endpoint=huge), metadata=token(TENANT, "admin")
            )
        )
        assert set(field_violations(err)) == {"endpoint.timeout"}


async def test_the_secret_is_shown_on_creation_and_rotation_only(start: Start, net: FakeNet) -> None:
    net.answers["crm.example.com"] = ["93.184.216.34"]
    system = await start()
    created = await put_endpoint(system, "crm", "https://crm.example.com/hook")
    updated = await put_endpoint(system, "crm", "https://crm.example.com/v2/hook")
    assert created.secret.startswith("whsec_") and updated.secret == ""
    assert updated.url == "https://crm.example.com/v2/hook"
    rotated = await put_endpoint(system, "crm", "https://crm.example.com/v2/hook", rotate=True)
    assert rotated.secret.startswith("whsec_") and rotated.secret != created.secret

    reply = await system.delivery.GetWebhookEndpoint(
        delivery_pb2.GetWebhookEndpointRequest(endpoint_id="crm"), metadata=token(TENANT, "read")
    )
    assert reply.endpoint.url == "https://crm.example.com/v2/hook" and reply.endpoint.secret == ""
    other_tenant = await rpc_error(
        system.delivery.GetWebhookEndpoint(
            delivery_pb2.GetWebhookEndpointRequest(endpoint_id="crm"), metadata=token("other", "read")
        )
    )
    assert other_tenant.code() == grpc.StatusCode.NOT_FOUND
    reader = await rpc_error(
        system.delivery.PutWebhookEndpoint(
            delivery_pb2.PutWebhookEndpointRequest(
                endpoint=delivery_pb2.WebhookEndpoint(endpoint_id="x", url="https://crm.example.com/")
            ),
            metadata=token(TENANT, "read"),
        )
    )
    assert reader.code() == grpc.StatusCode.PERMISSION_DENIED
    bad_id = await rpc_error(
        system.delivery.GetWebhookEndpoint(
            delivery_pb2.GetWebhookEndpointRequest(endpoint_id="../x"), metadata=token(TENANT, "read")
        )
    )
    assert set(field_violations(bad_id)) == {"endpoint_id"}


async def test_a_webhook_template_must_name_an_existing_endpoint(start: Start) -> None:
    system = await start()
    for endpoint_id, violation in (("", "is required"), ("crm", "no such webhook endpoint")):
        err = await rpc_error(put_template(system, "lead-to-crm", endpoint_id))
        assert field_violations(err) == {"template.webhook_endpoint_id": violation}


async def test_a_name_is_resolved_once_and_the_connection_goes_to_the_checked_address(
    start: Start, hooks: WebhookReceiver, net: FakeNet
) -> None:
    net.answers["crm.test"] = ["127.0.0.1"]
    system = await start(webhook_allow_addresses=f"crm.test:{hooks.port}")
    endpoint = await put_endpoint(system, "crm", f"http://crm.test:{hooks.port}/hooks/crm")
    hooks.write_secret("crm", endpoint.secret)
    await put_template(system, "lead-to-crm", "crm")
    net.asked.clear()
    key = await request(system, await lead(system), "lead-to-crm")
    message = await eventually(lambda: final_message(system, key))
    assert message.status == delivery_pb2.MESSAGE_STATUS_SENT, message.reason
    assert [d["verified"] for d in hooks.deliveries("crm")] == [True]
    assert net.asked == ["crm.test"]  # the connection asked the pinned answer, not DNS again
    assert net.connects == [("crm.test", hooks.port)]


async def test_failures_worth_retrying_are_retried_and_a_timeout_too(
    start: Start, redirector: tuple[str, list[str]]
) -> None:
    address, hits = redirector
    system = await start(webhook_allow_private=True, webhook_allow_insecure=True)
    closed_port = free_port()
    await put_endpoint(system, "busy", f"http://{address}/busy-once")
    await put_endpoint(system, "hang", f"http://{address}/hang", timeout=timedelta(milliseconds=300))
    await put_endpoint(system, "closed", f"http://127.0.0.1:{closed_port}/hook")
    person = await lead(system)
    keys = {}
    for endpoint_id in ("busy", "hang", "closed"):
        await put_template(system, f"to-{endpoint_id}", endpoint_id)
        keys[endpoint_id] = await request(system, person, f"to-{endpoint_id}")

    # A timeout after the request went out is retried: the receiver deduplicates by webhook-id.
    hung = await eventually(lambda: _retrying(system, keys["hang"]))
    assert "Timeout" in hung.reason, hung.reason
    assert "/hang" in hits
    closed = await eventually(lambda: _retrying(system, keys["closed"]))
    assert "Cannot connect to host 127.0.0.1:" in closed.reason
    await eventually(lambda: _retrying(system, keys["busy"]))
    await system.clock.advance(timedelta(seconds=RetryPolicy().delay_s(1, 0.999999)))
    sent = await eventually(lambda: final_message(system, keys["busy"]), timeout=20)
    assert sent.status == delivery_pb2.MESSAGE_STATUS_SENT
    assert [h.reason for h in sent.history][-2:] == [
        "retrying: attempt 1: webhook: 503 Service Unavailable",
        "webhook: 204 No Content",
    ]


async def _retrying(system: System, key: str) -> delivery_pb2.Message | None:
    for m in await messages(system):
        if m.idempotency_key == key and m.reason.startswith("retrying: attempt 1: webhook: "):
            return m
    return None
