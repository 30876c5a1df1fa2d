"""What reaches the trigger service's kinds: facts about a person (an event, a segment change, a
trait change), each routed to the triggers that react to it by a route key."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from relevans.conditions import ProfileView


def event_route(event_type: str) -> str:
    return f"event:{event_type}"


def segment_route(segment_id: str) -> str:
    return f"segment:{segment_id}"


def trait_route(trait_name: str) -> str:
    return f"trait:{trait_name}"


def _empty_view() -> ProfileView:
    return ProfileView()


@dataclass(frozen=True, slots=True)
class EventFacts:
    """An enriched event: what happened, and (decoded only when a condition asks) the profile as
    it was right after it."""

    tenant_id: str
    event_id: str
    profile_id: str
    event_type: str
    occurred_at: datetime
    properties: dict[str, Any] = field(default_factory=dict)
    # The profile right after the event, decoded on first use (most triggers never look).
    profile: Callable[[], ProfileView] = field(default=_empty_view, compare=False)

    @property
    def fact_id(self) -> str:
        return self.event_id

    @property
    def route(self) -> str:
        return event_route(self.event_type)


@dataclass(frozen=True, slots=True)
class SegmentChange:
    """A person entered (or left) a profile segment (`rv.profile.segments`)."""

    tenant_id: str
    profile_id: str
    segment_id: str
    entered: bool
    # The event that caused it (unique per change with segment_id and entered).
    event_id: str
    occurred_at: datetime

    @property
    def fact_id(self) -> str:
        return f"segment:{self.segment_id}:{'in' if self.entered else 'out'}:{self.event_id}"

    @property
    def route(self) -> str:
        return segment_route(self.segment_id)


@dataclass(frozen=True, slots=True)
class TraitChange:
    """One trait's effective value changed (`rv.profile.traits`); a change of several traits is
    one `TraitChange` per trait, all with the person's traits after the change."""

    tenant_id: str
    profile_id: str
    change_id: str
    name: str
    # None: the person had no value (before) / has none now (after).
    before: Any
    after: Any
    traits: Mapping[str, Any]
    occurred_at: datetime

    @property
    def fact_id(self) -> str:
        return f"trait:{self.change_id}:{self.name}"

    @property
    def route(self) -> str:
        return trait_route(self.name)


Fact = EventFacts | SegmentChange | TraitChange


def timer_variables(event: EventFacts) -> dict[str, Any]:
    """The template variables a timer carries to its delivery request."""
    return {
        "event": dict(event.properties),
        "event_type": event.event_type,
        "event_id": event.event_id,
        "event_time": event.occurred_at.isoformat(),
    }
