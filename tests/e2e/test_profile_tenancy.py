"""No ProfileService RPC lets one tenant read or change another tenant's people (issue #3 item 9).

Tenant A holds a person with every kind of data (identities, events, consent, tags, traits, an
erasure of someone else). Tenant B, with a token holding every scope, calls each RPC with A's
profile ids, erasure id and identifiers: reads find nothing, writes by id are NOT_FOUND, and
writes by identifier make B's own, separate profiles. A's full export is the same afterwards.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest_asyncio

from relevans.common.v1 import common_pb2
from relevans.kit.grpc_client import bearer
from relevans.profile.v1 import profile_pb2
from tests.helpers import code_of
from tests.helpers.auth import TEST_SECRET
from tests.helpers.system import System

A, B = "tenant-a", "tenant-b"
EMAIL = "ann@example.com"
CUSTOMER_ID = "c-1001"
COOKIE = "cookie-ann"
GRANTED = profile_pb2.ConsentInput(
    purpose=common_pb2.PURPOSE_MARKETING,
    channel=common_pb2.CHANNEL_EMAIL,
    status=common_pb2.CONSENT_STATUS_GRANTED,
    source="signup_form",
)
WITHDRAWN = profile_pb2.ConsentInput(
    purpose=common_pb2.PURPOSE_MARKETING,
    channel=common_pb2.CHANNEL_EMAIL,
    status=common_pb2.CONSENT_STATUS_WITHDRAWN,
    source="unsubscribe_link",
)


@dataclass
class TenantA:
    profile_id: str
    erased_profile_id: str
    erasure_id: str
    export: profile_pb2.ExportProfileResponse


def b_token(system: System) -> tuple[tuple[str, str]]:
    return system.token(B, "ingest", "read", "admin")


async def import_rows(system: System, metadata: tuple[tuple[str, str]], *rows: profile_pb2.ImportRow) -> int:
    async def requests() -> AsyncIterator[profile_pb2.ImportProfilesRequest]:
        yield profile_pb2.ImportProfilesRequest(source="ticketing", rows=list(rows))

    reply = await system.profiles.ImportProfiles(requests(), metadata=metadata)
    assert list(reply.errors) == []
    return int(reply.rows_upserted)


async def export_as_a(system: System, profile_id: str) -> profile_pb2.ExportProfileResponse:
    return await system.profiles.ExportProfile(
        profile_pb2.ExportProfileRequest(profile_id=profile_id), metadata=system.token(A, "admin")
    )


@pytest_asyncio.fixture
async def tenant_a(system: System) -> TenantA:
    ingest = system.token(A, "ingest")
    row = profile_pb2.ImportRow(
        row_number=1,
        customer_id=CUSTOMER_ID,
        email=EMAIL,
        first_name="Ann",
        last_name="Lee",
        phone="+47 912 34 567",
        tags=["hamlet"],
        traits={"tier": "gold"},
        marketing_email_consent=GRANTED,
    )
    assert await import_rows(system, ingest, row) == 1
    identified = await system.profiles.Identify(
        profile_pb2.IdentifyRequest(customer_id=CUSTOMER_ID, anonymous_id=COOKIE), metadata=ingest
    )
    event = profile_pb2.Event(type="page_view", email=EMAIL)
    event.properties.update({"path": "/toys"})
    await system.profiles.Track(profile_pb2.TrackRequest(event=event), metadata=ingest)
    gone = await system.customer(A, "gone@example.com")
    erasure = await system.profiles.EraseProfile(
        profile_pb2.EraseProfileRequest(profile_id=gone, request_id="erase-1"),
        metadata=system.token(A, "admin"),
    )
    profile_id = identified.profile.profile_id
    export = await export_as_a(system, profile_id)
    assert [i.kind for i in export.identities] and export.events and export.tags and export.traits
    return TenantA(profile_id, gone, erasure.erasure_id, export)


async def assert_a_unchanged(system: System, a: TenantA) -> None:
    assert await export_as_a(system, a.profile_id) == a.export
    got = await system.profiles.GetErasure(
        profile_pb2.GetErasureRequest(erasure_id=a.erasure_id), metadata=system.token(A, "admin")
    )
    assert got.profile_id == a.erased_profile_id


async def test_reads_of_another_tenants_ids_find_nothing(system: System, tenant_a: TenantA) -> None:
    md = b_token(system)
    lookups = (
        profile_pb2.GetProfileRequest(profile_id=tenant_a.profile_id),
        profile_pb2.GetProfileRequest(customer_id=CUSTOMER_ID),
        profile_pb2.GetProfileRequest(email=EMAIL),
    )
    for lookup in lookups:
        assert await code_of(system.profiles.GetProfile(lookup, metadata=md)) == grpc.StatusCode.NOT_FOUND
    batch = await system.profiles.BatchGetProfiles(
        profile_pb2.BatchGetProfilesRequest(profile_ids=[tenant_a.profile_id, tenant_a.erased_profile_id]),
        metadata=md,
    )
    assert list(batch.profiles) == []
    export = system.profiles.ExportProfile(
        profile_pb2.ExportProfileRequest(profile_id=tenant_a.profile_id), metadata=md
    )
    assert await code_of(export) == grpc.StatusCode.NOT_FOUND
    erasure = system.profiles.GetErasure(
        profile_pb2.GetErasureRequest(erasure_id=tenant_a.erasure_id), metadata=md
    )
    assert await code_of(erasure) == grpc.StatusCode.NOT_FOUND
    await assert_a_unchanged(system, tenant_a)


async def test_set_consent_and_erase_of_another_tenants_ids_are_not_found(
    system: System, tenant_a: TenantA
) -> None:
    md = b_token(system)
    consent = system.profiles.SetConsent(
        profile_pb2.SetConsentRequest(profile_id=tenant_a.profile_id, consent=WITHDRAWN), metadata=md
    )
    assert await code_of(consent) == grpc.StatusCode.NOT_FOUND
    erase = system.profiles.EraseProfile(
        profile_pb2.EraseProfileRequest(profile_id=tenant_a.profile_id, request_id="erase-b"), metadata=md
    )
    assert await code_of(erase) == grpc.StatusCode.NOT_FOUND
    # A's request id names nothing in B: A's erasure is not handed out.
    again = system.profiles.EraseProfile(
        profile_pb2.EraseProfileRequest(profile_id=tenant_a.erased_profile_id, request_id="erase-1"),
        metadata=md,
    )
    assert await code_of(again) == grpc.StatusCode.NOT_FOUND
    await assert_a_unchanged(system, tenant_a)
    [consent_now] = (
        await system.profiles.GetProfile(
            profile_pb2.GetProfileRequest(profile_id=tenant_a.profile_id), metadata=system.token(A, "read")
        )
    ).profile.consents
    assert consent_now.status == common_pb2.CONSENT_STATUS_GRANTED


async def test_set_traits_of_another_tenants_id_is_not_found(system: System, tenant_a: TenantA) -> None:
    request = profile_pb2.SetTraitsRequest(profile_id=tenant_a.profile_id, source="backend")
    request.traits.update({"tier": "bronze", "credit_limit": 0})
    call = system.profiles.SetTraits(request, metadata=b_token(system))
    assert await code_of(call) == grpc.StatusCode.NOT_FOUND
    await assert_a_unchanged(system, tenant_a)


async def test_ingest_with_another_tenants_identifiers_makes_separate_profiles(
    system: System, tenant_a: TenantA
) -> None:
    md = b_token(system)
    event = profile_pb2.Event(type="add_to_cart", customer_id=CUSTOMER_ID, email=EMAIL, anonymous_id=COOKIE)
    tracked = await system.profiles.Track(profile_pb2.TrackRequest(event=event), metadata=md)
    mine = tracked.profile_id
    assert mine != tenant_a.profile_id
    batch = await system.profiles.BatchTrack(
        profile_pb2.BatchTrackRequest(
            events=[
                profile_pb2.Event(type="page_view", email=EMAIL),
                profile_pb2.Event(type="page_view", anonymous_id=COOKIE),
                profile_pb2.Event(type="page_view", customer_id=CUSTOMER_ID),
            ]
        ),
        metadata=md,
    )
    assert {r.profile_id for r in batch.results} == {mine}
    identified = await system.profiles.Identify(
        profile_pb2.IdentifyRequest(
            customer_id=CUSTOMER_ID, email=EMAIL, anonymous_id=COOKIE, first_name="Eve"
        ),
        metadata=md,
    )
    assert identified.profile.profile_id == mine
    row = profile_pb2.ImportRow(row_number=1, customer_id=CUSTOMER_ID, email=EMAIL, tags=["mallory"])
    assert await import_rows(system, md, row) == 1

    # B sees only what B wrote; A's person is untouched.
    got = (await system.profiles.GetProfile(profile_pb2.GetProfileRequest(email=EMAIL), metadata=md)).profile
    assert (got.profile_id, got.first_name, list(got.tags), list(got.consents)) == (
        mine,
        "Eve",
        ["mallory"],
        [],
    )
    b_export = await system.profiles.ExportProfile(
        profile_pb2.ExportProfileRequest(profile_id=mine), metadata=md
    )
    assert len(b_export.events) == 4 and list(b_export.merges) == []
    await assert_a_unchanged(system, tenant_a)


async def test_a_cli_minted_read_token_reads_its_tenant_only(system: System, tenant_a: TenantA) -> None:
    env = {**os.environ, "RELEVANS_TOKEN_SECRET": TEST_SECRET, "RELEVANS_LOG_FORMAT": "json"}
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("relevans")),
        *("token", "create", "--tenant", A, "--scope", "read"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    md = bearer(out.decode().strip())

    got = await system.profiles.GetProfile(
        profile_pb2.GetProfileRequest(profile_id=tenant_a.profile_id), metadata=md
    )
    assert got.profile.email == EMAIL
    event = profile_pb2.Event(type="page_view", email=EMAIL)
    assert (
        await code_of(system.profiles.Track(profile_pb2.TrackRequest(event=event), metadata=md))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    b_person = await system.customer(B, "bob@example.com")
    assert (
        await code_of(
            system.profiles.GetProfile(profile_pb2.GetProfileRequest(profile_id=b_person), metadata=md)
        )
        == grpc.StatusCode.NOT_FOUND
    )
