"""What the trigger service needs of an enriched event, and what a timer carries of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class EventFacts:
    """What the trigger service needs of an enriched event."""

    tenant_id: str
    event_id: str
    profile_id: str
    event_type: str
    occurred_at: datetime
    properties: dict[str, Any] = field(default_factory=dict)


def timer_variables(event: EventFacts) -> dict[str, Any]:
    """The template variables a timer carries to its delivery request."""
    return {
        "event": dict(event.properties),
        "event_type": event.event_type,
        "event_id": event.event_id,
        "event_time": event.occurred_at.isoformat(),
    }
