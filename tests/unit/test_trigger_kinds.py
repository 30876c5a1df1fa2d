"""The condition-kind registry: every kind is known by one name everywhere, unknown kinds fail clearly."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import ClassVar

import pytest

from relevans.kit.errors import InvalidArgument
from relevans.trigger.v1 import trigger_pb2
from services.trigger.condition_protos import CONDITION_PROTOS, condition_fields, raw_condition
from services.trigger.domain import (
    PendingTimer,
    RawTrigger,
    RetireTimer,
    TriggerDef,
    plan_merge,
    validate_trigger,
)
from services.trigger.domain.kinds import KINDS, UnknownConditionKind, kind_named
from services.trigger.domain.kinds.absence import ABSENCE, Absence, RawAbsence, TriggerState

T0 = datetime(2026, 5, 1, 12, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class RawHoroscope:
    kind: ClassVar[str] = "horoscope"


def test_the_registry_lists_absence_under_its_name() -> None:
    assert KINDS == {"absence": ABSENCE}
    assert kind_named("absence") is ABSENCE


def test_every_kind_is_a_condition_variant_of_the_proto_with_its_conversion() -> None:
    oneof = trigger_pb2.Trigger.DESCRIPTOR.oneofs_by_name["condition"]
    assert set(KINDS) == {f.name for f in oneof.fields} == set(CONDITION_PROTOS)


def test_an_unknown_kind_fails_validation_naming_it() -> None:
    raw = RawTrigger(
        trigger_id="stars",
        condition=RawHoroscope(),
        channel="email",
        purpose="marketing",
        template_id="t",
    )
    with pytest.raises(InvalidArgument) as caught:
        validate_trigger(raw)
    assert {v.field: v.description for v in caught.value.violations} == {
        "trigger.horoscope": "is not a condition kind this service supports"
    }


def test_an_unknown_stored_kind_is_an_error_naming_the_known_ones() -> None:
    with pytest.raises(UnknownConditionKind, match=r"'horoscope' \(known: absence\)"):
        kind_named("horoscope")


@pytest.mark.parametrize(
    ("delay", "text"),
    [
        (timedelta(hours=4), "14400s"),
        (timedelta(seconds=1), "1s"),
        (timedelta(days=90), "7776000s"),
        (timedelta(days=1, seconds=1, microseconds=500_000), "86401.5s"),
        (timedelta(seconds=10, microseconds=1), "10.000001s"),
    ],
)
def test_an_absence_is_stored_as_json_and_read_back_equal(delay: timedelta, text: str) -> None:
    a = Absence("add_to_cart", "purchase", delay)
    stored = ABSENCE.to_json(a)
    assert stored == {"start_event_type": "add_to_cart", "cancel_event_type": "purchase", "delay": text}
    assert ABSENCE.from_json(stored) == a


def test_an_absence_goes_to_the_proto_and_back_through_its_conversion() -> None:
    a = Absence("add_to_cart", "purchase", timedelta(hours=4, microseconds=7))
    t = trigger_pb2.Trigger(**condition_fields(a))
    assert t.WhichOneof("condition") == "absence"
    assert raw_condition(t) == RawAbsence("add_to_cart", "purchase", a.delay)
    assert raw_condition(trigger_pb2.Trigger()) is None


def test_a_merge_settles_each_existing_trigger_by_its_kind_and_leaves_deleted_ones_out() -> None:
    state = TriggerState(T0, "e2")
    plan = plan_merge(
        {"cart": "absence"},
        {"cart": state, "deleted": state},
        {},
        [PendingTimer("cart", "e1", T0 - timedelta(hours=1)), PendingTimer("deleted", "e3", T0)],
        merged_profile_id="anon",
    )
    assert plan.states == {"cart": state}
    assert plan.retire == [RetireTimer("cart", "e1", "superseded", "superseded by e2 on merge of anon")]


def test_a_trigger_carries_its_kinds_definition() -> None:
    raw = RawTrigger(
        trigger_id="cart",
        condition=RawAbsence("add_to_cart", "purchase", timedelta(hours=1)),
        channel="email",
        purpose="marketing",
        template_id="t",
    )
    d = validate_trigger(raw)
    assert isinstance(d, TriggerDef)
    assert d.condition == Absence("add_to_cart", "purchase", timedelta(hours=1))
    assert ABSENCE.event_types(d.condition) == {"add_to_cart", "purchase"}
