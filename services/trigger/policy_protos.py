"""`relevans.trigger.v1.Policy` and `TriggerPolicy` <-> the domain's `TenantPolicy` and
`TriggerPolicy`.

The client's message becomes a raw domain value (enum numbers as their lower-case names, a
Duration no timedelta holds as `BAD_DURATION`); the domain validates it, naming each offending
field under the prefix given (`policy.caps[0].max_messages`, `trigger.policy.reentry.period`).
"""

from __future__ import annotations

from google.protobuf import duration_pb2
from google.protobuf.message import Message

from relevans.common.v1 import common_pb2
from relevans.kit.enums import enum_name, enum_value
from relevans.kit.errors import Violations, check_count
from relevans.kit.proto import checked_duration, to_duration, to_timestamp
from relevans.trigger.v1 import trigger_pb2
from services.trigger.domain.policies import QuietHours, TenantPolicy, TriggerPolicy, quiet_hours_text
from services.trigger.domain.policy_validation import (
    BAD_DURATION,
    MAX_CAPS,
    RawCap,
    RawDuration,
    RawQuietHours,
    RawReentry,
    RawTenantPolicy,
    RawTriggerPolicy,
    validate_tenant_policy,
    validate_trigger_policy,
)

POLICY_FIELD = "policy"
TRIGGER_POLICY_FIELD = "trigger.policy"


def tenant_policy(msg: trigger_pb2.Policy, field: str = POLICY_FIELD) -> TenantPolicy:
    """SetPolicy's policy as the domain's, or InvalidArgument naming every offending field."""
    check_count(f"{field}.caps", len(msg.caps), MAX_CAPS)
    v = Violations()
    policy = validate_tenant_policy(raw_tenant_policy(msg), field, v)
    v.raise_if_any()
    assert policy is not None
    return policy


def trigger_policy(
    msg: trigger_pb2.TriggerPolicy | None, v: Violations, field: str = TRIGGER_POLICY_FIELD
) -> TriggerPolicy | None:
    """A trigger's policy as the domain's (the defaults when unset), or None with its problems in `v`."""
    return validate_trigger_policy(None if msg is None else raw_trigger_policy(msg), field, v)


def raw_tenant_policy(msg: trigger_pb2.Policy) -> RawTenantPolicy:
    return RawTenantPolicy(
        caps=tuple(_raw_cap(c) for c in msg.caps),
        quiet_hours=_raw_quiet_hours(msg),
        quiet_hours_include_transactional=msg.quiet_hours_include_transactional,
        default_time_zone=msg.default_time_zone,
        time_zone_trait=msg.time_zone_trait,
        default_expiry=_duration(msg, "default_expiry"),
        late_event_window=_duration(msg, "late_event_window"),
    )


def raw_trigger_policy(msg: trigger_pb2.TriggerPolicy) -> RawTriggerPolicy:
    """What `RawTrigger.policy` holds for `validation` to check."""
    return RawTriggerPolicy(
        priority=msg.priority,
        reentry=RawReentry(
            mode=enum_name(trigger_pb2.ReentryMode, msg.reentry.mode, "REENTRY_MODE_"),
            period=_duration(msg.reentry, "period"),
        )
        if msg.HasField("reentry")
        else None,
        capped_action=enum_name(trigger_pb2.CappedAction, msg.capped_action, "CAPPED_ACTION_"),
        expiry=_duration(msg, "expiry"),
        quiet_hours=_raw_quiet_hours(msg),
        ignore_quiet_hours=msg.ignore_quiet_hours,
    )


def policy_message(p: TenantPolicy) -> trigger_pb2.Policy:
    """GetPolicy's and SetPolicy's answer."""
    return trigger_pb2.Policy(
        caps=[
            trigger_pb2.FrequencyCap(
                channel=enum_value(common_pb2.Channel, c.channel, "CHANNEL_"),  # ALL_CHANNELS: unspecified
                max_messages=c.max_messages,
                **({"calendar_day": True} if c.rolling is None else {"rolling": to_duration(c.rolling)}),
            )
            for c in p.caps
        ],
        quiet_hours=_quiet_hours_message(p.quiet_hours),
        quiet_hours_include_transactional=p.quiet_hours_include_transactional,
        default_time_zone=p.default_time_zone,
        time_zone_trait=p.time_zone_trait,
        default_expiry=to_duration(p.default_expiry),
        late_event_window=to_duration(p.late_event_window),
        update_time=to_timestamp(p.updated_at),
    )


def trigger_policy_message(p: TriggerPolicy) -> trigger_pb2.TriggerPolicy:
    """A trigger's policy as `Trigger.policy` carries it (every field set, defaults included)."""
    return trigger_pb2.TriggerPolicy(
        priority=p.priority,
        reentry=trigger_pb2.ReentryRule(
            mode=enum_value(trigger_pb2.ReentryMode, p.reentry.mode, "REENTRY_MODE_"),
            period=to_duration(p.reentry.period) if p.reentry.period else None,
        ),
        capped_action=enum_value(trigger_pb2.CappedAction, p.capped_action, "CAPPED_ACTION_"),
        expiry=None if p.expiry is None else to_duration(p.expiry),
        quiet_hours=_quiet_hours_message(p.quiet_hours),
        ignore_quiet_hours=p.ignore_quiet_hours,
    )


def _raw_cap(c: trigger_pb2.FrequencyCap) -> RawCap:
    window = c.WhichOneof("window")
    return RawCap(
        channel=enum_name(common_pb2.Channel, c.channel, "CHANNEL_"),
        max_messages=c.max_messages,
        calendar_day=window == "calendar_day" and c.calendar_day,
        rolling=_duration(c, "rolling"),
    )


def _duration(msg: Message, name: str) -> RawDuration:
    if not msg.HasField(name):
        return None
    d: duration_pb2.Duration = getattr(msg, name)
    value, bad = checked_duration(d)
    return BAD_DURATION if bad else value


def _raw_quiet_hours(msg: trigger_pb2.Policy | trigger_pb2.TriggerPolicy) -> RawQuietHours | None:
    if not msg.HasField("quiet_hours"):
        return None
    return RawQuietHours(msg.quiet_hours.start, msg.quiet_hours.end)


def _quiet_hours_message(q: QuietHours | None) -> trigger_pb2.QuietHours | None:
    if q is None:
        return None
    start, end = quiet_hours_text(q)
    return trigger_pb2.QuietHours(start=start, end=end)
