"""Trigger definitions, idempotent creation and list paging, as pure functions.

A trigger is its own fields (id, channel, purpose, template) and one condition, whose kind
(`services.trigger.domain.kinds`) defines what it means; `validation.validate_trigger` turns a
`RawTrigger` into a `TriggerDef`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar, Protocol

from relevans.kit.errors import AlreadyExists, FieldViolation, InvalidArgument, Violations
from relevans.kit.paging import PageSize, decode_page_token
from relevans.kit.resource_ids import RESOURCE_ID_RE, resource_id_problem
from services.trigger.domain.policies import RawTriggerPolicy, TriggerPolicy


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
    # None: the defaults. Validated by `validation` into a `TriggerPolicy`.
    policy: RawTriggerPolicy | None = None


@dataclass(frozen=True, slots=True)
class TriggerDef:
    """A valid trigger definition. `created_at` is set once it is stored."""

    trigger_id: str
    display_name: str
    condition: Condition
    channel: str
    purpose: str
    template_id: str
    policy: TriggerPolicy = field(default_factory=TriggerPolicy)
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
            and self.policy == other.policy
        )


def validate_trigger_id(value: str, field: str, v: Violations) -> None:
    problem = resource_id_problem(value)
    if problem:
        v.add(field, problem)


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

TRIGGER_PAGES = PageSize(default=50, maximum=100)


def page_after(token: str) -> str | None:
    """The trigger id a page starts after (the token is `encode_page_token(after=<trigger id>)`);
    None for the first page; InvalidArgument on `page_token` if forged."""
    data = decode_page_token(token, after=str)
    if data is None:
        return None
    after: str = data["after"]
    if not RESOURCE_ID_RE.fullmatch(after):
        raise InvalidArgument(FieldViolation("page_token", "is not a token this service issued"))
    return after
