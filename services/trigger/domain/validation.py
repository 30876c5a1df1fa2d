"""`validate_trigger`: a normalised `TriggerDef`, or InvalidArgument naming every offending field.

The trigger's own fields are checked here, its condition by its kind (through the registry),
each violation under its proto path (`trigger.absence.delay`, `trigger.channel`, ...).
"""

from __future__ import annotations

from relevans.kit.errors import Violations
from relevans.kit.resource_ids import resource_id_problem
from services.trigger.domain.kinds import KINDS
from services.trigger.domain.policies import TriggerPolicy, validate_trigger_policy
from services.trigger.domain.triggers import Condition, RawTrigger, TriggerDef, validate_trigger_id

MAX_DISPLAY_NAME_CHARS = 200

# Channels and purposes by their proto enum names without prefix, lower-case ("email", "marketing").
SUPPORTED_CHANNELS = ("email", "sms", "webhook", "web")
SENDING_PURPOSES = ("marketing", "transactional")


def validate_trigger(raw: RawTrigger | None) -> TriggerDef:
    """A normalised definition, or InvalidArgument naming every offending field."""
    v = Violations()
    if raw is None:
        v.add("trigger", "is required")
        v.raise_if_any()
    assert raw is not None
    validate_trigger_id(raw.trigger_id, "trigger.trigger_id", v)
    display_name = raw.display_name.strip()
    if len(display_name) > MAX_DISPLAY_NAME_CHARS:
        v.add("trigger.display_name", f"must be at most {MAX_DISPLAY_NAME_CHARS} characters")
    condition = _condition(raw, v)
    if raw.channel == "unspecified":
        v.add("trigger.channel", "is required")
    elif raw.channel not in SUPPORTED_CHANNELS:
        v.add("trigger.channel", "must be CHANNEL_EMAIL, CHANNEL_SMS, CHANNEL_WEBHOOK or CHANNEL_WEB")
    if raw.purpose == "unspecified":
        v.add("trigger.purpose", "is required")
    elif raw.purpose not in SENDING_PURPOSES:
        v.add("trigger.purpose", "must be PURPOSE_MARKETING or PURPOSE_TRANSACTIONAL")
    # The id delivery looks the template up by: the same rule, so a trigger cannot name a
    # template that no PutTemplate could have saved.
    template_id = raw.template_id.strip()
    problem = resource_id_problem(template_id)
    if problem:
        v.add("trigger.template_id", problem)
    policy = validate_trigger_policy(raw.policy, "trigger.policy", v)
    v.raise_if_any()
    assert condition is not None
    return TriggerDef(
        trigger_id=raw.trigger_id,
        display_name=display_name,
        condition=condition,
        channel=raw.channel,
        purpose=raw.purpose,
        template_id=template_id,
        policy=policy or TriggerPolicy(),
    )


def _condition(raw: RawTrigger, v: Violations) -> Condition | None:
    """The condition checked by its kind. None set: the oneof `condition` is named, with its kinds."""
    if raw.condition is None:
        v.add("trigger.condition", f"is required: set one of {', '.join(KINDS)}")
        return None
    kind = KINDS.get(raw.condition.kind)
    if kind is None:
        v.add(f"trigger.{raw.condition.kind}", "is not a condition kind this service supports")
        return None
    return kind.validate(raw.condition, f"trigger.{kind.name}", v)
