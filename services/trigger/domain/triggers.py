"""Trigger definitions: validation, idempotent creation and list paging, as pure functions.

The servicer turns a protobuf `Trigger` into a `RawTrigger`; `validate_trigger`
either returns a normalised `TriggerDef` or raises `InvalidArgument` naming every
offending field with its proto path (`trigger.absence.delay`, `trigger.channel`, ...).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from relevans.kit.errors import AlreadyExists, FieldViolation, InvalidArgument, Violations

TRIGGER_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# The event types the profile service accepts; a trigger on any other type could never fire.
EVENT_TYPE_RE = re.compile(r"^[a-z][a-z0-9_.:-]{0,63}$")
MIN_DELAY = timedelta(seconds=1)
MAX_DELAY = timedelta(days=90)
MAX_DISPLAY_NAME_CHARS = 200
MAX_TEMPLATE_ID_CHARS = 128

# Channels and purposes by their proto enum names without prefix, lower-case ("email", "marketing").
SUPPORTED_CHANNELS = ("email",)
SENDING_PURPOSES = ("marketing", "transactional")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100


@dataclass(frozen=True, slots=True)
class RawAbsence:
    start_event_type: str = ""
    cancel_event_type: str = ""
    delay: timedelta | None = None
    # True when the client sent a Duration that is not a valid duration (mixed signs, nanos overflow).
    bad_delay: bool = False


@dataclass(frozen=True, slots=True)
class RawTrigger:
    """A trigger as the client sent it, before any check."""

    trigger_id: str = ""
    display_name: str = ""
    absence: RawAbsence | None = None
    channel: str = "unspecified"
    purpose: str = "unspecified"
    template_id: str = ""


@dataclass(frozen=True, slots=True)
class Absence:
    """`start_event_type` not followed by `cancel_event_type` within `delay` (the abandoned cart)."""

    start_event_type: str
    cancel_event_type: str
    delay: timedelta


@dataclass(frozen=True, slots=True)
class TriggerDef:
    """A valid trigger definition. `created_at` is set once it is stored."""

    trigger_id: str
    display_name: str
    absence: Absence
    channel: str
    purpose: str
    template_id: str
    created_at: datetime | None = None

    def same_definition(self, other: TriggerDef) -> bool:
        """Equal in everything the client chose (the creation time is the service's)."""
        return (
            self.trigger_id == other.trigger_id
            and self.display_name == other.display_name
            and self.absence == other.absence
            and self.channel == other.channel
            and self.purpose == other.purpose
            and self.template_id == other.template_id
        )


def validate_trigger_id(value: str, field: str, v: Violations) -> None:
    if not value:
        v.add(field, "is required")
    elif not TRIGGER_ID_RE.match(value):
        v.add(field, f"must match {TRIGGER_ID_RE.pattern} (lower-case letters, digits, - and _)")


def check_trigger_id(value: str, field: str = "trigger_id") -> str:
    """A trigger id from a Get/Delete request, or InvalidArgument."""
    v = Violations()
    validate_trigger_id(value, field, v)
    v.raise_if_any()
    return value


def _event_type(value: str, field: str, v: Violations) -> None:
    if not value:
        v.add(field, "is required")
    elif not EVENT_TYPE_RE.match(value):
        v.add(field, f"must be an event type matching {EVENT_TYPE_RE.pattern}")


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
    a = raw.absence
    if a is None:
        v.add("trigger.absence", "a condition is required; only absence triggers are supported for now")
    else:
        _event_type(a.start_event_type, "trigger.absence.start_event_type", v)
        _event_type(a.cancel_event_type, "trigger.absence.cancel_event_type", v)
        if a.start_event_type and a.start_event_type == a.cancel_event_type:
            v.add("trigger.absence.cancel_event_type", "must differ from start_event_type")
        if a.bad_delay:
            v.add("trigger.absence.delay", "is not a valid duration")
        elif a.delay is None:
            v.add("trigger.absence.delay", "is required")
        elif not MIN_DELAY <= a.delay <= MAX_DELAY:
            v.add("trigger.absence.delay", "must be between 1 second and 90 days")
    if raw.channel == "unspecified":
        v.add("trigger.channel", "is required")
    elif raw.channel not in SUPPORTED_CHANNELS:
        v.add("trigger.channel", "only CHANNEL_EMAIL is supported for now")
    if raw.purpose == "unspecified":
        v.add("trigger.purpose", "is required")
    elif raw.purpose not in SENDING_PURPOSES:
        v.add("trigger.purpose", "must be PURPOSE_MARKETING or PURPOSE_TRANSACTIONAL")
    template_id = raw.template_id.strip()
    if not template_id:
        v.add("trigger.template_id", "is required")
    elif len(template_id) > MAX_TEMPLATE_ID_CHARS:
        v.add("trigger.template_id", f"must be at most {MAX_TEMPLATE_ID_CHARS} characters")
    v.raise_if_any()
    assert a is not None and a.delay is not None
    return TriggerDef(
        trigger_id=raw.trigger_id,
        display_name=display_name,
        absence=Absence(a.start_event_type, a.cancel_event_type, a.delay),
        channel=raw.channel,
        purpose=raw.purpose,
        template_id=template_id,
    )


def resolve_create(existing: TriggerDef, requested: TriggerDef) -> TriggerDef:
    """CreateTrigger on an id already taken: the stored trigger if the definitions match."""
    if existing.same_definition(requested):
        return existing
    raise AlreadyExists(
        f"trigger {requested.trigger_id!r} already exists with a different definition; "
        "delete it first or choose another trigger_id"
    )


# ---- paging ------------------------------------------------------------------------------------


def page_size(requested: int) -> int:
    """0 means the default; larger than the maximum is clamped; negative is invalid."""
    if requested < 0:
        raise InvalidArgument(FieldViolation("page_size", "must not be negative"))
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def encode_page_token(last_trigger_id: str) -> str:
    body = json.dumps({"after": last_trigger_id}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(body).decode().rstrip("=")


def decode_page_token(token: str) -> str | None:
    """The trigger id the page starts after; None for the first page; InvalidArgument if forged."""
    if not token:
        return None
    try:
        body = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        after = json.loads(body)["after"]
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise InvalidArgument(FieldViolation("page_token", "is not a token this service issued")) from exc
    if not isinstance(after, str) or not TRIGGER_ID_RE.match(after):
        raise InvalidArgument(FieldViolation("page_token", "is not a token this service issued"))
    return after
