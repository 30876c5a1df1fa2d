"""On-site banners: what a placed banner is, which one a page is shown, and the inbox of every
person's waiting banners that `GetBanner` answers from. Pure: the rows, the bus and the clock
are the caller's.

The choice: among the person's banners for the asking placement that have not expired (by the
caller's clock) and were not withdrawn, the one of highest priority, then the newest. Consent
and suppression are kept by withdrawing: a consent withdrawal or an erasure takes the banner
out of the table, and so out of every inbox.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from relevans.kit.errors import FieldViolation, InvalidArgument
from relevans.kit.resource_ids import resource_id_problem

MAX_PERSON_ID_CHARS = 256
# People a call of `BannerInbox.prune` looks at when given a budget: a sweep of 100,000 at once held
# the event loop ~75 ms (bench/README.md, "Banners, second pass").
PRUNE_STEP = 5_000

# A site asks with a few placements again and again: each is checked once (bounded, as the
# placements asked for are the caller's choice).
_placement_problem = functools.lru_cache(maxsize=1024)(resource_id_problem)


def check_banner_request(profile_id: str, anonymous_id: str, placement: str) -> None:
    """GetBanner's question: exactly one of the person's ids, and a placement; else
    InvalidArgument naming every bad field."""
    v: list[FieldViolation] = []
    if profile_id and anonymous_id:
        v.append(FieldViolation("anonymous_id", "give profile_id or anonymous_id, not both"))
    elif not (profile_id or anonymous_id):
        v.append(FieldViolation("profile_id", "profile_id or anonymous_id is required"))
    for name, value in (("profile_id", profile_id), ("anonymous_id", anonymous_id)):
        if len(value) > MAX_PERSON_ID_CHARS:
            v.append(FieldViolation(name, f"must be at most {MAX_PERSON_ID_CHARS} characters"))
    problem = _placement_problem(placement)
    if problem:
        v.append(FieldViolation("placement", problem))
    if v:
        raise InvalidArgument(v)


@dataclass(frozen=True, slots=True)
class BannerContent:
    """What a web message carries besides its title and body: whose banner it is, where it shows,
    for how long, and which anonymous ids ask for it."""

    tenant_id: str
    trigger_id: str
    placement: str
    link_url: str
    priority: int
    purpose: str
    lifetime: timedelta
    # The moment's own end (the request's expire_time), None when the lifetime alone decides.
    expire_time: datetime | None
    anonymous_ids: tuple[str, ...]
    # When the trigger asked for the message; None when the request did not say.
    requested_at: datetime | None = None

    def expire_at(self, placed_at: datetime) -> datetime:
        """A banner expires at min(the moment's end, placed + the template's banner_lifetime)."""
        end = placed_at + self.lifetime
        return end if self.expire_time is None else min(end, self.expire_time)


@dataclass(frozen=True, slots=True)
class PlacedBanner:
    """A banner in a person's inbox, as the table holds it."""

    tenant_id: str
    message_id: str
    profile_id: str
    trigger_id: str
    placement: str
    title: str
    body_text: str
    link_url: str
    priority: int
    placed_at: datetime
    expire_at: datetime
    anonymous_ids: tuple[str, ...] = ()
    withdrawn: bool = False

    def live(self, now: datetime) -> bool:
        return not self.withdrawn and self.expire_at > now


@dataclass(frozen=True, slots=True)
class InboxEntry:
    """What an inbox keeps of a live banner: what choosing needs, and the answer's content as the
    caller serialized it (one bytes object rather than a string per field: an inbox holds every
    person's banners, and Python spends about 50 bytes on each object besides its content;
    figures in bench/README.md). The caller may give banners of the same content one object."""

    message_id: str
    placement: str
    priority: int
    # Epoch seconds.
    placed_at: float
    expire_at: float
    # One id as itself (most people have one cookie: a tuple would cost 56 bytes more).
    anonymous: str | tuple[str, ...]
    # The answer without its message_id and expiry (the caller adds them from the fields above).
    payload: bytes

    @property
    def anonymous_ids(self) -> tuple[str, ...]:
        return (self.anonymous,) if isinstance(self.anonymous, str) else self.anonymous


def _rank(e: InboxEntry) -> tuple[int, float, str]:
    return (e.priority, e.placed_at, e.message_id)


def choose(entries: Iterable[InboxEntry], placement: str, now: datetime) -> InboxEntry | None:
    """The banner to show in `placement` now: not expired, highest priority, then newest (withdrawn
    ones never enter an inbox); None if there is none."""
    at = now.timestamp()
    best: InboxEntry | None = None
    for e in entries:
        if e.placement == placement and e.expire_at > at and (best is None or _rank(e) > _rank(best)):
            best = e
    return best


_Held = InboxEntry | tuple[InboxEntry, ...]  # a person's banners: most people have one


def _entries(held: _Held | None) -> tuple[InboxEntry, ...]:
    if held is None:
        return ()
    return held if isinstance(held, tuple) else (held,)


class BannerInbox:
    """Every person's live banners, by tenant and person, with the anonymous ids that stand for them.

    `put` takes a banner as the table now holds it with the answer to give for it (a withdrawn or
    expired one leaves the inbox; one moved to another person by a merge moves), `drop` one that
    is gone from the table, `prune` the ones expired by now: what is kept is what may be shown.
    """

    def __init__(self) -> None:
        # tenant -> profile id -> banners; tenant -> message id -> profile id; tenant ->
        # anonymous id -> profile id (per tenant, so no key is a tuple of its own)
        self._people: dict[str, dict[str, _Held]] = {}
        self._owner: dict[str, dict[str, str]] = {}
        self._anonymous: dict[str, dict[str, str]] = {}
        # The people a prune in steps has yet to look at: (tenant, their profile ids), the
        # next one's index in the last.
        self._sweep: list[tuple[str, list[str]]] = []
        self._swept = 0

    def __len__(self) -> int:
        return sum(len(owned) for owned in self._owner.values())

    def __iter__(self) -> Iterator[tuple[str, InboxEntry]]:
        """(tenant, banner) of every banner held."""
        for tenant, people in self._people.items():
            for held in people.values():
                for e in _entries(held):
                    yield tenant, e

    def put(self, banner: PlacedBanner, payload: bytes, now: datetime) -> None:
        tenant = banner.tenant_id
        self.drop(tenant, banner.message_id)
        if not banner.live(now):
            return
        entry = InboxEntry(
            message_id=banner.message_id,
            placement=sys.intern(banner.placement),
            priority=banner.priority,
            placed_at=banner.placed_at.timestamp(),
            expire_at=banner.expire_at.timestamp(),
            anonymous=banner.anonymous_ids[0] if len(banner.anonymous_ids) == 1 else banner.anonymous_ids,
            payload=payload,
        )
        people = self._people.setdefault(sys.intern(tenant), {})
        held = people.get(banner.profile_id)
        people[banner.profile_id] = entry if held is None else (*_entries(held), entry)
        self._owner.setdefault(tenant, {})[banner.message_id] = banner.profile_id
        if banner.anonymous_ids:
            anonymous = self._anonymous.setdefault(tenant, {})
            for anonymous_id in banner.anonymous_ids:
                anonymous[anonymous_id] = banner.profile_id

    def drop(self, tenant_id: str, message_id: str) -> None:
        owned = self._owner.get(tenant_id)
        profile_id = owned.pop(message_id, None) if owned else None
        if profile_id is None:
            return
        people = self._people[tenant_id]
        held = _entries(people.get(profile_id))
        gone = [e for e in held if e.message_id == message_id]
        kept = tuple(e for e in held if e.message_id != message_id)
        if not kept:
            del people[profile_id]
        else:
            people[profile_id] = kept[0] if len(kept) == 1 else kept
        still = {a for e in kept for a in e.anonymous_ids}
        anonymous = self._anonymous.get(tenant_id, {})
        for anonymous_id in (a for e in gone for a in e.anonymous_ids):
            if anonymous_id not in still and anonymous.get(anonymous_id) == profile_id:
                del anonymous[anonymous_id]

    def person_of(self, tenant_id: str, anonymous_id: str) -> str | None:
        """The profile id an anonymous id stands for, when that person has banners."""
        anonymous = self._anonymous.get(tenant_id)
        return anonymous.get(anonymous_id) if anonymous else None

    def best(self, tenant_id: str, profile_id: str, placement: str, now: datetime) -> InboxEntry | None:
        people = self._people.get(tenant_id)
        held = people.get(profile_id) if people else None
        if held is None:
            return None
        return choose(_entries(held), placement, now)

    def prune(self, now: datetime, budget: int | None = None) -> int:
        """Drop the banners expired by `now`; return how many. With a `budget`, look at that many
        people at most and go on from there at the next call (`sweeping` until every person
        was looked at), so that no call holds the caller for long."""
        if budget is None or not self._sweep:
            self._sweep = [(tenant, list(people)) for tenant, people in self._people.items()]
            self._swept = 0
        at = now.timestamp()
        left = budget
        expired: list[tuple[str, str]] = []
        while self._sweep and (left is None or left > 0):
            tenant, ids = self._sweep[-1]
            end = len(ids) if left is None else min(len(ids), self._swept + left)
            people = self._people.get(tenant, {})
            for profile_id in ids[self._swept : end]:
                for e in _entries(people.get(profile_id)):
                    if e.expire_at <= at:
                        expired.append((tenant, e.message_id))
            if left is not None:
                left -= end - self._swept
            self._swept = end
            if end == len(ids):
                self._sweep.pop()
                self._swept = 0
        for tenant, message_id in expired:
            self.drop(tenant, message_id)
        return len(expired)

    @property
    def sweeping(self) -> bool:
        """Whether a prune in steps has people left to look at."""
        return bool(self._sweep)
