"""Bulk import: row validation, the upsert plan and consent de-duplication. No infrastructure."""

from __future__ import annotations

import dataclasses
import io
from datetime import UTC, datetime
from itertools import count

import phonenumbers
import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relevans.cli.import_csv import DEFAULT_MAP, CsvRows, UsageError, parse_mapping
from relevans.common.v1 import common_pb2
from relevans.kit.errors import InvalidArgument
from services.profile.domain import ConsentInput
from services.profile.domain.imports import (
    MAX_IMPORT_ROWS,
    ImportRow,
    RawImportRow,
    StoredProfile,
    consent_changes,
    drop_unchanged,
    normalize_phone,
    phone_parse_error,
    plain_email,
    plain_phone,
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


# Addresses near the edges of the fast path's shape: odd characters, dots and hyphens in odd
# places, Punycode and R-LDH labels, special-use and numeric top-level domains, long labels.
_LOCAL = st.one_of(
    st.text(alphabet="aZ09._+-'", min_size=1, max_size=20),
    st.text(alphabet="aZ09._+-!#'`{}~\"\\ ,:;<>@[]()é\u0301", max_size=70),
    st.text(alphabet="a", min_size=60, max_size=250),
)
_PLAIN_LABEL = st.text(alphabet="aZ09-", min_size=1, max_size=8)
_LABEL = st.one_of(
    _PLAIN_LABEL,
    _PLAIN_LABEL,
    _PLAIN_LABEL,
    st.text(alphabet="aZ09-_.é\uff0e", max_size=8),
    st.text(alphabet="a", min_size=60, max_size=66),
    st.sampled_from(
        ["com", "SE", "test", "local", "arpa", "onion", "example", "xn--bcher-kva", "ab--cd", "123"]
    ),
)
_TLD = st.one_of(st.text(alphabet="aZé", min_size=1, max_size=4), _LABEL)
_ADDRESSES = st.one_of(
    st.builds(
        lambda local, labels: f"{local}@{'.'.join(labels)}", _LOCAL, st.lists(_LABEL, min_size=1, max_size=4)
    ),
    st.builds(
        lambda local, labels, tld: f"{local}@{'.'.join([*labels, tld])}",
        _LOCAL,
        st.lists(_LABEL, min_size=1, max_size=3),
        _TLD,
    ),
    st.text(max_size=40),
)


def _email_validator(value: str) -> str | None:
    try:
        return validate_email(value, check_deliverability=False).normalized.lower()
    except EmailNotValidError:
        return None


@settings(max_examples=3000)
@given(_ADDRESSES)
@example("Anna.Berg@Example.COM")
@example("a@b.test")
@example("a@" + "x" * 64 + ".com")
@example("x" * 240 + "@example.com")
@example("o'neil+tickets@mail.example.se")
def test_the_plain_email_fast_path_agrees_with_email_validator(value: str) -> None:
    fast = plain_email(value)
    if fast is not None:
        assert fast == _email_validator(value)


@pytest.mark.parametrize(
    "address",
    ["anna.berg@example.com", "Erik.Lund+tickets@Mail.Example.SE", "o'neil@x-y.example.org", "a_b@c.co"],
)
def test_common_addresses_take_the_fast_path(address: str) -> None:
    assert plain_email(address) == address.lower() == _email_validator(address)


@pytest.mark.parametrize(
    "address",
    [
        "a@b.test",
        "a@xn--bcher-kva.com",
        "a@büc.com",
        '"a b"@x.com',
        "a@x.c0m",
        "a..b@x.com",
        "Anna <a@x.com>",
    ],
)
def test_unusual_addresses_are_left_to_email_validator(address: str) -> None:
    assert plain_email(address) is None
    row, errors = check(email=address)
    assert (row.email if row else None) == _email_validator(address)
    assert set(errors) <= {"email"}


def _phonenumbers(value: str) -> tuple[str | None, str]:
    """What normalize_phone answered before its fast path: phonenumbers alone."""
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException as exc:
        return None, phone_parse_error(exc.error_type, value)
    if not phonenumbers.is_valid_number(number):
        return None, "is not a valid phone number"
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), ""


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("12345", "it does not start with + and a country code"),
        ("+999 123", "the country code is unknown"),
        ("+4", "it is not a phone number"),
        ("+46 12345678901234567890", "it is too long"),
    ],
)
def test_a_bad_phone_number_is_said_in_one_sentence_of_our_own(value: str, why: str) -> None:
    """Issue 17: the reason was phonenumbers' own sentence with its full stop before ours
    ("Missing or invalid default region.;"), naming a default region an import never has."""
    _, reason = normalize_phone(value)
    assert reason == f"is not a valid phone number: {why}; use the international format, e.g. +46701234567"


# Valid numbers of every region (phonenumbers' examples of each type), as written in
# international format and in E.164, and near misses: digits changed, added or dropped,
# national prefixes and leading zeros, odd separators.
_EXAMPLES = sorted(
    {
        phonenumbers.format_number(n, f)
        for region in phonenumbers.SUPPORTED_REGIONS
        for t in (phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE)
        if (n := phonenumbers.example_number_for_type(region, t)) is not None
        for f in (phonenumbers.PhoneNumberFormat.INTERNATIONAL, phonenumbers.PhoneNumberFormat.E164)
    }
)
_CALLING_CODES = sorted(str(cc) for cc in phonenumbers.COUNTRY_CODE_TO_REGION_CODE)


@st.composite
def _phones(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        value = draw(st.sampled_from(_EXAMPLES))
    elif kind == 1:
        cc = draw(st.sampled_from(_CALLING_CODES))
        prefix = draw(st.sampled_from(["", "0", "00", "1", "8", "9", "06"]))
        value = f"+{cc}{prefix}" + draw(st.text(alphabet="0123456789", min_size=1, max_size=16))
    elif kind == 2:
        value = "+" + draw(st.text(alphabet="0123456789", min_size=1, max_size=20))
    else:
        value = draw(st.text(alphabet="+0123456789 -().x#/*,;٣", max_size=25))
    for _ in range(draw(st.integers(0, 3))):  # edit it a little
        chars = list(value)
        i = draw(st.integers(0, len(chars)))
        op = draw(st.integers(0, 2))
        if op == 0:
            chars.insert(i, draw(st.sampled_from("0123456789  --.()+x")))
        elif chars and i < len(chars):
            if op == 1:
                del chars[i]
            else:
                chars[i] = draw(st.sampled_from("0123456789"))
        value = "".join(chars)
    return value


@settings(max_examples=5000)
@given(_phones())
@example("+46 70 123 45 67")
@example("+46 070 123 45 67")
@example("+39 06 1234 5678")
@example("+1 650 253 0000")
@example("+7 912 345 67 89")
@example("+44 20 7946 0958")
def test_the_plain_phone_fast_path_agrees_with_phonenumbers(value: str) -> None:
    assert normalize_phone(value) == _phonenumbers(value)
    fast = plain_phone(value)
    if fast is not None:
        assert (fast, "") == _phonenumbers(value)
        assert phonenumbers.parse(value, None) == phonenumbers.parse(fast, None)


@pytest.mark.parametrize(
    "phone", ["+4791234567", "+46 70 123 45 67", "+46731234567", "+46 76-123 45 67", "+1 650 253 0000"]
)
def test_common_phone_numbers_take_the_fast_path(phone: str) -> None:
    assert plain_phone(phone) is not None
    assert (plain_phone(phone), "") == _phonenumbers(phone)


@pytest.mark.parametrize(
    "phone", ["+46 070 123 45 67", "+39 06 1234 5678", "+46 (0)70 123 45 67", "0046701234567", "+46 12"]
)
def test_unusual_phone_numbers_are_left_to_phonenumbers(phone: str) -> None:
    assert plain_phone(phone) is None
    assert normalize_phone(phone) == _phonenumbers(phone)


def test_the_fast_paths_cover_most_examples() -> None:
    # (a guard against a fast path that silently stopped matching anything)
    taken = sum(plain_phone(p) is not None for p in _EXAMPLES)
    assert taken > len(_EXAMPLES) // 2, taken
    assert all(normalize_phone(p) == _phonenumbers(p) for p in _EXAMPLES)


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


def test_profiles_a_batch_changes_nothing_of_are_dropped_from_the_plan() -> None:
    ids = count(1)
    bound = {
        ("email", "a@example.com"): "p-a",
        ("email", "b@example.com"): "p-b",
        ("customer_id", "C-1"): "p-a",
    }
    consent = ConsentInput("marketing", "email", "granted")
    rows = [
        _row(2, customer_id="C-1", email="a@example.com", first_name="Anna", tags=("x",), consent=consent),
        _row(3, email="b@example.com", first_name="Bo", traits={"tier": "gold"}),
        _row(4, email="new@example.com"),
    ]
    plan = plan_import(rows, bound, lambda: f"p-new-{next(ids)}")
    same_a = StoredProfile("C-1", "a@example.com", "Anna", None, None, frozenset({"x", "y"}), {}, {})
    same_a = dataclasses.replace(same_a, consents={("marketing", "email"): "granted"})
    same_b = StoredProfile(
        None, "b@example.com", "Bo", "B", "+46701234567", frozenset(), {"tier": "gold"}, {}
    )
    kept = drop_unchanged(plan, {"p-a": same_a, "p-b": same_b})
    assert [p.profile_id for p in kept.profiles] == ["p-new-1"]
    assert (kept.tags, kept.traits, kept.consents, kept.created) == ([], {}, [], 1)
    assert kept.bind == [("email", "new@example.com", "p-new-1")]
    # one difference keeps the profile, with all of its rows' writes
    for a, b in [
        (dataclasses.replace(same_a, first_name="Ann"), same_b),
        (dataclasses.replace(same_a, tags=frozenset({"y"})), same_b),
        (dataclasses.replace(same_a, consents={("marketing", "email"): "denied"}), same_b),
        (dataclasses.replace(same_a, consents={}), same_b),
        (same_a, dataclasses.replace(same_b, traits={"tier": "silver"})),
        (same_a, dataclasses.replace(same_b, traits={})),
    ]:
        kept = drop_unchanged(plan, {"p-a": a, "p-b": b})
        assert len(kept.profiles) == 2
        changed = kept.profiles[0].profile_id
        assert [p for p, _ in kept.tags] == [p for p, _ in plan.tags if p == changed]
        assert [p for p, _ in kept.traits] == [p for p, _ in plan.traits if p == changed]
    # a profile not read, or held by an earlier batch of the import, stays
    assert [p.profile_id for p in drop_unchanged(plan, {"p-a": same_a}).profiles] == ["p-b", "p-new-1"]
    assert len(drop_unchanged(plan, {"p-a": same_a, "p-b": same_b}, {"p-a"}).profiles) == 2
    # a field the profile lacks is filled in
    no_name = dataclasses.replace(same_b, first_name=None)
    assert len(drop_unchanged(plan, {"p-a": same_a, "p-b": no_name}).profiles) == 2


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
