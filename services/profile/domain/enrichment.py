"""What events add to a profile: counters, last seen per event type, behavioural traits, lead score.

A tenant's `Enrichment` (its counter definitions, computed traits and scoring rules) is applied to
each batch of a profile's new events by `enrich`, which returns the profile's new state and the
threshold crossings the batch caused. `profile_view` turns stored state into the `ProfileView`
segment and trigger conditions are evaluated on, so the pure evaluator and the SQL one see the same
numbers.

Score: event points are stored as a value as of a time (`score`, `score_at`) and halve every
`half_life_days`; trait points are not stored but added on read from the effective traits, so a
change of rules or traits shows at once. Pure: stdlib only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from relevans.conditions import ProfileView
from services.profile.domain import counters as counting
from services.profile.domain.counters import CounterDefinition, same_value
from services.profile.domain.traits import MAX_TRAIT_VALUE_BYTES

# A profile remembers the latest time of at most this many event types (the most recent ones).
MAX_LAST_SEEN_TYPES = 200
MAX_HALVINGS = 900

JsonScalar = str | int | float | bool


@dataclass(frozen=True, slots=True)
class EventMatch:
    """Events of a type, optionally only with `properties[property] == property_value`."""

    event_type: str
    property: str | None = None
    property_value: JsonScalar | None = None

    def matches(self, event_type: str, properties: Mapping[str, object]) -> bool:
        if event_type != self.event_type:
            return False
        if self.property is None:
            return True
        return same_value(properties.get(self.property), self.property_value)


@dataclass(frozen=True, slots=True)
class TraitMatch:
    """Profiles whose effective trait `name` equals `value`."""

    name: str
    value: JsonScalar


@dataclass(frozen=True, slots=True)
class ScoreRule:
    """Points per matching event (decaying) or while a trait matches (not decaying): one target."""

    points: float
    event: EventMatch | None = None
    trait: TraitMatch | None = None


@dataclass(frozen=True, slots=True)
class Scoring:
    rules: tuple[ScoreRule, ...] = ()
    # 0: event points never decay.
    half_life_days: int = 0
    thresholds: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class ComputedTrait:
    """A behavioural trait: `properties[property]` of the person's latest `event_type` event."""

    name: str
    event_type: str
    property: str


@dataclass(frozen=True, slots=True)
class Enrichment:
    """One tenant's definitions."""

    counters: tuple[CounterDefinition, ...] = ()
    computed_traits: tuple[ComputedTrait, ...] = ()
    scoring: Scoring = Scoring()

    def is_empty(self) -> bool:
        return not (self.counters or self.computed_traits or self.scoring.rules)


# ---------------------------------------------------------------------------------------------- json


def scoring_to_json(scoring: Scoring) -> list[dict[str, object]]:
    """The `scoring_rules.rules` column."""
    out: list[dict[str, object]] = []
    for rule in scoring.rules:
        if rule.event is not None:
            e = rule.event
            target: dict[str, object] = {
                "event": {
                    "event_type": e.event_type,
                    "property": e.property,
                    "property_value": e.property_value,
                }
            }
        elif rule.trait is not None:
            target = {"trait": {"name": rule.trait.name, "value": rule.trait.value}}
        else:
            raise ValueError("a score rule needs an event or a trait")
        out.append({**target, "points": rule.points})
    return out


def scoring_from_json(
    rules: Sequence[Mapping[str, object]] | None, half_life_days: int, thresholds: Iterable[float]
) -> Scoring:
    parsed: list[ScoreRule] = []
    for item in rules or ():
        points = float(item["points"])  # type: ignore[arg-type]
        event = item.get("event")
        trait = item.get("trait")
        if isinstance(event, Mapping):
            parsed.append(
                ScoreRule(
                    points,
                    event=EventMatch(event["event_type"], event.get("property"), event.get("property_value")),
                )
            )
        elif isinstance(trait, Mapping):
            parsed.append(ScoreRule(points, trait=TraitMatch(trait["name"], trait["value"])))
    return Scoring(tuple(parsed), half_life_days, tuple(sorted(thresholds)))


def counters_from_json(raw: Mapping[str, Mapping[str, int]] | None) -> dict[str, dict[date, int]]:
    """`profiles.counters` ({name: {"YYYY-MM-DD": n}}) as dates."""
    return {name: {date.fromisoformat(d): n for d, n in days.items()} for name, days in (raw or {}).items()}


def counters_to_json(values: Mapping[str, Mapping[date, int]]) -> dict[str, dict[str, int]]:
    return {
        name: {d.isoformat(): n for d, n in sorted(days.items())} for name, days in values.items() if days
    }


def last_seen_from_json(raw: Mapping[str, str] | None) -> dict[str, datetime]:
    return {t: datetime.fromisoformat(v) for t, v in (raw or {}).items()}


def last_seen_to_json(values: Mapping[str, datetime]) -> dict[str, datetime]:
    """`profiles.last_seen_types` ready for the JSON encoder (orjson writes an aware datetime as
    ISO-8601, as `isoformat` would, in a fifth of the time): the times in UTC."""
    return {t: v if v.tzinfo is UTC else v.astimezone(UTC) for t, v in values.items()}


# ---------------------------------------------------------------------------------------------- reading


def decayed(score: float, score_at: datetime | None, half_life_days: int, now: datetime) -> float:
    """Stored event points as of `now`: halved per half-life since `score_at` (never grown)."""
    if half_life_days <= 0 or score_at is None or not score:
        return score
    return score * decay_factor(score_at, now, half_life_days)


def trait_points(scoring: Scoring, traits: Mapping[str, object]) -> float:
    total = 0.0
    for rule in scoring.rules:
        if rule.trait is not None and same_value(traits.get(rule.trait.name), rule.trait.value):
            total += rule.points
    return total


def score_now(
    score: float, score_at: datetime | None, traits: Mapping[str, object], scoring: Scoring, now: datetime
) -> float:
    """The lead score at `now`: decayed event points plus the trait points of the effective traits."""
    return decayed(score, score_at, scoring.half_life_days, now) + trait_points(scoring, traits)


def counter_values(
    definitions: Iterable[CounterDefinition], buckets: Mapping[str, Mapping[date, int]], now: datetime
) -> list[tuple[str, int, int]]:
    """(name, window_days, count) for every defined counter and window, in definition order."""
    out = []
    for d in definitions:
        days = buckets.get(d.name, {})
        for w in d.windows:
            out.append((d.name, w, counting.count_in_window(days, now, timedelta(days=w))))
    return out


def shortest_window_count(defn: CounterDefinition, buckets: Mapping[date, int], now: datetime) -> int:
    return counting.count_in_window(buckets, now, timedelta(days=min(defn.windows)))


def counter_for(
    counters: Iterable[CounterDefinition],
    event_type: str,
    window: timedelta,
    prop: str | None,
    value: object | None,
) -> CounterDefinition | None:
    """The definition whose buckets answer "events of this type (with this property value) in this
    window": the first, in the tenant's order, counting the same events and keeping the window."""
    for d in counters:
        if (
            d.event_type == event_type
            and d.property == prop
            and (prop is None or same_value(d.property_value, value))
            and d.keep_days() >= window.days
        ):
            return d
    return None


def profile_view(
    *,
    traits: Mapping[str, object],
    tags: Iterable[str],
    counters_json: Mapping[str, Mapping[str, int]] | None,
    score: float,
    score_at: datetime | None,
    consents: Mapping[tuple[str, str], str],
    last_seen_types: Mapping[str, str] | None,
    enrichment: Enrichment,
    now: datetime,
) -> ProfileView:
    """What a condition sees of a stored profile (its JSON columns) at `now` (see store/segments.py)."""
    state = EnrichedState(
        counters_from_json(counters_json), last_seen_from_json(last_seen_types), score, score_at
    )
    return state_view(state, traits=traits, tags=tags, consents=consents, enrichment=enrichment, now=now)


def state_view(
    state: EnrichedState,
    *,
    traits: Mapping[str, object],
    tags: Iterable[str],
    consents: Mapping[tuple[str, str], str],
    enrichment: Enrichment,
    now: datetime,
) -> ProfileView:
    """What a condition sees of a profile's enrichment state at `now`."""
    buckets = state.counters
    values = {
        d.name: float(shortest_window_count(d, buckets.get(d.name, {}), now)) for d in enrichment.counters
    }

    def window_counts(event_type: str, window: timedelta, prop: str | None, value: object | None) -> int:
        d = counter_for(enrichment.counters, event_type, window, prop, value)
        return 0 if d is None else counting.count_in_window(buckets.get(d.name, {}), now, window)

    return ProfileView(
        traits=dict(traits),
        tags=frozenset(tags),
        counters=values,
        score=score_now(state.score, state.score_at, traits, enrichment.scoring, now),
        consents=dict(consents),
        last_seen=dict(state.last_seen),
        window_counts=window_counts,
    )


# ---------------------------------------------------------------------------------------------- applying


@dataclass(slots=True)  # not frozen: made for every ingested event, and a frozen one costs 3x
class EventFacts:
    """What enrichment needs of one stored event."""

    event_id: str
    type: str
    timestamp: datetime
    properties: Mapping[str, object]


@dataclass(slots=True)
class EnrichedState:
    """A profile's enrichment state; `enrich` returns a new one."""

    counters: dict[str, dict[date, int]] = field(default_factory=dict)
    last_seen: dict[str, datetime] = field(default_factory=dict)
    score: float = 0.0
    score_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Crossing:
    """A counter (in its shortest window) or the score reached `threshold` from below."""

    kind: str  # counter or score
    name: str
    window_days: int
    threshold: float
    value: float
    event_id: str


@dataclass(frozen=True, slots=True)
class EnrichResult:
    state: EnrichedState
    # Behavioural trait values set by this batch (latest event wins).
    traits: dict[str, JsonScalar]
    # Counter crossings; score crossings need the effective traits, see `score_crossings`.
    crossings: list[Crossing]


def _trait_value(value: object) -> JsonScalar | None:
    if isinstance(value, bool | str):
        return value if not isinstance(value, str) or len(value.encode()) <= MAX_TRAIT_VALUE_BYTES else None
    if isinstance(value, int | float) and math.isfinite(value):
        return value
    return None


def enrich(
    state: EnrichedState, events: Sequence[EventFacts], enrichment: Enrichment, now: datetime
) -> EnrichResult:
    """Apply one profile's new events (in order) to its state. Counters count by the event's day and
    keep only the buckets their longest window needs; event points are decayed from the event's time.
    A counter crossing names the last event of the batch, which is the one that completed it."""
    if enrichment.is_empty() and not state.counters:  # the common case: only last seen moves
        moved = EnrichedState(
            state.counters, latest_seen(state.last_seen, events), state.score, state.score_at
        )
        return EnrichResult(moved, {}, [])
    last_id = events[-1].event_id if events else ""
    buckets = {name: dict(days) for name, days in state.counters.items()}
    crossings: list[Crossing] = []
    defined = {d.name for d in enrichment.counters}
    for name in list(buckets):
        if name not in defined:
            del buckets[name]  # the definition was deleted
    for d in enrichment.counters:
        before = buckets.get(d.name, {})
        after = before
        for e in events:
            if d.matches(e.type, e.properties):
                after = counting.add(after, e.timestamp)
        after = counting.prune(after, now, d.keep_days())
        if after:
            buckets[d.name] = after
        else:
            buckets.pop(d.name, None)
        if d.thresholds and after is not before:
            old = shortest_window_count(d, before, now)
            new = shortest_window_count(d, after, now)
            for t in d.thresholds:
                if counting.crossed(old, new, t):
                    crossings.append(
                        Crossing("counter", d.name, min(d.windows), float(t), float(new), last_id)
                    )

    last_seen = latest_seen(state.last_seen, events)

    scoring = enrichment.scoring
    score, score_at = state.score, state.score_at
    earned = 0.0
    for e in events:
        for rule in scoring.rules:
            if rule.event is not None and rule.event.matches(e.type, e.properties):
                earned += rule.points * (
                    decay_factor(e.timestamp, now, scoring.half_life_days) if scoring.half_life_days else 1.0
                )
    if earned:
        score = decayed(score, score_at, scoring.half_life_days, now) + earned
        score_at = now

    traits: dict[str, JsonScalar] = {}
    latest: dict[str, datetime] = {}
    for ct in enrichment.computed_traits:
        for e in events:
            if e.type != ct.event_type or ct.property not in e.properties:
                continue
            value = _trait_value(e.properties[ct.property])
            if value is not None and (ct.name not in latest or e.timestamp >= latest[ct.name]):
                traits[ct.name] = value
                latest[ct.name] = e.timestamp
    return EnrichResult(EnrichedState(buckets, last_seen, score, score_at), traits, crossings)


def latest_seen(last_seen: Mapping[str, datetime], events: Sequence[EventFacts]) -> dict[str, datetime]:
    """The latest time per event type, keeping the MAX_LAST_SEEN_TYPES most recent types."""
    out = dict(last_seen)
    for e in events:
        if e.type not in out or e.timestamp > out[e.type]:
            out[e.type] = e.timestamp
    if len(out) > MAX_LAST_SEEN_TYPES:
        out = dict(sorted(out.items(), key=lambda kv: kv[1], reverse=True)[:MAX_LAST_SEEN_TYPES])
    return out


def decay_factor(at: datetime, now: datetime, half_life_days: int) -> float:
    """How much of a point earned at `at` is left at `now` (points from the future count in full)."""
    halvings = max((now - at).total_seconds(), 0.0) / (half_life_days * 86400.0)
    # 0.5 ** 900 is below the smallest normal double; PostgreSQL raises rather than round, so the
    # SQL of segments counts such points as 0 and so does this.
    return 0.0 if halvings >= MAX_HALVINGS else 0.5**halvings


def score_crossings(before: float, after: float, scoring: Scoring, event_id: str) -> list[Crossing]:
    return [
        Crossing("score", "score", 0, t, after, event_id)
        for t in scoring.thresholds
        if counting.crossed(before, after, t)
    ]


def merge_states(
    into: EnrichedState, other: EnrichedState, half_life_days: int, now: datetime
) -> EnrichedState:
    """A merged-away profile's enrichment added to the survivor's: counts summed per day, the
    later time per event type, event points summed (both decayed to `now`)."""
    names = set(into.counters) | set(other.counters)
    buckets = {n: counting.merge(into.counters.get(n, {}), other.counters.get(n, {})) for n in sorted(names)}
    last_seen = dict(into.last_seen)
    for t, at in other.last_seen.items():
        if t not in last_seen or at > last_seen[t]:
            last_seen[t] = at
    if into.score_at is None and other.score_at is None:
        return EnrichedState(buckets, last_seen, into.score + other.score, None)
    score = decayed(into.score, into.score_at, half_life_days, now) + decayed(
        other.score, other.score_at, half_life_days, now
    )
    return EnrichedState(buckets, last_seen, score, now)
