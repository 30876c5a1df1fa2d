"""Queries of the delivery service (SQLAlchemy Core on asyncpg); the tables are in tables.py.

Every status change is appended to `message_status_history`; final statuses are
published through the outbox in the same transaction.

Workers serialise on one request with a session-level advisory lock per
(tenant, idempotency key), held while a batch is handled (decide -> claim each
message -> send it -> record it). A row in `sending` whose lock nobody holds belongs
to a worker that died mid-send; a row whose lock is held belongs to a live
worker and is left alone. A claim takes only a row still `pending`, so a worker
whose session (and locks) PostgreSQL dropped never sends what another has claimed.

Per person, delivery keeps only the messages (idempotency keys are unique per tenant,
not per profile, so at most one send per key holds across a profile merge; there are
no per-person caps here yet). A merge re-points the merged-away profile's messages to
the survivor and remembers the alias; reads by profile and GDPR purges take the
survivor's aliases along, so a message recorded under the old id while the merge was
being applied is still the person's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import sqlalchemy as sa
import structlog
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans.kit.db import DriverStatement, fetch_on_driver, json_text, unnest
from relevans.kit.erasure import Erased
from relevans.kit.errors import NotFound
from relevans.kit.locks import lock_key32, lock_key64
from relevans.kit.merges import (
    Person,
    ProfileMerge,
    forget_aliases,
    record_alias,
    surviving_ids,
)
from relevans.kit.outbox import OutboxMessage, enqueue
from services.delivery.domain import (
    ACCEPTED,
    PENDING,
    SENDING,
    DeliveryRequest,
    MessageRecord,
    StatusChange,
)
from services.delivery.domain.decision import ERASED
from services.delivery.suppressions import Suppression, suppress
from services.delivery.tables import (
    erased_profiles,
    history,
    merged_profiles,
    messages,
    outbox,
    suppressions,
)

log = structlog.get_logger(__name__)

# First key of the transaction-level advisory lock that serialises one tenant's merges.
MERGE_LOCK_NAMESPACE = 0x5256444D  # "RVDM"


Key = tuple[str, str]  # (tenant_id, idempotency_key)


@dataclass(frozen=True, slots=True)
class MessageRow:
    """A message as the worker sees it."""

    tenant_id: str
    message_id: str
    idempotency_key: str
    profile_id: str
    trigger_id: str
    status: str
    attempts: int
    next_attempt_at: datetime | None = None

    @property
    def key(self) -> Key:
        return (self.tenant_id, self.idempotency_key)


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """Move one message to `status`; `recipient`/`subject` kept when None, attempts never decrease;
    `next_attempt_at` when a pending message's next attempt is due (None: not scheduled)."""

    tenant_id: str
    message_id: str
    status: str
    reason: str
    recipient: str | None = None
    subject: str | None = None
    attempts: int = 0
    next_attempt_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    """Mark one pending message `sending`, right before its content goes out."""

    row: MessageRow
    recipient: str
    subject: str
    sms_segments: int = 0


_TRY_LOCK = sa.text("SELECT k, pg_try_advisory_lock(k) AS ok FROM unnest(CAST(:keys AS bigint[])) AS k")
_UNLOCK_ALL = sa.text("SELECT pg_advisory_unlock_all()")

# Status changes of messages by (tenant, message id), as `_change_parameters` gives them.
_CHANGES = unnest(
    "u",
    (
        ("tenant_id", "text"),
        ("message_id", "text"),
        ("status", "text"),
        ("reason", "text"),
        ("recipient", "text"),
        ("subject", "text"),
        ("attempts", "integer"),
        ("next_attempt_at", "timestamptz"),
    ),
)
_CLAIMS = unnest(
    "c",
    (
        ("tenant_id", "text"),
        ("message_id", "text"),
        ("recipient", "text"),
        ("subject", "text"),
        ("sms_segments", "integer"),
    ),
    prefix="c_",
)
_PUBLISHED = unnest("p", (("subject", "text"), ("payload", "bytea")), prefix="p_")
_SUPPRESSED = unnest(
    "s", (("tenant_id", "text"), ("channel", "text"), ("value_hash", "text"), ("reason", "text")), prefix="s_"
)
# What a delivery worker's sends came to, in one statement (its own transaction, one round trip:
# the writes of every send run through it, so it is kept cheap): the outcomes with their history,
# outbox messages and the addresses they suppress (a hard bounce), and the claims. A claim keeps
# the message's `next_attempt_at`, so the retry worker sees a retry whose sender died mid-send.
# A claim takes only a message still pending: one another
# worker claimed or finished is left to it. A message's claim and outcome are never in the same
# statement (the outcome is known only once the claim is committed).
_RECORD_SENDS = DriverStatement(f"""
WITH u AS (
    SELECT * FROM {_CHANGES}
), recorded AS (
    UPDATE messages AS m
    SET status = u.status, reason = u.reason, attempts = greatest(m.attempts, u.attempts),
        recipient = coalesce(u.recipient, m.recipient), next_attempt_at = u.next_attempt_at,
        updated_at = CAST(:now AS timestamptz)
    FROM u
    WHERE m.tenant_id = u.tenant_id AND m.message_id = u.message_id
), changed AS (
    INSERT INTO message_status_history (tenant_id, message_id, status, reason, at)
    SELECT tenant_id, message_id, status, reason, CAST(:now AS timestamptz) FROM u
), published AS (
    INSERT INTO outbox (subject, payload, created_at)
    SELECT subject, payload, CAST(:now AS timestamptz) FROM {_PUBLISHED}
), suppressed AS (
    INSERT INTO suppressions (tenant_id, channel, value_hash, reason, created_at)
    SELECT tenant_id, channel, value_hash, reason, CAST(:now AS timestamptz) FROM {_SUPPRESSED}
    ON CONFLICT DO NOTHING
), claimed AS (
    UPDATE messages AS m
    SET status = :sending, reason = '', recipient = c.recipient, subject = c.subject,
        sms_segments = c.sms_segments, updated_at = CAST(:now AS timestamptz)
    FROM {_CLAIMS}
    WHERE m.tenant_id = c.tenant_id AND m.message_id = c.message_id AND m.status = :pending
    RETURNING m.tenant_id, m.message_id
)
SELECT tenant_id, message_id FROM claimed
""")

# A batch's new messages (pending, once per idempotency key) and the history row of each one
# inserted, in one statement.
_PENDING_ROWS = unnest(
    "r",
    (
        ("tenant_id", "text"),
        ("message_id", "text"),
        ("idempotency_key", "text"),
        ("profile_id", "text"),
        ("trigger_id", "text"),
        ("channel", "text"),
        ("purpose", "text"),
        ("template_id", "text"),
        ("variables", "jsonb"),
        ("locale", "text"),
    ),
)
_INSERT_PENDING = DriverStatement(f"""
WITH inserted AS (
    INSERT INTO messages (tenant_id, message_id, idempotency_key, profile_id, trigger_id, channel, purpose,
                          template_id, variables, locale, status, reason, recipient, subject, attempts,
                          created_at, updated_at)
    SELECT r.tenant_id, r.message_id, r.idempotency_key, r.profile_id, r.trigger_id, r.channel, r.purpose,
           r.template_id, r.variables, r.locale, :pending, '', '', '', 0,
           CAST(:now AS timestamptz), CAST(:now AS timestamptz)
    FROM {_PENDING_ROWS}
    ON CONFLICT (tenant_id, idempotency_key) DO NOTHING
    RETURNING tenant_id, message_id
)
INSERT INTO message_status_history (tenant_id, message_id, status, reason, at)
SELECT tenant_id, message_id, :pending, :accepted, CAST(:now AS timestamptz) FROM inserted
""")

# Messages by (tenant, idempotency key): a join on the unnested keys, which PostgreSQL reads by the
# unique index (a 200-pair row-value IN list was a scan of the table).
_LOAD_ROWS = DriverStatement(f"""
SELECT m.tenant_id, m.message_id, m.idempotency_key, m.profile_id, m.trigger_id, m.status, m.attempts,
       m.next_attempt_at
FROM {unnest("k", (("tenant_id", "text"), ("idempotency_key", "text")))}
JOIN messages m ON m.tenant_id = k.tenant_id AND m.idempotency_key = k.idempotency_key
""")

# Status changes, one statement for any number: the messages and their history (`sending` is
# internal and not recorded there).
_APPLY = DriverStatement(f"""
WITH u AS (
    SELECT * FROM {_CHANGES}
), updated AS (
    UPDATE messages AS m
    SET status = u.status, reason = u.reason, recipient = coalesce(u.recipient, m.recipient),
        subject = coalesce(u.subject, m.subject), attempts = greatest(m.attempts, u.attempts),
        next_attempt_at = u.next_attempt_at, updated_at = CAST(:now AS timestamptz)
    FROM u
    WHERE m.tenant_id = u.tenant_id AND m.message_id = u.message_id
)
INSERT INTO message_status_history (tenant_id, message_id, status, reason, at)
SELECT tenant_id, message_id, status, reason, CAST(:now AS timestamptz) FROM u WHERE status <> :sending
""")


def _change_parameters(updates: Sequence[StatusUpdate]) -> dict[str, list[Any]]:
    """The parameters of `_CHANGES`."""
    return {
        "tenant_id": [u.tenant_id for u in updates],
        "message_id": [u.message_id for u in updates],
        "status": [u.status for u in updates],
        "reason": [u.reason for u in updates],
        "recipient": [u.recipient for u in updates],
        "subject": [u.subject for u in updates],
        "attempts": [u.attempts for u in updates],
        "next_attempt_at": [u.next_attempt_at for u in updates],
    }


class DeliveryStore:
    """`engine` for reads and occasional writes; `send_engine` for the send path, whose every
    statement finds its rows by key and runs for a whole batch (`Runtime.lookup_engine`)."""

    def __init__(self, engine: AsyncEngine, send_engine: AsyncEngine | None = None) -> None:
        self.engine = engine
        self.send_engine = send_engine or engine

    # ---- GDPR ---------------------------------------------------------------------------------

    async def purge_people(self, conn: AsyncConnection, erased: Sequence[Erased], now: datetime) -> None:
        """Delete the messages (and their status history) of erased people — under any id merged
        into them — and suppress their identifiers, in the caller's transaction. The merged-away
        ids are erased with them and the links between ids go."""
        people = sorted({(e.tenant_id, e.profile_id) for e in erased})
        merged_ids = await forget_aliases(conn, merged_profiles, people)
        everyone = sorted({*people, *merged_ids})
        await conn.execute(
            pg_insert(erased_profiles)
            .values([{"tenant_id": t, "profile_id": p, "erased_at": now} for t, p in everyone])
            .on_conflict_do_nothing()
        )
        for tenant_id, profile_id in everyone:
            await self._delete_messages(conn, tenant_id, profile_id)
        for e in sorted(erased, key=lambda e: (e.tenant_id, e.profile_id)):
            if e.identifier_hashes:
                await conn.execute(
                    pg_insert(suppressions)
                    .values(
                        [
                            {"tenant_id": e.tenant_id, "value_hash": h, "reason": ERASED, "created_at": now}
                            for h in sorted(set(e.identifier_hashes))
                        ]
                    )
                    .on_conflict_do_nothing()
                )

    @staticmethod
    async def _delete_messages(conn: AsyncConnection, tenant_id: str, profile_id: str) -> None:
        ids = (
            sa.select(messages.c.message_id)
            .where(messages.c.tenant_id == tenant_id, messages.c.profile_id == profile_id)
            .scalar_subquery()
        )
        await conn.execute(
            history.delete().where(history.c.tenant_id == tenant_id, history.c.message_id.in_(ids))
        )
        await conn.execute(
            messages.delete().where(messages.c.tenant_id == tenant_id, messages.c.profile_id == profile_id)
        )

    # ---- profile merges ------------------------------------------------------------------------

    async def merge_people(
        self, conn: AsyncConnection, merges: Sequence[ProfileMerge], now: datetime
    ) -> None:
        """Apply profile merges in order, in the caller's transaction (one tenant's merges at a
        time): the merged-away id becomes an alias of the survivor (resolved through earlier
        merges) and every message under an alias of the survivor moves to it. Redelivery moves
        nothing more. When the survivor is already erased, the merged-away id is erased too."""
        tenants = sorted({m.tenant_id for m in merges})
        await conn.execute(
            sa.text(
                "SELECT pg_advisory_xact_lock(:ns, k) "
                "FROM unnest(CAST(:keys AS integer[])) WITH ORDINALITY AS u(k, i) ORDER BY i"
            ),
            {"ns": MERGE_LOCK_NAMESPACE, "keys": sorted({lock_key32(t) for t in tenants})},
        )
        m_ = merged_profiles
        for m in merges:
            tenant, gone = m.tenant_id, m.merged_profile_id
            found = await self.survivors(conn, [(tenant, m.surviving_profile_id)])
            survivor = found.get((tenant, m.surviving_profile_id), m.surviving_profile_id)
            if survivor == gone:
                continue  # would make the id stand for itself (profile never merges back)
            await record_alias(conn, m_, tenant, gone, survivor, m.merged_at)
            if await self.erased(conn, [(tenant, survivor)]):
                await self.purge_people(conn, [Erased(tenant, survivor, "", ())], now)
                continue
            aliases = sa.select(m_.c.profile_id).where(
                m_.c.tenant_id == tenant, m_.c.surviving_profile_id == survivor
            )
            await conn.execute(
                messages.update()
                .where(messages.c.tenant_id == tenant, messages.c.profile_id.in_(aliases))
                .values(profile_id=survivor)
            )

    async def survivors(self, conn: AsyncConnection, people: Iterable[Person]) -> dict[Person, str]:
        """The surviving profile id of each merged-away person among `people`."""
        return await surviving_ids(conn, merged_profiles, people)

    async def erased(self, conn: AsyncConnection, people: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """The (tenant, profile id) pairs of erased people."""
        wanted = sorted(set(people))
        if not wanted:
            return set()
        rows = await conn.execute(
            sa.select(erased_profiles.c.tenant_id, erased_profiles.c.profile_id).where(
                sa.tuple_(erased_profiles.c.tenant_id, erased_profiles.c.profile_id).in_(wanted)
            )
        )
        return {(r.tenant_id, r.profile_id) for r in rows}

    # ---- messages: the API's reads -------------------------------------------------------------

    async def get_message(self, tenant: str, message_id: str) -> MessageRecord:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(messages).where(
                        messages.c.tenant_id == tenant, messages.c.message_id == message_id
                    )
                )
            ).one_or_none()
            if row is None:
                raise NotFound(f"no message {message_id!r}")
            changes = await self._history(conn, tenant, [message_id])
        return _record(row, changes.get(message_id, ()))

    async def list_messages(
        self, tenant: str, *, profile_id: str, before_seq: int | None, limit: int
    ) -> list[MessageRecord]:
        """Newest first; only the person's when `profile_id` is set (it or the profile it was merged
        into, under any id merged into that one); only those created before `before_seq`."""
        query = sa.select(messages).where(messages.c.tenant_id == tenant)
        if before_seq is not None:
            query = query.where(messages.c.seq < before_seq)
        query = query.order_by(messages.c.seq.desc()).limit(limit)
        async with self.engine.connect() as conn:
            if profile_id:
                found = await self.survivors(conn, [(tenant, profile_id)])
                person = found.get((tenant, profile_id), profile_id)
                m = merged_profiles
                aliases = sa.select(m.c.profile_id).where(
                    m.c.tenant_id == tenant, m.c.surviving_profile_id == person
                )
                # one list of ids, not `= person OR IN (aliases)`: PostgreSQL reads each id's messages
                # by `messages_profile_seq` for a list, but filtered the tenant's every message, newest
                # first, for the OR (figures in bench/README.md)
                query = query.where(
                    messages.c.profile_id.in_(sa.select(sa.literal(person)).union_all(aliases))
                )
            rows = (await conn.execute(query)).all()
            changes = await self._history(conn, tenant, [r.message_id for r in rows])
        return [_record(r, changes.get(r.message_id, ())) for r in rows]

    async def _history(
        self, conn: AsyncConnection, tenant: str, message_ids: Sequence[str]
    ) -> dict[str, tuple[StatusChange, ...]]:
        if not message_ids:
            return {}
        rows = await conn.execute(
            sa.select(history.c.message_id, history.c.status, history.c.reason, history.c.at)
            .where(history.c.tenant_id == tenant, history.c.message_id.in_(message_ids))
            .order_by(history.c.message_id, history.c.id)
        )
        out: dict[str, list[StatusChange]] = {}
        for r in rows:
            out.setdefault(r.message_id, []).append(StatusChange(r.status, r.reason, r.at))
        return {k: tuple(v) for k, v in out.items()}

    # ---- messages: the worker's writes ---------------------------------------------------------

    @asynccontextmanager
    async def worker_connection(self) -> AsyncIterator[AsyncConnection]:
        """A connection whose advisory locks are released when the block ends, however it ends."""
        async with self.send_engine.connect() as conn:
            try:
                yield conn
            finally:
                try:
                    if conn.in_transaction():
                        await conn.rollback()
                    await conn.execute(_UNLOCK_ALL)
                    await conn.commit()
                except Exception:
                    # A connection that cannot unlock is closed: its locks die with the session.
                    log.warning("advisory unlock failed; dropping the connection", exc_info=True)
                    await conn.invalidate()

    async def try_lock(self, conn: AsyncConnection, keys: Sequence[Key]) -> set[Key]:
        """Take the locks of the requests no other live worker holds; return their keys."""
        if not keys:
            return set()
        ids = {lock_key64(*k): k for k in keys}
        async with conn.begin():
            rows = (await conn.execute(_TRY_LOCK, {"keys": list(ids)})).all()
        return {ids[r.k] for r in rows if r.ok}

    async def insert_pending(
        self,
        conn: AsyncConnection,
        requests: Sequence[tuple[DeliveryRequest, str]],
        variables: Sequence[dict[str, Any]],
        locales: Sequence[str],
        now: datetime,
    ) -> None:
        """Insert (request, new message id) pairs as pending, with the template variant picked for
        each ("" when none), once per idempotency key."""
        if not requests:
            return
        await fetch_on_driver(
            conn,
            _INSERT_PENDING,
            {
                "tenant_id": [r.tenant_id for r, _ in requests],
                "message_id": [message_id for _, message_id in requests],
                "idempotency_key": [r.idempotency_key for r, _ in requests],
                "profile_id": [r.profile_id for r, _ in requests],
                "trigger_id": [r.trigger_id for r, _ in requests],
                "channel": [r.channel for r, _ in requests],
                "purpose": [r.purpose for r, _ in requests],
                "template_id": [r.template_id for r, _ in requests],
                "variables": [json_text(v) for v in variables],
                "locale": list(locales),
                "pending": PENDING,
                "accepted": ACCEPTED,
                "now": now,
            },
        )

    async def load_rows(self, conn: AsyncConnection, keys: Sequence[Key]) -> dict[Key, MessageRow]:
        if not keys:
            return {}
        rows = await fetch_on_driver(
            conn, _LOAD_ROWS, {"tenant_id": [t for t, _ in keys], "idempotency_key": [k for _, k in keys]}
        )
        return {
            (r["tenant_id"], r["idempotency_key"]): MessageRow(
                tenant_id=r["tenant_id"],
                message_id=r["message_id"],
                idempotency_key=r["idempotency_key"],
                profile_id=r["profile_id"],
                trigger_id=r["trigger_id"],
                status=r["status"],
                attempts=r["attempts"],
                next_attempt_at=r["next_attempt_at"],
            )
            for r in rows
        }

    async def record_sends(
        self,
        claims: Sequence[Claim],
        updates: Sequence[StatusUpdate],
        published: Sequence[OutboxMessage],
        now: datetime,
        suppressed: Sequence[Suppression] = (),
    ) -> set[tuple[str, str]]:
        """Write send outcomes (with their history, outbox messages and the addresses they
        suppress) and mark the claims' messages `sending` where they are still pending (`sending`
        is internal: not in the history), all or nothing; return the (tenant, message id) of the
        messages claimed."""
        async with self.send_engine.connect() as conn:
            driver: asyncpg.Connection = (await conn.get_raw_connection()).driver_connection
            try:
                rows = await _RECORD_SENDS.fetch(
                    driver,
                    {
                        **_change_parameters(updates),
                        "p_subject": [m.subject for m in published],
                        "p_payload": [m.payload for m in published],
                        "s_tenant_id": [x.tenant_id for x in suppressed],
                        "s_channel": [x.channel for x in suppressed],
                        "s_value_hash": [x.value_hash for x in suppressed],
                        "s_reason": [x.reason for x in suppressed],
                        "c_tenant_id": [c.row.tenant_id for c in claims],
                        "c_message_id": [c.row.message_id for c in claims],
                        "c_recipient": [c.recipient for c in claims],
                        "c_subject": [c.subject for c in claims],
                        "c_sms_segments": [c.sms_segments for c in claims],
                        "sending": SENDING,
                        "pending": PENDING,
                        "now": now,
                    },
                )
            except BaseException:
                # The pool must not hand out a connection the server may have dropped.
                await conn.invalidate()
                raise
        return {(r["tenant_id"], r["message_id"]) for r in rows}

    async def apply(
        self,
        conn: AsyncConnection,
        updates: Sequence[StatusUpdate],
        now: datetime,
        published: Sequence[OutboxMessage] = (),
        suppressed: Sequence[Suppression] = (),
    ) -> None:
        """Write status changes, their history (`sending` is internal and not recorded), the
        outbox messages announcing them and the addresses they suppress, inside the caller's
        transaction."""
        if updates:
            await fetch_on_driver(
                conn,
                _APPLY,
                {**_change_parameters(updates), "sending": SENDING, "now": now},
            )
        await enqueue(conn, outbox, published, now)
        await suppress(conn, suppressed, now)


async def append_history(
    conn: AsyncConnection, changes: Iterable[tuple[str, str, str, str]], at: datetime
) -> None:
    """Append each (tenant id, message id, status, reason) to its message's status history at `at`,
    in the caller's transaction. The statements that write a batch, a send or a show in one round
    trip (`_INSERT_PENDING`, `_APPLY`, `_RECORD_SENDS`, banner_rows' `_COUNT_SHOWS`) insert theirs
    themselves."""
    rows = [{"tenant_id": t, "message_id": m, "status": s, "reason": r, "at": at} for t, m, s, r in changes]
    if rows:
        await conn.execute(history.insert(), rows)


def _record(row: sa.Row[Any], changes: tuple[StatusChange, ...]) -> MessageRecord:
    return MessageRecord(
        message_id=row.message_id,
        idempotency_key=row.idempotency_key,
        profile_id=row.profile_id,
        trigger_id=row.trigger_id,
        channel=row.channel,
        template_id=row.template_id,
        status=row.status,
        reason=row.reason,
        recipient=row.recipient,
        subject=row.subject,
        created_at=row.created_at,
        attempts=row.attempts,
        seq=row.seq,
        sms_segments=row.sms_segments,
        history=changes,
        test=row.test,
        locale=row.locale,
    )
