"""The field paths a condition may name, the ops each kind of field allows, and the vocabulary
(event types, consent purposes, channels and statuses) they are checked against."""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

# Mirrors services.profile.domain.events.EVENT_TYPE_RE and consent.PURPOSES/CHANNELS/STATUSES (those
# modules pull in third-party validators; this one stays stdlib-only). A unit test keeps them in sync.
EVENT_TYPE_RE = re.compile(r"^[a-z][a-z0-9_.:-]{0,63}$")
PURPOSES = ("marketing", "transactional", "profiling")
CHANNELS = ("email", "sms", "web", "webhook")
STATUSES = ("granted", "denied", "withdrawn")

COUNTER_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
TRAIT_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
PROPERTY_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")

EQ, NE, LT, LE, GT, GE, IN, CONTAINS, EXISTS = "eq", "ne", "lt", "le", "gt", "ge", "in", "contains", "exists"
OPS = (EQ, NE, LT, LE, GT, GE, IN, CONTAINS, EXISTS)
ORDER_OPS = (LT, LE, GT, GE)
COUNT_OPS = (EQ, NE, LT, LE, GT, GE)

# Field kinds and the ops each allows. `event` (the event's properties) exists only in trigger
# conditions: a segment has no event.
TRAIT, TAG, COUNTER, SCORE, CONSENT, LAST_SEEN = "trait", "tag", "counter", "score", "consent", "last_seen"
EVENT = "event"
FIELD_OPS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        TRAIT: OPS,
        EVENT: OPS,
        TAG: (CONTAINS, IN),
        COUNTER: (EQ, NE, LT, LE, GT, GE, IN, EXISTS),
        SCORE: (EQ, NE, LT, LE, GT, GE, IN),
        CONSENT: (EQ, NE, IN, EXISTS),
        LAST_SEEN: (EQ, NE, LT, LE, GT, GE, EXISTS),
    }
)


def split_field(path: str) -> tuple[str, tuple[str, ...]] | None:
    """(kind, keys) for a valid field path, None otherwise: "consent.marketing.email" ->
    ("consent", ("marketing", "email"))."""
    if not isinstance(path, str):
        return None
    if path in (TAG, SCORE):
        return (path, ())
    head, dot, rest = path.partition(".")
    if not dot:
        return None
    if head == TRAIT and TRAIT_NAME_RE.match(rest):
        return (TRAIT, (rest,))
    if head == COUNTER and COUNTER_NAME_RE.match(rest):
        return (COUNTER, (rest,))
    if head == LAST_SEEN and EVENT_TYPE_RE.match(rest):
        return (LAST_SEEN, (rest,))
    if head == EVENT and PROPERTY_NAME_RE.fullmatch(rest):
        return (EVENT, (rest,))
    if head == CONSENT:
        purpose, dot2, channel = rest.partition(".")
        if dot2 and purpose in PURPOSES and channel in CHANNELS:
            return (CONSENT, (purpose, channel))
    return None


FIELD_HELP = (
    "must be trait.<name>, tag, counter.<name>, score, consent.<purpose>.<channel> or last_seen.<event_type>"
)


def field_help(path: object) -> str:
    """What is wrong with an invalid field path, as precisely as its head allows."""
    if isinstance(path, str):
        head = path.partition(".")[0]
        if head == TRAIT:
            return f"the trait name must match {TRAIT_NAME_RE.pattern}"
        if head == COUNTER:
            return f"the counter name must match {COUNTER_NAME_RE.pattern}"
        if head == LAST_SEEN:
            return f"the event type must match {EVENT_TYPE_RE.pattern}"
        if head == EVENT:
            return f"the property name must match {PROPERTY_NAME_RE.pattern}"
        if head == CONSENT:
            return f"must be consent.<{'|'.join(PURPOSES)}>.<{'|'.join(CHANNELS)}>"
    return FIELD_HELP
