"""The profile service's pure domain: event validation and normalisation, identity resolution,
identify planning, consent rules and lookups. No infrastructure."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import count

import pytest

from relevans.kit.errors import InvalidArgument
from services.profile.domain import (
    ANONYMOUS,
    CUSTOMER_ID,
    EMAIL,
    Consent,
    ConsentInput,
    Event,
    IdentifyCommand,
    ProfileState,
    RawEvent,
    RawIdentify,
    apply_bindings,
    current_view,
    first_occurrences,
    normalize_email,
    plan_identify,
    plan_track,
    validate_batch,
    validate_consent,
    validate_event,
    validate_identify,
    validate_lookup,
    validate_profile_ids,
    validate_set_consent,
)
from services.profile.domain.events import MAX_PROPERTIES_BYTES
from services.profile.domain.ids import random_uuid, time_ordered_ids, uuid4_hex

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def violations(exc: pytest.ExceptionInfo[InvalidArgument]) -> dict[str, str]:
    return {v.field: v.description for v in exc.value.violations}


def event(**fields: object) -> Event:
    raw = RawEvent(**{"type": "page_view", "anonymous_id": "a-1", **fields})  # type: ignore[arg-type]
    return validate_event(raw, NOW)


def ids(prefix: str = "p") -> Callable[[], str]:
    n = count(1)
    return lambda: f"{prefix}{next(n)}"


# ---- events -----------------------------------------------------------------------------------


def test_a_valid_event_is_normalised() -> None:
    e = validate_event(
        RawEvent(
            type="add_to_cart", email="Ada.Lovelace@Example.COM", properties={"sku": "s-1", "price": 9.5}
        ),
        NOW,
        make_message_id=lambda: "generated",
    )
    assert e.email == "ada.lovelace@example.com"
    assert e.timestamp == NOW
    assert e.message_id == "generated"
    assert e.anonymous_id is None and e.customer_id is None
    assert e.properties_json == '{"sku":"s-1","price":9.5}'


def test_a_generated_message_id_is_32_hex_digits() -> None:
    e = event()
    assert uuid.UUID(hex=e.message_id).hex == e.message_id and uuid.UUID(hex=e.message_id).version == 4
    assert event().message_id != e.message_id


def test_client_message_id_and_timestamp_are_kept() -> None:
    at = NOW - timedelta(days=3)
    e = event(message_id="m-1", timestamp=at)
    assert (e.message_id, e.timestamp) == ("m-1", at)


@pytest.mark.parametrize(
    ("fields", "field", "why"),
    [
        ({"type": ""}, "event.type", "is required"),
        ({"type": "PageView"}, "event.type", "must match"),
        ({"type": "1st"}, "event.type", "must match"),
        ({"type": "a" * 65}, "event.type", "must match"),
        ({"type": "page view"}, "event.type", "must match"),
        ({"anonymous_id": ""}, "event.anonymous_id", "one of anonymous_id, customer_id or email is required"),
        ({"email": "not-an-email"}, "event.email", "is not a valid email address"),
        ({"email": "a@localhost"}, "event.email", "is not a valid email address"),
        ({"timestamp": NOW + timedelta(minutes=5, seconds=1)}, "event.timestamp", "is in the future"),
        ({"timestamp": datetime(1999, 12, 31, 23, 59, tzinfo=UTC)}, "event.timestamp", "is before 2000"),
        ({"bad_timestamp": True}, "event.timestamp", "is not a valid timestamp"),
        ({"message_id": "m" * 129}, "event.message_id", "at most 128"),
        ({"anonymous_id": "a" * 257}, "event.anonymous_id", "at most 256"),
        ({"customer_id": "c" * 257}, "event.customer_id", "at most 256"),
        ({"properties": {"x": float("nan")}}, "event.properties", "NaN"),
        ({"properties": {"x": [1.0, float("inf")]}}, "event.properties", "NaN"),
        ({"properties": {"x": "y" * MAX_PROPERTIES_BYTES}}, "event.properties", "at most 32768 bytes"),
        ({"properties": {"x": "é" * (MAX_PROPERTIES_BYTES // 2)}}, "event.properties", "at most 32768 bytes"),
        ({"properties": {"x": 2**64}}, "event.properties", "cannot be written as JSON"),
        ({"anonymous_id": "a\x00b"}, "event.anonymous_id", "NUL"),
        ({"message_id": "\x00"}, "event.message_id", "NUL"),
        ({"properties": {"x": ["ok", {"y": "\x00"}]}}, "event.properties", "NUL"),
        ({"properties": {"k\x00": 1.0}}, "event.properties", "NUL"),
    ],
)
def test_invalid_events_name_the_field(fields: dict[str, object], field: str, why: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        event(**fields)
    found = violations(caught)
    assert field in found, found
    assert why in found[field]


def test_limits_are_inclusive() -> None:
    event(timestamp=NOW + timedelta(minutes=5))
    event(timestamp=datetime(2000, 1, 1, tzinfo=UTC))
    event(type="a" * 64, message_id="m" * 128, anonymous_id="a" * 256)
    event(type="checkout.step:2-done_ok")


def test_properties_may_nest_eight_levels_not_nine() -> None:
    def nested(levels: int) -> dict[str, object]:
        value: dict[str, object] = {"leaf": 1.0}
        for _ in range(levels - 1):
            value = {"n": value}
        return value

    event(properties=nested(8))
    event(properties={"list": [[[[[[[1.0]]]]]]]})  # the object and seven lists: eight levels
    with pytest.raises(InvalidArgument) as caught:
        event(properties=nested(9))
    assert "deeper than 8" in violations(caught)["event.properties"]


def test_a_backslash_u0000_text_is_not_a_nul() -> None:
    assert event(properties={"x": "\\u0000"}).properties_json == '{"x":"\\\\u0000"}'


def test_properties_size_counts_utf8_bytes() -> None:
    # 4-byte characters: 8,200 of them are under the character limit but over the byte limit.
    with pytest.raises(InvalidArgument):
        event(properties={"x": "\U0001f600" * 8200})
    event(properties={"x": "é" * 16_000})


def test_several_problems_are_reported_together() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_event(RawEvent(type="", email="nope", message_id="m" * 200), NOW)
    assert set(violations(caught)) == {"event.type", "event.email", "event.message_id"}


def test_a_batch_names_each_bad_event_by_index() -> None:
    raws = [RawEvent(type="ok", anonymous_id=f"a{i}") for i in range(5)]
    raws[3] = RawEvent(type="Bad", anonymous_id="a3")
    raws[4] = RawEvent(type="ok")
    with pytest.raises(InvalidArgument) as caught:
        validate_batch(raws, NOW)
    assert set(violations(caught)) == {"events[3].type", "events[4].anonymous_id"}


def test_a_batch_of_more_than_1000_events_is_refused() -> None:
    validate_batch([RawEvent(type="t", anonymous_id="a")] * 1000, NOW)
    with pytest.raises(InvalidArgument) as caught:
        validate_batch([RawEvent(type="t", anonymous_id="a")] * 1001, NOW)
    assert "events" in violations(caught)


def test_first_occurrences_mark_repeated_message_ids() -> None:
    batch = [event(message_id=m) for m in ("a", "b", "a", "c", "b")]
    assert first_occurrences(batch) == [0, 1, 0, 3, 1]


def test_normalize_email() -> None:
    assert normalize_email("Bob@Example.ORG") == "bob@example.org"
    with pytest.raises(ValueError):
        normalize_email("bob@")


# ---- identity resolution ----------------------------------------------------------------------


def test_an_anonymous_event_creates_a_shadow_profile() -> None:
    plan = plan_track([event(anonymous_id="cookie")], {}, ids())
    assert plan.profile_ids == ["p1"]
    [profile] = plan.new_profiles
    assert profile.shadow and profile.new
    assert plan.new_identities == [(ANONYMOUS, "cookie", "p1")]


def test_events_of_one_batch_sharing_an_identifier_share_a_profile() -> None:
    batch = [
        event(anonymous_id="cookie"),
        event(anonymous_id="cookie", email="ada@example.com"),
        event(anonymous_id="", email="ada@example.com"),
        event(anonymous_id="other"),
    ]
    plan = plan_track(batch, {}, ids())
    assert plan.profile_ids == ["p1", "p1", "p1", "p2"]
    assert plan.profiles["p1"].email == "ada@example.com"
    assert plan.new_identities == sorted(
        [(ANONYMOUS, "cookie", "p1"), (EMAIL, "ada@example.com", "p1"), (ANONYMOUS, "other", "p2")]
    )


def test_resolution_prefers_customer_id_then_email_then_anonymous_id() -> None:
    by_customer = ProfileState("known-c", customer_id="c-1")
    by_email = ProfileState("known-e", email="e@example.com")
    shadow = ProfileState("shadow")
    bound = {
        (CUSTOMER_ID, "c-1"): by_customer,
        (EMAIL, "e@example.com"): by_email,
        (ANONYMOUS, "cookie"): shadow,
    }
    plan = plan_track(
        [
            event(customer_id="c-1", email="e@example.com", anonymous_id="cookie"),
            event(email="e@example.com", anonymous_id="cookie"),
            event(anonymous_id="cookie"),
        ],
        bound,
        ids(),
    )
    assert plan.profile_ids == ["known-c", "known-e", "shadow"]
    assert plan.new_identities == [] and plan.new_profiles == []


def test_unbound_identifiers_attach_to_the_resolved_profile_and_fill_it() -> None:
    shadow = ProfileState("shadow")
    plan = plan_track(
        [event(anonymous_id="cookie", customer_id="c-9", email="new@example.com")],
        {(ANONYMOUS, "cookie"): shadow},
        ids(),
    )
    assert plan.profile_ids == ["shadow"]
    assert plan.new_identities == [(CUSTOMER_ID, "c-9", "shadow"), (EMAIL, "new@example.com", "shadow")]
    [filled] = plan.filled_profiles
    assert (filled.customer_id, filled.email) == ("c-9", "new@example.com")
    assert shadow.customer_id is None, "the caller's state is not modified"


def test_a_profile_keeps_its_first_email_when_another_one_attaches() -> None:
    known = ProfileState("k", email="first@example.com")
    plan = plan_track(
        [event(anonymous_id="", customer_id="c-1", email="first@example.com")],
        {(EMAIL, "first@example.com"): known},
        ids(),
    )
    assert plan.profiles["k"].email == "first@example.com"
    assert plan.profiles["k"].customer_id == "c-1"


def test_apply_bindings_keeps_only_the_bindings_that_happened() -> None:
    existing = ProfileState("p-old")
    bound = {(ANONYMOUS, "a-old"): existing}
    bindings = [
        (CUSTOMER_ID, "c-1", "p-old"),
        (ANONYMOUS, "a-new", "p-new"),
        (EMAIL, "x@example.com", "p-new"),
    ]
    after = apply_bindings(bound, bindings)
    assert after[(ANONYMOUS, "a-old")] is after[(CUSTOMER_ID, "c-1")]
    assert after[(CUSTOMER_ID, "c-1")].customer_id == "c-1" and after[(CUSTOMER_ID, "c-1")].filled
    new = after[(ANONYMOUS, "a-new")]
    assert new.new and new.email == "x@example.com" and after[(EMAIL, "x@example.com")] is new
    assert existing.customer_id is None


def test_planning_again_after_losing_a_binding_race() -> None:
    # First plan: both identifiers new, one profile. The customer id was bound elsewhere meanwhile.
    batch = [event(anonymous_id="cookie", customer_id="c-1")]
    first = plan_track(batch, {}, ids("n"))
    assert first.profile_ids == ["n1"]
    won = [b for b in first.new_identities if b[0] == ANONYMOUS]
    bound = apply_bindings({}, won)
    bound[(CUSTOMER_ID, "c-1")] = ProfileState("winner", customer_id="c-1")
    second = plan_track(batch, bound, ids("m"))
    assert second.profile_ids == ["winner"]
    assert second.new_identities == []
    assert [p.profile_id for p in second.new_profiles] == ["n1"]  # still owns the cookie


# ---- identify ---------------------------------------------------------------------------------


def command(**fields: object) -> IdentifyCommand:
    return validate_identify(RawIdentify(**fields), NOW)  # type: ignore[arg-type]


def test_identify_creates_a_known_profile() -> None:
    plan = plan_identify(
        command(email="Ada@Example.com", anonymous_id="cookie", first_name=" Ada "), {}, ids()
    )
    assert plan.created and plan.profile_id == "p1"
    assert plan.attach == [(ANONYMOUS, "cookie"), (EMAIL, "ada@example.com")]
    assert (plan.email, plan.first_name, plan.merge_from) == ("ada@example.com", "Ada", None)


def test_identify_merges_the_anonymous_shadow_profile_into_the_known_one() -> None:
    known = ProfileState("known", customer_id="c-1", first_name="Ada")
    shadow = ProfileState("shadow")
    plan = plan_identify(
        command(customer_id="c-1", anonymous_id="cookie"),
        {(CUSTOMER_ID, "c-1"): known, (ANONYMOUS, "cookie"): shadow},
        ids(),
    )
    assert (plan.profile_id, plan.created, plan.merge_from) == ("known", False, "shadow")
    assert plan.attach == []
    assert plan.first_name == "Ada", "an empty first name leaves it unchanged"


def test_identify_promotes_a_shadow_profile_when_nobody_is_known_yet() -> None:
    shadow = ProfileState("shadow")
    plan = plan_identify(
        command(email="new@example.com", anonymous_id="cookie"), {(ANONYMOUS, "cookie"): shadow}
    )
    assert (plan.profile_id, plan.created, plan.merge_from) == ("shadow", False, None)
    assert plan.attach == [(EMAIL, "new@example.com")]


def test_identify_takes_a_known_persons_device_without_merging_them() -> None:
    other = ProfileState("other", email="other@example.com")
    plan = plan_identify(
        command(email="me@example.com", anonymous_id="shared"), {(ANONYMOUS, "shared"): other}, ids()
    )
    assert plan.created and plan.take_anonymous_from == "other" and plan.merge_from is None


def test_identify_merges_two_known_profiles_into_the_one_with_the_customer_id() -> None:
    bound = {
        (CUSTOMER_ID, "c-1"): ProfileState(
            "b", customer_id="c-1", created_at=datetime(2024, 2, 1, tzinfo=UTC)
        ),
        (EMAIL, "a@example.com"): ProfileState(
            "a", email="a@example.com", first_name="Ada", created_at=datetime(2024, 1, 1, tzinfo=UTC)
        ),
    }
    plan = plan_identify(command(customer_id="c-1", email="a@example.com"), bound)
    assert (plan.profile_id, plan.merge_known_from, plan.created) == ("b", "a", False)
    assert (plan.customer_id, plan.email, plan.first_name) == ("c-1", "a@example.com", "Ada")
    assert plan.attach == [] and plan.merge_from is None and plan.take_anonymous_from is None


def test_identify_merges_two_customers_into_the_older_one() -> None:
    bound = {
        (CUSTOMER_ID, "c-1"): ProfileState(
            "a", customer_id="c-1", created_at=datetime(2024, 2, 1, tzinfo=UTC)
        ),
        (EMAIL, "b@example.com"): ProfileState(
            "b", customer_id="c-2", email="b@example.com", created_at=datetime(2024, 1, 1, tzinfo=UTC)
        ),
    }
    plan = plan_identify(command(customer_id="c-1", email="b@example.com"), bound)
    assert (plan.profile_id, plan.merge_known_from, plan.customer_id) == ("b", "a", "c-2")


def test_identify_declares_a_new_email_for_a_known_customer() -> None:
    known = ProfileState("k", customer_id="c-1", email="old@example.com")
    plan = plan_identify(command(customer_id="c-1", email="new@example.com"), {(CUSTOMER_ID, "c-1"): known})
    assert plan.email == "new@example.com" and plan.attach == [(EMAIL, "new@example.com")]


def test_identify_validation() -> None:
    with pytest.raises(InvalidArgument) as caught:
        command(anonymous_id="cookie")
    assert "customer_id" in violations(caught)
    with pytest.raises(InvalidArgument) as caught:
        command(
            email="bad",
            first_name="x\x00",
            consents=(
                ConsentInput("marketing", "email", "granted"),
                ConsentInput("unspecified", "pigeon", "maybe"),
            ),
        )
    assert set(violations(caught)) == {
        "email",
        "first_name",
        "consents[1].purpose",
        "consents[1].channel",
        "consents[1].status",
    }
    cmd = command(customer_id="c-1", consents=(ConsentInput("marketing", "email", "granted"),))
    assert cmd.consents[0].source == "identify" and cmd.consents[0].recorded_at == NOW


# ---- consent ----------------------------------------------------------------------------------


def test_a_consent_needs_purpose_channel_and_status() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_consent(ConsentInput("unspecified", "unspecified", "unspecified"), NOW)
    assert violations(caught) == {
        "consent.purpose": "is required",
        "consent.channel": "is required",
        "consent.status": "is required",
    }
    with pytest.raises(InvalidArgument) as caught:
        validate_consent(ConsentInput("7", "email", "granted"), NOW)
    assert "must be one of" in violations(caught)["consent.purpose"]


def test_set_consent_needs_a_profile_id_and_defaults_the_source() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_set_consent("", ConsentInput("marketing", "email", "withdrawn"), NOW)
    assert set(violations(caught)) == {"profile_id"}
    c = validate_set_consent("p", ConsentInput("marketing", "email", "withdrawn", evidence="link"), NOW)
    assert (c.source, c.evidence, c.recorded_at) == ("api", "link", NOW)


def consent(purpose: str, channel: str, status: str, minutes: int) -> Consent:
    return Consent(purpose, channel, status, "src", "", NOW + timedelta(minutes=minutes))


def test_current_view_keeps_the_latest_decision_per_purpose_and_channel() -> None:
    view = current_view(
        [consent("marketing", "email", "granted", 0), consent("marketing", "email", "withdrawn", 1)]
    )
    assert [c.status for c in view] == ["withdrawn"]


# ---- lookups and ids --------------------------------------------------------------------------


def test_a_lookup_takes_exactly_one_identifier() -> None:
    assert validate_lookup("p-1", "", "").value == "p-1"
    assert (
        validate_lookup("", "", "Ada@Example.com").kind,
        validate_lookup("", "", "Ada@Example.com").value,
    ) == (
        EMAIL,
        "ada@example.com",
    )
    assert validate_lookup("", "c-1", "").kind == CUSTOMER_ID
    with pytest.raises(InvalidArgument) as caught:
        validate_lookup("", "", "")
    assert "profile_id" in violations(caught)
    with pytest.raises(InvalidArgument) as caught:
        validate_lookup("p-1", "c-1", "")
    assert "customer_id" in violations(caught)
    with pytest.raises(InvalidArgument) as caught:
        validate_lookup("", "", "nope")
    assert "email" in violations(caught)


def test_batch_lookups_are_limited_and_deduplicated() -> None:
    assert validate_profile_ids(["a", "b", "a", ""]) == ["a", "b"]
    with pytest.raises(InvalidArgument) as caught:
        validate_profile_ids(["x"] * 1001)
    assert "profile_ids" in violations(caught)


def test_generated_ids() -> None:
    assert uuid.UUID(random_uuid()).version == 4
    assert uuid.UUID(hex=uuid4_hex()).version == 4 and len(uuid4_hex()) == 32
    make = time_ordered_ids(NOW)
    first, second = make(), make()
    assert uuid.UUID(first).version == 7 and first != second
    later = time_ordered_ids(NOW + timedelta(milliseconds=1))()
    assert max(first, second) < later


def test_properties_keep_nulls_and_unicode_as_json() -> None:
    stored = event(properties={"gone": None, "name": "Åsa", "n": [1.5, None]})
    assert json.loads(stored.properties_json) == {"gone": None, "name": "Åsa", "n": [1.5, None]}
