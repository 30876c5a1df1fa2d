"""Triggers of every condition kind, built as a client would send them."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from google.protobuf import duration_pb2, struct_pb2

from relevans.common.v1 import common_pb2
from relevans.kit.proto import to_struct, to_value
from relevans.trigger.v1 import trigger_pb2

TEMPLATE_ID = "moment"


def duration(d: timedelta) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromTimedelta(d)
    return out


def condition(data: dict[str, Any]) -> struct_pb2.Struct:
    return to_struct(data)


def equals(field: str, value: Any) -> dict[str, Any]:
    return {"compare": {"field": field, "op": "eq", "value": value}}


def trigger(
    trigger_id: str,
    *,
    purpose: int = common_pb2.PURPOSE_MARKETING,
    channel: int = common_pb2.CHANNEL_EMAIL,
    policy: trigger_pb2.TriggerPolicy | None = None,
    **kind: Any,
) -> trigger_pb2.Trigger:
    return trigger_pb2.Trigger(
        trigger_id=trigger_id,
        display_name=trigger_id.replace("-", " "),
        channel=channel,
        purpose=purpose,
        template_id=TEMPLATE_ID,
        policy=policy,
        **kind,
    )


def on_event(
    trigger_id: str, event_type: str, when: dict[str, Any] | None = None, **kw: Any
) -> trigger_pb2.Trigger:
    event = trigger_pb2.EventCondition(event_type=event_type)
    if when is not None:
        event.condition.CopyFrom(condition(when))
    return trigger(trigger_id, event=event, **kw)


def threshold(
    trigger_id: str,
    event_type: str,
    count: int,
    window: timedelta,
    when: dict[str, Any] | None = None,
    **kw: Any,
) -> trigger_pb2.Trigger:
    counted = trigger_pb2.EventCount(event_type=event_type, count=count, window=duration(window))
    if when is not None:
        counted.condition.CopyFrom(condition(when))
    return trigger(trigger_id, threshold=trigger_pb2.ThresholdCondition(event_count=counted), **kw)


def score_reaches(trigger_id: str, value: float, **kw: Any) -> trigger_pb2.Trigger:
    reached = trigger_pb2.ProfileValue(field="score", value=value)
    return trigger(trigger_id, threshold=trigger_pb2.ThresholdCondition(profile_value=reached), **kw)


def inactivity(trigger_id: str, event_types: list[str], lapse: timedelta, **kw: Any) -> trigger_pb2.Trigger:
    return trigger(
        trigger_id,
        inactivity=trigger_pb2.InactivityCondition(event_types=event_types, duration=duration(lapse)),
        **kw,
    )


def on_date(
    trigger_id: str,
    date_trait: str,
    local_time: str,
    *,
    offset_days: int = 0,
    yearly: bool = False,
    **kw: Any,
) -> trigger_pb2.Trigger:
    return trigger(
        trigger_id,
        date=trigger_pb2.DateCondition(
            date_trait=date_trait, offset_days=offset_days, yearly=yearly, local_time=local_time
        ),
        **kw,
    )


def on_segment(trigger_id: str, segment_id: str, entered: bool = True, **kw: Any) -> trigger_pb2.Trigger:
    transition = trigger_pb2.SEGMENT_TRANSITION_ENTERED if entered else trigger_pb2.SEGMENT_TRANSITION_EXITED
    return trigger(
        trigger_id, segment=trigger_pb2.SegmentCondition(segment_id=segment_id, transition=transition), **kw
    )


def on_trait(
    trigger_id: str, name: str, value: Any, transition: int = trigger_pb2.TRAIT_TRANSITION_TAKES, **kw: Any
) -> trigger_pb2.Trigger:
    return trigger(
        trigger_id,
        trait_change=trigger_pb2.TraitChangeCondition(
            trait_name=name, transition=transition, value=to_value(value)
        ),
        **kw,
    )
