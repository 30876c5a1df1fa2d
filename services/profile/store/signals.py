"""What an ingest batch tells the world besides its events: segment entries and exits
(rv.profile.segments) and threshold crossings (rv.profile.thresholds).

Segments are read per batch (one indexed query; none for most tenants) and their conditions
compiled once per segment id — a segment's condition never changes after it is saved — so a
segment saved through any instance is followed by the very next batch. Membership is evaluated in
Python on the profile's state after the batch, with the same semantics as the SQL that
CountSegment runs (store/segments.py); the segment_members table remembers who was in,
so only changes are published.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from relevans.conditions import Predicate, ProfileView, compile_condition, parse_condition
from relevans.kit.errors import InvalidArgument
from relevans.kit.outbox import OutboxMessage
from relevans.kit.proto import to_timestamp
from relevans.profile.v1 import bus_pb2
from services.profile.domain.enrichment import Crossing

SEGMENTS_SUBJECT = "rv.profile.segments"
THRESHOLDS_SUBJECT = "rv.profile.thresholds"

log = structlog.get_logger(__name__)

_SEGMENTS = sa.text("SELECT segment_id, name, condition FROM segments WHERE tenant_id = :tenant")
_MEMBERS = sa.text("""
SELECT segment_id, profile_id FROM segment_members
WHERE tenant_id = :tenant AND profile_id = ANY(CAST(:ids AS text[]))
""")
_ENTER = sa.text("""
INSERT INTO segment_members (tenant_id, segment_id, profile_id, entered_at)
SELECT :tenant, u.segment_id, u.profile_id, :now
FROM unnest(CAST(:segment_ids AS text[]), CAST(:profile_ids AS text[])) AS u(segment_id, profile_id)
ORDER BY u.segment_id, u.profile_id
ON CONFLICT DO NOTHING
""")
# (The profile ids once more as an array: an index condition in any plan. Planned once while the
# table was empty, on Track's connections (see create_engine's lookups_only), the join alone read
# every membership of the tenant for each batch in which someone left a segment.)
_LEAVE = sa.text("""
DELETE FROM segment_members m
USING unnest(CAST(:segment_ids AS text[]), CAST(:profile_ids AS text[])) AS u(segment_id, profile_id)
WHERE m.tenant_id = :tenant AND m.segment_id = u.segment_id AND m.profile_id = u.profile_id
  AND m.profile_id = ANY(CAST(:profile_ids AS text[]))
""")


@dataclass(frozen=True, slots=True)
class SegmentRule:
    segment_id: str
    name: str
    matches: Predicate


class SegmentRules:
    """The saved segments of a tenant, their conditions compiled once per segment id."""

    def __init__(self) -> None:
        self._compiled: dict[str, Predicate | None] = {}

    async def load(self, conn: AsyncConnection, tenant: str) -> list[SegmentRule]:
        rules = []
        for segment_id, name, condition in await conn.execute(_SEGMENTS, {"tenant": tenant}):
            key = f"{tenant}/{segment_id}"
            if key not in self._compiled:
                try:
                    self._compiled[key] = compile_condition(parse_condition(condition))
                except (InvalidArgument, ValueError):
                    # Saved conditions were validated; one that no longer parses is skipped, loudly.
                    log.error("segment condition does not parse", segment_id=segment_id)
                    self._compiled[key] = None
            predicate = self._compiled[key]
            if predicate is not None:
                rules.append(SegmentRule(segment_id, name, predicate))
        return rules


@dataclass(frozen=True, slots=True)
class MembershipChange:
    segment: SegmentRule
    profile_id: str
    entered: bool
    event_id: str


async def apply_membership(
    conn: AsyncConnection,
    tenant: str,
    rules: Sequence[SegmentRule],
    views: Mapping[str, tuple[ProfileView, str]],
    now: datetime,
) -> list[MembershipChange]:
    """Evaluate every segment for the profiles in `views` ({profile id: (view after the batch, the
    batch's last event id of that profile)}), record who entered and left, and return the changes."""
    if not rules or not views:
        return []
    rows = await conn.execute(_MEMBERS, {"tenant": tenant, "ids": sorted(views)})
    members = {(r.segment_id, r.profile_id) for r in rows}
    changes = []
    for profile_id in sorted(views):
        view, event_id = views[profile_id]
        for rule in rules:
            inside = bool(rule.matches(view))
            if inside != ((rule.segment_id, profile_id) in members):
                changes.append(MembershipChange(rule, profile_id, inside, event_id))
    for entered, statement in ((True, _ENTER), (False, _LEAVE)):
        picked = [c for c in changes if c.entered is entered]
        if picked:
            await conn.execute(
                statement,
                {
                    "tenant": tenant,
                    "now": now,
                    "segment_ids": [c.segment.segment_id for c in picked],
                    "profile_ids": [c.profile_id for c in picked],
                },
            )
    return changes


def membership_message(tenant: str, change: MembershipChange, now: datetime) -> OutboxMessage:
    payload = bus_pb2.SegmentMembershipChanged(
        tenant_id=tenant,
        segment_id=change.segment.segment_id,
        segment_name=change.segment.name,
        profile_id=change.profile_id,
        entered=change.entered,
        event_id=change.event_id,
        change_time=to_timestamp(now),
    ).SerializeToString()
    return OutboxMessage(SEGMENTS_SUBJECT, payload)


def crossing_message(tenant: str, profile_id: str, crossing: Crossing, now: datetime) -> OutboxMessage:
    payload = bus_pb2.ThresholdCrossed(
        tenant_id=tenant,
        profile_id=profile_id,
        kind=crossing.kind,
        name=crossing.name,
        window_days=crossing.window_days,
        threshold=crossing.threshold,
        value=crossing.value,
        event_id=crossing.event_id,
        cross_time=to_timestamp(now),
    ).SerializeToString()
    return OutboxMessage(THRESHOLDS_SUBJECT, payload)
