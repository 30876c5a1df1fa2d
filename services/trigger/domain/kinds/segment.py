"""The segment kind: a person enters (or leaves) a profile segment (`rv.profile.segments`).

Each wanted transition fires a message due when it happened, keyed by the change (segment, way,
causing event), so a redelivered change sends nothing new. A late change fires nothing. No state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from relevans.kit.errors import Violations
from relevans.kit.resource_ids import resource_id_problem
from services.trigger.domain.events import Fact, SegmentChange, segment_route
from services.trigger.domain.intents import ScheduleTimer
from services.trigger.domain.kinds.common import FIRED, Stateless, late_note, note
from services.trigger.domain.kinds.contract import NOTHING, Context, Decision
from services.trigger.domain.triggers import Condition, RawCondition, TriggerDef

ENTERED, EXITED = "entered", "exited"


@dataclass(frozen=True, slots=True)
class RawSegment:
    kind: ClassVar[str] = "segment"

    segment_id: str = ""
    # The SegmentTransition name without its prefix, lower-case ("entered"; "unspecified").
    transition: str = "unspecified"


@dataclass(frozen=True, slots=True)
class Segment:
    kind: ClassVar[str] = "segment"

    segment_id: str
    transition: str


def _segment(condition: Condition) -> Segment:
    assert isinstance(condition, Segment)
    return condition


class SegmentKind(Stateless):
    name = "segment"

    def validate(self, raw: RawCondition, field: str, v: Violations) -> Segment | None:
        assert isinstance(raw, RawSegment)
        before = len(v.items)
        problem = resource_id_problem(raw.segment_id)
        if problem:
            v.add(f"{field}.segment_id", problem)
        if raw.transition == "unspecified":
            v.add(f"{field}.transition", "is required")
        elif raw.transition not in (ENTERED, EXITED):
            v.add(f"{field}.transition", "must be SEGMENT_TRANSITION_ENTERED or SEGMENT_TRANSITION_EXITED")
        if len(v.items) > before:
            return None
        return Segment(raw.segment_id, raw.transition)

    def to_json(self, condition: Condition) -> dict[str, Any]:
        s = _segment(condition)
        return {"segment_id": s.segment_id, "transition": s.transition}

    def from_json(self, data: Mapping[str, Any]) -> Segment:
        return Segment(data["segment_id"], data["transition"])

    def routes(self, condition: Condition, ctx: Context) -> frozenset[str]:
        return frozenset((segment_route(_segment(condition).segment_id),))

    def decide(self, trigger: TriggerDef, fact: Fact, state: Any | None, ctx: Context) -> Decision:
        s = _segment(trigger.condition)
        if not isinstance(fact, SegmentChange) or fact.entered != (s.transition == ENTERED):
            return NOTHING
        if ctx.is_late(fact.occurred_at):
            return Decision(notes=(late_note(trigger, fact, ctx),))
        schedule = ScheduleTimer(
            tenant_id=fact.tenant_id,
            trigger_id=trigger.trigger_id,
            profile_id=fact.profile_id,
            occurrence=fact.fact_id,
            started_at=fact.occurred_at,
            due_at=fact.occurred_at,
            variables={"segment_id": s.segment_id, "transition": s.transition, "event_id": fact.event_id},
        )
        reason = f"{s.transition} segment {s.segment_id}"
        fired = note(
            trigger,
            fact,
            ctx,
            FIRED,
            f"segment_{s.transition}",
            reason,
            occurrence=fact.fact_id,
            until=fact.occurred_at,
        )
        return Decision((schedule,), notes=(fired,))


SEGMENT = SegmentKind()
