"""The profile as readers see it, and validation of profile lookups."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from relevans.kit.errors import Violations
from services.profile.domain.consent import Consent
from services.profile.domain.events import check_email
from services.profile.domain.identity import CUSTOMER_ID, EMAIL, Enriched

MAX_BATCH_PROFILES = 1000
PROFILE_ID = "profile_id"


@dataclass(frozen=True, slots=True)
class Profile:
    profile_id: str
    customer_id: str | None
    email: str | None
    first_name: str | None
    anonymous_ids: tuple[str, ...]
    consents: tuple[Consent, ...]
    created_at: datetime
    updated_at: datetime
    last_seen_at: datetime | None
    enriched: Enriched = field(default_factory=Enriched)
    # Every source's value of every trait; loaded only when asked for.
    trait_sources: tuple[TraitValue, ...] = ()
    # E.164 (imports normalise it).
    phone: str | None = None


@dataclass(frozen=True, slots=True)
class TraitValue:
    name: str
    source: str
    value: object
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Lookup:
    """How GetProfile finds its profile: by PROFILE_ID, CUSTOMER_ID or EMAIL."""

    kind: str
    value: str


def validate_lookup(profile_id: str, customer_id: str, email: str) -> Lookup:
    """Exactly one of profile_id, customer_id and email; the email is normalised."""
    given = [
        (name, value)
        for name, value in (("profile_id", profile_id), ("customer_id", customer_id), ("email", email))
        if value
    ]
    v = Violations()
    if not given:
        v.add("profile_id", "exactly one of profile_id, customer_id or email is required")
    for name, _ in given[1:]:
        v.add(
            name, f"exactly one of profile_id, customer_id or email is allowed; {given[0][0]} is already set"
        )
    v.raise_if_any()
    name, value = given[0]
    if name == "email":
        normalized = check_email(value, "email", v)
        v.raise_if_any()
        assert normalized is not None
        return Lookup(EMAIL, normalized)
    return Lookup(PROFILE_ID if name == "profile_id" else CUSTOMER_ID, value)


def validate_profile_ids(profile_ids: Sequence[str]) -> list[str]:
    """At most MAX_BATCH_PROFILES ids; empty ones dropped, duplicates kept once, order kept."""
    if len(profile_ids) > MAX_BATCH_PROFILES:
        v = Violations()
        v.add("profile_ids", f"at most {MAX_BATCH_PROFILES} ids per call, got {len(profile_ids)}")
        v.raise_if_any()
    return list(dict.fromkeys(p for p in profile_ids if p))


# Fields of the Profile message a read mask may name.
PROFILE_FIELDS = (
    "profile_id",
    "customer_id",
    "email",
    "first_name",
    "anonymous_ids",
    "consents",
    "create_time",
    "update_time",
    "last_seen_time",
    "traits",
    "trait_sources",
    "tags",
    "counters",
    "score",
    "last_seen",
    "phone",
)
# What an empty read mask returns: every field but the per-source trait values.
DEFAULT_FIELDS = frozenset(PROFILE_FIELDS) - {"trait_sources"}


def validate_read_mask(paths: Sequence[str]) -> frozenset[str]:
    """The profile fields to return; profile_id always is."""
    if not paths:
        return DEFAULT_FIELDS
    v = Violations()
    for i, path in enumerate(paths):
        if path not in PROFILE_FIELDS:
            v.add(f"read_mask.paths[{i}]", f"unknown field {path[:64]!r}; one of {', '.join(PROFILE_FIELDS)}")
    v.raise_if_any()
    return frozenset(paths) | {"profile_id"}
