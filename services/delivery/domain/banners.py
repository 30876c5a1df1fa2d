"""On-site banners: what a placed banner is, which one a page is shown, and the inbox of every
person's waiting banners that `GetBanner` answers from. Pure: the rows, the bus and the clock
are the caller's.

The choice: among the person's banners for the asking placement that have not expired (by the
caller's clock) and were not withdrawn, the one of highest priority, then the newest. Consent
and suppression are kept by withdrawing: a consent withdrawal or an erasure takes the banner
out of the table, and so out of every inbox.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from relevans.kit.errors import FieldViolation, InvalidArgument
from relevans.kit.resource_ids import resource_id_problem

Person = tuple[str, str]  # (tenant id, profile id)

MAX_PERSON_ID_CHARS = 256


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
    problem = resource_id_problem(placement)
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


def _rank(b: PlacedBanner) -> tuple[int, datetime, str]:
    return (b.priority, b.placed_at, b.message_id)


def choose(banners: Iterable[PlacedBanner], placement: str, now: datetime) -> PlacedBanner | None:
    """The banner to show in `placement` now: live, highest priority, then newest; None if none."""
    best: PlacedBanner | None = None
    for b in banners:
        if b.placement == placement and b.live(now) and (best is None or _rank(b) > _rank(best)):
            best = b
    return best


class BannerInbox:
    """Every person's live banners, by person, with the anonymous ids that stand for them.

    `put` takes a banner as the table now holds it (a withdrawn or expired one leaves the inbox;
    one moved to another person by a merge moves), `drop` one that is gone from the table,
    `prune` the ones expired by now: what is kept is what may still be shown.
    """

    def __init__(self) -> None:
        self._by_person: dict[Person, dict[str, PlacedBanner]] = {}
        self._owner: dict[tuple[str, str], Person] = {}  # (tenant, message id) -> person
        self._anonymous: dict[tuple[str, str], str] = {}  # (tenant, anonymous id) -> profile id

    def __len__(self) -> int:
        return len(self._owner)

    def __iter__(self) -> Iterator[PlacedBanner]:
        for banners in self._by_person.values():
            yield from banners.values()

    def put(self, banner: PlacedBanner, now: datetime) -> None:
        self.drop(banner.tenant_id, banner.message_id)
        if not banner.live(now):
            return
        person = (banner.tenant_id, banner.profile_id)
        self._by_person.setdefault(person, {})[banner.message_id] = banner
        self._owner[(banner.tenant_id, banner.message_id)] = person
        for anonymous_id in banner.anonymous_ids:
            self._anonymous[(banner.tenant_id, anonymous_id)] = banner.profile_id

    def drop(self, tenant_id: str, message_id: str) -> None:
        person = self._owner.pop((tenant_id, message_id), None)
        if person is None:
            return
        banners = self._by_person[person]
        gone = banners.pop(message_id)
        if banners:
            still = {a for b in banners.values() for a in b.anonymous_ids}
        else:
            del self._by_person[person]
            still = set()
        for anonymous_id in gone.anonymous_ids:
            key = (tenant_id, anonymous_id)
            if anonymous_id not in still and self._anonymous.get(key) == person[1]:
                del self._anonymous[key]

    def person_of(self, tenant_id: str, anonymous_id: str) -> str | None:
        """The profile id an anonymous id stands for, when that person has banners."""
        return self._anonymous.get((tenant_id, anonymous_id))

    def best(self, tenant_id: str, profile_id: str, placement: str, now: datetime) -> PlacedBanner | None:
        banners = self._by_person.get((tenant_id, profile_id))
        return choose(banners.values(), placement, now) if banners else None

    def prune(self, now: datetime) -> int:
        """Drop the banners expired by `now`; return how many."""
        expired = [b for b in self if not b.live(now)]
        for b in expired:
            self.drop(b.tenant_id, b.message_id)
        return len(expired)
