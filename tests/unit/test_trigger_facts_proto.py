"""An enriched event's profile as a trigger condition sees it."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from relevans.common.v1 import common_pb2
from relevans.conditions import Compare, compile_condition
from relevans.kit.proto import to_value
from relevans.profile.v1 import profile_pb2
from services.trigger.facts_proto import profile_view

SEEN = datetime(2026, 5, 1, 12, 30, tzinfo=UTC)


def test_the_view_holds_traits_tags_counters_score_consents_last_seen_and_the_event() -> None:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(SEEN)
    profile = profile_pb2.Profile(
        profile_id="p1",
        traits={"vip": to_value(True), "age": to_value(41), "city": to_value("Bergen")},
        tags=["b2b", "vip"],
        counters=[
            profile_pb2.CounterValue(name="toys", window_days=30, count=20),
            profile_pb2.CounterValue(name="toys", window_days=7, count=11),
            profile_pb2.CounterValue(name="logins", window_days=1, count=2),
        ],
        score=101.5,
        consents=[
            profile_pb2.Consent(
                purpose=common_pb2.PURPOSE_MARKETING,
                channel=common_pb2.CHANNEL_EMAIL,
                status=common_pb2.CONSENT_STATUS_GRANTED,
            ),
            profile_pb2.Consent(
                purpose=common_pb2.PURPOSE_MARKETING,
                channel=common_pb2.CHANNEL_SMS,
                status=common_pb2.CONSENT_STATUS_WITHDRAWN,
            ),
        ],
        last_seen={"page_view": stamp},
    )
    view = profile_view(profile, {"amount": 12_000})
    assert view.traits == {"vip": True, "age": 41, "city": "Bergen"}
    assert type(view.traits["age"]) is int
    assert view.tags == {"b2b", "vip"}
    assert view.counters == {"toys": 11.0, "logins": 2.0}  # the shortest window, as segments see it
    assert view.score == 101.5
    assert view.consents == {("marketing", "email"): "granted", ("marketing", "sms"): "withdrawn"}
    assert view.last_seen == {"page_view": SEEN}
    assert view.event == {"amount": 12_000}
    assert compile_condition(Compare("consent.marketing.email", "eq", "granted"))(view)
    assert compile_condition(Compare("counter.toys", "ge", 11))(view)


def test_an_empty_profile_is_an_empty_view() -> None:
    view = profile_view(profile_pb2.Profile(), {})
    assert (view.traits, view.tags, view.counters, view.score, view.consents, view.last_seen) == (
        {},
        frozenset(),
        {},
        0.0,
        {},
        {},
    )
