"""Each condition kind's proto message <-> its raw and stored definition, keyed by kind name.

The kind's name is the field of the `condition` oneof of `relevans.trigger.v1.Trigger`
(`absence = 3` is the absence kind). The domain kinds know no protobuf; this is the one
place that does, one pair of functions per kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from relevans.kit.errors import FieldViolation, InvalidArgument
from relevans.kit.proto import checked_duration, to_duration
from relevans.trigger.v1 import trigger_pb2
from services.trigger.domain import Condition, RawCondition
from services.trigger.domain.kinds.absence import Absence, RawAbsence


@dataclass(frozen=True, slots=True)
class ConditionProto:
    # The oneof variant as the client sent it -> what the kind validates.
    raw: Callable[[Any], RawCondition]
    # A stored definition -> the oneof variant to answer with.
    message: Callable[[Any], Any]


def _raw_absence(a: trigger_pb2.AbsenceCondition) -> RawAbsence:
    delay, bad = checked_duration(a.delay) if a.HasField("delay") else (None, False)
    return RawAbsence(
        start_event_type=a.start_event_type,
        cancel_event_type=a.cancel_event_type,
        delay=delay,
        bad_delay=bad,
    )


def _absence_message(a: Absence) -> trigger_pb2.AbsenceCondition:
    return trigger_pb2.AbsenceCondition(
        start_event_type=a.start_event_type,
        cancel_event_type=a.cancel_event_type,
        delay=to_duration(a.delay),
    )


CONDITION_PROTOS: dict[str, ConditionProto] = {
    "absence": ConditionProto(raw=_raw_absence, message=_absence_message),
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
