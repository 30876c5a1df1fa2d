"""A batch of events made ready to store: each touched profile's enrichment after the batch, and
the `ingest_event` and `ingest_profile` rows ingest's one storing statement takes. No I/O here:
ingest reads before and writes after."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from relevans.conditions import ProfileView
from relevans.kit.outbox import OutboxMessage
from services.profile.domain import Event, ProfileState, TrackPlan
from services.profile.domain.enrichment import (
    EnrichedState,
    Enrichment,
    EventFacts,
    counter_values,
    counters_to_json,
    enrich,
    last_seen_to_json,
    latest_seen,
    score_crossings,
    score_now,
)
from services.profile.domain.identity import Enriched
from services.profile.store.rows import EnrichedRow, dumps
from services.profile.store.signals import crossing_message


@dataclass(slots=True)
class TrackResult:
    event_id: str
    profile_id: str
    duplicate: bool


# (the stored events' indexes in the call, their new event ids, their profiles after the call) ->
# each event's outbox subject and payload (built for the whole batch at once: this runs per event)
EventMessages = Callable[
    [Sequence[int], Sequence[str], Sequence[ProfileState]], tuple[list[str], list[bytes]]
]


@dataclass(slots=True)
class BatchEnrichment:
    # Each touched profile's enrichment columns after the batch.
    after: dict[str, EnrichedRow] = dataclasses.field(default_factory=dict)
    # Threshold crossings to publish.
    signals: list[OutboxMessage] = dataclasses.field(default_factory=list)
    # (profile id, name, value) of behavioural traits to store.
    behavioural: list[tuple[str, str, object]] = dataclasses.field(default_factory=list)
    # Profiles whose segments to evaluate: their view and the event that changed them.
    views: dict[str, tuple[ProfileView, str]] = dataclasses.field(default_factory=dict)


def _enrich_batch(
    tenant: str,
    touched: Sequence[ProfileState],
    locked: Mapping[str, EnrichedRow],
    facts: Mapping[str, list[EventFacts]],
    definitions: Enrichment,
    segments: bool,
    now: datetime,
) -> BatchEnrichment:
    """Apply each touched profile's fresh events to its enrichment state, and set the state each
    event's snapshot carries. A behavioural trait becomes effective only where no declared or
    backend value of it is held."""
    out = BatchEnrichment()
    scoring = definitions.scoring
    only_last_seen = definitions.is_empty()
    for state in touched:
        pid = state.profile_id
        row = locked.get(pid) or EnrichedRow.empty()
        events_of = facts.get(pid, [])
        if only_last_seen and not row.enriched.counters:
            # what `enrich` and the rest of this loop come to when nothing is defined, without their
            # bookkeeping (the common case, per profile of every batch)
            e = row.enriched
            moved = EnrichedState(e.counters, latest_seen(e.last_seen, events_of), e.score, e.score_at)
            new = out.after[pid] = EnrichedRow(row.traits, moved, row.tags, row.held_traits)
            score = score_now(e.score, e.score_at, row.traits, scoring, now)
            state.enriched = Enriched(row.traits, row.tags, (), score, moved.last_seen)
            if segments and events_of:
                out.views[pid] = (new.view(state.consents, definitions, now), events_of[-1].event_id)
            continue
        result = enrich(row.enriched, events_of, definitions, now)
        traits = dict(row.traits)
        for name, value in result.traits.items():
            out.behavioural.append((pid, name, value))
            if name not in row.held_traits:
                traits[name] = value
        new = out.after[pid] = EnrichedRow(traits, result.state, row.tags, row.held_traits)
        score = score_now(result.state.score, result.state.score_at, traits, scoring, now)
        crossings = list(result.crossings)
        if scoring.thresholds and events_of:
            before = score_now(row.enriched.score, row.enriched.score_at, row.traits, scoring, now)
            crossings += score_crossings(before, score, scoring, events_of[-1].event_id)
        out.signals += [crossing_message(tenant, pid, c, now) for c in crossings]
        state.enriched = Enriched(
            traits=traits,
            tags=row.tags,
            counters=tuple(counter_values(definitions.counters, result.state.counters, now)),
            score=score,
            last_seen=result.state.last_seen,
        )
        if segments and events_of:
            out.views[pid] = (new.view(state.consents, definitions, now), events_of[-1].event_id)
    return out


def _event_rows(
    batch: Sequence[Event],
    event_ids: Sequence[str],
    profile_ids: Sequence[str],
    subjects: Sequence[str],
    payloads: Sequence[bytes],
) -> list[tuple[Any, ...]]:
    """The events as `ingest_event` rows for ingest's `_STORE`; an event's position is its outbox order."""
    return [
        (
            event_id,
            e.message_id,
            profile_id,
            e.type,
            e.timestamp,
            e.anonymous_id,
            e.customer_id,
            e.email,
            e.properties_json,
            subject,
            payload,
        )
        for e, event_id, profile_id, subject, payload in zip(
            batch, event_ids, profile_ids, subjects, payloads, strict=True
        )
    ]


def _profile_rows(
    touched: Sequence[ProfileState],
    locked: Mapping[str, EnrichedRow],
    after: Mapping[str, EnrichedRow],
    last_seen: Mapping[str, datetime],
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The `ingest_profile` rows of ingest's `_STORE`: the profiles this batch creates, and the existing ones
    it updates (what the batch fills in; a value that did not change is NULL, so the column keeps
    its value)."""
    created: list[tuple[Any, ...]] = []
    updated: list[tuple[Any, ...]] = []
    for state in touched:
        pid = state.profile_id
        now_ = after[pid]
        before = locked.get(pid)
        e = now_.enriched
        last_seen_types = dumps(last_seen_to_json(e.last_seen))
        if before is None:
            created.append(
                (
                    None,
                    pid,
                    state.customer_id,
                    state.email,
                    last_seen[pid],
                    dumps(now_.traits),
                    dumps(counters_to_json(e.counters)),
                    last_seen_types,
                    e.score,
                    e.score_at,
                    None,
                )
            )
            continue
        b = before.enriched
        score_changed = (e.score, e.score_at) != (b.score, b.score_at)
        updated.append(
            (
                before.ctid,
                pid,
                state.customer_id if state.filled else None,
                state.email if state.filled else None,
                last_seen[pid],
                dumps(now_.traits) if now_.traits != before.traits else None,
                dumps(counters_to_json(e.counters)) if e.counters != b.counters else None,
                last_seen_types,
                e.score if score_changed else None,
                e.score_at if score_changed else None,
                before.xmin,
            )
        )
    return created, updated


@dataclass(frozen=True, slots=True)
class Batch:
    """Events to store, with what storing them needs: the tenant, the receive time, each event's
    position in the call (its outbox order) and how its outbox message and id are made."""

    tenant: str
    events: Sequence[Event]
    now: datetime
    positions: Sequence[int]
    messages: EventMessages
    make_id: Callable[[], str]

    def without(self, known: Mapping[str, TrackResult]) -> Batch:
        """The batch without the events stored before (`known`, by message id)."""
        if not known:
            return self
        fresh = [j for j, e in enumerate(self.events) if e.message_id not in known]
        return dataclasses.replace(
            self, events=[self.events[j] for j in fresh], positions=[self.positions[j] for j in fresh]
        )


@dataclass(slots=True)
class Write:
    """A batch of new events ready for ingest's `_STORE`, and what it changed of its profiles."""

    results: list[TrackResult]
    events: list[tuple[Any, ...]]  # `ingest_event` rows
    created: list[tuple[Any, ...]]  # `ingest_profile` rows
    updated: list[tuple[Any, ...]]
    enrichment: BatchEnrichment


def prepare_write(
    batch: Batch,
    plan: TrackPlan,
    read: Mapping[str, EnrichedRow],
    definitions: Enrichment,
    *,
    segments: bool,
) -> Write:
    """Enrich the profiles of `plan` (as `read`) with the batch's events, and build the rows to store
    and the events' outbox messages."""
    events, tenant, now = batch.events, batch.tenant, batch.now
    event_ids = [batch.make_id() for _ in events]
    last_seen: dict[str, datetime] = {}
    facts: dict[str, list[EventFacts]] = {}
    for event_id, event, pid in zip(event_ids, events, plan.profile_ids, strict=True):
        if pid not in last_seen or event.timestamp > last_seen[pid]:
            last_seen[pid] = event.timestamp
        facts.setdefault(pid, []).append(EventFacts(event_id, event.type, event.timestamp, event.properties))
    profiles = plan.profiles
    touched = [profiles[pid] for pid in sorted(last_seen)]
    enrichment = _enrich_batch(tenant, touched, read, facts, definitions, segments, now)
    subjects, payloads = batch.messages(
        batch.positions, event_ids, [profiles[pid] for pid in plan.profile_ids]
    )
    created, updated = _profile_rows(touched, read, enrichment.after, last_seen)
    return Write(
        [
            TrackResult(event_id, pid, False)
            for event_id, pid in zip(event_ids, plan.profile_ids, strict=True)
        ],
        _event_rows(events, event_ids, plan.profile_ids, subjects, payloads),
        created,
        updated,
        enrichment,
    )
