"""The segment kind: the wanted transition fires, keyed by the change."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from relevans.kit.errors import InvalidArgument
from services.trigger.domain import (
    Context,
    RawTrigger,
    ScheduleTimer,
    SegmentChange,
    TriggerDef,
    validate_trigger,
)
from services.trigger.domain.kinds.segment import SEGMENT, RawSegment

T0 = datetime(2026, 5, 1, 12, tzinfo=UTC)
CTX = Context(now=T0)


def trigger(raw: RawSegment) -> TriggerDef:
    return validate_trigger(
        RawTrigger(trigger_id="s", condition=raw, channel="web", purpose="marketing", template_id="t")
    )


ENTER = trigger(RawSegment("big-spenders", "entered"))
EXIT = trigger(RawSegment("big-spenders", "exited"))


def seg(entered: bool, at: datetime = T0) -> SegmentChange:
    return SegmentChange("shop", "p1", "big-spenders", entered, "e1", at)


def test_the_wanted_transition_fires_keyed_by_the_change() -> None:
    d = SEGMENT.decide(ENTER, seg(True), None, CTX)
    (s,) = d.intents
    assert isinstance(s, ScheduleTimer)
    assert (s.occurrence, s.due_at) == ("segment:big-spenders:in:e1", T0)
    assert [(n.outcome, n.reason_code, n.event_id) for n in d.notes] == [("fired", "segment_entered", "e1")]
    assert SEGMENT.decide(EXIT, seg(False), None, CTX).intents[0].occurrence == "segment:big-spenders:out:e1"  # type: ignore[union-attr]


def test_the_other_transition_does_nothing_and_a_late_one_fires_nothing() -> None:
    assert SEGMENT.decide(ENTER, seg(False), None, CTX).intents == ()
    d = SEGMENT.decide(ENTER, seg(True, T0 - timedelta(days=2)), None, CTX)
    assert d.intents == () and [n.reason_code for n in d.notes] == ["late_event"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (RawSegment("", "entered"), {"trigger.segment.segment_id"}),
        (RawSegment("Big Spenders", "entered"), {"trigger.segment.segment_id"}),
        (RawSegment("b"), {"trigger.segment.transition"}),
        (RawSegment("b", "7"), {"trigger.segment.transition"}),
    ],
)
def test_validation_names_the_field(raw: RawSegment, expected: set[str]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        trigger(raw)
    assert {v.field for v in caught.value.violations} == expected


def test_routes_no_state_nothing_to_merge() -> None:
    assert SEGMENT.routes(ENTER.condition, CTX) == {"segment:big-spenders"}
    assert SEGMENT.state_from_json(SEGMENT.state_to_json(None)) is None
    assert SEGMENT.plan_merge({}, {}, [], merged_profile_id="x").retire == []
