"""Merging two known profiles by Identify (README, "Identity"), over gRPC, PostgreSQL and NATS."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import grpc
import nats
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.common.v1 import common_pb2
from relevans.kit.clock import ManualClock
from relevans.profile.v1 import bus_pb2, profile_pb2
from tests.helpers import field_violations
from tests.helpers.profile import (
    TENANT,
    count,
    fetch_all,
    granted_marketing_email,
    token,
    track,
)

if TYPE_CHECKING:
    from tests.helpers.profile import Stub


def consent_input(purpose: int, channel: int, status: int, source: str) -> profile_pb2.ConsentInput:
    return profile_pb2.ConsentInput(
        purpose=purpose,  # type: ignore[arg-type]
        channel=channel,  # type: ignore[arg-type]
        status=status,  # type: ignore[arg-type]
        source=source,
    )


async def test_identify_merges_two_known_profiles_into_the_one_with_the_customer_id(
    stub: Stub, db: AsyncEngine, clock: ManualClock, js: nats.js.JetStreamContext
) -> None:
    # the older profile, known by email, with a name, a tag, two consents and an event
    by_email = await stub.Identify(
        profile_pb2.IdentifyRequest(
            email="ada@example.com",
            first_name="Ada",
            consents=[
                granted_marketing_email(),
                consent_input(
                    common_pb2.PURPOSE_PROFILING,
                    common_pb2.CHANNEL_WEB,
                    common_pb2.CONSENT_STATUS_GRANTED,
                    "cookie_banner",
                ),
            ],
        ),
        metadata=token(),
    )
    a = by_email.profile.profile_id
    await track(stub, type="add_to_cart", email="ada@example.com")
    async with db.begin() as conn:
        await conn.execute(
            sa.text("INSERT INTO profile_tags VALUES (:t, :p, 'vip', now())"), {"t": TENANT, "p": a}
        )
        await conn.execute(
            sa.text(
                """INSERT INTO profile_traits VALUES (:t, :p, 'tier', 'backend', '"gold"'::jsonb, now())"""
            ),
            {"t": TENANT, "p": a},
        )

    # a day later the same person, known by customer id, withdraws marketing email
    await clock.advance(timedelta(days=1))
    by_customer = await stub.Identify(profile_pb2.IdentifyRequest(customer_id="c-1"), metadata=token())
    b = by_customer.profile.profile_id
    await stub.SetConsent(
        profile_pb2.SetConsentRequest(
            profile_id=b,
            consent=consent_input(
                common_pb2.PURPOSE_MARKETING,
                common_pb2.CHANNEL_EMAIL,
                common_pb2.CONSENT_STATUS_WITHDRAWN,
                "unsubscribe_link",
            ),
        ),
        metadata=token(),
    )
    await track(stub, type="purchase", customer_id="c-1")

    await clock.advance(timedelta(minutes=5))
    merged = await stub.Identify(
        profile_pb2.IdentifyRequest(customer_id="c-1", email="ada@example.com"), metadata=token()
    )
    p = merged.profile
    assert not merged.created
    assert (p.profile_id, p.customer_id, p.email, p.first_name) == (b, "c-1", "ada@example.com", "Ada")
    # the most recent decision per purpose and channel
    assert sorted((c.purpose, c.channel, c.status, c.source) for c in p.consents) == [
        (
            common_pb2.PURPOSE_MARKETING,
            common_pb2.CHANNEL_EMAIL,
            common_pb2.CONSENT_STATUS_WITHDRAWN,
            "unsubscribe_link",
        ),
        (
            common_pb2.PURPOSE_PROFILING,
            common_pb2.CHANNEL_WEB,
            common_pb2.CONSENT_STATUS_GRANTED,
            "cookie_banner",
        ),
    ]
    # both profiles' events, ledger rows, tags and traits are the survivor's
    assert await count(db, "SELECT count(*) FROM events WHERE profile_id = :p", p=b) == 2
    assert await count(db, "SELECT count(*) FROM consent_ledger WHERE profile_id = :p", p=b) == 3
    assert await count(db, "SELECT count(*) FROM consent_ledger WHERE profile_id = :p", p=a) == 0
    assert (
        await count(db, "SELECT count(*) FROM profile_tags WHERE profile_id = :p AND tag = 'vip'", p=b) == 1
    )
    assert await count(db, "SELECT count(*) FROM profile_traits WHERE profile_id = :p", p=b) == 1
    assert await count(db, "SELECT count(*) FROM identities WHERE profile_id = :p", p=b) == 2
    async with db.connect() as conn:
        row = (await conn.execute(sa.text("SELECT * FROM merges"))).one()
        merged_into = await conn.scalar(
            sa.text("SELECT merged_into FROM profiles WHERE profile_id = :p"), {"p": a}
        )
    assert (row.from_profile_id, row.to_profile_id, row.merged_at) == (a, b, clock.now())
    assert merged_into == b

    # the merged-away id and both identifiers read the survivor
    for request in (
        profile_pb2.GetProfileRequest(profile_id=a),
        profile_pb2.GetProfileRequest(email="ada@example.com"),
        profile_pb2.GetProfileRequest(customer_id="c-1"),
    ):
        assert (await stub.GetProfile(request, metadata=token())).profile.profile_id == b
    assert (await track(stub, email="ada@example.com")).profile_id == b

    [msg] = await fetch_all(js, "rv.profile.merged", 1)
    event = bus_pb2.ProfileMerged.FromString(msg.data)
    assert (event.tenant_id, event.surviving_profile_id, event.merged_profile_id, event.reason) == (
        TENANT,
        b,
        a,
        "customer_id_and_email",
    )
    assert event.merge_time.ToDatetime(tzinfo=clock.now().tzinfo) == clock.now()

    # merging twice is a no-op
    again = await stub.Identify(
        profile_pb2.IdentifyRequest(customer_id="c-1", email="ada@example.com"), metadata=token()
    )
    assert again.profile.profile_id == b and not again.created
    assert await count(db, "SELECT count(*) FROM merges") == 1
    assert await count(db, "SELECT count(*) FROM outbox WHERE subject = 'rv.profile.merged'") == 1
    assert await count(db, "SELECT count(*) FROM consent_ledger WHERE profile_id = :p", p=b) == 3


async def test_of_two_customers_the_older_profile_survives(stub: Stub, clock: ManualClock) -> None:
    older = await stub.Identify(
        profile_pb2.IdentifyRequest(customer_id="c-1", email="one@example.com"), metadata=token()
    )
    await clock.advance(timedelta(hours=1))
    newer = await stub.Identify(
        profile_pb2.IdentifyRequest(customer_id="c-2", first_name="Bo"), metadata=token()
    )
    merged = await stub.Identify(
        profile_pb2.IdentifyRequest(customer_id="c-2", email="one@example.com"), metadata=token()
    )
    p = merged.profile
    assert (p.profile_id, p.customer_id, p.first_name) == (older.profile.profile_id, "c-1", "Bo")
    read = await stub.GetProfile(profile_pb2.GetProfileRequest(customer_id="c-2"), metadata=token())
    assert read.profile.profile_id == older.profile.profile_id
    old = await stub.GetProfile(
        profile_pb2.GetProfileRequest(profile_id=newer.profile.profile_id), metadata=token()
    )
    assert old.profile.profile_id == older.profile.profile_id


async def test_a_shadow_merge_publishes_profile_merged(
    stub: Stub, clock: ManualClock, js: nats.js.JetStreamContext
) -> None:
    shadow = await track(stub, anonymous_id="cookie-1")
    known = await stub.Identify(profile_pb2.IdentifyRequest(email="ada@example.com"), metadata=token())
    await stub.Identify(
        profile_pb2.IdentifyRequest(email="ada@example.com", anonymous_id="cookie-1"), metadata=token()
    )
    [msg] = await fetch_all(js, "rv.profile.merged", 1)
    event = bus_pb2.ProfileMerged.FromString(msg.data)
    assert (event.surviving_profile_id, event.merged_profile_id, event.reason) == (
        known.profile.profile_id,
        shadow.profile_id,
        "anonymous_id",
    )


async def test_a_profile_merged_earlier_follows_its_survivor_into_a_later_merge(
    stub: Stub, clock: ManualClock
) -> None:
    shadow = await track(stub, anonymous_id="cookie-7")
    first = await stub.Identify(
        profile_pb2.IdentifyRequest(email="x@example.com", anonymous_id="cookie-7"), metadata=token()
    )
    assert first.profile.profile_id == shadow.profile_id  # the shadow became known
    other = await track(stub, anonymous_id="cookie-8")
    await stub.Identify(
        profile_pb2.IdentifyRequest(email="x@example.com", anonymous_id="cookie-8"), metadata=token()
    )
    await clock.advance(timedelta(minutes=1))
    customer = await stub.Identify(profile_pb2.IdentifyRequest(customer_id="c-7"), metadata=token())
    await stub.Identify(
        profile_pb2.IdentifyRequest(customer_id="c-7", email="x@example.com"), metadata=token()
    )
    for pid in (shadow.profile_id, other.profile_id):
        read = await stub.GetProfile(profile_pb2.GetProfileRequest(profile_id=pid), metadata=token())
        assert read.profile.profile_id == customer.profile.profile_id
        assert sorted(read.profile.anonymous_ids) == ["cookie-7", "cookie-8"]


def merge(profile_id: str, other: str) -> profile_pb2.MergeProfilesRequest:
    return profile_pb2.MergeProfilesRequest(profile_id=profile_id, other_profile_id=other)


async def test_merge_profiles_follows_the_survivor_rule_and_refuses_what_it_must(
    stub: Stub, clock: ManualClock, js: nats.js.JetStreamContext
) -> None:
    admin = token(TENANT, "admin")
    older = await stub.Identify(profile_pb2.IdentifyRequest(email="bo@example.com"), metadata=token())
    await clock.advance(timedelta(hours=1))
    newer = await stub.Identify(profile_pb2.IdentifyRequest(email="bo.work@example.com"), metadata=token())
    a, b = older.profile.profile_id, newer.profile.profile_id

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.MergeProfiles(
            profile_pb2.MergeProfilesRequest(profile_id=a, other_profile_id=a), metadata=admin
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(caught.value)) == {"other_profile_id"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.MergeProfiles(
            profile_pb2.MergeProfilesRequest(profile_id=a, other_profile_id=b), metadata=token()
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # neither has a customer id: the older survives, whichever is named first
    merged = await stub.MergeProfiles(
        profile_pb2.MergeProfilesRequest(profile_id=b, other_profile_id=a), metadata=admin
    )
    assert (merged.profile.profile_id, merged.merged_profile_id) == (a, b)
    again = await stub.MergeProfiles(
        profile_pb2.MergeProfilesRequest(profile_id=a, other_profile_id=b), metadata=admin
    )
    assert (again.profile.profile_id, again.merged_profile_id) == (a, "")
    [msg] = await fetch_all(js, "rv.profile.merged", 1)
    event = bus_pb2.ProfileMerged.FromString(msg.data)
    assert (event.surviving_profile_id, event.merged_profile_id, event.reason) == (a, b, "merge_request")

    # two different business keys stay apart
    c1 = await stub.Identify(profile_pb2.IdentifyRequest(customer_id="c-1"), metadata=token())
    c2 = await stub.Identify(profile_pb2.IdentifyRequest(customer_id="c-2"), metadata=token())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.MergeProfiles(
            profile_pb2.MergeProfilesRequest(
                profile_id=c1.profile.profile_id, other_profile_id=c2.profile.profile_id
            ),
            metadata=admin,
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.MergeProfiles(
            merge(a, c1.profile.profile_id),
            metadata=token("other-tenant", "admin"),
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
