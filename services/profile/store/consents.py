"""Consent: the ledger of every decision and the current view (the latest per purpose and channel)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans.kit.outbox import OutboxMessage, enqueue
from services.profile.domain import Consent, Profile, current_view
from services.profile.store.reads import ProfileReads
from services.profile.store.rows import ConsentMessage, lock_existing, transaction
from services.profile.store.tables import consents, outbox, profiles

CONSENT_SUBJECT = "rv.profile.consent"

# The consent ledger and its current view, for any number of (profile, decision) pairs: one
# statement each, whatever their number (see `consent_columns`).
_CONSENT_ROWS = """
FROM unnest(CAST(:profile_ids AS text[]), CAST(:purposes AS text[]), CAST(:channels AS text[]),
            CAST(:statuses AS text[]), CAST(:sources AS text[]), CAST(:evidences AS text[]),
            CAST(:recorded AS timestamptz[]))
     WITH ORDINALITY AS u(profile_id, purpose, channel, status, source, evidence, recorded_at, ord)
"""
_APPEND_LEDGER = sa.text(f"""
INSERT INTO consent_ledger (tenant_id, profile_id, purpose, channel, status, source, evidence, recorded_at)
SELECT :tenant, u.profile_id, u.purpose, u.channel, u.status, u.source, u.evidence, u.recorded_at
{_CONSENT_ROWS}
ORDER BY u.ord
""")
UPSERT_CONSENTS = sa.text(f"""
INSERT INTO consents AS c (tenant_id, profile_id, purpose, channel, status, source, evidence, recorded_at)
SELECT :tenant, u.profile_id, u.purpose, u.channel, u.status, u.source, u.evidence, u.recorded_at
{_CONSENT_ROWS}
ORDER BY u.profile_id, u.purpose, u.channel
ON CONFLICT (tenant_id, profile_id, purpose, channel) DO UPDATE
SET status = excluded.status, source = excluded.source, evidence = excluded.evidence,
    recorded_at = excluded.recorded_at
""")


def consent_columns(decisions: Sequence[tuple[str, Consent]]) -> dict[str, list[Any]]:
    """(profile id, decision) pairs as the array parameters of `_CONSENT_ROWS`."""
    return {
        "profile_ids": [pid for pid, _ in decisions],
        "purposes": [c.purpose for _, c in decisions],
        "channels": [c.channel for _, c in decisions],
        "statuses": [c.status for _, c in decisions],
        "sources": [c.source for _, c in decisions],
        "evidences": [c.evidence for _, c in decisions],
        "recorded": [c.recorded_at for _, c in decisions],
    }


async def consents_of(conn: AsyncConnection, tenant: str, profile_ids: list[str]) -> dict[str, list[Consent]]:
    rows = await conn.execute(
        sa.select(consents).where(consents.c.tenant_id == tenant, consents.c.profile_id.in_(profile_ids))
    )
    held: dict[str, list[Consent]] = {}
    for r in rows:
        held.setdefault(r.profile_id, []).append(
            Consent(r.purpose, r.channel, r.status, r.source, r.evidence, r.recorded_at)
        )
    return held


class ConsentStore:
    """Records consent decisions (identify and SetConsent) with their ConsentChanged messages."""

    def __init__(self, engine: AsyncEngine, consent_message: ConsentMessage, reads: ProfileReads) -> None:
        self.engine = engine
        self.consent_message = consent_message
        self.reads = reads

    async def record(
        self, conn: AsyncConnection, tenant: str, profile_id: str, decisions: Sequence[Consent]
    ) -> list[OutboxMessage]:
        """Append to the ledger, update the current view; the ConsentChanged messages to enqueue."""
        return await self.record_decisions(conn, tenant, [(profile_id, c) for c in decisions])

    async def record_decisions(
        self, conn: AsyncConnection, tenant: str, decisions: Sequence[tuple[str, Consent]]
    ) -> list[OutboxMessage]:
        """`record` for (profile id, decision) pairs of any number of profiles."""
        if not decisions:
            return []
        await conn.execute(_APPEND_LEDGER, {"tenant": tenant, **consent_columns(decisions)})
        by_profile: dict[str, list[Consent]] = {}
        for profile_id, c in decisions:
            by_profile.setdefault(profile_id, []).append(c)
        latest = [(pid, c) for pid in sorted(by_profile) for c in current_view(by_profile[pid])]
        await conn.execute(UPSERT_CONSENTS, {"tenant": tenant, **consent_columns(latest)})
        return [
            OutboxMessage(CONSENT_SUBJECT, self.consent_message(tenant, profile_id, c))
            for profile_id, c in decisions
        ]

    async def set_consent(self, tenant: str, profile_id: str, consent: Consent, now: datetime) -> Profile:
        """Record one consent decision for an existing profile (NotFound otherwise)."""

        async def work(conn: AsyncConnection) -> Profile:
            target = await lock_existing(conn, tenant, profile_id)
            msgs = await self.record(conn, tenant, target, [consent])
            await conn.execute(
                profiles.update()
                .where(profiles.c.tenant_id == tenant, profiles.c.profile_id == target)
                .values(updated_at=now)
            )
            await enqueue(conn, outbox, msgs, now)
            [profile] = await self.reads.load(conn, tenant, [target], now)
            return profile

        return await transaction(self.engine, work)
