"""GDPR in the profile service: export everything held about a person, erase them, suppress.

Erasure deletes the person's rows (and those of the shadow profiles merged into them) in one
transaction, leaves a `suppressions` row per identifier (only its sha256), records an
`erasures` row and enqueues `ProfileErased` for trigger and delivery, whose
`ErasureAcknowledged` answers complete the erasure (`record_acks`, called by
services/profile/consumers.py). Identify and import do not restore consent given for a suppressed
identifier (`suppressed_hashes`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans.kit.erasure import ERASED_SUBJECT
from relevans.kit.errors import FieldViolation, InvalidArgument, NotFound, Violations
from relevans.kit.identifiers import identifier_hash
from relevans.kit.outbox import OutboxMessage, enqueue
from relevans.profile.v1 import bus_pb2
from services.profile.store.tables import (
    consent_ledger,
    consents,
    erasures,
    events,
    identities,
    merges,
    outbox,
    profile_tags,
    profile_traits,
    profiles,
    segment_members,
    suppressions,
)

PENDING = "pending"
DONE = "done"
# Services whose acknowledgement completes an erasure (profile itself is done at once).
PURGING_SERVICES = ("trigger", "delivery")
MAX_EXPORT_EVENTS = 10_000
CONSENT_NOT_RESTORED = "identifier was erased; consent not restored"


async def suppressed_hashes(conn: AsyncConnection, tenant: str, values: Iterable[str]) -> set[str]:
    """The hashes of `values` that belong to erased people."""
    hashes = {identifier_hash(v) for v in values if v}
    if not hashes:
        return set()
    rows = await conn.execute(
        sa.select(suppressions.c.value_hash).where(
            suppressions.c.tenant_id == tenant, suppressions.c.value_hash.in_(sorted(hashes))
        )
    )
    return set(rows.scalars())


@dataclass(frozen=True, slots=True)
class Export:
    profile: sa.Row[Any]
    identities: list[sa.Row[Any]]
    events: list[sa.Row[Any]]
    events_truncated: bool
    consent_history: list[sa.Row[Any]]
    tags: list[str]
    traits: list[sa.Row[Any]]
    merges: list[sa.Row[Any]]


@dataclass(frozen=True, slots=True)
class Erasure:
    erasure_id: str
    profile_id: str
    state: str
    services_done: tuple[str, ...]
    requested_at: datetime
    completed_at: datetime | None


def _erasure(row: sa.Row[Any]) -> Erasure:
    return Erasure(
        erasure_id=row.erasure_id,
        profile_id=row.profile_id,
        state=row.state,
        services_done=tuple(row.services_done),
        requested_at=row.requested_at,
        completed_at=row.completed_at,
    )


def validate_erase(profile_id: str, request_id: str) -> None:
    v = Violations()
    if not profile_id:
        v.add("profile_id", "required")
    if len(request_id) > 200:
        v.add("request_id", "at most 200 characters")
    v.raise_if_any()


class GdprStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def _canonical(
        self, conn: AsyncConnection, tenant: str, profile_id: str, lock: bool
    ) -> sa.Row[Any]:
        """The profile row of `profile_id` (a merged-away id stands for the profile it went to)."""
        target = profile_id
        for _ in range(3):
            q = sa.select(profiles).where(profiles.c.tenant_id == tenant, profiles.c.profile_id == target)
            row = (await conn.execute(q.with_for_update() if lock else q)).first()
            if row is None:
                break
            if row.merged_into is None:
                return row
            target = row.merged_into
        raise NotFound(f"profile {profile_id!r} not found")

    async def _shadows(self, conn: AsyncConnection, tenant: str, profile_id: str) -> list[str]:
        rows = await conn.execute(
            sa.select(profiles.c.profile_id)
            .where(profiles.c.tenant_id == tenant, profiles.c.merged_into == profile_id)
            .order_by(profiles.c.profile_id)
        )
        return list(rows.scalars())

    async def export(self, tenant: str, profile_id: str) -> Export:
        async with self.engine.begin() as conn:
            await conn.execute(sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
            p = await self._canonical(conn, tenant, profile_id, lock=False)
            pid = p.profile_id
            ids = [pid, *await self._shadows(conn, tenant, pid)]

            def mine(table: sa.Table) -> Any:
                return sa.and_(table.c.tenant_id == tenant, table.c.profile_id.in_(ids))

            idents = (
                await conn.execute(sa.select(identities).where(mine(identities)).order_by("kind", "value"))
            ).all()
            evs = (
                await conn.execute(
                    sa.select(events)
                    .where(mine(events))
                    .order_by(events.c.occurred_at.desc(), events.c.event_id.desc())
                    .limit(MAX_EXPORT_EVENTS + 1)
                )
            ).all()
            ledger = (
                await conn.execute(
                    sa.select(consent_ledger).where(mine(consent_ledger)).order_by(consent_ledger.c.entry_id)
                )
            ).all()
            tags = (
                await conn.execute(
                    sa.select(profile_tags.c.tag).where(mine(profile_tags)).order_by(profile_tags.c.tag)
                )
            ).scalars()
            traits = (
                await conn.execute(
                    sa.select(profile_traits).where(mine(profile_traits)).order_by("name", "source")
                )
            ).all()
            merged = (
                await conn.execute(
                    sa.select(merges)
                    .where(
                        merges.c.tenant_id == tenant,
                        sa.or_(merges.c.to_profile_id.in_(ids), merges.c.from_profile_id.in_(ids)),
                    )
                    .order_by(merges.c.merge_id)
                )
            ).all()
        return Export(
            profile=p,
            identities=list(idents),
            events=list(evs[:MAX_EXPORT_EVENTS]),
            events_truncated=len(evs) > MAX_EXPORT_EVENTS,
            consent_history=list(ledger),
            tags=list(tags),
            traits=list(traits),
            merges=list(merged),
        )

    async def erase(
        self,
        tenant: str,
        profile_id: str,
        request_id: str,
        now: datetime,
        *,
        make_id: Callable[[], str],
    ) -> Erasure:
        """Erase a person in one transaction; the same request_id returns the same erasure."""
        async with self.engine.begin() as conn:
            if request_id:
                found = await self._erasure_of_request(conn, tenant, request_id)
                if found is not None:
                    return found
            p = await self._canonical(conn, tenant, profile_id, lock=True)
            pid = p.profile_id
            ids = [*await self._shadows(conn, tenant, pid), pid]
            keys = await self._identifier_keys(conn, tenant, ids)
            await self._delete_rows(conn, tenant, ids)
            await self._suppress(conn, tenant, keys, now)
            erasure_id = make_id()
            row = (
                await conn.execute(
                    erasures.insert()
                    .values(
                        tenant_id=tenant,
                        erasure_id=erasure_id,
                        request_id=request_id or erasure_id,
                        profile_id=pid,
                        state=PENDING,
                        services_done=["profile"],
                        requested_at=now,
                    )
                    .returning(*erasures.c)
                )
            ).one()
            hashes = sorted({h for _, h in keys})
            # the shadows first: a service acknowledges the last (the person's own id) after them
            await enqueue(
                conn,
                outbox,
                [
                    OutboxMessage(
                        ERASED_SUBJECT,
                        bus_pb2.ProfileErased(
                            tenant_id=tenant, profile_id=i, erasure_id=erasure_id, identifier_hashes=hashes
                        ).SerializeToString(),
                    )
                    for i in ids
                ],
                now,
            )
            return _erasure(row)

    async def _erasure_of_request(
        self, conn: AsyncConnection, tenant: str, request_id: str
    ) -> Erasure | None:
        """The erasure made for `request_id` before, if any; erasures with one request id take
        turns from here (the unique constraint backs this up)."""
        await conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"),
            {"k": f"erasure/{tenant}/{request_id}"},
        )
        found = (
            await conn.execute(
                sa.select(erasures).where(erasures.c.tenant_id == tenant, erasures.c.request_id == request_id)
            )
        ).first()
        return None if found is None else _erasure(found)

    async def _identifier_keys(
        self, conn: AsyncConnection, tenant: str, ids: list[str]
    ) -> set[tuple[str, str]]:
        """(kind, hash) of every identifier and phone number of the profiles `ids`."""
        idents = (
            await conn.execute(
                sa.select(identities.c.kind, identities.c.value).where(
                    identities.c.tenant_id == tenant, identities.c.profile_id.in_(ids)
                )
            )
        ).all()
        phones = (
            await conn.execute(
                sa.select(profiles.c.phone).where(
                    profiles.c.tenant_id == tenant,
                    profiles.c.profile_id.in_(ids),
                    profiles.c.phone.is_not(None),
                )
            )
        ).scalars()
        keys = {(i.kind, identifier_hash(i.value)) for i in idents}
        keys |= {("phone", identifier_hash(ph)) for ph in phones}
        return keys

    async def _delete_rows(self, conn: AsyncConnection, tenant: str, ids: list[str]) -> None:
        """Delete every row of the profiles `ids` and the merges between them and others."""
        for table in (
            events,
            identities,
            consents,
            consent_ledger,
            profile_tags,
            profile_traits,
            segment_members,
        ):
            await conn.execute(table.delete().where(table.c.tenant_id == tenant, table.c.profile_id.in_(ids)))
        await conn.execute(
            merges.delete().where(
                merges.c.tenant_id == tenant,
                sa.or_(merges.c.to_profile_id.in_(ids), merges.c.from_profile_id.in_(ids)),
            )
        )
        await conn.execute(
            profiles.delete().where(profiles.c.tenant_id == tenant, profiles.c.profile_id.in_(ids))
        )

    async def _suppress(
        self, conn: AsyncConnection, tenant: str, keys: set[tuple[str, str]], now: datetime
    ) -> None:
        """Keep the (kind, hash) `keys` of an erased person's identifiers."""
        if keys:
            await conn.execute(
                sa.text("""
                INSERT INTO suppressions (tenant_id, kind, value_hash, created_at)
                SELECT :tenant, k.kind, k.hash, :now
                FROM unnest(CAST(:kinds AS text[]), CAST(:hashes AS text[])) AS k(kind, hash)
                ON CONFLICT DO NOTHING
                """),
                {
                    "tenant": tenant,
                    "now": now,
                    "kinds": [k for k, _ in sorted(keys)],
                    "hashes": [h for _, h in sorted(keys)],
                },
            )

    async def get_erasure(self, tenant: str, erasure_id: str) -> Erasure:
        if not erasure_id:
            raise InvalidArgument(FieldViolation("erasure_id", "required"))
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(erasures).where(
                        erasures.c.tenant_id == tenant, erasures.c.erasure_id == erasure_id
                    )
                )
            ).first()
        if row is None:
            raise NotFound(f"erasure {erasure_id!r} not found")
        return _erasure(row)

    async def record_acks(self, acks: Sequence[tuple[str, str, str]], now: datetime) -> None:
        """Record (tenant, erasure id, service) acknowledgements; an erasure every purging
        service acknowledged is done. Repeated acknowledgements change nothing."""
        async with self.engine.begin() as conn:
            for tenant, erasure_id, service in sorted(set(acks)):
                await conn.execute(
                    sa.text("""
                    UPDATE erasures
                    SET services_done = CASE WHEN :service = ANY(services_done) THEN services_done
                                             ELSE services_done || CAST(:service AS text) END
                    WHERE tenant_id = :tenant AND erasure_id = :erasure_id
                    """),
                    {"tenant": tenant, "erasure_id": erasure_id, "service": service},
                )
                await conn.execute(
                    sa.text("""
                    UPDATE erasures SET state = 'done', completed_at = :now
                    WHERE tenant_id = :tenant AND erasure_id = :erasure_id AND state = 'pending'
                      AND CAST(:required AS text[]) <@ services_done
                    """),
                    {
                        "tenant": tenant,
                        "erasure_id": erasure_id,
                        "now": now,
                        "required": list(PURGING_SERVICES),
                    },
                )
