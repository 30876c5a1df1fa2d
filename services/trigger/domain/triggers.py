"""Trigger definitions, idempotent creation and list paging, as pure functions.

A trigger is its own fields (id, channel, purpose, template) and one condition, whose kind
(`services.trigger.domain.kinds`) defines what it means; `validation.validate_trigger` turns a
`RawTrigger` into a `TriggerDef`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar, Protocol

from relevans.kit.errors import AlreadyExists, FieldViolation, InvalidArgument, Violations

TRIGGER_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100


class Condition(Protocol):
    """A condition kind's validated definition (e.g. `Absence`); `kind` names its kind in the registry."""

    kind: ClassVar[str]


class RawCondition(Protocol):
    """A condition as the client sent it, before its kind checks it (e.g. `RawAbsence`)."""

    kind: ClassVar[str]


@dataclass(frozen=True, slots=True)
class RawTrigger:
    """A trigger as the client sent it, before any check."""

    trigger_id: str = ""
    display_name: str = ""
    condition: RawCondition | None = None
    channel: str = "unspecified"
    purpose: str = "unspecified"
    template_id: str = ""


@dataclass(frozen=True, slots=True)
class TriggerDef:
    """A valid trigger definition. `created_at` is set once it is stored."""

    trigger_id: str
    display_name: str
    condition: Condition
    channel: str
    purpose: str
    template_id: str
    created_at: datetime | None = None

    def same_definition(self, other: TriggerDef) -> bool:
        """Equal in everything the client chose (the creation time is the service's)."""
        return (
            self.trigger_id == other.trigger_id
            and self.display_name == other.display_name
            and self.condition == other.condition
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
