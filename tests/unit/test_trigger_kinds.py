"""The condition-kind registry: every kind is known by one name everywhere, goes to its proto and
back, is stored as JSON and read back equal; unknown kinds fail clearly."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import ClassVar

import pytest

from relevans.conditions import parse_condition
from relevans.kit.errors import InvalidArgument
from relevans.kit.proto import to_struct
from relevans.trigger.v1 import trigger_pb2
from services.trigger.condition_protos import CONDITION_PROTOS, condition_fields, raw_condition
from services.trigger.domain import (
    Condition,
    PendingTimer,
    RawTrigger,
    RetireTimer,
    plan_merge,
    validate_trigger,
)
from services.trigger.domain.durations import duration_text
from services.trigger.domain.kinds import KINDS, UnknownConditionKind, kind_named
from services.trigger.domain.kinds.absence import Absence, TriggerState
from services.trigger.domain.kinds.common import INVALID_DURATION, Matcher
from services.trigger.domain.kinds.date import DateCondition
from services.trigger.domain.kinds.event import Event, RawEvent
from services.trigger.domain.kinds.inactivity import Inactivity, RawInactivity
from services.trigger.domain.kinds.segment import Segment
from services.trigger.domain.kinds.threshold import EventCount, ProfileValue, Threshold
from services.trigger.domain.kinds.trait_change import TraitChangeCondition

T0 = datetime(2026, 5, 1, 12, tzinfo=UTC)
TOYS = Matcher(
    parse_condition({"compare": {"field": "event.category", "op": "eq", "value": "toys"}}, trigger=True)
)

EXAMPLES: list[Condition] = [
    Absence("add_to_cart", "purchase", timedelta(hours=4)),
    Absence(
        "add_to_cart",
        "purchase",
        timedelta(hours=4, microseconds=7),
        Matcher(parse_condition({"compare": {"field": "event.total", "op": "gt", "value": 0}}, trigger=True)),
        ("cart_id",),
    ),
    Event("purchase"),
    Event("page_view", TOYS),
    Threshold(EventCount("page_view", 11, timedelta(days=7), TOYS)),
    Threshold(EventCount("page_view", 3, timedelta(hours=1))),
    Threshold(ProfileValue("score", 100.0)),
    Threshold(ProfileValue("counter.logins", 2.5)),
    Inactivity(("gym_check_in", "class_booked"), timedelta(days=14)),
    DateCondition("birthday", 0, True, time(10, 0)),
    DateCondition("renewal_date", -7, False, time(9, 30)),
    Segment("big-spenders", "entered"),
    Segment("big-spenders", "exited"),
    TraitChangeCondition("tier", "takes", "gold"),
    TraitChangeCondition("credit_limit_reached", "leaves", True),
    TraitChangeCondition("missed_payments", "changed"),
]


@dataclass(frozen=True, slots=True)
class RawHoroscope:
    kind: ClassVar[str] = "horoscope"


def test_the_registry_lists_every_kind_under_its_proto_name() -> None:
    oneof = trigger_pb2.Trigger.DESCRIPTOR.oneofs_by_name["condition"]
    assert set(KINDS) == {f.name for f in oneof.fields} == set(CONDITION_PROTOS)
    for name, kind in KINDS.items():
        assert kind.name == name
        assert kind_named(name) is kind
    assert {e.kind for e in EXAMPLES} == set(KINDS)


def test_an_unknown_kind_fails_validation_naming_it() -> None:
    raw = RawTrigger(
        trigger_id="stars", condition=RawHoroscope(), channel="email", purpose="marketing", template_id="t"
    )
    with pytest.raises(InvalidArgument) as caught:
        validate_trigger(raw)
    assert {v.field: v.description for v in caught.value.violations} == {
        "trigger.horoscope": "is not a condition kind this service supports"
    }


def test_an_unknown_stored_kind_is_an_error_naming_the_known_ones() -> None:
    with pytest.raises(UnknownConditionKind, match=r"'horoscope' \(known: absence, date, event"):
        kind_named("horoscope")


@pytest.mark.parametrize("condition", EXAMPLES, ids=lambda c: f"{c.kind}")
def test_every_kind_is_stored_as_json_and_read_back_equal(condition: Condition) -> None:
    import json

    kind = KINDS[condition.kind]
    stored = json.loads(json.dumps(kind.to_json(condition)))
    assert kind.from_json(stored) == condition


@pytest.mark.parametrize("condition", EXAMPLES, ids=lambda c: f"{c.kind}")
def test_every_kind_goes_to_its_proto_and_back_through_validation(condition: Condition) -> None:
    t = trigger_pb2.Trigger(**condition_fields(condition))
    assert t.WhichOneof("condition") == condition.kind
    t = trigger_pb2.Trigger.FromString(t.SerializeToString())
    raw = RawTrigger(
        trigger_id="t", condition=raw_condition(t), channel="email", purpose="marketing", template_id="x"
    )
    assert validate_trigger(raw).condition == condition


def test_no_condition_set_is_none_and_the_oneof_is_named_with_every_kind() -> None:
    assert raw_condition(trigger_pb2.Trigger()) is None
    with pytest.raises(InvalidArgument) as caught:
        validate_trigger(RawTrigger(trigger_id="t", channel="email", purpose="marketing", template_id="x"))
    [violation] = caught.value.violations
    assert violation.field == "trigger.condition"
    assert all(name in violation.description for name in KINDS)


def test_an_empty_condition_struct_is_no_condition() -> None:
    t = trigger_pb2.Trigger(event=trigger_pb2.EventCondition(event_type="purchase", condition=to_struct({})))
    assert raw_condition(t) == RawEvent("purchase", None)


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(1, -1), (-1, 1), (0, 1_000_000_000)],
)
def test_a_duration_that_is_no_duration_is_named(seconds: int, nanos: int) -> None:
    from google.protobuf import duration_pb2

    t = trigger_pb2.Trigger(
        inactivity=trigger_pb2.InactivityCondition(
            event_types=["gym_check_in"], duration=duration_pb2.Duration(seconds=seconds, nanos=nanos)
        )
    )
    raw = raw_condition(t)
    assert raw == RawInactivity(("gym_check_in",), INVALID_DURATION)
    with pytest.raises(InvalidArgument) as caught:
        validate_trigger(
            RawTrigger(trigger_id="t", condition=raw, channel="email", purpose="marketing", template_id="x")
        )
    assert {v.field: v.description for v in caught.value.violations} == {
        "trigger.inactivity.duration": "is not a valid duration"
    }


@pytest.mark.parametrize(
    ("delay", "text"),
    [
        (timedelta(hours=4), "14400s"),
        (timedelta(seconds=1), "1s"),
        (timedelta(days=365), "31536000s"),
        (timedelta(days=1, seconds=1, microseconds=500_000), "86401.5s"),
        (timedelta(seconds=10, microseconds=1), "10.000001s"),
    ],
)
def test_durations_are_stored_exactly(delay: timedelta, text: str) -> None:
    assert duration_text(delay) == text


def test_conditions_compare_by_tree_not_by_closure() -> None:
    assert Event("page_view", TOYS) == Event(
        "page_view",
        Matcher(
            parse_condition(
                {"compare": {"field": "event.category", "op": "eq", "value": "toys"}}, trigger=True
            )
        ),
    )
    assert Event("page_view", TOYS) != Event("page_view")


def test_a_merge_settles_each_existing_trigger_by_its_kind_and_leaves_deleted_ones_out() -> None:
    state = TriggerState(T0, "e2")
    plan = plan_merge(
        {"cart": "absence", "views": "event"},
        {"cart": state, "deleted": state},
        {},
        [
            PendingTimer("cart", "e1", T0 - timedelta(hours=1)),
            PendingTimer("deleted", "e3", T0),
            PendingTimer("views", "v1", T0),
        ],
        merged_profile_id="anon",
    )
    assert plan.states == {"cart": state}
    assert plan.retire == [RetireTimer("cart", "e1", "superseded", "superseded by e2 on merge of anon")]
