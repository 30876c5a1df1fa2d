"""The trigger service's pure domain: definitions, the fact planner, condition kinds, firing. No I/O here."""

from services.trigger.domain.events import EventFacts, Fact, SegmentChange, TraitChange, timer_variables
from services.trigger.domain.firing import DueTimer, Firing, fire, idempotency_key
from services.trigger.domain.intents import (
    CancelTimers,
    Intent,
    MergePlan,
    Note,
    PendingTimer,
    RetireTimer,
    ScheduleTimer,
    StateKey,
    WithdrawMessages,
)
from services.trigger.domain.kinds.contract import Context, Decision, FiredTimer
from services.trigger.domain.planner import Plan, plan_facts, plan_merge, relevant_facts, routes
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
    "Context",
    "Decision",
    "DueTimer",
    "EventFacts",
    "Fact",
    "FiredTimer",
    "Firing",
    "Intent",
    "MergePlan",
    "Note",
    "PendingTimer",
    "Plan",
    "RawCondition",
    "RawTrigger",
    "RetireTimer",
    "ScheduleTimer",
    "SegmentChange",
    "StateKey",
    "TraitChange",
    "TriggerDef",
    "WithdrawMessages",
    "check_trigger_id",
    "fire",
    "idempotency_key",
    "page_after",
    "plan_facts",
    "plan_merge",
    "relevant_facts",
    "resolve_create",
    "routes",
    "timer_variables",
    "validate_trigger",
]
