"""Queries of the on-site banners (table `banners`, tables.py): placing, loading, withdrawing,
counting shows, closing expired ones, following merges and erasures.

Every change of a banner row enqueues, in the same transaction, a notice on `rv.delivery.banners`
(a `DeliveryStatusChanged` naming the message): every delivery process reloads the rows it is
told of and so keeps its inbox (banner_inbox.py) equal to the table. A notice says only "this
banner changed"; the row says how, so notices may arrive twice or out of order.

What the person sees in the message history: `opened` the first time the banner is shown (once,
whichever process showed it), `withdrawn` with the reason when its moment passed (`cancelled`, or
the trigger's reason), consent was withdrawn (`consent_withdrawn`) or it expired unseen
(`expired`); each is published on `rv.delivery.status.<status>` through the outbox as well.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans.delivery.v1 import bus_pb2, delivery_pb2
from relevans.kit.db import DriverStatement, fetch_on_driver
from relevans.kit.erasure import Erased
from relevans.kit.merges import ProfileMerge
from relevans.kit.outbox import OutboxMessage, enqueue
from relevans.kit.proto import to_timestamp
from services.delivery.domain import OPENED, WITHDRAWN
from services.delivery.domain.banners import PlacedBanner
from services.delivery.store import append_history
from services.delivery.tables import (
    banner_consents,
    banner_withdrawals,
    banners,
    merged_profiles,
    messages,
    outbox,
)

# Every delivery process follows this subject (stream RV_DELIVERY_BANNERS).
BANNERS_SUBJECT = "rv.delivery.banners"
STATUS_SUBJECT_PREFIX = "rv.delivery.status."
# Rows read per round trip when a process loads the live banners at start.
LOAD_CHUNK = 2_000
# Expired banners closed per transaction; how long closed banners are kept (their history stays).
EXPIRE_BATCH = 1_000
RETENTION = timedelta(days=30)
# Reasons recorded on a banner that expired before anyone saw it, or whose consent was withdrawn.
EXPIRED = "expired"
CONSENT_WITHDRAWN = "consent_withdrawn"

BannerKey = tuple[str, str]  # (tenant id, message id)

# The reason of a banner's `opened`.
SHOWN = "banner_shown"

# The shown banners among a batch, locked (another process's first show of one waits here), with
# whether this is their first show and what their status message needs.
_LOCK_SHOWN = DriverStatement("""
SELECT b.tenant_id, b.message_id, b.first_shown_at IS NULL AS first,
       m.idempotency_key, m.profile_id, m.trigger_id
FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[])) AS s(tenant_id, message_id)
JOIN banners b ON b.tenant_id = s.tenant_id AND b.message_id = s.message_id
LEFT JOIN messages m ON m.tenant_id = s.tenant_id AND m.message_id = s.message_id
ORDER BY b.tenant_id, b.message_id
FOR UPDATE OF b
""")

# The shows added up, and for the first ones `opened` in the history and on the bus.
_COUNT_SHOWS = DriverStatement("""
WITH s AS (
    SELECT * FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[]), CAST(:ns AS bigint[]),
                         CAST(:ats AS timestamptz[]), CAST(:firsts AS boolean[]))
        AS s(tenant_id, message_id, n, at, first)
), counted AS (
    UPDATE banners AS b
    SET shown_count = b.shown_count + s.n, first_shown_at = coalesce(b.first_shown_at, s.at)
    FROM s WHERE b.tenant_id = s.tenant_id AND b.message_id = s.message_id
), opened AS (
    INSERT INTO message_status_history (tenant_id, message_id, status, reason, at)
    SELECT tenant_id, message_id, :opened, :reason, at FROM s WHERE first
)
INSERT INTO outbox (subject, payload, created_at)
SELECT subject, payload, CAST(:now AS timestamptz)
FROM unnest(CAST(:subjects AS text[]), CAST(:payloads AS bytea[])) AS p(subject, payload)
""")

_STATUS = {
    OPENED: delivery_pb2.MESSAGE_STATUS_OPENED,
    WITHDRAWN: delivery_pb2.MESSAGE_STATUS_WITHDRAWN,
}


@dataclass(frozen=True, slots=True)
class Placement:
    """A banner to place, with the purpose of the message (a consent withdrawal of that purpose
    on the web channel withdraws it) and when the trigger asked for it (a withdrawal of the
    moment from then on withdraws it)."""

    banner: PlacedBanner
    purpose: str
    requested_at: datetime


def _status_changed(message: Mapping[Any, Any], status: str, reason: str, at: datetime) -> OutboxMessage:
    """`DeliveryStatusChanged` of a banner's message (its row: tenant_id, message_id,
    idempotency_key, profile_id, trigger_id) on rv.delivery.status.<status>."""
    payload = bus_pb2.DeliveryStatusChanged(
        tenant_id=message["tenant_id"],
        message_id=message["message_id"],
        idempotency_key=message["idempotency_key"],
        profile_id=message["profile_id"],
        trigger_id=message["trigger_id"],
        status=_STATUS[status],
        reason=reason,
        time=to_timestamp(at),
    )
    return OutboxMessage(STATUS_SUBJECT_PREFIX + status, payload.SerializeToString())


def banner_notice(
    tenant_id: str, message_id: str, profile_id: str = "", trigger_id: str = ""
) -> OutboxMessage:
    payload = bus_pb2.DeliveryStatusChanged(
        tenant_id=tenant_id, message_id=message_id, profile_id=profile_id, trigger_id=trigger_id
    )
    return OutboxMessage(BANNERS_SUBJECT, payload.SerializeToString())


def _banner(row: Any) -> PlacedBanner:
    return PlacedBanner(
        tenant_id=row.tenant_id,
        message_id=row.message_id,
        profile_id=row.profile_id,
        trigger_id=row.trigger_id,
        placement=row.placement,
        title=row.title,
        body_text=row.body_text,
        link_url=row.link_url,
        priority=row.priority,
        placed_at=row.placed_at,
        expire_at=row.expire_at,
        anonymous_ids=tuple(row.anonymous_ids),
        withdrawn=row.withdrawn_at is not None,
    )


_COLUMNS = (
    banners.c.tenant_id,
    banners.c.message_id,
    banners.c.profile_id,
    banners.c.trigger_id,
    banners.c.placement,
    banners.c.title,
    banners.c.body_text,
    banners.c.link_url,
    banners.c.priority,
    banners.c.placed_at,
    banners.c.expire_at,
    banners.c.anonymous_ids,
    banners.c.withdrawn_at,
)


class BannerRows:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # ---- placing and loading ---------------------------------------------------------------------

    async def place(self, placements: Sequence[Placement], now: datetime) -> None:
        """Write the banners and their notices in one transaction; a banner already placed (the same
        message) stays as it is. One whose moment was withdrawn, or whose web consent was refused,
        after its request (the withdrawal was handled first) is placed withdrawn."""
        if not placements:
            return
        values = [
            {
                "tenant_id": p.banner.tenant_id,
                "message_id": p.banner.message_id,
                "profile_id": p.banner.profile_id,
                "anonymous_ids": list(p.banner.anonymous_ids),
                "trigger_id": p.banner.trigger_id,
                "purpose": p.purpose,
                "placement": p.banner.placement,
                "title": p.banner.title,
                "body_text": p.banner.body_text,
                "link_url": p.banner.link_url,
                "priority": p.banner.priority,
                "placed_at": p.banner.placed_at,
                "expire_at": p.banner.expire_at,
                "requested_at": p.requested_at,
            }
            for p in placements
        ]
        async with self.engine.begin() as conn:
            await conn.execute(
                pg_insert(banners).on_conflict_do_nothing(),
                values,
            )
            notices = [
                banner_notice(
                    p.banner.tenant_id, p.banner.message_id, p.banner.profile_id, p.banner.trigger_id
                )
                for p in placements
            ]
            await enqueue(conn, outbox, notices, now)
            await self._withdrawn_before(conn, [p.banner for p in placements], now)

    async def _withdrawn_before(
        self, conn: AsyncConnection, placed: Sequence[PlacedBanner], now: datetime
    ) -> None:
        """Withdraw the banners among `placed` whose trigger's moment was withdrawn for the person, or
        whose web consent was refused, at or after their request (the withdrawal was handled before
        the placement)."""
        keys = sorted({(b.tenant_id, b.message_id) for b in placed})
        c = banner_consents
        refused = (
            sa.select(sa.literal(1))
            .where(
                c.c.tenant_id == banners.c.tenant_id,
                c.c.profile_id == banners.c.profile_id,
                c.c.purpose == banners.c.purpose,
                c.c.refused,
                c.c.changed_at >= banners.c.requested_at,
            )
            .exists()
        )
        unwanted = (
            await conn.execute(
                banners.update()
                .where(
                    sa.tuple_(banners.c.tenant_id, banners.c.message_id).in_(keys),
                    banners.c.withdrawn_at.is_(None),
                    refused,
                )
                .values(withdrawn_at=now, withdraw_reason=CONSENT_WITHDRAWN)
                .returning(banners.c.tenant_id, banners.c.message_id)
            )
        ).all()
        for r in unwanted:
            await self._record(conn, r.tenant_id, [r.message_id], WITHDRAWN, CONSENT_WITHDRAWN, now)
        w = banner_withdrawals
        rows = (
            await conn.execute(
                banners.update()
                .where(
                    sa.tuple_(banners.c.tenant_id, banners.c.message_id).in_(keys),
                    banners.c.withdrawn_at.is_(None),
                    w.c.tenant_id == banners.c.tenant_id,
                    w.c.profile_id == banners.c.profile_id,
                    w.c.trigger_id == banners.c.trigger_id,
                    w.c.withdrawn_at >= banners.c.requested_at,
                )
                .values(withdrawn_at=now, withdraw_reason=w.c.reason)
                .returning(banners.c.tenant_id, banners.c.message_id, banners.c.withdraw_reason)
            )
        ).all()
        for r in rows:
            await self._record(conn, r.tenant_id, [r.message_id], WITHDRAWN, r.withdraw_reason, now)

    async def live(self, now: datetime) -> AsyncIterator[list[PlacedBanner]]:
        """Every banner that may still be shown, in chunks (one snapshot: one transaction)."""
        query = (
            sa.select(*_COLUMNS)
            .where(banners.c.withdrawn_at.is_(None), banners.c.expire_at > now)
            .execution_options(yield_per=LOAD_CHUNK)
        )
        async with self.engine.connect() as conn:
            result = await conn.stream(query)
            async for chunk in result.partitions(LOAD_CHUNK):
                yield [_banner(r) for r in chunk]

    async def load(self, keys: Iterable[BannerKey]) -> dict[BannerKey, PlacedBanner]:
        """The banners of `keys` as the table holds them now (withdrawn ones too); absent: gone."""
        wanted = sorted(set(keys))
        if not wanted:
            return {}
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(*_COLUMNS).where(sa.tuple_(banners.c.tenant_id, banners.c.message_id).in_(wanted))
            )
            return {(r.tenant_id, r.message_id): _banner(r) for r in rows}

    # ---- withdrawing ---------------------------------------------------------------------------

    async def withdraw(
        self,
        conn: AsyncConnection,
        tenant_id: str,
        profile_id: str,
        reason: str,
        now: datetime,
        *,
        trigger_id: str | None = None,
        purpose: str | None = None,
        requested_before: datetime | None = None,
        moment_ended: datetime | None = None,
    ) -> list[str]:
        """Withdraw the person's banners still waiting (of one trigger, or of one purpose; asked
        for no later than `requested_before`), in the caller's transaction: `withdrawn` in their history
        and on the bus, and their notices. A merged-away id counts as its survivor. Returns the
        message ids withdrawn. A trigger's withdrawal is remembered (as of `moment_ended`, else
        now) for the banners of that moment placed later."""
        person = await self._survivor(conn, tenant_id, profile_id)
        if trigger_id is not None:
            remembered = pg_insert(banner_withdrawals).values(
                tenant_id=tenant_id,
                profile_id=person,
                trigger_id=trigger_id,
                withdrawn_at=moment_ended or now,
                reason=reason,
            )
            await conn.execute(
                remembered.on_conflict_do_update(
                    index_elements=["tenant_id", "profile_id", "trigger_id"],
                    set_={
                        "withdrawn_at": sa.func.greatest(
                            banner_withdrawals.c.withdrawn_at, remembered.excluded.withdrawn_at
                        ),
                        "reason": remembered.excluded.reason,
                    },
                )
            )
        query = banners.update().where(
            banners.c.tenant_id == tenant_id,
            banners.c.profile_id == person,
            banners.c.withdrawn_at.is_(None),
            banners.c.expire_at > now,
        )
        if trigger_id is not None:
            query = query.where(banners.c.trigger_id == trigger_id)
        if purpose is not None:
            query = query.where(banners.c.purpose == purpose)
        if requested_before is not None:
            query = query.where(banners.c.requested_at <= requested_before)
        rows = (
            await conn.execute(
                query.values(withdrawn_at=now, withdraw_reason=reason).returning(
                    banners.c.message_id, banners.c.trigger_id
                )
            )
        ).all()
        ids = [r.message_id for r in rows]
        await self._record(conn, tenant_id, ids, WITHDRAWN, reason, now)
        await enqueue(conn, outbox, [banner_notice(tenant_id, m) for m in ids], now)
        return ids

    async def remember_consent(
        self,
        conn: AsyncConnection,
        tenant_id: str,
        profile_id: str,
        purpose: str,
        refused: bool,
        at: datetime,
    ) -> None:
        """The person's latest web consent decision for `purpose` (the later one wins)."""
        person = await self._survivor(conn, tenant_id, profile_id)
        decision = pg_insert(banner_consents).values(
            tenant_id=tenant_id, profile_id=person, purpose=purpose, refused=refused, changed_at=at
        )
        await conn.execute(
            decision.on_conflict_do_update(
                index_elements=["tenant_id", "profile_id", "purpose"],
                set_={"refused": decision.excluded.refused, "changed_at": decision.excluded.changed_at},
                where=banner_consents.c.changed_at <= decision.excluded.changed_at,
            )
        )

    async def _survivor(self, conn: AsyncConnection, tenant_id: str, profile_id: str) -> str:
        found = await conn.scalar(
            sa.select(merged_profiles.c.surviving_profile_id).where(
                merged_profiles.c.tenant_id == tenant_id, merged_profiles.c.profile_id == profile_id
            )
        )
        return str(found) if found else profile_id

    async def _record(
        self,
        conn: AsyncConnection,
        tenant_id: str,
        message_ids: Sequence[str],
        status: str,
        reason: str,
        now: datetime,
    ) -> None:
        """`status` in the history of each message, and its DeliveryStatusChanged on the bus."""
        if not message_ids:
            return
        rows = (
            await conn.execute(
                sa.select(
                    messages.c.tenant_id,
                    messages.c.message_id,
                    messages.c.idempotency_key,
                    messages.c.profile_id,
                    messages.c.trigger_id,
                ).where(messages.c.tenant_id == tenant_id, messages.c.message_id.in_(message_ids))
            )
        ).all()
        if not rows:
            return
        await append_history(conn, [(tenant_id, r.message_id, status, reason) for r in rows], now)
        published = [_status_changed(r._mapping, status, reason, now) for r in rows]
        await enqueue(conn, outbox, published, now)

    # ---- expiry and retention --------------------------------------------------------------------

    async def expire(self, now: datetime, *, batch: int = EXPIRE_BATCH, keep: timedelta = RETENTION) -> int:
        """Close up to `batch` banners whose time has passed (`withdrawn_at` = their expiry; one never
        shown gets `withdrawn` "expired" in its history and on the bus), and delete closed ones older
        than `keep`; return how many were closed. Any number of processes may run it: each row is
        taken by one (SKIP LOCKED)."""
        async with self.engine.begin() as conn:
            closed = (
                await conn.execute(
                    sa.text(
                        "UPDATE banners AS b SET withdrawn_at = b.expire_at, withdraw_reason = :reason "
                        "FROM (SELECT tenant_id, message_id FROM banners "
                        "      WHERE withdrawn_at IS NULL AND expire_at <= :now "
                        "      ORDER BY expire_at LIMIT :batch FOR UPDATE SKIP LOCKED) AS due "
                        "WHERE b.tenant_id = due.tenant_id AND b.message_id = due.message_id "
                        "RETURNING b.tenant_id, b.message_id, b.first_shown_at IS NULL AS unseen"
                    ),
                    {"reason": EXPIRED, "now": now, "batch": batch},
                )
            ).all()
            unseen: dict[str, list[str]] = {}
            for r in closed:
                if r.unseen:
                    unseen.setdefault(r.tenant_id, []).append(r.message_id)
            for tenant_id, ids in sorted(unseen.items()):
                await self._record(conn, tenant_id, ids, WITHDRAWN, EXPIRED, now)
            await conn.execute(
                banners.delete().where(
                    banners.c.withdrawn_at.is_not(None), banners.c.withdrawn_at < now - keep
                )
            )
        return len(closed)

    # ---- shows -----------------------------------------------------------------------------------

    async def record_shows(self, shows: Mapping[BannerKey, tuple[int, datetime]]) -> int:
        """Add up shows ((tenant, message id) -> (count, when first shown here)) in one
        transaction; a banner shown for the first time anywhere gets `opened` in its history and on
        the bus, once (its row is locked, so two processes' first shows make one). Two statements
        on the driver, whatever the number of banners: this runs beside GetBanner in its process.
        Returns how many were shown for the first time."""
        if not shows:
            return 0
        keys = sorted(shows)
        async with self.engine.begin() as conn:
            locked = await fetch_on_driver(
                conn, _LOCK_SHOWN, {"tenants": [t for t, _ in keys], "ids": [m for _, m in keys]}
            )
            first = {(r["tenant_id"], r["message_id"]): r for r in locked if r["first"]}
            present = {(r["tenant_id"], r["message_id"]) for r in locked}
            counted = [k for k in keys if k in present]
            published = [
                _status_changed(r, OPENED, SHOWN, shows[k][1])
                for k, r in first.items()
                if r["idempotency_key"]
            ]
            await fetch_on_driver(
                conn,
                _COUNT_SHOWS,
                {
                    "tenants": [t for t, _ in counted],
                    "ids": [m for _, m in counted],
                    "ns": [shows[k][0] for k in counted],
                    "ats": [shows[k][1] for k in counted],
                    "firsts": [k in first and bool(first[k]["idempotency_key"]) for k in counted],
                    "opened": OPENED,
                    "reason": SHOWN,
                    "subjects": [m.subject for m in published],
                    "payloads": [m.payload for m in published],
                    "now": max(at for _, at in shows.values()),
                },
            )
        return len(first)

    # ---- people: merges and erasures -------------------------------------------------------------

    async def merge_people(
        self, conn: AsyncConnection, merges: Sequence[ProfileMerge], now: datetime
    ) -> None:
        """After the store applied the merges (aliases recorded): the banners under a merged-away
        id move to the survivor, and every banner of the survivor answers to all their anonymous
        ids; each moved or widened banner is announced."""
        for m in merges:
            survivor = await self._survivor(conn, m.tenant_id, m.merged_profile_id)
            moved = (
                await conn.execute(
                    banners.update()
                    .where(banners.c.tenant_id == m.tenant_id, banners.c.profile_id == m.merged_profile_id)
                    .values(profile_id=survivor)
                    .returning(banners.c.message_id)
                )
            ).all()
            if not moved:
                continue
            widened = (
                await conn.execute(
                    sa.text(
                        "UPDATE banners SET anonymous_ids = ("
                        " SELECT coalesce(array_agg(DISTINCT a ORDER BY a), '{}') FROM banners o, "
                        " unnest(o.anonymous_ids) AS a WHERE o.tenant_id = :t AND o.profile_id = :p) "
                        "WHERE tenant_id = :t AND profile_id = :p RETURNING message_id"
                    ),
                    {"t": m.tenant_id, "p": survivor},
                )
            ).all()
            notices = {r.message_id for r in (*moved, *widened)}
            await enqueue(conn, outbox, [banner_notice(m.tenant_id, i) for i in sorted(notices)], now)

    async def purge_people(self, conn: AsyncConnection, erased: Sequence[Erased], now: datetime) -> None:
        """Delete the erased people's banners (the store already deleted their messages) and tell
        every process to drop them."""
        for e in erased:
            gone = (
                await conn.execute(
                    banners.delete()
                    .where(banners.c.tenant_id == e.tenant_id, banners.c.profile_id == e.profile_id)
                    .returning(banners.c.message_id)
                )
            ).all()
            await conn.execute(
                banner_withdrawals.delete().where(
                    banner_withdrawals.c.tenant_id == e.tenant_id,
                    banner_withdrawals.c.profile_id == e.profile_id,
                )
            )
            await enqueue(conn, outbox, [banner_notice(e.tenant_id, r.message_id) for r in gone], now)
