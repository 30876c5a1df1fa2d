"""Bulk import: row validation, the upsert plan and consent de-duplication. No infrastructure."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from itertools import count

import pytest

from relevans.cli.import_csv import DEFAULT_MAP, CsvRows, UsageError, parse_mapping
from relevans.common.v1 import common_pb2
from relevans.kit.errors import InvalidArgument
from services.profile.domain import ConsentInput
from services.profile.domain.imports import (
    MAX_IMPORT_ROWS,
    ImportRow,
    RawImportRow,
    consent_changes,
    plan_import,
    validate_batch_size,
    validate_row,
    validate_rows,
    validate_source,
)

NOW = datetime(2026, 11, 24, 7, 30, tzinfo=UTC)


def check(**fields: object) -> tuple[ImportRow | None, dict[str, str]]:
    fields.setdefault("row_number", 7)
    row, errors = validate_row(RawImportRow(**fields), NOW, "ticketing-nightly")  # type: ignore[arg-type]
    assert all(e.row_number == fields["row_number"] for e in errors)
    return row, {e.field: e.reason for e in errors}


def test_a_good_row_is_normalised() -> None:
    row, errors = check(
        email=" Anna.Berg@Example.COM ",
        first_name=" Anna ",
        last_name="Berg",
        phone="+46 70-123 45 67",
        tags=("Hamlet  2026-11-20", "hamlet 2026-11-20", "VIP"),
        traits={"address": "Storgatan 1", "vip_tier": "gold"},
        consent=ConsentInput("unspecified", "unspecified", "granted"),
    )
    assert errors == {}
    assert row is not None
    assert (row.customer_id, row.email, row.first_name, row.last_name) == (
        None,
        "anna.berg@example.com",
        "Anna",
        "Berg",
    )
    assert row.phone == "+46701234567"
    assert row.tags == ("hamlet 2026-11-20", "vip")
    assert row.traits == {"address": "Storgatan 1", "vip_tier": "gold"}
    assert row.consent is not None
    assert (row.consent.purpose, row.consent.channel, row.consent.status) == ("marketing", "email", "granted")
    assert row.consent.source == "ticketing-nightly"
    assert row.consent.evidence == "ticketing-nightly row 7" and row.consent.recorded_at == NOW
    assert row.identifiers() == [("email", "anna.berg@example.com")]


def test_a_row_needs_a_customer_id_or_an_email() -> None:
    row, errors = check(first_name="Olof", phone="+46707890123")
    assert row is None and set(errors) == {"customer_id"}
    row, errors = check(customer_id="C-1")
    assert errors == {} and row is not None and row.identifiers() == [("customer_id", "C-1")]


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"email": "not-an-email"}, "email"),
        ({"email": "a@example.com", "phone": "12345"}, "phone"),
        ({"email": "a@example.com", "phone": "+46 12"}, "phone"),
        ({"email": "a@example.com", "tags": ("ok", "-starts-with-dash")}, "tags[1]"),
        ({"email": "a@example.com", "tags": ("x" * 101,)}, "tags[0]"),
        ({"email": "a@example.com", "traits": {"VipTier": "gold"}}, "traits.VipTier"),
        ({"email": "a@example.com", "traits": {"note": "x" * 1025}}, "traits.note"),
        ({"email": "a@example.com", "first_name": "x" * 257}, "first_name"),
        (
            {"email": "a@example.com", "consent": ConsentInput("marketing", "email", "unspecified")},
            "marketing_email_consent.status",
        ),
        (
            {"email": "a@example.com", "consent": ConsentInput("marketing", "sms", "granted")},
            "marketing_email_consent.channel",
        ),
        ({"customer_id": "c\x00"}, "customer_id"),
    ],
)
def test_each_bad_field_is_named(fields: dict[str, object], bad: str) -> None:
    row, errors = check(**fields)
    assert row is None
    assert set(errors) == {bad}, errors


def test_a_trait_value_of_exactly_1_kib_is_fine() -> None:
    row, errors = check(email="a@example.com", traits={"note": "é" * 512})
    assert errors == {} and row is not None


def test_every_error_of_a_row_is_reported_and_other_rows_go_on() -> None:
    raws = [
        RawImportRow(2, email="a@example.com"),
        RawImportRow(3, email="bad", phone="123"),
        RawImportRow(4, customer_id="C-4"),
    ]
    rows, errors = validate_rows(raws, NOW, "s")
    assert [r.row_number for r in rows] == [2, 4]
    assert {(e.row_number, e.field) for e in errors} == {(3, "email"), (3, "phone")}


def test_batch_size_and_source_limits() -> None:
    validate_batch_size(MAX_IMPORT_ROWS)
    with pytest.raises(InvalidArgument) as caught:
        validate_batch_size(MAX_IMPORT_ROWS + 1)
    assert caught.value.violations[0].field == "rows"
    assert validate_source("") == "import"
    with pytest.raises(InvalidArgument):
        validate_source("x" * 65)


def _row(n: int, **fields: object) -> ImportRow:
    row, errors = validate_row(RawImportRow(n, **fields), NOW, "s")  # type: ignore[arg-type]
    assert row is not None, errors
    return row


def test_the_plan_keys_rows_by_customer_id_then_email() -> None:
    ids = count(1)
    bound = {("email", "known@example.com"): "p-known", ("customer_id", "C-9"): "p-9"}
    plan = plan_import(
        [
            _row(2, email="known@example.com", first_name="Kim", tags=("a",)),
            _row(3, customer_id="C-9", email="new@example.com", traits={"tier": "gold"}),
            _row(4, email="fresh@example.com", phone="+46701234567"),
            _row(5, email="FRESH@example.com", first_name="Fred", tags=("b",), traits={"tier": "silver"}),
        ],
        bound,
        lambda: f"p-new-{next(ids)}",
    )
    assert plan.created == 1
    by_id = {p.profile_id: p for p in plan.profiles}
    assert set(by_id) == {"p-known", "p-9", "p-new-1"}
    assert by_id["p-known"].first_name == "Kim" and not by_id["p-known"].new
    assert by_id["p-9"].email == "new@example.com"  # filled in where the profile has none
    fresh = by_id["p-new-1"]
    assert (fresh.new, fresh.email, fresh.first_name, fresh.phone) == (
        True,
        "fresh@example.com",
        "Fred",
        "+46701234567",
    )
    assert plan.bind == [("email", "fresh@example.com", "p-new-1"), ("email", "new@example.com", "p-9")]
    assert plan.tags == [("p-known", "a"), ("p-new-1", "b")]
    assert plan.traits == {("p-9", "tier"): "gold", ("p-new-1", "tier"): "silver"}


def test_an_unchanged_consent_is_not_recorded_again() -> None:
    granted = _row(2, email="a@example.com", consent=ConsentInput("marketing", "email", "granted")).consent
    denied = _row(3, email="a@example.com", consent=ConsentInput("marketing", "email", "denied")).consent
    assert granted is not None and denied is not None
    current = {("p1", "marketing", "email"): "granted"}
    assert consent_changes(current, [("p1", granted)]) == []
    assert consent_changes(current, [("p1", denied), ("p1", denied), ("p2", granted), ("p2", granted)]) == [
        ("p1", denied),
        ("p2", granted),
    ]


# ---- the CSV side of the CLI -----------------------------------------------------------------


def test_csv_rows_map_columns_and_report_malformed_rows() -> None:
    text = (
        "Email,first_name,show,marketing_consent,notes\n"
        "a@example.com,Anna,Hamlet,yes,x\n"
        "b@example.com,Bo,Carmen,no\n"  # a column short
        "\n"
        "c@example.com,Cy,Carmen,maybe,x\n"
        "d@example.com,,Carmen,,x\n"
    )
    rows = CsvRows(io.StringIO(text), DEFAULT_MAP, "nightly")
    out = list(rows)
    assert [r.row_number for r in out] == [2, 6]
    assert out[0].email == "a@example.com" and list(out[0].tags) == ["Hamlet"]
    assert out[0].marketing_email_consent.status == common_pb2.CONSENT_STATUS_GRANTED
    assert out[0].marketing_email_consent.source == "nightly"
    assert not out[1].HasField("marketing_email_consent") and out[1].first_name == ""
    assert [(e.row_number, e.field) for e in rows.errors] == [(3, ""), (5, "marketing_consent")]
    assert rows.ignored == ["notes"] and rows.read == 4


def test_mapping_options() -> None:
    mapping = parse_mapping(["Kundnr=customer_id", "tier=trait:vip_tier", "show=-"])
    assert (
        mapping["kundnr"] == "customer_id" and mapping["tier"] == "trait:vip_tier" and mapping["show"] == "-"
    )
    for bad in ("nocolumn", "x=unknown", "x=trait:"):
        with pytest.raises(UsageError):
            parse_mapping([bad])
    with pytest.raises(UsageError):
        CsvRows(io.StringIO("name,show\nx,y\n"), DEFAULT_MAP, "s")
