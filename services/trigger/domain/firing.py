"""What a person's due timers come to: the policies decide each (handed to delivery, deferred,
dropped), and each handed one becomes a delivery request keyed so it is sent once per occurrence.

`settle_person` is the one decision the timer worker makes per person, over every timer of theirs
that is due (the decision window: when a cap allows fewer than are due, priority chooses).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from services.trigger.domain.intents import Note, ScheduleTimer
from services.trigger.domain.kinds import KINDS
from services.trigger.domain.kinds.contract import Context, FiredTimer
from services.trigger.domain.policies import HANDED, DueMessage, Sent, TenantPolicy, decide_due, person_zone
from services.trigger.domain.triggers import TriggerDef


@dataclass(frozen=True, slots=True)
class DueTimer:
    """A pending timer whose time has come, with its trigger's definition (None: deleted)."""

    tenant_id: str
    trigger_id: str
    profile_id: str
    occurrence: str
    variables: dict[str, Any]
    due_at: datetime
    first_due_at: datetime
    trigger: TriggerDef | None


@dataclass(frozen=True, slots=True)
class Firing:
    """A delivery request to send: one per (trigger, profile, occurrence)."""

    idempotency_key: str
    tenant_id: str
    profile_id: str
    trigger_id: str
    occurrence: str
    channel: str
    purpose: str
    template_id: str
    variables: dict[str, Any]
    # The trigger's priority (delivery shows the highest of a person's banners first).
    priority: int = 0
    # When the moment has passed (first due + the trigger's own expiry); None when the trigger sets
    # none: the tenant's default expiry is about late sends, not how long a banner may wait.
    expire_at: datetime | None = None


def idempotency_key(trigger_id: str, profile_id: str, occurrence: str) -> str:
    return f"{trigger_id}:{profile_id}:{occurrence}"


def fire(timer: DueTimer, trigger: TriggerDef) -> Firing:
    return Firing(
        idempotency_key=idempotency_key(timer.trigger_id, timer.profile_id, timer.occurrence),
        tenant_id=timer.tenant_id,
        profile_id=timer.profile_id,
        trigger_id=timer.trigger_id,
        occurrence=timer.occurrence,
        channel=trigger.channel,
        purpose=trigger.purpose,
        template_id=trigger.template_id,
        variables=dict(timer.variables),
        priority=trigger.policy.priority,
        expire_at=None if trigger.policy.expiry is None else timer.first_due_at + trigger.policy.expiry,
    )


@dataclass(slots=True)
class Settled:
    """What the store writes for one person's due timers."""

    handed: list[tuple[DueTimer, Firing]] = field(default_factory=list)
    # (timer, new due time)
    deferred: list[tuple[DueTimer, datetime]] = field(default_factory=list)
    # (timer, status, reason): status "cancelled" (trigger deleted) or "dropped"
    retired: list[tuple[DueTimer, str, str]] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    # The idempotency key of each note ("" unless it handed a message).
    note_keys: list[str] = field(default_factory=list)
    # Timers that follow firings (a yearly date's next year).
    follow_ups: list[ScheduleTimer] = field(default_factory=list)


def settle_person(
    timers: Sequence[DueTimer],
    history: Sequence[Sent],
    policy: TenantPolicy,
    traits: Mapping[str, Any],
    consents: Mapping[tuple[str, str], str],
    now: datetime,
) -> Settled:
    """Decide one person's due timers together, by the tenant's policy (`policies.decide_due`)."""
    out = Settled()
    live: dict[tuple[str, str], DueTimer] = {}
    messages: list[DueMessage] = []
    for t in timers:
        if t.trigger is None:
            out.retired.append((t, "cancelled", "trigger deleted"))
            _note(out, t, "cancelled", "trigger_deleted", "the trigger was deleted", now)
            continue
        live[(t.trigger_id, t.occurrence)] = t
        messages.append(
            DueMessage(
                trigger_id=t.trigger_id,
                occurrence=t.occurrence,
                channel=t.trigger.channel,
                purpose=t.trigger.purpose,
                policy=t.trigger.policy,
                due_at=t.due_at,
                first_due_at=t.first_due_at,
            )
        )
    if not messages:
        return out
    ctx = Context(
        now=now,
        late_event_window=policy.late_event_window,
        default_time_zone=policy.default_time_zone,
        time_zone_trait=policy.time_zone_trait,
    )
    for verdict in decide_due(messages, history, policy, person_zone(traits, policy), now, consents):
        t = live[(verdict.message.trigger_id, verdict.message.occurrence)]
        trigger = t.trigger
        assert trigger is not None
        if verdict.outcome == HANDED:
            firing = fire(t, trigger)
            out.handed.append((t, firing))
            _note(
                out, t, verdict.outcome, verdict.reason_code, verdict.reason, now, key=firing.idempotency_key
            )
            follow = KINDS[trigger.condition.kind].after_fire(
                trigger,
                FiredTimer(t.tenant_id, t.trigger_id, t.profile_id, t.occurrence, t.due_at, t.variables),
                ctx,
            )
            if follow is not None:
                out.follow_ups.append(follow)
        elif verdict.until is not None:
            out.deferred.append((t, verdict.until))
            _note(out, t, verdict.outcome, verdict.reason_code, verdict.reason, now, until=verdict.until)
        else:
            out.retired.append((t, "dropped", verdict.reason))
            _note(out, t, verdict.outcome, verdict.reason_code, verdict.reason, now)
    return out


def _note(
    out: Settled,
    t: DueTimer,
    outcome: str,
    code: str,
    reason: str,
    now: datetime,
    *,
    key: str = "",
    until: datetime | None = None,
) -> None:
    out.notes.append(
        Note(
            tenant_id=t.tenant_id,
            trigger_id=t.trigger_id,
            profile_id=t.profile_id,
            outcome=outcome,
            reason_code=code,
            reason=reason,
            at=now,
            occurrence=t.occurrence,
            until=until,
        )
    )
    out.note_keys.append(key)
