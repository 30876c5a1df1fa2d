"""Each condition kind's proto message <-> its raw and stored definition, keyed by kind name.

The kind's name is the field of the `condition` oneof of `relevans.trigger.v1.Trigger`
(`absence = 3` is the absence kind). The domain kinds know no protobuf; this is the one
place that does, one pair of functions per kind. A condition Struct that is unset or empty is
no condition (every event matches).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import struct_pb2

from relevans.kit.enums import enum_name, enum_value
from relevans.kit.errors import FieldViolation, InvalidArgument
from relevans.kit.proto import checked_duration, from_struct, from_value, to_duration, to_struct, to_value
from relevans.trigger.v1 import trigger_pb2
from services.trigger.domain import Condition, RawCondition
from services.trigger.domain.kinds.absence import Absence, RawAbsence
from services.trigger.domain.kinds.common import INVALID_DURATION, Matcher, RawDuration
from services.trigger.domain.kinds.date import DateCondition, RawDate
from services.trigger.domain.kinds.event import Event, RawEvent
from services.trigger.domain.kinds.inactivity import Inactivity, RawInactivity
from services.trigger.domain.kinds.segment import RawSegment, Segment
from services.trigger.domain.kinds.threshold import (
    EventCount,
    ProfileValue,
    RawEventCount,
    RawProfileValue,
    RawThreshold,
    Threshold,
)
from services.trigger.domain.kinds.trait_change import RawTraitChange, TraitChangeCondition

SEGMENT_PREFIX = "SEGMENT_TRANSITION_"
TRAIT_PREFIX = "TRAIT_TRANSITION_"


@dataclass(frozen=True, slots=True)
class ConditionProto:
    # The oneof variant as the client sent it -> what the kind validates.
    raw: Callable[[Any], RawCondition]
    # A stored definition -> the oneof variant to answer with.
    message: Callable[[Any], Any]


def _duration(message: Any, name: str) -> RawDuration:
    """A Duration field: None when unset; INVALID_DURATION for mixed signs or nanos out of range."""
    if not message.HasField(name):
        return None
    value, bad = checked_duration(getattr(message, name))
    return INVALID_DURATION if bad else value


def _struct(message: Any, name: str) -> dict[str, Any] | None:
    return (from_struct(getattr(message, name)) or None) if message.HasField(name) else None


def _condition_struct(m: Matcher | None) -> struct_pb2.Struct | None:
    return None if m is None else to_struct(m.to_json())


def _raw_absence(a: trigger_pb2.AbsenceCondition) -> RawAbsence:
    return RawAbsence(
        start_event_type=a.start_event_type,
        cancel_event_type=a.cancel_event_type,
        delay=_duration(a, "delay"),
        cancel_condition=_struct(a, "cancel_condition"),
        match_properties=tuple(a.match_properties),
    )


def _absence_message(a: Absence) -> trigger_pb2.AbsenceCondition:
    return trigger_pb2.AbsenceCondition(
        start_event_type=a.start_event_type,
        cancel_event_type=a.cancel_event_type,
        delay=to_duration(a.delay),
        cancel_condition=_condition_struct(a.cancel_condition),
        match_properties=a.match_properties,
    )


def _raw_event(e: trigger_pb2.EventCondition) -> RawEvent:
    return RawEvent(event_type=e.event_type, condition=_struct(e, "condition"))


def _event_message(e: Event) -> trigger_pb2.EventCondition:
    return trigger_pb2.EventCondition(event_type=e.event_type, condition=_condition_struct(e.condition))


def _raw_threshold(t: trigger_pb2.ThresholdCondition) -> RawThreshold:
    which = t.WhichOneof("measure")
    if which == "event_count":
        c = t.event_count
        return RawThreshold(
            event_count=RawEventCount(
                event_type=c.event_type,
                condition=_struct(c, "condition"),
                count=c.count,
                window=_duration(c, "window"),
            )
        )
    if which == "profile_value":
        return RawThreshold(profile_value=RawProfileValue(t.profile_value.field, t.profile_value.value))
    return RawThreshold()


def _threshold_message(t: Threshold) -> trigger_pb2.ThresholdCondition:
    m = t.measure
    if isinstance(m, EventCount):
        return trigger_pb2.ThresholdCondition(
            event_count=trigger_pb2.EventCount(
                event_type=m.event_type,
                condition=_condition_struct(m.condition),
                count=m.count,
                window=to_duration(m.window),
            )
        )
    assert isinstance(m, ProfileValue)
    return trigger_pb2.ThresholdCondition(
        profile_value=trigger_pb2.ProfileValue(field=m.field, value=m.value)
    )


def _raw_inactivity(i: trigger_pb2.InactivityCondition) -> RawInactivity:
    return RawInactivity(event_types=tuple(i.event_types), duration=_duration(i, "duration"))


def _inactivity_message(i: Inactivity) -> trigger_pb2.InactivityCondition:
    return trigger_pb2.InactivityCondition(event_types=i.event_types, duration=to_duration(i.duration))


def _raw_date(d: trigger_pb2.DateCondition) -> RawDate:
    return RawDate(
        date_trait=d.date_trait, offset_days=d.offset_days, yearly=d.yearly, local_time=d.local_time
    )


def _date_message(d: DateCondition) -> trigger_pb2.DateCondition:
    return trigger_pb2.DateCondition(
        date_trait=d.date_trait,
        offset_days=d.offset_days,
        yearly=d.yearly,
        local_time=d.local_time.strftime("%H:%M"),
    )


def _raw_segment(s: trigger_pb2.SegmentCondition) -> RawSegment:
    return RawSegment(
        segment_id=s.segment_id,
        transition=enum_name(trigger_pb2.SegmentTransition, s.transition, SEGMENT_PREFIX),
    )


def _segment_message(s: Segment) -> trigger_pb2.SegmentCondition:
    return trigger_pb2.SegmentCondition(
        segment_id=s.segment_id,
        transition=enum_value(trigger_pb2.SegmentTransition, s.transition, SEGMENT_PREFIX),
    )


def _raw_trait_change(t: trigger_pb2.TraitChangeCondition) -> RawTraitChange:
    return RawTraitChange(
        trait_name=t.trait_name,
        transition=enum_name(trigger_pb2.TraitTransition, t.transition, TRAIT_PREFIX),
        value=from_value(t.value) if t.HasField("value") else None,
    )


def _trait_change_message(t: TraitChangeCondition) -> trigger_pb2.TraitChangeCondition:
    return trigger_pb2.TraitChangeCondition(
        trait_name=t.trait_name,
        transition=enum_value(trigger_pb2.TraitTransition, t.transition, TRAIT_PREFIX),
        value=None if t.value is None else to_value(t.value),
    )


CONDITION_PROTOS: dict[str, ConditionProto] = {
    "absence": ConditionProto(raw=_raw_absence, message=_absence_message),
    "event": ConditionProto(raw=_raw_event, message=_event_message),
    "threshold": ConditionProto(raw=_raw_threshold, message=_threshold_message),
    "inactivity": ConditionProto(raw=_raw_inactivity, message=_inactivity_message),
    "date": ConditionProto(raw=_raw_date, message=_date_message),
    "segment": ConditionProto(raw=_raw_segment, message=_segment_message),
    "trait_change": ConditionProto(raw=_raw_trait_change, message=_trait_change_message),
}


def raw_condition(t: trigger_pb2.Trigger) -> RawCondition | None:
    """The condition set on `t` (None if none is), for its kind to validate."""
    which = t.WhichOneof("condition")
    if which is None:
        return None
    if which not in CONDITION_PROTOS:
        raise InvalidArgument(
            FieldViolation(f"trigger.{which}", "is not a condition kind this service supports")
        )
    return CONDITION_PROTOS[which].raw(getattr(t, which))


def condition_fields(condition: Condition) -> dict[str, Any]:
    """The `Trigger` constructor argument that sets the oneof to this condition."""
    return {condition.kind: CONDITION_PROTOS[condition.kind].message(condition)}
