"""Unit tests of the kit's pure parts: tokens, clock, settings, error mapping, partitions."""

from __future__ import annotations

import asyncio
import gc
import weakref
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import timestamp_pb2
from google.rpc import code_pb2, error_details_pb2
from hypothesis import given
from hypothesis import strategies as st

from relevans.kit.auth import DEFAULT_TOKEN_LIFETIME, TokenError, mint_token, verify_token
from relevans.kit.bus import event_partition
from relevans.kit.clock import ManualClock
from relevans.kit.db import DriverStatement
from relevans.kit.errors import FieldViolation, InvalidArgument, NotFound, Violations
from relevans.kit.proto import from_timestamp, to_timestamp
from relevans.kit.runtime import GC_THRESHOLDS, settle_heap
from relevans.kit.settings import Settings, SettingsError, env_names
from relevans.kit.status import to_rpc_status

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_token_round_trip_names_tenant_and_scopes() -> None:
    token = mint_token("s3cret", "acme", ["ingest", "read"])
    who = verify_token("s3cret", token, NOW)
    assert who.tenant_id == "acme"
    assert who.allows("read") and who.allows("ingest") and not who.allows("admin")


def test_admin_scope_allows_everything() -> None:
    who = verify_token("k", mint_token("k", "acme", ["admin"]), NOW)
    assert who.allows("ingest") and who.allows("read")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t + "x",
        lambda t: t.replace("rv1.", "rv2."),
        lambda t: "rv1.e30." + t.split(".")[2],
        lambda t: "garbage",
        lambda t: "",
    ],
)
def test_tampered_tokens_are_rejected(mangle) -> None:  # type: ignore[no-untyped-def]
    token = mint_token("k", "acme", ["read"])
    with pytest.raises(TokenError):
        verify_token("k", mangle(token), NOW)


def test_token_signed_with_another_secret_is_rejected() -> None:
    with pytest.raises(TokenError, match="signature"):
        verify_token("other", mint_token("k", "acme", ["read"]), NOW)


def test_expired_token_is_rejected() -> None:
    token = mint_token("k", "acme", ["read"], expires_at=NOW + timedelta(minutes=5))
    assert verify_token("k", token, NOW).tenant_id == "acme"
    with pytest.raises(TokenError, match="expired"):
        verify_token("k", token, NOW + timedelta(minutes=5))


def test_tokens_expire_by_default() -> None:
    """Issue 16 finding 7: a token minted without a lifetime used to be valid for ever."""
    assert verify_token("k", mint_token("k", "acme", ["read"]), NOW).expires_at is not None
    token = mint_token("k", "acme", ["read"], issued_at=NOW)
    who = verify_token("k", token, NOW + DEFAULT_TOKEN_LIFETIME - timedelta(seconds=1))
    assert who.expires_at == (NOW + DEFAULT_TOKEN_LIFETIME).timestamp()
    with pytest.raises(TokenError, match="expired"):
        verify_token("k", token, NOW + DEFAULT_TOKEN_LIFETIME)


@pytest.mark.parametrize("tenant,scopes", [("Bad Tenant", ["read"]), ("acme", ["root"]), ("acme", [])])
def test_mint_refuses_bad_tenant_or_scopes(tenant: str, scopes: list[str]) -> None:
    with pytest.raises(ValueError):
        mint_token("k", tenant, scopes)


async def test_manual_clock_wakes_sleepers_only_when_moved() -> None:
    clock = ManualClock(NOW)
    sleeper = asyncio.create_task(clock.sleep(60))
    await asyncio.sleep(0)
    await clock.advance(timedelta(seconds=59))
    await asyncio.sleep(0)
    assert not sleeper.done()
    await clock.advance(1)
    await asyncio.wait_for(sleeper, 1)
    assert clock.now() == NOW + timedelta(seconds=60)


def test_settings_from_env_parse_types_and_database_urls() -> None:
    s = Settings.from_env(
        {
            "RELEVANS_POSTGRES_URL": "postgresql://u@db:5433",
            "RELEVANS_EVENT_PARTITIONS": "16",
            "RELEVANS_SHUTDOWN_GRACE": "2.5",
            "RELEVANS_TRIGGER_DATABASE_URL": "postgresql://u@other/trig",
        }
    )
    assert s.event_partitions == 16 and s.shutdown_grace == 2.5
    assert s.database_url("profile") == "postgresql+asyncpg://u@db:5433/relevans_profile"
    assert s.database_url("trigger") == "postgresql+asyncpg://u@other/trig"


def test_settings_reject_non_numbers_naming_the_variable() -> None:
    with pytest.raises(SettingsError, match="RELEVANS_SMTP_PORT"):
        Settings.from_env({"RELEVANS_SMTP_PORT": "twenty-five"})


def test_settings_names_are_all_relevans_prefixed() -> None:
    names = env_names()
    assert "RELEVANS_NATS_URL" in names and "RELEVANS_TOKEN_SECRET" in names
    assert all(n.startswith("RELEVANS_") and n.isupper() for n in names)


def test_invalid_argument_maps_to_bad_request_details() -> None:
    v = Violations()
    v.add("event.type", "is required")
    v.add("event.email", "is not an email address")
    with pytest.raises(InvalidArgument) as caught:
        v.raise_if_any()
    status = to_rpc_status(caught.value)
    assert status.code == code_pb2.INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details if d.Is(bad.DESCRIPTOR))
    assert [f.field for f in bad.field_violations] == ["event.type", "event.email"]


def test_not_found_maps_without_field_details() -> None:
    status = to_rpc_status(NotFound("profile p1 not found"))
    assert status.code == code_pb2.NOT_FOUND and "p1" in status.message
    assert not any(d.Is(error_details_pb2.BadRequest.DESCRIPTOR) for d in status.details)


def test_single_violation_is_accepted() -> None:
    err = InvalidArgument(FieldViolation("x", "bad"))
    assert err.violations == [FieldViolation("x", "bad")] and "x" in err.message


def test_event_partition_is_stable_and_in_range() -> None:
    parts = {event_partition("acme", f"p{i}", 8) for i in range(200)}
    assert parts == set(range(8))
    assert event_partition("acme", "p1", 8) == event_partition("acme", "p1", 8)


@given(st.datetimes(timezones=st.timezones()))
def test_to_timestamp_matches_protobufs_own_conversion(value: datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(value.astimezone(UTC))
    assert to_timestamp(value) == expected
    assert from_timestamp(expected) == value.astimezone(UTC)


@given(st.integers(-62_135_596_800, 253_402_300_799), st.integers(0, 999_999_999))
def test_from_timestamp_matches_protobufs_own_conversion(seconds: int, nanos: int) -> None:
    ts = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
    assert from_timestamp(ts) == ts.ToDatetime(tzinfo=UTC)


@pytest.mark.parametrize(
    ("seconds", "nanos", "error"),
    [(0, -1, ValueError), (0, 1_000_000_000, ValueError), (253_402_300_800, 0, OverflowError)],
)
def test_from_timestamp_refuses_what_no_datetime_holds(seconds: int, nanos: int, error: type) -> None:
    with pytest.raises(error):
        from_timestamp(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos))


def test_settle_heap_freezes_what_startup_left_and_still_collects_cycles() -> None:
    before = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0

        class Node:
            other: object = None

        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        assert gone() is not None  # a cycle outlives its last reference until a collection
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_driver_statement_numbers_named_parameters_once_each_and_keeps_casts() -> None:
    statement = DriverStatement(
        "SELECT CAST(:ids AS text[]), x::jsonb FROM t WHERE t.tenant = :tenant AND t.owner = :tenant"
        " AND t.id = ANY(:ids)"
    )
    assert statement.sql == (
        "SELECT CAST($1 AS text[]), x::jsonb FROM t WHERE t.tenant = $2 AND t.owner = $2 AND t.id = ANY($1)"
    )
    assert statement.names == ("ids", "tenant")
