"""Profile merges as the services that follow people see them (`rv.profile.merged`).

The profile service publishes `relevans.profile.v1.ProfileMerged` when one profile is merged into
another; trigger and delivery move what they keep under the merged-away id to the survivor.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
import structlog
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans.kit.bus import Bus, Consumer
from relevans.kit.clock import Clock
from relevans.kit.db import DriverStatement, fetch_on_driver, unnest
from relevans.kit.proto import from_timestamp
from relevans.profile.v1 import bus_pb2

STREAM = "RV_PROFILE"
MERGED_SUBJECT = "rv.profile.merged"

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ProfileMerge:
    """Profile `merged_profile_id` was merged into `surviving_profile_id` and now stands for it."""

    tenant_id: str
    surviving_profile_id: str
    merged_profile_id: str
    merged_at: datetime


def decode_merges(msgs: Sequence[Msg], now: datetime) -> list[ProfileMerge]:
    """The usable merges of a batch, in order; unusable messages are logged and skipped (a missing
    or invalid merge time is taken as `now`)."""
    out: list[ProfileMerge] = []
    for m in msgs:
        try:
            merged = bus_pb2.ProfileMerged.FromString(m.data)
        except DecodeError:
            log.error("undecodable merge skipped", subject=m.subject, size=len(m.data))
            continue
        if not (merged.tenant_id and merged.surviving_profile_id and merged.merged_profile_id):
            log.error("incomplete merge skipped", subject=m.subject)
            continue
        at = now
        if merged.HasField("merge_time"):
            try:
                at = from_timestamp(merged.merge_time)
            except (ValueError, OverflowError):
                log.warning("merge with an invalid merge_time", subject=m.subject)
        out.append(ProfileMerge(merged.tenant_id, merged.surviving_profile_id, merged.merged_profile_id, at))
    return out


# Moves what a service keeps under merged-away ids to the survivors, inside the caller's transaction.
MergePeople = Callable[[AsyncConnection, Sequence[ProfileMerge], datetime], Awaitable[None]]


class MergeHandler:
    """Applies a batch of merges in one transaction; the kit's Consumer acks after the commit, so a
    redelivered batch finds nothing left under the old ids."""

    def __init__(self, service: str, engine: AsyncEngine, merge_people: MergePeople, clock: Clock) -> None:
        self.service = service
        self.engine = engine
        self.merge_people = merge_people
        self.clock = clock

    async def handle(self, msgs: Sequence[Msg]) -> None:
        now = self.clock.now()
        merges = decode_merges(msgs, now)
        if not merges:
            return
        async with self.engine.begin() as conn:
            await self.merge_people(conn, merges, now)
        log.info("profile merges applied", service=self.service, count=len(merges))


def merge_consumer(
    bus: Bus, *, service: str, durable: str, engine: AsyncEngine, merge_people: MergePeople, clock: Clock
) -> Consumer:
    return Consumer(
        bus,
        service=service,
        stream=STREAM,
        durable=durable,
        filter_subject=MERGED_SUBJECT,
        handler=MergeHandler(service, engine, merge_people, clock).handle,
    )


# ---------------------------------------------------------------------------------------------- aliases

Person = tuple[str, str]  # (tenant id, profile id)


async def surviving_ids(
    conn: AsyncConnection, table: sa.Table, people: Iterable[Person]
) -> dict[Person, str]:
    """The surviving profile id of each merged-away person among `people`."""
    wanted = sorted(set(people))
    if not wanted:
        return {}
    rows = await fetch_on_driver(
        conn,
        _survivors(table.name),
        {"tenant_id": [t for t, _ in wanted], "profile_id": [p for _, p in wanted]},
    )
    return {(r["tenant_id"], r["profile_id"]): r["surviving_profile_id"] for r in rows}


@functools.cache
def _survivors(table: str) -> DriverStatement:
    """The merged-away ids among a batch and their survivors: one statement whatever the batch size
    (it runs for every batch of events a service handles)."""
    return DriverStatement(f"""
SELECT m.tenant_id, m.profile_id, m.surviving_profile_id
FROM {unnest("u", (("tenant_id", "text"), ("profile_id", "text")))}
JOIN {table} m ON m.tenant_id = u.tenant_id AND m.profile_id = u.profile_id
""")


async def record_alias(
    conn: AsyncConnection, table: sa.Table, tenant: str, gone: str, survivor: str, merged_at: datetime
) -> None:
    """`gone` now stands for `survivor`, and so does every id that stood for `gone`."""
    alias = pg_insert(table).values(
        tenant_id=tenant, profile_id=gone, surviving_profile_id=survivor, merged_at=merged_at
    )
    await conn.execute(
        alias.on_conflict_do_update(
            index_elements=["tenant_id", "profile_id"],
            set_={"surviving_profile_id": alias.excluded.surviving_profile_id},
        )
    )
    await conn.execute(
        table.update()
        .where(table.c.tenant_id == tenant, table.c.surviving_profile_id == gone)
        .values(surviving_profile_id=survivor)
    )


async def forget_aliases(conn: AsyncConnection, table: sa.Table, people: Sequence[Person]) -> list[Person]:
    """Drop the ids merged into `people` (erased people: their old ids go with them); returns them."""
    if not people:
        return []
    rows = await conn.execute(
        table.delete()
        .where(sa.tuple_(table.c.tenant_id, table.c.surviving_profile_id).in_(people))
        .returning(table.c.tenant_id, table.c.profile_id)
    )
    return [(r.tenant_id, r.profile_id) for r in rows]
