"""Addresses delivery never sends to again, by hash (`relevans.kit.identifiers.identifier_hash`):
an erased person's identifiers on every channel (channel "", reason "erased", written by
`DeliveryStore.purge_people`) and an address that bounced, on the channel it bounced on (reason
"address_bounced", written with the bounce's outcome).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from relevans.kit.identifiers import identifier_hash
from services.delivery.tables import suppressions

# The channel of a suppression that holds on every channel.
EVERY_CHANNEL = ""

Address = tuple[str, str, str]  # (tenant_id, channel, address)


@dataclass(frozen=True, slots=True)
class Suppression:
    tenant_id: str
    channel: str
    address: str
    reason: str

    @property
    def value_hash(self) -> str:
        return identifier_hash(self.address)


def suppression_rows(items: Sequence[Suppression], now: datetime) -> list[dict[str, object]]:
    return [
        {
            "tenant_id": s.tenant_id,
            "channel": s.channel,
            "value_hash": s.value_hash,
            "reason": s.reason,
            "created_at": now,
        }
        for s in items
    ]


async def suppress(conn: AsyncConnection, items: Sequence[Suppression], now: datetime) -> None:
    """Remember the addresses (a repeat changes nothing), in the caller's transaction."""
    if items:
        await conn.execute(pg_insert(suppressions).on_conflict_do_nothing(), suppression_rows(items, now))


async def suppression_reasons(conn: AsyncConnection, addresses: Iterable[Address]) -> dict[Address, str]:
    """Why each suppressed one of `addresses` is (an erasure before a bounce); the others are absent."""
    wanted: dict[tuple[str, str], list[Address]] = {}
    for tenant, channel, address in addresses:
        wanted.setdefault((tenant, identifier_hash(address)), []).append((tenant, channel, address))
    if not wanted:
        return {}
    rows = await conn.execute(
        sa.select(
            suppressions.c.tenant_id, suppressions.c.value_hash, suppressions.c.channel, suppressions.c.reason
        )
        .where(sa.tuple_(suppressions.c.tenant_id, suppressions.c.value_hash).in_(sorted(wanted)))
        .order_by(suppressions.c.channel.desc())  # "" (every channel) last, so it wins
    )
    found: dict[Address, str] = {}
    for r in rows:
        for key in wanted[(r.tenant_id, r.value_hash)]:
            if r.channel in (EVERY_CHANNEL, key[1]):
                found[key] = r.reason
    return found
