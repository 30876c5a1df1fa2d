"""GDPR across the three real services: export everything about a person, erase them everywhere."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import nats
import pytest
from google.protobuf import struct_pb2

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import bus_pb2 as delivery_bus_pb2
from relevans.delivery.v1 import delivery_pb2
from relevans.kit.bus import event_partition, event_subject
from relevans.profile.v1 import bus_pb2 as profile_bus_pb2
from relevans.profile.v1 import profile_pb2
from tests.helpers import eventually
from tests.helpers.cart import DELAY
from tests.helpers.system import System

A, B = "shop-a", "shop-b"
EMAIL = "ada@example.com"
GRANTED = common_pb2.CONSENT_STATUS_GRANTED


def marketing_email(status: int = GRANTED) -> profile_pb2.ConsentInput:
    return profile_pb2.ConsentInput(
        purpose=common_pb2.PURPOSE_MARKETING, channel=common_pb2.CHANNEL_EMAIL, status=status, source="form"
    )


async def track(system: System, tenant: str, event: profile_pb2.Event) -> profile_pb2.TrackResponse:
    event.timestamp.FromDatetime(system.clock.now())
    reply: profile_pb2.TrackResponse = await system.profiles.Track(
        profile_pb2.TrackRequest(event=event), metadata=system.token(tenant, "ingest")
    )
    return reply


async def messages_of(system: System, profile_id: str) -> list[delivery_pb2.Message]:
    reply = await system.delivery.ListMessages(
        delivery_pb2.ListMessagesRequest(profile_id=profile_id), metadata=system.token(A, "read")
    )
    return list(reply.messages)


async def test_export_then_erase_everywhere_and_suppress(system: System) -> None:
    admin = system.token(A, "admin")
    await system.setup_abandoned_cart(A)
    reply = await system.profiles.Identify(
        profile_pb2.IdentifyRequest(email=EMAIL, first_name="Ada", consents=[marketing_email()]),
        metadata=system.token(A, "ingest"),
    )
    pid = reply.profile.profile_id
    # a visit before logging in, then the login: the shadow profile is merged into Ada's
    await track(system, A, profile_pb2.Event(type="page_view", anonymous_id="anon-1", message_id="m0"))
    await system.profiles.Identify(
        profile_pb2.IdentifyRequest(email=EMAIL, anonymous_id="anon-1"), metadata=system.token(A, "ingest")
    )
    await system.clock.advance(timedelta(minutes=1))
    await system.track(A, EMAIL, "add_to_cart", message_id="m1", product_name="Shoes")
    await eventually(
        lambda: system.scalar("trigger", "SELECT count(*) FROM timers WHERE profile_id = :p", p=pid)
    )
    await system.clock.advance(DELAY)
    await eventually(lambda: messages_of(system, pid))
    await system.track(A, EMAIL, "add_to_cart", message_id="m2", product_name="Socks")
    pending = "SELECT count(*) FROM timers WHERE profile_id = :p AND status = 'pending'"
    await eventually(lambda: system.scalar("trigger", pending, p=pid))

    traits = struct_pb2.Struct()
    traits.update({"tier": "gold"})
    await system.profiles.SetTraits(
        profile_pb2.SetTraitsRequest(profile_id=pid, source="backend", traits=traits),
        metadata=system.token(A, "ingest"),
    )

    export = await system.profiles.ExportProfile(
        profile_pb2.ExportProfileRequest(profile_id=pid), metadata=admin
    )
    assert export.profile.email == EMAIL and export.profile.first_name == "Ada"
    assert [(t.name, t.source, t.value.string_value) for t in export.traits] == [("tier", "backend", "gold")]
    assert export.profile.traits["tier"].string_value == "gold"
    assert set(export.profile.last_seen) == {"page_view", "add_to_cart"}
    assert [e.event.message_id for e in export.events] == ["m2", "m1", "m0"]  # newest first
    assert export.events[2].event.anonymous_id == "anon-1"
    assert export.events[1].event.properties["product_name"] == "Shoes"
    assert not export.events_truncated
    assert {(i.kind, i.value) for i in export.identities} == {("email", EMAIL), ("anonymous", "anon-1")}
    [entry] = export.consent_history
    assert entry.status == GRANTED and entry.source == "form"
    [merge] = export.merges
    assert merge.to_profile_id == pid and merge.anonymous_id == "anon-1"

    erased = await system.profiles.EraseProfile(
        profile_pb2.EraseProfileRequest(profile_id=pid, request_id="ticket-1"), metadata=admin
    )
    again = await system.profiles.EraseProfile(
        profile_pb2.EraseProfileRequest(profile_id=pid, request_id="ticket-1"), metadata=admin
    )
    assert again.erasure_id == erased.erasure_id

    status = await eventually(lambda: system.erasure_done(A, erased.erasure_id))
    assert set(status.services_done) == {"profile", "trigger", "delivery"}
    assert status.profile_id == pid and status.HasField("complete_time")

    for call in (
        system.profiles.GetProfile(profile_pb2.GetProfileRequest(profile_id=pid), metadata=admin),
        system.profiles.ExportProfile(profile_pb2.ExportProfileRequest(profile_id=pid), metadata=admin),
        system.profiles.EraseProfile(profile_pb2.EraseProfileRequest(profile_id=pid), metadata=admin),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    for table in ("timers", "trigger_states", "firings"):
        assert (
            await system.scalar("trigger", f"SELECT count(*) FROM {table} WHERE profile_id = :p", p=pid) == 0
        )
    assert await messages_of(system, pid) == []
    assert await system.scalar("delivery", "SELECT count(*) FROM message_status_history") == 0
    assert await system.scalar("profile", "SELECT count(*) FROM events") == 0
    assert await system.scalar("profile", "SELECT count(*) FROM profile_traits") == 0

    # The person comes back: neither Identify nor an import restores their marketing consent.
    back = await system.profiles.Identify(
        profile_pb2.IdentifyRequest(email=EMAIL, consents=[marketing_email()]),
        metadata=system.token(A, "ingest"),
    )
    assert back.created and list(back.profile.consents) == []

    async def rows() -> AsyncIterator[profile_pb2.ImportProfilesRequest]:
        row = profile_pb2.ImportRow(row_number=2, email=EMAIL, marketing_email_consent=marketing_email())
        yield profile_pb2.ImportProfilesRequest(source="ticketing", rows=[row])

    imported = await system.profiles.ImportProfiles(rows(), metadata=system.token(A, "ingest"))
    assert imported.rows_upserted == 1
    [error] = imported.errors
    assert (error.row_number, error.field) == (2, "marketing_consent")
    assert error.reason == "identifier was erased; consent not restored"
    found = await system.profiles.GetProfile(profile_pb2.GetProfileRequest(email=EMAIL), metadata=admin)
    assert list(found.profile.consents) == []


async def test_other_tenants_and_callers_without_admin_cannot_export_or_erase(system: System) -> None:
    pid = await system.customer(A, EMAIL)
    other = system.token(B, "admin")
    for call in (
        system.profiles.ExportProfile(profile_pb2.ExportProfileRequest(profile_id=pid), metadata=other),
        system.profiles.EraseProfile(profile_pb2.EraseProfileRequest(profile_id=pid), metadata=other),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await system.profiles.ExportProfile(profile_pb2.ExportProfileRequest(profile_id=pid))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await system.profiles.EraseProfile(profile_pb2.EraseProfileRequest(profile_id=pid))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await system.profiles.ExportProfile(
            profile_pb2.ExportProfileRequest(profile_id=pid), metadata=system.token(A, "ingest", "read")
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # A's person is untouched.
    export = await system.profiles.ExportProfile(
        profile_pb2.ExportProfileRequest(profile_id=pid), metadata=system.token(A, "admin")
    )
    assert export.profile.email == EMAIL


async def test_delivery_never_sends_to_an_erased_address(system: System) -> None:
    admin = system.token(A, "admin")
    await system.setup_abandoned_cart(A)
    pid = await system.customer(A, EMAIL)
    erased = await system.profiles.EraseProfile(
        profile_pb2.EraseProfileRequest(profile_id=pid), metadata=admin
    )

    await eventually(lambda: system.erasure_done(A, erased.erasure_id))
    # the person comes back and explicitly consents again: delivery still suppresses the address
    back = await system.customer(A, EMAIL)
    await system.profiles.SetConsent(
        profile_pb2.SetConsentRequest(profile_id=back, consent=marketing_email()),
        metadata=system.token(A, "ingest"),
    )
    await system.track(A, EMAIL, "add_to_cart", message_id="m1", product_name="Shoes")
    pending = "SELECT count(*) FROM timers WHERE profile_id = :p AND status = 'pending'"
    await eventually(lambda: system.scalar("trigger", pending, p=back))
    await system.clock.advance(DELAY)
    [message] = await eventually(lambda: messages_of(system, back))
    assert message.status == delivery_pb2.MESSAGE_STATUS_SUPPRESSED
    assert message.reason == "erased"
    assert system.mails_to(EMAIL) == []


async def test_late_events_and_requests_of_an_erased_person_leave_no_trace(system: System) -> None:
    """The event stream, the erasure stream and the request queue are consumed independently:
    an event or a delivery request of the person that arrives after the erasure is dropped."""
    admin = system.token(A, "admin")
    await system.setup_abandoned_cart(A)
    pid = await system.customer(A, EMAIL)
    erased = await system.profiles.EraseProfile(
        profile_pb2.EraseProfileRequest(profile_id=pid), metadata=admin
    )

    await eventually(lambda: system.erasure_done(A, erased.erasure_id))
    nc = await nats.connect(system.settings.nats_url)
    try:
        js = nc.jetstream()
        late = profile_bus_pb2.EnrichedEvent(
            tenant_id=A, event_id="late-1", profile_id=pid, event=profile_pb2.Event(type="add_to_cart")
        )
        late.receive_time.FromDatetime(system.clock.now())
        await js.publish(event_subject(A, pid, system.settings.event_partitions), late.SerializeToString())
        request = delivery_bus_pb2.DeliveryRequest(
            idempotency_key=f"late:{pid}",
            tenant_id=A,
            profile_id=pid,
            trigger_id="abandoned-cart",
            channel=common_pb2.CHANNEL_EMAIL,
            purpose=common_pb2.PURPOSE_MARKETING,
            template_id="cart-reminder",
        )
        await js.publish("rv.delivery.requests", request.SerializeToString())

        async def consumed() -> bool:
            partition = event_partition(A, pid, system.settings.event_partitions)
            events = await js.consumer_info("RV_EVENTS", f"trigger-events-{partition}")
            requests = await js.consumer_info("RV_DELIVERY_REQUESTS", "delivery-requests")
            return not (events.num_pending or events.num_ack_pending or requests.num_pending) and not (
                requests.num_ack_pending
            )

        await eventually(consumed)
    finally:
        await nc.close()
    assert await system.scalar("trigger", "SELECT count(*) FROM timers WHERE profile_id = :p", p=pid) == 0
    assert (
        await system.scalar("trigger", "SELECT count(*) FROM trigger_states WHERE profile_id = :p", p=pid)
        == 0
    )
    assert await messages_of(system, pid) == []


async def test_an_identifier_erased_in_one_case_stays_suppressed_in_another_through_every_path(
    system: System,
) -> None:
    """Profile, import and delivery hash an erased identifier with one normalisation
    (relevans.kit.identifiers): `Ann@Example.com` erased is `ann@example.com` suppressed, and a
    customer id erased as `ANN-1` is not resubscribed as `ann-1`."""
    admin = system.token(A, "admin")
    await system.setup_abandoned_cart(A)
    reply = await system.profiles.Identify(
        profile_pb2.IdentifyRequest(
            email="Ann@Example.com", customer_id="ANN-1", consents=[marketing_email()]
        ),
        metadata=system.token(A, "ingest"),
    )
    erased = await system.profiles.EraseProfile(
        profile_pb2.EraseProfileRequest(profile_id=reply.profile.profile_id), metadata=admin
    )
    await eventually(lambda: system.erasure_done(A, erased.erasure_id))

    back = await system.profiles.Identify(
        profile_pb2.IdentifyRequest(email="ann@example.com", consents=[marketing_email()]),
        metadata=system.token(A, "ingest"),
    )
    assert back.created and list(back.profile.consents) == []

    async def rows() -> AsyncIterator[profile_pb2.ImportProfilesRequest]:
        yield profile_pb2.ImportProfilesRequest(
            source="ticketing",
            rows=[
                profile_pb2.ImportRow(
                    row_number=2, email="ANN@EXAMPLE.COM", marketing_email_consent=marketing_email()
                ),
                profile_pb2.ImportRow(
                    row_number=3, customer_id="ann-1", marketing_email_consent=marketing_email()
                ),
            ],
        )

    imported = await system.profiles.ImportProfiles(rows(), metadata=system.token(A, "ingest"))
    assert sorted((e.row_number, e.reason) for e in imported.errors) == [
        (2, "identifier was erased; consent not restored"),
        (3, "identifier was erased; consent not restored"),
    ]

    # an explicit consent given later is kept by profile, but delivery still suppresses the address
    await system.profiles.SetConsent(
        profile_pb2.SetConsentRequest(profile_id=back.profile.profile_id, consent=marketing_email()),
        metadata=system.token(A, "ingest"),
    )
    await system.track(A, "ann@example.com", "add_to_cart", message_id="m1", product_name="Shoes")
    pending = "SELECT count(*) FROM timers WHERE profile_id = :p AND status = 'pending'"
    await eventually(lambda: system.scalar("trigger", pending, p=back.profile.profile_id))
    await system.clock.advance(DELAY)
    [message] = await eventually(lambda: messages_of(system, back.profile.profile_id))
    assert (message.status, message.reason) == (delivery_pb2.MESSAGE_STATUS_SUPPRESSED, "erased")
    assert system.mails_to("ann@example.com") == []
