"""Bulk import (story 7) over real gRPC, PostgreSQL and NATS JetStream, and `relevans import`."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import nats
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.common.v1 import common_pb2
from relevans.kit.auth import mint_token
from relevans.kit.clock import ManualClock
from relevans.kit.server import ServiceHost
from relevans.kit.settings import Settings
from relevans.profile.v1 import bus_pb2, profile_pb2
from tests.helpers import field_violations
from tests.helpers.auth import TEST_SECRET, Tokens
from tests.helpers.profile import count

if TYPE_CHECKING:
    from tests.helpers.profile import Stub

TENANT = "tickets"
ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "examples" / "ticketing-sample.csv"
token = Tokens(TENANT, ("ingest", "read"))


async def rows_of(db: AsyncEngine, sql: str, **params: object) -> list[tuple[object, ...]]:
    async with db.connect() as conn:
        return [tuple(r) for r in await conn.execute(sa.text(sql), params)]


def consent(status: common_pb2.ConsentStatus.ValueType) -> profile_pb2.ConsentInput:
    return profile_pb2.ConsentInput(
        purpose=common_pb2.PURPOSE_MARKETING, channel=common_pb2.CHANNEL_EMAIL, status=status
    )


GRANTED = common_pb2.CONSENT_STATUS_GRANTED
DENIED = common_pb2.CONSENT_STATUS_DENIED


async def _messages(
    batches: Sequence[Sequence[profile_pb2.ImportRow]], source: str = "ticketing-nightly"
) -> AsyncIterator[profile_pb2.ImportProfilesRequest]:
    for i, rows in enumerate(batches):
        yield profile_pb2.ImportProfilesRequest(source=source if i == 0 else "", rows=rows)


async def run_import(
    stub: Stub, *batches: Sequence[profile_pb2.ImportRow], tenant: str = TENANT
) -> profile_pb2.ImportProfilesResponse:
    reply: profile_pb2.ImportProfilesResponse = await stub.ImportProfiles(
        _messages(batches), metadata=token(tenant)
    )
    return reply


def nightly() -> list[list[profile_pb2.ImportRow]]:
    """Two messages: three buyers, one of them twice (another show, in the second message)."""
    return [
        [
            profile_pb2.ImportRow(
                row_number=2,
                email="Anna.Berg@Example.com",
                first_name="Anna",
                last_name="Berg",
                phone="+46 70 123 45 67",
                tags=["Hamlet 2026-11-20"],
                traits={"address": "Storgatan 1, Stockholm"},
                marketing_email_consent=consent(GRANTED),
            ),
            profile_pb2.ImportRow(
                row_number=3,
                customer_id="T-1002",
                email="erik@example.com",
                first_name="Erik",
                tags=["Hamlet 2026-11-20"],
                marketing_email_consent=consent(DENIED),
            ),
        ],
        [
            profile_pb2.ImportRow(
                row_number=4, email="sara@example.com", first_name="Sara", tags=["Carmen 2026-11-22"]
            ),
            profile_pb2.ImportRow(
                row_number=5,
                email="anna.berg@example.com",
                tags=["Carmen 2026-11-22"],
                marketing_email_consent=consent(GRANTED),
            ),
        ],
    ]


async def test_an_import_upserts_profiles_with_tags_traits_and_consent(
    stub: Stub, db: AsyncEngine, settings: Settings
) -> None:
    reply = await run_import(stub, *nightly())
    assert (reply.rows_received, reply.rows_upserted, reply.rows_failed, reply.profiles_created) == (
        4,
        4,
        0,
        3,
    )
    assert list(reply.errors) == []

    anna = (
        await stub.GetProfile(profile_pb2.GetProfileRequest(email="anna.berg@example.com"), metadata=token())
    ).profile
    assert (anna.first_name, anna.phone) == ("Anna", "+46701234567")
    [c] = anna.consents
    assert (c.purpose, c.channel, c.status, c.source) == (
        common_pb2.PURPOSE_MARKETING,
        common_pb2.CHANNEL_EMAIL,
        GRANTED,
        "ticketing-nightly",
    )
    assert await rows_of(
        db, "SELECT last_name, phone FROM profiles WHERE profile_id = :p", p=anna.profile_id
    ) == [("Berg", "+46701234567")]
    assert await rows_of(
        db, "SELECT tag FROM profile_tags WHERE profile_id = :p ORDER BY tag", p=anna.profile_id
    ) == [("carmen 2026-11-22",), ("hamlet 2026-11-20",)]
    assert await rows_of(db, "SELECT profile_id, name, source, value FROM profile_traits") == [
        (anna.profile_id, "address", "backend", "Storgatan 1, Stockholm")
    ]
    # the effective traits of a new profile come with it
    assert await rows_of(db, "SELECT traits FROM profiles WHERE profile_id = :p", p=anna.profile_id) == [
        ({"address": "Storgatan 1, Stockholm"},)
    ]
    erik = (
        await stub.GetProfile(profile_pb2.GetProfileRequest(customer_id="T-1002"), metadata=token())
    ).profile
    assert erik.email == "erik@example.com" and [c.status for c in erik.consents] == [DENIED]
    # one ledger entry per consent decision that changed something: Anna's second "yes" did not
    assert await count(db, "SELECT count(*) FROM consent_ledger") == 2
    assert await count(db, "SELECT count(*) FROM profile_tags") == 4

    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe("rv.profile.consent", ordered_consumer=True)
        changes = [bus_pb2.ConsentChanged.FromString((await sub.next_msg(timeout=10)).data) for _ in range(2)]
    finally:
        await nc.close()
    assert {(c.tenant_id, c.profile_id, c.consent.status) for c in changes} == {
        (TENANT, anna.profile_id, GRANTED),
        (TENANT, erik.profile_id, DENIED),
    }


async def test_re_running_an_import_changes_nothing(stub: Stub, db: AsyncEngine, clock: ManualClock) -> None:
    await run_import(stub, *nightly())
    tables = (
        "profiles",
        "identities",
        "profile_tags",
        "profile_traits",
        "consent_ledger",
        "consents",
        "outbox",
    )
    before = {t: await rows_of(db, f"SELECT * FROM {t} ORDER BY 1, 2") for t in tables}

    await clock.advance(timedelta(days=1))
    again = await run_import(stub, *nightly())
    assert (again.rows_received, again.rows_upserted, again.rows_failed, again.profiles_created) == (
        4,
        4,
        0,
        0,
    )
    for t in tables:
        assert await rows_of(db, f"SELECT * FROM {t} ORDER BY 1, 2") == before[t], t

    # a changed answer is one new ledger entry, and a changed field moves updated_at
    await clock.advance(timedelta(days=1))
    changed = nightly()
    changed[0][0].marketing_email_consent.status = DENIED
    changed[0][0].last_name = "Berg-Lind"
    changed[0][0].traits["address"] = "Vasagatan 3, Uppsala"
    changed[0][1].traits["vip_tier"] = "gold"
    changed[1][1].ClearField("marketing_email_consent")
    await run_import(stub, *changed)
    assert await count(db, "SELECT count(*) FROM consent_ledger") == 3
    assert await rows_of(
        db, "SELECT last_name, updated_at FROM profiles WHERE email = 'anna.berg@example.com'"
    ) == [("Berg-Lind", clock.now())]
    # an existing profile's effective traits follow its changed traits
    assert await rows_of(db, "SELECT email, traits FROM profiles ORDER BY email") == [
        ("anna.berg@example.com", {"address": "Vasagatan 3, Uppsala"}),
        ("erik@example.com", {"vip_tier": "gold"}),
        ("sara@example.com", {}),
    ]


async def test_re_running_an_import_neither_locks_nor_writes_its_profiles(
    stub: Stub, db: AsyncEngine, clock: ManualClock
) -> None:
    await run_import(stub, *nightly())
    await clock.advance(timedelta(days=1))
    # another transaction holds every profile: a re-run that changes nothing does not wait for it
    async with db.connect() as other:
        await other.execute(sa.text("SELECT 1 FROM profiles FOR UPDATE"))
        again = await asyncio.wait_for(run_import(stub, *nightly()), timeout=20)
        assert (again.rows_upserted, again.rows_failed, again.profiles_created) == (4, 0, 0)
        await other.rollback()
    # a row that changes something still lands, with the rows that do not
    changed = nightly()
    changed[1][0].first_name = "Sarah"
    changed[1][0].marketing_email_consent.CopyFrom(consent(DENIED))
    await run_import(stub, *changed)
    assert await rows_of(db, "SELECT first_name, updated_at FROM profiles ORDER BY email") == [
        ("Anna", clock.now() - timedelta(days=1)),
        ("Erik", clock.now() - timedelta(days=1)),
        ("Sarah", clock.now()),
    ]
    assert await count(db, "SELECT count(*) FROM consent_ledger") == 3


async def test_a_later_message_wins_over_an_earlier_one_written_at_the_same_time(
    stub: Stub, db: AsyncEngine
) -> None:
    # Messages are written two at a time; one person in every message still ends up as the
    # last message says, with one ledger entry per change, in order.
    statuses = [GRANTED, DENIED] * 4
    batches = [
        [
            *(
                profile_pb2.ImportRow(row_number=10 * i + j, email=f"other-{i}-{j}@example.com")
                for j in range(3)
            ),
            profile_pb2.ImportRow(
                row_number=10 * i + 9,
                email="kim@example.com",
                first_name=f"Kim {i}",
                tags=[f"show {i}"],
                traits={"seat": f"row {i}"},
                marketing_email_consent=consent(status),
            ),
        ]
        for i, status in enumerate(statuses)
    ]
    reply = await run_import(stub, *batches)
    assert (reply.rows_upserted, reply.profiles_created) == (32, 25)
    assert await rows_of(db, "SELECT first_name, traits FROM profiles WHERE email = 'kim@example.com'") == [
        ("Kim 7", {"seat": "row 7"})
    ]
    assert (
        await rows_of(
            db,
            "SELECT l.status FROM consent_ledger l JOIN profiles p USING (tenant_id, profile_id) "
            "WHERE p.email = 'kim@example.com' ORDER BY l.entry_id",
        )
        == [("granted",), ("denied",)] * 4
    )
    assert await count(db, "SELECT count(*) FROM profile_tags WHERE tag LIKE 'show %'") == 8


async def test_a_later_message_changing_back_what_an_earlier_one_changed_still_wins(
    stub: Stub, db: AsyncEngine
) -> None:
    # Kim has consented; message i withdraws (even i) or grants (odd i) it again. A message that,
    # as stored before the earlier ones commit, changes nothing must still land after them.
    def kim(i: int, status: common_pb2.ConsentStatus.ValueType) -> profile_pb2.ImportRow:
        return profile_pb2.ImportRow(
            row_number=i, email="kim@example.com", first_name="Kim", marketing_email_consent=consent(status)
        )

    await run_import(stub, [kim(1, GRANTED)])
    batches = [
        [
            *(
                profile_pb2.ImportRow(row_number=10 * i + j, email=f"o-{i}-{j}@example.com")
                for j in range(20)
            ),
            kim(10 * i + 9, DENIED if i % 2 == 0 else GRANTED),
        ]
        for i in range(8)
    ]
    await run_import(stub, *batches)
    statuses = await rows_of(
        db,
        "SELECT l.status FROM consent_ledger l JOIN profiles p USING (tenant_id, profile_id) "
        "WHERE p.email = 'kim@example.com' ORDER BY l.entry_id",
    )
    assert statuses == [("granted",)] + [("denied",), ("granted",)] * 4
    assert await rows_of(
        db,
        "SELECT c.status FROM consents c JOIN profiles p USING (tenant_id, profile_id) "
        "WHERE p.email = 'kim@example.com'",
    ) == [("granted",)]


async def test_bad_rows_are_reported_by_row_and_field_while_good_rows_land(
    stub: Stub, db: AsyncEngine
) -> None:
    reply = await run_import(
        stub,
        [
            profile_pb2.ImportRow(row_number=2, email="good@example.com", tags=["Hamlet"]),
            profile_pb2.ImportRow(row_number=3, email="not-an-email", tags=["Hamlet"]),
            profile_pb2.ImportRow(row_number=4, email="phone@example.com", phone="12345"),
        ],
        [
            profile_pb2.ImportRow(row_number=5, first_name="No Key"),
            profile_pb2.ImportRow(row_number=6, customer_id="C-6", tags=["ok", "!bad"], traits={"Bad": "x"}),
            profile_pb2.ImportRow(row_number=7, customer_id="C-7"),
        ],
    )
    assert (reply.rows_received, reply.rows_upserted, reply.rows_failed, reply.profiles_created) == (
        6,
        2,
        4,
        2,
    )
    assert [(e.row_number, e.field) for e in reply.errors] == [
        (3, "email"),
        (4, "phone"),
        (5, "customer_id"),
        (6, "tags[1]"),
        (6, "traits.Bad"),
    ]
    assert all(e.reason for e in reply.errors)
    assert await rows_of(db, "SELECT coalesce(customer_id, email) FROM profiles ORDER BY 1") == [
        ("C-7",),
        ("good@example.com",),
    ]


async def test_too_many_rows_in_one_message_is_invalid(stub: Stub) -> None:
    rows = [profile_pb2.ImportRow(row_number=i, customer_id=f"c-{i}") for i in range(1001)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run_import(stub, rows)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(caught.value)) == {"rows"}


async def test_an_import_needs_a_token_with_the_ingest_scope(stub: Stub, db: AsyncEngine) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ImportProfiles(_messages(nightly()))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ImportProfiles(_messages(nightly()), metadata=token(TENANT, "read"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await count(db, "SELECT count(*) FROM profiles") == 0


async def test_imports_of_two_tenants_stay_apart(stub: Stub, db: AsyncEngine) -> None:
    a = await run_import(stub, *nightly(), tenant="theatre-a")
    b = await run_import(stub, nightly()[0], tenant="theatre-b")
    assert (a.profiles_created, b.profiles_created) == (3, 2)  # the same people, new to theatre-b
    in_b = (
        await stub.GetProfile(
            profile_pb2.GetProfileRequest(email="anna.berg@example.com"), metadata=token("theatre-b")
        )
    ).profile
    assert await rows_of(
        db,
        "SELECT tag FROM profile_tags WHERE tenant_id = 'theatre-b' AND profile_id = :p",
        p=in_b.profile_id,
    ) == [("hamlet 2026-11-20",)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetProfile(
            profile_pb2.GetProfileRequest(email="sara@example.com"), metadata=token("theatre-b")
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert await count(db, "SELECT count(*) FROM consent_ledger WHERE tenant_id = 'theatre-a'") == 2
    assert await count(db, "SELECT count(*) FROM consent_ledger WHERE tenant_id = 'theatre-b'") == 2


async def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relevans.cli.main",
        "import",
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_cli_imports_the_sample_file_and_reports_bad_rows(
    stub: Stub, host: ServiceHost, db: AsyncEngine, tmp_path: Path
) -> None:
    tok = mint_token(TEST_SECRET, TENANT, ["ingest"])
    target = f"127.0.0.1:{host.port}"
    code, out, err = await _cli(
        str(SAMPLE), "--tenant-token", tok, "--target", target, "--source", "ticketing-nightly"
    )
    assert code == 1, (out, err)
    assert "20 rows read, 15 imported, 5 failed, 14 profiles created" in out
    for row in (
        r"7 +email +is not a valid email address",
        r"9 +phone +is not a valid phone number: it does not start with \+ and a country code; use",
        r"11 +customer_id +customer_id or email is required",
        r"14 +\(row\) +has 5 columns, the header has 7",
        r"19 +marketing_consent +must be yes/no",
    ):
        assert re.search(rf"^ *{row}", out, flags=re.M), out
    assert await count(db, "SELECT count(*) FROM profiles WHERE tenant_id = :t", t=TENANT) == 14
    assert await count(db, "SELECT count(*) FROM consent_ledger WHERE source = 'ticketing-nightly'") == 13
    assert await count(db, "SELECT count(*) FROM profile_traits WHERE name = 'address'") == 13

    # run again: nothing new; a file whose rows are all fine exits 0
    code, out, _ = await _cli(str(SAMPLE), "--tenant-token", tok, "--target", target)
    assert code == 1 and "0 profiles created" in out
    assert await count(db, "SELECT count(*) FROM consent_ledger") == 13
    good = "\n".join(SAMPLE.read_text().splitlines()[:6]) + "\n"
    path = tmp_path / "good.csv"
    path.write_text(good)
    code, out, _ = await _cli(str(path), "--tenant-token", tok, "--target", target)
    assert code == 0 and "5 rows read, 5 imported, 0 failed, 0 profiles created" in out, out

    no_stack = {"PATH": "/usr/bin:/bin", "RELEVANS_DATA_DIR": str(tmp_path / "no-stack")}
    code, _, err = await _cli(str(SAMPLE), "--target", target, env=no_stack)
    assert code == 2 and "RELEVANS_TOKEN" in err


async def test_a_refused_token_says_nothing_was_imported(host: ServiceHost, db: AsyncEngine) -> None:
    """Issue 17 item 2: a bad token or a missing scope said "the batches sent before the failure were
    imported" though the service had refused the call before reading a row."""
    target = f"127.0.0.1:{host.port}"
    for tok in (mint_token("not-the-secret", TENANT, ["ingest"]), mint_token(TEST_SECRET, TENANT, ["read"])):
        code, out, err = await _cli(str(SAMPLE), "--tenant-token", tok, "--target", target)
        assert code == 2 and out == "", (out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "nothing was imported" in lines[0], err
        assert "batches sent before" not in err
    assert await count(db, "SELECT count(*) FROM profiles") == 0


async def test_output_closed_early_is_not_blamed_on_the_file(host: ServiceHost, db: AsyncEngine) -> None:
    """Issue 17 item 2: with its output closed (`| head -1`) import said `cannot read … Broken pipe`."""
    tok = mint_token(TEST_SECRET, TENANT, ["ingest"])
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "relevans.cli.main", "import", str(SAMPLE)),
        *("--tenant-token", tok, "--target", f"127.0.0.1:{host.port}"),
        stdout=write_end,
        stderr=asyncio.subprocess.PIPE,
    )
    os.close(write_end)
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 1, err.decode()  # the sample's status: some rows were not imported
    assert err.decode() == ""
    assert await count(db, "SELECT count(*) FROM profiles WHERE tenant_id = :t", t=TENANT) == 14
