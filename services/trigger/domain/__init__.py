"""The trigger service's pure domain: definitions, the event planner, condition kinds, firing. No I/O here."""

from services.trigger.domain.events import EventFacts, timer_variables
from services.trigger.domain.firing import DueTimer, Firing, fire, idempotency_key
from services.trigger.domain.intents import (
    CancelTimers,
    Intent,
    MergePlan,
    PendingTimer,
    RetireTimer,
    ScheduleTimer,
    StateKey,
)
from services.trigger.domain.planner import Plan, plan_events, plan_merge, relevant_events
from services.trigger.domain.triggers import (
    TRIGGER_PAGES,
    Condition,
    RawCondition,
    RawTrigger,
    TriggerDef,
    check_trigger_id,
    page_after,
    resolve_create,
)
from services.trigger.domain.validation import validate_trigger

__all__ = [
    "TRIGGER_PAGES",
    "CancelTimers",
    "Condition",
    "DueTimer",
    "EventFacts",
    "Firing",
    "Intent",
    "MergePlan",
    "PendingTimer",
    "Plan",
    "RawCondition",
    "RawTrigger",
    "RetireTimer",
    "ScheduleTimer",
    "StateKey",
    "TriggerDef",
    "check_trigger_id",
    "fire",
    "idempotency_key",
    "page_after",
    "plan_events",
    "plan_merge",
    "relevant_events",
    "resolve_create",
    "timer_variables",
    "validate_trigger",
]
