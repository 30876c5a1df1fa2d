"""What a due timer sends: the delivery request, keyed so it is sent once per occurrence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class DueTimer:
    """A pending timer whose time has come, with the definition of its trigger (if it still exists)."""

    tenant_id: str
    trigger_id: str
    profile_id: str
    occurrence: str
    variables: dict[str, Any]
    channel: str | None
    purpose: str | None
    template_id: str | None


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


def idempotency_key(trigger_id: str, profile_id: str, occurrence: str) -> str:
    return f"{trigger_id}:{profile_id}:{occurrence}"


def fire(timer: DueTimer) -> Firing | None:
    """The request a due timer sends, or None when its trigger is gone (the timer is then cancelled)."""
    if timer.channel is None or timer.purpose is None or timer.template_id is None:
        return None
    return Firing(
        idempotency_key=idempotency_key(timer.trigger_id, timer.profile_id, timer.occurrence),
        tenant_id=timer.tenant_id,
        profile_id=timer.profile_id,
        trigger_id=timer.trigger_id,
        occurrence=timer.occurrence,
        channel=timer.channel,
        purpose=timer.purpose,
        template_id=timer.template_id,
        variables=dict(timer.variables),
    )
