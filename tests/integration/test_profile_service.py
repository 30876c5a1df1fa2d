"""The profile service over real gRPC, PostgreSQL and NATS JetStream."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import TYPE_CHECKING

import grpc
import nats
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.common.v1 import common_pb2
from relevans.kit.auth import mint_token
from relevans.kit.bus import event_subject
from relevans.kit.clock import ManualClock
from relevans.kit.grpc_client import bearer
from relevans.kit.settings import Settings
from relevans.profile.v1 import bus_pb2, profile_pb2
from tests.helpers import code_of, eventually, field_violations, stays
from tests.helpers.profile import (
    TENANT,
    count,
    ev,
    fetch_all,
    granted_marketing_email,
    stream_messages,
    token,
    track,
)

if TYPE_CHECKING:
    from tests.helpers.profile import Stub

# ---- ingest -----------------------------------------------------------------------------------


async def test_an_event_with_a_known_message_id_is_stored_once(
    stub: Stub, db: AsyncEngine, js: nats.js.JetStreamContext
) -> None:
    first = await track(stub, anonymous_id="cookie-1", message_id="m-1", properties={"sku": "s-1"})
    again = await track(stub, anonymous_id="cookie-1", message_id="m-1", properties={"sku": "s-1"})
    assert not first.duplicate and again.duplicate
    assert (again.event_id, again.profile_id) == (first.event_id, first.profile_id)
    assert await count(db, "SELECT count(*) FROM events") == 1
    assert await count(db, "SELECT count(*) FROM outbox") == 1
    await eventually(lambda: _equals(stream_messages(js, "RV_EVENTS"), 1))
    await stays(lambda: _greater(stream_messages(js, "RV_EVENTS"), 1), duration=0.3)
    # without a message id every call is a new event
    a, b = await track(stub, anonymous_id="cookie-1"), await track(stub, anonymous_id="cookie-1")
    assert a.event_id != b.event_id and a.profile_id == b.profile_id == first.profile_id


async def _equals(value: object, expected: int) -> bool:
    return await value == expected  # type: ignore[misc]


async def _greater(value: object, limit: int) -> bool:
    return await value > limit  # type: ignore[misc]


async def test_a_batch_with_one_bad_event_stores_nothing(
    stub: Stub, db: AsyncEngine, js: nats.js.JetStreamContext
) -> None:
    events = [ev(customer_id=f"c-{i}", email=f"p{i}@example.com") for i in range(6)]
    events[3].type = "Not A Type"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.BatchTrack(profile_pb2.BatchTrackRequest(events=events), metadata=token())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(caught.value)) == {"events[3].type"}
    for i in (0, 5):
        assert (
            await code_of(
                stub.GetProfile(profile_pb2.GetProfileRequest(customer_id=f"c-{i}"), metadata=token())
            )
            == grpc.StatusCode.NOT_FOUND
        )
    for table in ("events", "profiles", "identities", "outbox"):
        assert await count(db, f"SELECT count(*) FROM {table}") == 0, table
    await stays(lambda: _greater(stream_messages(js, "RV_EVENTS"), 0), duration=0.3)


async def test_a_batch_is_stored_in_order_with_duplicates_flagged(stub: Stub, db: AsyncEngine) -> None:
    await track(stub, anonymous_id="cookie-0", message_id="already-there")
    events = [
        ev("add_to_cart", anonymous_id="cookie-1", message_id="a"),
        ev("add_to_cart", anonymous_id="cookie-1", message_id="a"),  # repeated within the batch
        ev("purchase", anonymous_id="cookie-1", email="Buyer@Example.com", message_id="b"),
        ev("page_view", anonymous_id="cookie-0", message_id="already-there"),
        ev("page_view", email="buyer@example.com"),
    ]
    reply = await stub.BatchTrack(profile_pb2.BatchTrackRequest(events=events), metadata=token())
    results = list(reply.results)
    assert [r.duplicate for r in results] == [False, True, False, True, False]
    assert results[1].event_id == results[0].event_id
    assert len({r.profile_id for r in (results[0], results[2], results[4])}) == 1
    assert await count(db, "SELECT count(*) FROM events") == 4
    buyer = await stub.GetProfile(profile_pb2.GetProfileRequest(email="BUYER@example.com"), metadata=token())
    assert buyer.profile.profile_id == results[0].profile_id
    assert buyer.profile.email == "buyer@example.com"
    assert list(buyer.profile.anonymous_ids) == ["cookie-1"]


async def test_concurrent_tracks_are_stored_once_per_message_id_and_per_tenant(
    stub: Stub, db: AsyncEngine, js: nats.js.JetStreamContext
) -> None:
    calls = [
        track(stub, tenant=tenant, customer_id=f"c-{i % 5}", message_id=f"m-{i % 10}")
        for tenant in ("tenant-a", "tenant-b")
        for i in range(40)
    ]
    replies = await asyncio.gather(*calls)
    for tenant_replies in (replies[:40], replies[40:]):
        by_message: dict[int, set[str]] = {}
        for i, r in enumerate(tenant_replies):
            by_message.setdefault(i % 10, set()).add(r.event_id)
        assert all(len(ids) == 1 for ids in by_message.values())
        assert sum(not r.duplicate for r in tenant_replies) == 10
    assert {r.profile_id for r in replies[:40]}.isdisjoint({r.profile_id for r in replies[40:]})
    assert await count(db, "SELECT count(*) FROM events") == 20
    assert await count(db, "SELECT count(*) FROM profiles") == 10
    await eventually(lambda: _equals(stream_messages(js, "RV_EVENTS"), 20))


async def test_last_seen_follows_the_latest_event(stub: Stub, clock: ManualClock) -> None:
    at = clock.now() - timedelta(hours=1)
    e = ev(customer_id="c-1")
    e.timestamp.FromDatetime(at)
    await stub.Track(profile_pb2.TrackRequest(event=e), metadata=token())
    older = ev(customer_id="c-1")
    older.timestamp.FromDatetime(at - timedelta(days=1))
    await stub.Track(profile_pb2.TrackRequest(event=older), metadata=token())
    reply = await stub.GetProfile(profile_pb2.GetProfileRequest(customer_id="c-1"), metadata=token())
    assert reply.profile.last_seen_time.ToDatetime().replace(tzinfo=at.tzinfo) == at
    await clock.advance(timedelta(minutes=1))
    await track(stub, customer_id="c-1")
    reply = await stub.GetProfile(profile_pb2.GetProfileRequest(customer_id="c-1"), metadata=token())
    assert reply.profile.last_seen_time.ToDatetime().replace(tzinfo=at.tzinfo) == clock.now()


async def test_every_stored_event_is_published_enriched(
    stub: Stub, settings: Settings, clock: ManualClock, js: nats.js.JetStreamContext
) -> None:
    identified = await stub.Identify(
        profile_pb2.IdentifyRequest(
            email="ada@example.com", first_name="Ada", consents=[granted_marketing_email()]
        ),
        metadata=token(),
    )
    profile_id = identified.profile.profile_id
    tracked = await track(
        stub, type="add_to_cart", email="ADA@example.com", properties={"product_name": "Shoes", "price": 89.0}
    )
    assert tracked.profile_id == profile_id

    [msg] = await fetch_all(js, "rv.events.>", 1)
    assert msg.subject == event_subject(TENANT, profile_id, settings.event_partitions)
    enriched = bus_pb2.EnrichedEvent.FromString(msg.data)
    assert (enriched.tenant_id, enriched.event_id, enriched.profile_id) == (
        TENANT,
        tracked.event_id,
        profile_id,
    )
    assert enriched.event.type == "add_to_cart"
    assert enriched.event.email == "ada@example.com"
    assert len(enriched.event.message_id) == 32
    assert enriched.event.timestamp.ToDatetime(tzinfo=clock.now().tzinfo) == clock.now()
    assert enriched.receive_time.ToDatetime(tzinfo=clock.now().tzinfo) == clock.now()
    assert dict(enriched.event.properties) == {"product_name": "Shoes", "price": 89.0}
    assert (enriched.profile.profile_id, enriched.profile.email, enriched.profile.first_name) == (
        profile_id,
        "ada@example.com",
        "Ada",
    )
    [consent] = enriched.profile.consents
    assert (consent.purpose, consent.channel, consent.status) == (
        common_pb2.PURPOSE_MARKETING,
        common_pb2.CHANNEL_EMAIL,
        common_pb2.CONSENT_STATUS_GRANTED,
    )


async def test_an_event_fills_in_a_missing_email_and_never_replaces_one(
    stub: Stub, js: nats.js.JetStreamContext
) -> None:
    known = await stub.Identify(
        profile_pb2.IdentifyRequest(customer_id="c-1", email="first@example.com"), metadata=token()
    )
    bare = await stub.Identify(profile_pb2.IdentifyRequest(customer_id="c-2"), metadata=token())
    events = [
        ev(customer_id="c-1", email="second@example.com"),
        ev(customer_id="c-2", email="new@example.com"),
    ]
    reply = await stub.BatchTrack(profile_pb2.BatchTrackRequest(events=events), metadata=token())
    assert [r.profile_id for r in reply.results] == [known.profile.profile_id, bare.profile.profile_id]

    async def email_of(**lookup: str) -> tuple[str, str]:
        got = await stub.GetProfile(profile_pb2.GetProfileRequest(**lookup), metadata=token(TENANT, "read"))
        return got.profile.profile_id, got.profile.email

    # the second address now finds the known profile, which keeps its first one
    assert await email_of(email="second@example.com") == (known.profile.profile_id, "first@example.com")
    assert await email_of(customer_id="c-2") == (bare.profile.profile_id, "new@example.com")
    snapshots = [
        bus_pb2.EnrichedEvent.FromString(m.data).profile for m in await fetch_all(js, "rv.events.>", 2)
    ]
    assert sorted((p.customer_id, p.email) for p in snapshots) == [
        ("c-1", "first@example.com"),
        ("c-2", "new@example.com"),
    ]


async def test_one_profiles_events_keep_their_order_on_one_subject(
    stub: Stub, js: nats.js.JetStreamContext
) -> None:
    events = [ev(f"step_{i}", anonymous_id="cookie") for i in range(20)]
    reply = await stub.BatchTrack(profile_pb2.BatchTrackRequest(events=events), metadata=token())
    msgs = await fetch_all(js, "rv.events.>", 20)
    assert {m.subject for m in msgs} == {msgs[0].subject}
    assert [bus_pb2.EnrichedEvent.FromString(m.data).event_id for m in msgs] == [
        r.event_id for r in reply.results
    ]


async def test_concurrent_batches_resolve_shared_new_identifiers_to_one_profile(stub: Stub) -> None:
    visitors = [f"cookie-{i}" for i in range(60)]

    async def batch(offset: int) -> list[tuple[str, str]]:
        chosen = visitors[offset:] + visitors[:offset]
        events = [ev(anonymous_id=v) for v in chosen]
        reply = await stub.BatchTrack(profile_pb2.BatchTrackRequest(events=events), metadata=token())
        return [(v, r.profile_id) for v, r in zip(chosen, reply.results, strict=True)]

    results = await asyncio.gather(*(batch(offset) for offset in range(0, 60, 7)))
    owner: dict[str, set[str]] = {}
    for pairs in results:
        for visitor, profile_id in pairs:
            owner.setdefault(visitor, set()).add(profile_id)
    assert all(len(p) == 1 for p in owner.values()), owner
    assert len({next(iter(p)) for p in owner.values()}) == len(visitors)


async def test_concurrent_batches_sharing_message_ids_store_and_publish_each_event_once(
    stub: Stub, db: AsyncEngine, js: nats.js.JetStreamContext
) -> None:
    # each batch takes the 40 message ids in another order: the batches race for the same events
    async def batch(offset: int) -> list[profile_pb2.TrackResult]:
        events = [
            ev(customer_id=f"c-{i % 8}", message_id=f"m-{i}") for i in [*range(offset, 40), *range(offset)]
        ]
        reply = await stub.BatchTrack(profile_pb2.BatchTrackRequest(events=events), metadata=token())
        return sorted(reply.results, key=lambda r: r.event_id)

    replies = await asyncio.gather(*(batch(offset) for offset in range(0, 40, 5)))
    stored = {r.event_id: r.profile_id for r in replies[0]}
    assert len(stored) == 40
    for results in replies:  # every batch names the same 40 events, one call stored each
        assert {r.event_id: r.profile_id for r in results} == stored
    assert sum(not r.duplicate for results in replies for r in results) == 40
    assert await count(db, "SELECT count(*) FROM events") == 40
    assert await count(db, "SELECT count(*) FROM profiles") == 8
    await eventually(lambda: _equals(stream_messages(js, "RV_EVENTS"), 40))
    await stays(lambda: _greater(stream_messages(js, "RV_EVENTS"), 40), duration=0.3)


async def _blocked(db: AsyncEngine) -> bool:
    """Whether some session waits for a lock another one holds."""
    return await count(db, "SELECT count(*) FROM pg_locks WHERE NOT granted") > 0


async def test_an_event_written_while_its_profile_changes_keeps_both_changes(
    stub: Stub, db: AsyncEngine
) -> None:
    first = await track(stub, type="page_view", customer_id="c-1")
    # another writer has changed the profile and not committed yet when the next event arrives: the
    # event is written over the committed change, never over the version it read before it
    async with db.connect() as other:
        await other.execute(
            sa.text(
                "UPDATE profiles SET last_seen_types = last_seen_types"
                " || jsonb_build_object('signup', '2026-01-01T00:00:00+00:00') WHERE profile_id = :p"
            ),
            {"p": first.profile_id},
        )
        call = asyncio.ensure_future(track(stub, type="add_to_cart", customer_id="c-1"))
        await eventually(lambda: _blocked(db))
        await other.commit()
        second = await call
    assert second.profile_id == first.profile_id and not second.duplicate
    async with db.connect() as conn:
        seen = await conn.scalar(
            sa.text("SELECT last_seen_types FROM profiles WHERE profile_id = :p"), {"p": first.profile_id}
        )
    assert set(seen) == {"page_view", "add_to_cart", "signup"}
    assert await count(db, "SELECT count(*) FROM events") == 2


async def test_an_identifier_bound_while_an_event_names_it_takes_the_event_to_that_profile(
    stub: Stub, db: AsyncEngine, js: nats.js.JetStreamContext
) -> None:
    # another writer has bound the customer id to a new profile and not committed yet
    async with db.connect() as other:
        await other.execute(
            sa.text(
                "INSERT INTO profiles (tenant_id, profile_id, customer_id, created_at, updated_at)"
                " VALUES (:t, 'p-other', 'c-1', now(), now());"
            ),
            {"t": TENANT},
        )
        await other.execute(
            sa.text(
                "INSERT INTO identities (tenant_id, kind, value, profile_id, created_at)"
                " VALUES (:t, 'customer_id', 'c-1', 'p-other', now())"
            ),
            {"t": TENANT},
        )
        call = asyncio.ensure_future(track(stub, customer_id="c-1", message_id="m-1"))
        await eventually(lambda: _blocked(db))
        await other.commit()
        reply = await call
    # the event went to the other writer's profile, and nothing of a profile of its own is left
    assert reply.profile_id == "p-other"
    assert await count(db, "SELECT count(*) FROM profiles") == 1
    assert await count(db, "SELECT count(*) FROM identities") == 1
    assert await count(db, "SELECT count(*) FROM events WHERE profile_id = 'p-other'") == 1
    await eventually(lambda: _equals(stream_messages(js, "RV_EVENTS"), 1))
    await stays(lambda: _greater(stream_messages(js, "RV_EVENTS"), 1), duration=0.3)


# ---- identify, merge and consent ----------------------------------------------------------------


async def test_identify_merges_the_anonymous_shadow_profile(
    stub: Stub, db: AsyncEngine, clock: ManualClock
) -> None:
    known = await stub.Identify(profile_pb2.IdentifyRequest(email="ada@example.com"), metadata=token())
    assert known.created
    shadow = await track(stub, type="add_to_cart", anonymous_id="cookie-1", properties={"sku": "s-1"})
    await track(stub, anonymous_id="cookie-1")
    assert shadow.profile_id != known.profile.profile_id

    await clock.advance(timedelta(minutes=3))
    merged = await stub.Identify(
        profile_pb2.IdentifyRequest(email="ada@example.com", anonymous_id="cookie-1", first_name="Ada"),
        metadata=token(),
    )
    assert not merged.created
    assert merged.profile.profile_id == known.profile.profile_id
    assert list(merged.profile.anonymous_ids) == ["cookie-1"]
    assert merged.profile.first_name == "Ada"
    assert (
        await count(db, "SELECT count(*) FROM events WHERE profile_id = :p", p=known.profile.profile_id) == 2
    )
    async with db.connect() as conn:
        row = (await conn.execute(sa.text("SELECT * FROM merges"))).one()
    assert (row.from_profile_id, row.to_profile_id, row.tenant_id) == (
        shadow.profile_id,
        merged.profile.profile_id,
        TENANT,
    )
    assert row.merged_at == clock.now() and row.source == "identify"

    # the merged-away id stands for the surviving profile; new events go there directly
    old = await stub.GetProfile(profile_pb2.GetProfileRequest(profile_id=shadow.profile_id), metadata=token())
    assert old.profile.profile_id == known.profile.profile_id
    assert (await track(stub, anonymous_id="cookie-1")).profile_id == known.profile.profile_id


async def test_identify_turns_a_shadow_profile_into_a_known_one(stub: Stub) -> None:
    shadow = await track(stub, anonymous_id="cookie-9")
    reply = await stub.Identify(
        profile_pb2.IdentifyRequest(customer_id="c-9", anonymous_id="cookie-9"), metadata=token()
    )
    assert not reply.created and reply.profile.profile_id == shadow.profile_id
    assert reply.profile.customer_id == "c-9"
    again = await stub.Identify(profile_pb2.IdentifyRequest(customer_id="c-9"), metadata=token())
    assert not again.created and again.profile.profile_id == shadow.profile_id


async def test_concurrent_identifies_of_one_person_make_one_profile(stub: Stub) -> None:
    replies = await asyncio.gather(
        *(
            stub.Identify(
                profile_pb2.IdentifyRequest(email="same@example.com", anonymous_id=f"dev-{i}"),
                metadata=token(),
            )
            for i in range(6)
        )
    )
    assert len({r.profile.profile_id for r in replies}) == 1
    assert sum(r.created for r in replies) == 1
    final = await stub.GetProfile(profile_pb2.GetProfileRequest(email="same@example.com"), metadata=token())
    assert sorted(final.profile.anonymous_ids) == [f"dev-{i}" for i in range(6)]


async def test_consent_is_recorded_read_back_and_published(
    stub: Stub, db: AsyncEngine, clock: ManualClock, js: nats.js.JetStreamContext
) -> None:
    reply = await stub.Identify(
        profile_pb2.IdentifyRequest(
            customer_id="c-1", email="c1@example.com", consents=[granted_marketing_email()]
        ),
        metadata=token(),
    )
    profile_id = reply.profile.profile_id
    [granted] = reply.profile.consents
    assert (granted.status, granted.source) == (common_pb2.CONSENT_STATUS_GRANTED, "signup_form")

    await clock.advance(timedelta(days=2))
    withdrawn = await stub.SetConsent(
        profile_pb2.SetConsentRequest(
            profile_id=profile_id,
            consent=profile_pb2.ConsentInput(
                purpose=common_pb2.PURPOSE_MARKETING,
                channel=common_pb2.CHANNEL_EMAIL,
                status=common_pb2.CONSENT_STATUS_WITHDRAWN,
                source="unsubscribe_link",
            ),
        ),
        metadata=token(),
    )
    [current] = withdrawn.profile.consents
    assert (current.status, current.source) == (common_pb2.CONSENT_STATUS_WITHDRAWN, "unsubscribe_link")
    assert current.update_time.ToDatetime(tzinfo=clock.now().tzinfo) == clock.now()
    read = await stub.BatchGetProfiles(
        profile_pb2.BatchGetProfilesRequest(profile_ids=[profile_id]), metadata=token()
    )
    assert [c.status for c in read.profiles[0].consents] == [common_pb2.CONSENT_STATUS_WITHDRAWN]
    assert await count(db, "SELECT count(*) FROM consent_ledger WHERE profile_id = :p", p=profile_id) == 2

    msgs = await fetch_all(js, "rv.profile.consent", 2)
    changes = [bus_pb2.ConsentChanged.FromString(m.data) for m in msgs]
    assert [(c.tenant_id, c.profile_id) for c in changes] == [(TENANT, profile_id)] * 2
    assert [c.consent.status for c in changes] == [
        common_pb2.CONSENT_STATUS_GRANTED,
        common_pb2.CONSENT_STATUS_WITHDRAWN,
    ]


async def test_consent_for_an_unknown_profile_is_not_found(stub: Stub) -> None:
    request = profile_pb2.SetConsentRequest(profile_id="no-such-profile", consent=granted_marketing_email())
    assert await code_of(stub.SetConsent(request, metadata=token())) == grpc.StatusCode.NOT_FOUND


async def test_a_merged_shadow_profiles_consent_moves_to_the_known_profile(stub: Stub) -> None:
    shadow = await track(stub, anonymous_id="cookie-5")
    await stub.SetConsent(
        profile_pb2.SetConsentRequest(
            profile_id=shadow.profile_id, consent=granted_marketing_email("banner")
        ),
        metadata=token(),
    )
    known = await stub.Identify(profile_pb2.IdentifyRequest(customer_id="c-5"), metadata=token())
    merged = await stub.Identify(
        profile_pb2.IdentifyRequest(customer_id="c-5", anonymous_id="cookie-5"), metadata=token()
    )
    assert merged.profile.profile_id == known.profile.profile_id
    assert [(c.status, c.source) for c in merged.profile.consents] == [
        (common_pb2.CONSENT_STATUS_GRANTED, "banner")
    ]


# ---- reads, errors, security ------------------------------------------------------------------


async def test_profiles_are_read_by_id_customer_id_or_email(stub: Stub) -> None:
    made = await stub.Identify(
        profile_pb2.IdentifyRequest(
            customer_id="c-7", email="seven@example.com", anonymous_id="a-7", first_name="Sev"
        ),
        metadata=token(),
    )
    pid = made.profile.profile_id
    for request in (
        profile_pb2.GetProfileRequest(profile_id=pid),
        profile_pb2.GetProfileRequest(customer_id="c-7"),
        profile_pb2.GetProfileRequest(email="Seven@Example.com"),
    ):
        reply = await stub.GetProfile(request, metadata=token(TENANT, "read"))
        assert (reply.profile.profile_id, reply.profile.first_name) == (pid, "Sev")
        assert list(reply.profile.anonymous_ids) == ["a-7"]
    batch = await stub.BatchGetProfiles(
        profile_pb2.BatchGetProfilesRequest(profile_ids=["unknown", pid, pid]), metadata=token(TENANT, "read")
    )
    assert [p.profile_id for p in batch.profiles] == [pid]


@pytest.mark.parametrize(
    ("method", "request_", "field"),
    [
        ("Track", profile_pb2.TrackRequest(event=profile_pb2.Event(email="ok@example.com")), "event.type"),
        ("Track", profile_pb2.TrackRequest(event=profile_pb2.Event(type="x", email="nope")), "event.email"),
        ("Track", profile_pb2.TrackRequest(event=profile_pb2.Event(type="x")), "event.anonymous_id"),
        (
            "Track",
            profile_pb2.TrackRequest(
                event=profile_pb2.Event(type="x", anonymous_id="a", message_id="m" * 129)
            ),
            "event.message_id",
        ),
        (
            "BatchTrack",
            profile_pb2.BatchTrackRequest(events=[profile_pb2.Event(type="x", anonymous_id="a")] * 1001),
            "events",
        ),
        ("Identify", profile_pb2.IdentifyRequest(anonymous_id="a"), "customer_id"),
        (
            "Identify",
            profile_pb2.IdentifyRequest(email="x@example.com", consents=[profile_pb2.ConsentInput()]),
            "consents[0].purpose",
        ),
        (
            "SetConsent",
            profile_pb2.SetConsentRequest(
                profile_id="p",
                consent=profile_pb2.ConsentInput(
                    channel=common_pb2.CHANNEL_EMAIL, status=common_pb2.CONSENT_STATUS_GRANTED
                ),
            ),
            "consent.purpose",
        ),
        ("GetProfile", profile_pb2.GetProfileRequest(), "profile_id"),
        ("GetProfile", profile_pb2.GetProfileRequest(profile_id="p", email="x@example.com"), "email"),
        ("BatchGetProfiles", profile_pb2.BatchGetProfilesRequest(profile_ids=["p"] * 1001), "profile_ids"),
    ],
)
async def test_invalid_requests_name_the_offending_field(
    stub: Stub, method: str, request_: object, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(stub, method)(request_, metadata=token(TENANT, "admin"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(caught.value), field_violations(caught.value)


async def test_an_event_far_in_the_future_is_refused(stub: Stub, clock: ManualClock) -> None:
    e = ev(anonymous_id="a")
    e.timestamp.FromDatetime(clock.now() + timedelta(minutes=6))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Track(profile_pb2.TrackRequest(event=e), metadata=token())
    assert field_violations(caught.value) == {"event.timestamp": "is in the future"}
    e.timestamp.FromDatetime(clock.now() + timedelta(minutes=4))
    await stub.Track(profile_pb2.TrackRequest(event=e), metadata=token())


async def test_calls_need_a_token_with_the_right_scope(stub: Stub) -> None:
    track_request = profile_pb2.TrackRequest(event=ev(anonymous_id="a"))
    assert await code_of(stub.Track(track_request)) == grpc.StatusCode.UNAUTHENTICATED
    forged = bearer(mint_token("not-the-secret", TENANT, ["admin"]))
    assert await code_of(stub.GetProfile(profile_pb2.GetProfileRequest(profile_id="p"), metadata=forged)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert (
        await code_of(stub.Track(track_request, metadata=token(TENANT, "read")))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert (
        await code_of(
            stub.Identify(profile_pb2.IdentifyRequest(customer_id="c"), metadata=token(TENANT, "read"))
        )
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert (
        await code_of(
            stub.GetProfile(profile_pb2.GetProfileRequest(profile_id="p"), metadata=token(TENANT, "ingest"))
        )
        == grpc.StatusCode.PERMISSION_DENIED
    )
    await stub.Track(track_request, metadata=token(TENANT, "admin"))


async def test_a_tenant_cannot_see_or_change_another_tenants_profiles(stub: Stub) -> None:
    a = await stub.Identify(
        profile_pb2.IdentifyRequest(customer_id="c-1", email="ann@example.com", first_name="Ann"),
        metadata=token("tenant-a"),
    )
    pid = a.profile.profile_id
    for request in (
        profile_pb2.GetProfileRequest(profile_id=pid),
        profile_pb2.GetProfileRequest(customer_id="c-1"),
        profile_pb2.GetProfileRequest(email="ann@example.com"),
    ):
        assert (
            await code_of(stub.GetProfile(request, metadata=token("tenant-b"))) == grpc.StatusCode.NOT_FOUND
        )
    batch = await stub.BatchGetProfiles(
        profile_pb2.BatchGetProfilesRequest(profile_ids=[pid]), metadata=token("tenant-b")
    )
    assert list(batch.profiles) == []
    consent = profile_pb2.SetConsentRequest(profile_id=pid, consent=granted_marketing_email())
    assert await code_of(stub.SetConsent(consent, metadata=token("tenant-b"))) == grpc.StatusCode.NOT_FOUND
    # the same identifiers in tenant B are a different person
    b = await track(stub, tenant="tenant-b", customer_id="c-1")
    assert b.profile_id != pid
    still = await stub.GetProfile(profile_pb2.GetProfileRequest(profile_id=pid), metadata=token("tenant-a"))
    assert still.profile.first_name == "Ann" and list(still.profile.consents) == []
