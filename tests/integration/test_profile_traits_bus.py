"""TraitsChanged on rv.profile.traits: the profile service publishes a profile's effective traits
when a write changes them (SetTraits, Identify, ImportProfiles, a merge), through its outbox in
the write's transaction, on the real PostgreSQL and NATS.

Most tests read the messages from the outbox, where the write put them (so "nothing was
published" is a plain count, with no wait); one follows them onto the bus.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import grpc
import nats
import pytest
import sqlalchemy as sa
from google.protobuf import struct_pb2
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.kit.clock import ManualClock
from relevans.kit.proto import from_timestamp, from_value
from relevans.profile.v1 import bus_pb2, profile_pb2
from tests.helpers import field_violations
from tests.helpers.profile import TENANT, fetch_all, token

if TYPE_CHECKING:
    from tests.helpers.profile import Stub

SUBJECT = "rv.profile.traits"
RW = token()


def struct(**values: object) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def plain(values: Any) -> dict[str, Any]:
    """A map<string, Value> as plain values."""
    return {name: from_value(v) for name, v in values.items()}


def summary(m: bus_pb2.TraitsChanged) -> tuple[str, dict[str, Any], dict[str, Any], list[str], str]:
    """What changed, as (profile id, traits, previous, changed, source)."""
    return m.profile_id, plain(m.traits), plain(m.previous), list(m.changed), m.source


async def outbox_messages(db: AsyncEngine) -> list[bus_pb2.TraitsChanged]:
    """The TraitsChanged messages in the outbox, in the order they were written."""
    async with db.connect() as conn:
        rows = await conn.execute(
            sa.text("SELECT payload FROM outbox WHERE subject = :s ORDER BY id"), {"s": SUBJECT}
        )
        return [bus_pb2.TraitsChanged.FromString(r.payload) for r in rows]


async def new_messages(db: AsyncEngine, seen: list[bus_pb2.TraitsChanged]) -> list[bus_pb2.TraitsChanged]:
    """The messages written since `seen` was (extended with them)."""
    found = (await outbox_messages(db))[len(seen) :]
    seen.extend(found)
    return found


async def set_traits(stub: Stub, profile_id: str, source: str, **traits: object) -> profile_pb2.Profile:
    reply = await stub.SetTraits(
        profile_pb2.SetTraitsRequest(profile_id=profile_id, source=source, traits=struct(**traits)),
        metadata=RW,
    )
    return reply.profile


async def identify(stub: Stub, **fields: Any) -> str:
    reply = await stub.Identify(profile_pb2.IdentifyRequest(**fields), metadata=RW)
    return reply.profile.profile_id


async def _import_messages(
    batches: Sequence[Sequence[profile_pb2.ImportRow]],
) -> AsyncIterator[profile_pb2.ImportProfilesRequest]:
    for i, rows in enumerate(batches):
        yield profile_pb2.ImportProfilesRequest(source="ticketing-nightly" if i == 0 else "", rows=rows)


async def run_import(
    stub: Stub, *batches: Sequence[profile_pb2.ImportRow]
) -> profile_pb2.ImportProfilesResponse:
    reply: profile_pb2.ImportProfilesResponse = await stub.ImportProfiles(
        _import_messages(batches), metadata=RW
    )
    return reply


async def test_set_traits_publishes_the_change_once_and_the_same_values_again_nothing(
    stub: Stub, db: AsyncEngine, clock: ManualClock, js: nats.js.JetStreamContext
) -> None:
    pid = await identify(stub, customer_id="c-1")
    seen: list[bus_pb2.TraitsChanged] = []
    assert await new_messages(db, seen) == [], "a profile created without traits changed none"

    await set_traits(stub, pid, "backend", tier=2, city="Lund")
    [first] = await new_messages(db, seen)
    assert summary(first) == (pid, {"tier": 2, "city": "Lund"}, {}, ["city", "tier"], "set_traits")
    assert first.tenant_id == TENANT
    assert from_timestamp(first.change_time) == clock.now()

    await clock.advance(timedelta(minutes=5))
    await set_traits(stub, pid, "backend", tier=3, city="Lund")
    [second] = await new_messages(db, seen)
    assert summary(second) == (pid, {"tier": 3, "city": "Lund"}, {"tier": 2}, ["tier"], "set_traits")
    assert from_timestamp(second.change_time) == clock.now()

    await set_traits(stub, pid, "backend", tier=3, city="Lund")
    await set_traits(stub, pid, "backend", tier=3.0)
    assert await new_messages(db, seen) == [], "the same values (3 is 3.0) change nothing"

    await set_traits(stub, pid, "backend", tier=True)
    [third] = await new_messages(db, seen)
    assert (plain(third.previous), list(third.changed)) == ({"tier": 3}, ["tier"]), "true is not 1"

    # and they reach the bus, each with a change id of its own
    msgs = [bus_pb2.TraitsChanged.FromString(m.data) for m in await fetch_all(js, SUBJECT, 3)]
    assert msgs == seen
    assert len({m.change_id for m in msgs}) == 3 and all(msgs[i].change_id for i in range(3))


async def test_removing_a_trait_lists_it_as_changed_with_its_previous_value(
    stub: Stub, db: AsyncEngine
) -> None:
    pid = await identify(stub, customer_id="c-1")
    await set_traits(stub, pid, "backend", tier=2, city="Lund")
    seen = await outbox_messages(db)

    profile = await set_traits(stub, pid, "backend", city=None)
    [removed] = await new_messages(db, seen)
    assert summary(removed) == (pid, {"tier": 2}, {"city": "Lund"}, ["city"], "set_traits")
    assert plain(profile.traits) == plain(removed.traits), "the message carries what GetProfile shows"

    await set_traits(stub, pid, "backend", city=None)
    await set_traits(stub, pid, "declared", tier=None)
    assert await new_messages(db, seen) == [], "removing a value there is not changes nothing"


async def test_a_declared_value_shows_over_a_backend_one_and_hides_its_changes(
    stub: Stub, db: AsyncEngine
) -> None:
    pid = await identify(stub, customer_id="c-1")
    await set_traits(stub, pid, "backend", city="Lund")
    seen = await outbox_messages(db)

    await set_traits(stub, pid, "declared", city="Malmö")
    [declared] = await new_messages(db, seen)
    assert summary(declared) == (pid, {"city": "Malmö"}, {"city": "Lund"}, ["city"], "set_traits")

    await set_traits(stub, pid, "backend", city="Uppsala")
    assert await new_messages(db, seen) == [], "a backend value under a declared one is not effective"

    await set_traits(stub, pid, "declared", city=None)
    [uncovered] = await new_messages(db, seen)
    assert summary(uncovered) == (pid, {"city": "Uppsala"}, {"city": "Malmö"}, ["city"], "set_traits")


async def test_identify_with_declared_traits_publishes_their_change(stub: Stub, db: AsyncEngine) -> None:
    pid = await identify(stub, customer_id="c-1", traits=struct(plan="gold", age=41))
    seen: list[bus_pb2.TraitsChanged] = []
    [created] = await new_messages(db, seen)
    assert summary(created) == (pid, {"plan": "gold", "age": 41}, {}, ["age", "plan"], "identify")

    await identify(stub, customer_id="c-1", traits=struct(plan="gold"))
    await identify(stub, customer_id="c-1", first_name="Bo")
    assert await new_messages(db, seen) == []

    await identify(stub, customer_id="c-1", traits=struct(plan="silver"))
    [changed] = await new_messages(db, seen)
    assert summary(changed) == (pid, {"plan": "silver", "age": 41}, {"plan": "gold"}, ["plan"], "identify")


async def test_a_merge_that_changes_the_survivors_traits_publishes_them(stub: Stub, db: AsyncEngine) -> None:
    survivor = await identify(stub, customer_id="c-1", traits=struct(plan="gold"))
    merged = await identify(stub, email="bo@example.com", traits=struct(plan="silver", city="Lund"))
    same = await identify(stub, email="same@example.com", traits=struct(plan="gold"))
    seen = await outbox_messages(db)
    admin = token(TENANT, "admin")

    reply = await stub.MergeProfiles(
        profile_pb2.MergeProfilesRequest(profile_id=merged, other_profile_id=survivor), metadata=admin
    )
    assert (reply.profile.profile_id, reply.merged_profile_id) == (survivor, merged)
    [change] = await new_messages(db, seen)
    # the survivor keeps its own value of a trait both had; it takes the ones it had not
    assert summary(change) == (survivor, {"plan": "gold", "city": "Lund"}, {}, ["city"], "merge")

    await stub.MergeProfiles(
        profile_pb2.MergeProfilesRequest(profile_id=survivor, other_profile_id=same), metadata=admin
    )
    assert await new_messages(db, seen) == [], "a merge that changes no effective trait"


async def test_an_import_publishes_the_traits_of_the_rows_that_change_them(
    stub: Stub, db: AsyncEngine
) -> None:
    declared = await identify(stub, email="sara@example.com", traits=struct(address="Home 1"))
    seen = await outbox_messages(db)
    rows = [
        profile_pb2.ImportRow(row_number=2, email="anna@example.com", traits={"address": "Storgatan 1"}),
        profile_pb2.ImportRow(row_number=3, customer_id="T-1", email="erik@example.com"),
        profile_pb2.ImportRow(row_number=4, email="sara@example.com", traits={"address": "Storgatan 9"}),
    ]
    reply = await run_import(
        stub, rows, [profile_pb2.ImportRow(row_number=5, customer_id="T-2", traits={"a": "1"})]
    )
    assert (reply.rows_upserted, reply.profiles_created) == (4, 3)
    # (the two messages of the call are written concurrently: their outbox order is either)
    t2, anna = sorted(await new_messages(db, seen), key=lambda m: list(m.changed))
    assert summary(anna)[1:] == ({"address": "Storgatan 1"}, {}, ["address"], "import")
    assert summary(t2)[1:] == ({"a": "1"}, {}, ["a"], "import")
    anna_profile = await stub.GetProfile(profile_pb2.GetProfileRequest(email="anna@example.com"), metadata=RW)
    assert anna.profile_id == anna_profile.profile.profile_id
    assert len({anna.change_id, t2.change_id}) == 2

    # the same file again changes nothing; a changed value is published with the one before
    await run_import(stub, rows)
    assert await new_messages(db, seen) == []
    moved = profile_pb2.ImportRow(row_number=2, email="anna@example.com", traits={"address": "Kungsgatan 2"})
    await run_import(stub, [moved, rows[2]])
    [change] = await new_messages(db, seen)
    assert summary(change) == (
        anna.profile_id,
        {"address": "Kungsgatan 2"},
        {"address": "Storgatan 1"},
        ["address"],
        "import",
    )
    sara = await stub.GetProfile(profile_pb2.GetProfileRequest(profile_id=declared), metadata=RW)
    assert plain(sara.profile.traits) == {"address": "Home 1"}, "the declared value stays effective"


async def test_a_call_that_fails_validation_writes_and_publishes_nothing(stub: Stub, db: AsyncEngine) -> None:
    pid = await identify(stub, customer_id="c-1", traits=struct(plan="gold"))
    seen = await outbox_messages(db)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await set_traits(stub, pid, "declared", plan="silver", **{"Bad-Name": 1})
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(caught.value)) == {"traits.Bad-Name"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identify(stub, customer_id="c-1", traits=struct(plan="silver", tier=None))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await set_traits(stub, "nobody", "declared", plan="silver")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    # an import's message that fails ends the call: the one before it stays, with its messages
    too_many = [
        profile_pb2.ImportRow(row_number=n, customer_id=f"T-{n}", traits={"a": "1"}) for n in range(1001)
    ]
    first = [profile_pb2.ImportRow(row_number=1, customer_id="c-1", traits={"city": "Lund"})]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run_import(stub, first, too_many)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    [imported] = await new_messages(db, seen)
    assert summary(imported) == (pid, {"plan": "gold", "city": "Lund"}, {}, ["city"], "import")
    profile = await stub.GetProfile(profile_pb2.GetProfileRequest(profile_id=pid), metadata=RW)
    assert plain(profile.profile.traits) == {"plan": "gold", "city": "Lund"}
    async with db.connect() as conn:
        assert await conn.scalar(sa.text("SELECT count(*) FROM identities WHERE value LIKE 'T-%'")) == 0
