"""Identity resolution: which profile an event or an Identify call belongs to.

Identifiers are (kind, value) keys bound to one profile each. An event resolves
by customer_id, then email, then anonymous_id; when none is bound a new profile
is created (a *shadow* profile when it only has an anonymous id). Identifiers
of the event that are not bound yet are attached to the profile it resolved to.

`plan_track` and `plan_identify` are pure: the store reads the bound keys,
asks for a plan, then writes it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from relevans.kit.errors import Violations
from services.profile.domain.consent import Consent, ConsentInput, check_consent
from services.profile.domain.events import Event, check_email, check_id, check_name
from services.profile.domain.ids import random_uuid
from services.profile.domain.merge import choose_survivor
from services.profile.domain.traits import TraitScalar, check_traits

ANONYMOUS = "anonymous"
CUSTOMER_ID = "customer_id"
EMAIL = "email"
IDENTITY_KINDS = (ANONYMOUS, CUSTOMER_ID, EMAIL)
MAX_FIRST_NAME_CHARS = 256
MAX_IDENTIFY_CONSENTS = 32

Key = tuple[str, str]


def new_profile_id() -> str:
    return random_uuid()


def event_keys(event: Event) -> list[Key]:
    """The identifiers of an event in resolution order: customer_id, email, anonymous_id."""
    keys: list[Key] = []
    if event.customer_id:
        keys.append((CUSTOMER_ID, event.customer_id))
    if event.email:
        keys.append((EMAIL, event.email))
    if event.anonymous_id:
        keys.append((ANONYMOUS, event.anonymous_id))
    return keys


@dataclass(slots=True)
class ProfileState:
    """What resolution and the event snapshot need to know about one profile."""

    profile_id: str
    customer_id: str | None = None
    email: str | None = None
    first_name: str | None = None
    consents: tuple[Consent, ...] = ()
    # Created by this plan.
    new: bool = False
    # customer_id or email filled in by this plan.
    filled: bool = False
    # When the profile was created (None for one created by this plan); decides merges.
    created_at: datetime | None = None
    # Filled in by ingest for the event snapshot (see domain/enrichment.py).
    enriched: Enriched | None = None

    def copy(self) -> ProfileState:
        return ProfileState(
            self.profile_id,
            self.customer_id,
            self.email,
            self.first_name,
            self.consents,
            self.new,
            self.filled,
            self.created_at,
            self.enriched,
        )

    @property
    def shadow(self) -> bool:
        """Known only by anonymous ids."""
        return self.customer_id is None and self.email is None


@dataclass(slots=True)  # not frozen: made for every profile of every ingested batch (3x cheaper)
class Enriched:
    """What readers and triggers see of a profile beyond its identity: effective traits, tags,
    counter values (name, window days, count), the score now and the latest time per event type."""

    traits: Mapping[str, object] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    counters: tuple[tuple[str, int, int], ...] = ()
    score: float = 0.0
    last_seen: Mapping[str, datetime] = field(default_factory=dict)


@dataclass
class TrackPlan:
    # The profile of each event, in order.
    profile_ids: list[str]
    # Every profile the events touch, in its state after the batch.
    profiles: dict[str, ProfileState]
    # Identifiers to bind, sorted by key: (kind, value, profile_id).
    new_identities: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def new_profiles(self) -> list[ProfileState]:
        return [p for p in self.profiles.values() if p.new]

    @property
    def filled_profiles(self) -> list[ProfileState]:
        """Existing profiles whose customer_id or email this batch fills in."""
        return [p for p in self.profiles.values() if p.filled and not p.new]


def plan_track(
    events: Sequence[Event],
    bound: Mapping[Key, ProfileState],
    make_profile_id: Callable[[], str] = new_profile_id,
) -> TrackPlan:
    """Resolve each event to a profile, creating profiles and binding new identifiers as needed.

    `bound` maps every already bound identifier of the batch to its profile's state (its
    `new`/`filled` flags are kept, so a caller can bind some identifiers and plan again).
    Events are resolved in order, so a later event sees identifiers bound by earlier ones.
    """
    profiles: dict[str, ProfileState] = {}
    resolved: dict[Key, str] = {}
    for key, state in bound.items():
        if state.profile_id not in profiles:
            profiles[state.profile_id] = state.copy()
        resolved[key] = state.profile_id
    new_identities: list[tuple[str, str, str]] = []
    profile_ids: list[str] = []
    for event in events:
        keys = event_keys(event)
        profile_id = next((resolved[k] for k in keys if k in resolved), None)
        if profile_id is None:
            profile_id = make_profile_id()
            profiles[profile_id] = ProfileState(profile_id, new=True)
        state = profiles[profile_id]
        for key in keys:
            if key in resolved:
                continue
            resolved[key] = profile_id
            new_identities.append((key[0], key[1], profile_id))
            if key[0] == CUSTOMER_ID and state.customer_id is None:
                state.customer_id, state.filled = key[1], True
            elif key[0] == EMAIL and state.email is None:
                state.email, state.filled = key[1], True
        profile_ids.append(profile_id)
    new_identities.sort()
    return TrackPlan(profile_ids=profile_ids, profiles=profiles, new_identities=new_identities)


def apply_bindings(
    bound: Mapping[Key, ProfileState], bindings: Sequence[tuple[str, str, str]]
) -> dict[Key, ProfileState]:
    """`bound` plus the identifiers (kind, value, profile_id) that were actually bound.

    Used when only some of a plan's new identifiers could be bound (others were bound
    concurrently elsewhere): the profiles take over just the bindings that happened,
    a profile id not known yet becomes a new profile, and the batch is planned again.
    """
    states: dict[str, ProfileState] = {}
    for state in bound.values():
        states.setdefault(state.profile_id, state)
    out = {key: states[state.profile_id] for key, state in bound.items()}
    for kind, value, profile_id in bindings:
        state = states.get(profile_id) or ProfileState(profile_id, new=True)
        if kind == CUSTOMER_ID and state.customer_id is None:
            state = replace(state, customer_id=value, filled=True)
        elif kind == EMAIL and state.email is None:
            state = replace(state, email=value, filled=True)
        states[profile_id] = state
        out[(kind, value)] = state
    return {key: states[state.profile_id] for key, state in out.items()}


@dataclass(frozen=True, slots=True)
class RawIdentify:
    customer_id: str = ""
    email: str = ""
    anonymous_id: str = ""
    first_name: str = ""
    consents: tuple[ConsentInput, ...] = ()
    traits: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class IdentifyCommand:
    customer_id: str | None
    email: str | None
    anonymous_id: str | None
    first_name: str | None
    consents: tuple[Consent, ...]
    # Declared traits.
    traits: Mapping[str, TraitScalar] = field(default_factory=dict)

    def identifiers(self) -> list[Key]:
        keys: list[Key] = []
        if self.customer_id:
            keys.append((CUSTOMER_ID, self.customer_id))
        if self.email:
            keys.append((EMAIL, self.email))
        if self.anonymous_id:
            keys.append((ANONYMOUS, self.anonymous_id))
        return keys


def validate_identify(raw: RawIdentify, now: datetime) -> IdentifyCommand:
    """Validate an Identify request: customer_id or email required, consents complete."""
    v = Violations()
    customer_id = check_id(raw.customer_id, "customer_id", v)
    email = check_email(raw.email, "email", v) if raw.email else None
    if not raw.customer_id and not raw.email:
        v.add("customer_id", "one of customer_id or email is required")
    anonymous_id = check_id(raw.anonymous_id, "anonymous_id", v)
    first_name = raw.first_name.strip() or None
    if first_name is not None:
        check_name(first_name, "first_name", v, MAX_FIRST_NAME_CHARS)
    if len(raw.consents) > MAX_IDENTIFY_CONSENTS:
        v.add("consents", f"at most {MAX_IDENTIFY_CONSENTS} consents per call")
    consents = [
        check_consent(c, f"consents[{i}]", now, v, default_source="identify")
        for i, c in enumerate(raw.consents)
    ]
    traits = check_traits(raw.traits, "traits", v, allow_remove=False)
    v.raise_if_any()
    return IdentifyCommand(
        customer_id=customer_id,
        email=email,
        anonymous_id=anonymous_id,
        first_name=first_name,
        consents=tuple(c for c in consents if c is not None),
        traits={k: t for k, t in traits.items() if t is not None},
    )


@dataclass
class IdentifyPlan:
    # The known profile the call ends up on.
    profile_id: str
    # True when that profile is created by this call.
    created: bool
    # Identifiers to bind to profile_id, sorted.
    attach: list[Key]
    # A shadow profile merged into profile_id (its identities, events and consents move over).
    merge_from: str | None = None
    # A known profile merged into profile_id: customer_id and email were bound to two profiles
    # (see domain/merge.py for which one survives).
    merge_known_from: str | None = None
    # A known profile the anonymous id is taken from (the device changed hands; no merge).
    take_anonymous_from: str | None = None
    # The profile's columns after the call.
    customer_id: str | None = None
    email: str | None = None
    first_name: str | None = None


def plan_identify(
    command: IdentifyCommand,
    bound: Mapping[Key, ProfileState],
    make_profile_id: Callable[[], str] = new_profile_id,
) -> IdentifyPlan:
    """Find or create the known profile, and decide what happens to the anonymous id's profile.

    When customer_id and email are bound to two different profiles, they are merged: the
    survivor is chosen by `domain.merge.choose_survivor` (customer_id first, then the older).
    """
    by_customer = bound.get((CUSTOMER_ID, command.customer_id)) if command.customer_id else None
    by_email = bound.get((EMAIL, command.email)) if command.email else None
    by_anonymous = bound.get((ANONYMOUS, command.anonymous_id)) if command.anonymous_id else None
    known: ProfileState | None
    merged_known: ProfileState | None = None
    if by_customer and by_email and by_customer.profile_id != by_email.profile_id:
        known, merged_known = choose_survivor(by_customer, by_email)
    else:
        known = by_customer or by_email
    created = False
    merge_from: str | None = None
    take_from: str | None = None
    if known is not None:
        target = known
        merged_ids = {target.profile_id, merged_known.profile_id if merged_known else None}
        if by_anonymous is not None and by_anonymous.profile_id not in merged_ids:
            if by_anonymous.shadow:
                merge_from = by_anonymous.profile_id
            else:
                take_from = by_anonymous.profile_id
    elif by_anonymous is not None and by_anonymous.shadow:
        target = by_anonymous  # the shadow profile becomes known, keeping its id
    else:
        target = ProfileState(make_profile_id(), new=True)
        created = True
        if by_anonymous is not None:
            take_from = by_anonymous.profile_id
    attach = sorted(k for k in command.identifiers() if k not in bound)
    # What the merged-away profile brings (its first name only when the survivor has none).
    merged = merged_known or (by_anonymous if merge_from and by_anonymous else None) or ProfileState("")
    return IdentifyPlan(
        profile_id=target.profile_id,
        created=created,
        attach=attach,
        merge_from=merge_from,
        merge_known_from=merged_known.profile_id if merged_known else None,
        take_anonymous_from=take_from,
        customer_id=target.customer_id or merged.customer_id or command.customer_id,
        email=command.email or target.email,
        first_name=command.first_name or target.first_name or merged.first_name,
    )
