"""Merging two profiles of one person: who survives and how their data combine.

The rule (README, "Identity"): the surviving profile is the one with a customer_id (the
business key); when both or neither have one, the older one survives (earlier created_at,
then the smaller profile_id). The merged-away profile's identities, events, consent ledger,
tags and traits move to the survivor; its first name only when the survivor has none. The
consents' current view keeps the most recent decision per (purpose, channel); decisions
recorded at the same instant are ordered by status, source and evidence, so the outcome does
not depend on which profile held which.

`survivor_rank`, `choose_survivor` and `combine_consents` are pure and order-independent:
merging a set of profiles in any order ends with the same survivor and the same consents,
tags and identities (`merge_profiles`, tested by property in tests/unit/test_profile_merge.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

from relevans.kit.errors import FailedPrecondition, Violations
from services.profile.domain.consent import Consent

# ProfileMerged.reason
REASON_ANONYMOUS = "anonymous_id"
REASON_KNOWN = "customer_id_and_email"
REASON_REQUEST = "merge_request"


class Rankable(Protocol):
    @property
    def profile_id(self) -> str: ...

    @property
    def customer_id(self) -> str | None: ...

    @property
    def created_at(self) -> datetime | None: ...


def survivor_rank(p: Rankable) -> tuple[bool, datetime, str]:
    """Smaller survives: a profile with a customer_id first, then the older, then the smaller id."""
    return (not p.customer_id, p.created_at or datetime.max, p.profile_id)


P = TypeVar("P", bound=Rankable)


def choose_survivor(a: P, b: P) -> tuple[P, P]:
    """(survivor, merged away) of two profiles."""
    return (a, b) if survivor_rank(a) <= survivor_rank(b) else (b, a)


def _consent_order(c: Consent) -> tuple[datetime, str, str, str]:
    return (c.recorded_at, c.status, c.source, c.evidence)


def combine_consents(*views: Iterable[Consent]) -> tuple[Consent, ...]:
    """The current view of merged profiles: the most recent decision per (purpose, channel)."""
    latest: dict[tuple[str, str], Consent] = {}
    for view in views:
        for c in view:
            prev = latest.get(c.key)
            if prev is None or _consent_order(c) > _consent_order(prev):
                latest[c.key] = c
    return tuple(latest[k] for k in sorted(latest))


def consents_taken_over(survivor: Iterable[Consent], merged: Iterable[Consent]) -> list[Consent]:
    """The merged-away profile's current decisions that become the survivor's current ones."""
    own = {c.key: c for c in survivor}
    return [c for c in combine_consents(own.values(), merged) if own.get(c.key) != c]


@dataclass(frozen=True, slots=True)
class MergeProfile:
    """A profile as far as merging is concerned."""

    profile_id: str
    customer_id: str | None
    created_at: datetime
    first_name: str | None = None
    consents: tuple[Consent, ...] = ()
    tags: frozenset[str] = frozenset()
    # (kind, value)
    identities: frozenset[tuple[str, str]] = frozenset()
    # Profile ids merged into this one (itself included).
    members: frozenset[str] = frozenset()


def merge_profiles(a: MergeProfile, b: MergeProfile) -> MergeProfile:
    """The survivor of `a` and `b` with the other's data; merging a profile with itself changes nothing."""
    survivor, merged = choose_survivor(a, b)
    return MergeProfile(
        profile_id=survivor.profile_id,
        customer_id=survivor.customer_id or merged.customer_id,
        created_at=survivor.created_at,
        first_name=survivor.first_name or merged.first_name,
        consents=combine_consents(survivor.consents, merged.consents),
        tags=survivor.tags | merged.tags,
        identities=survivor.identities | merged.identities,
        members=survivor.members | merged.members | {survivor.profile_id, merged.profile_id},
    )


def validate_merge_request(profile_id: str, other_profile_id: str) -> None:
    v = Violations()
    if not profile_id:
        v.add("profile_id", "is required")
    if not other_profile_id:
        v.add("other_profile_id", "is required")
    elif other_profile_id == profile_id:
        v.add("other_profile_id", "cannot merge a profile into itself")
    v.raise_if_any()


def check_mergeable(survivor: Rankable, merged: Rankable) -> None:
    """A person has one business key: two profiles with different customer ids stay apart."""
    if survivor.customer_id and merged.customer_id and survivor.customer_id != merged.customer_id:
        raise FailedPrecondition(
            f"profiles {survivor.profile_id} and {merged.profile_id} have different customer ids"
        )
