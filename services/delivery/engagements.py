"""What a followed link of a message does in delivery's database, and reporting it to profile.

`EngagementStore.record` writes, in one transaction, the engagement (counting repeats) and, the
first time only, the message's history entry, its `rv.delivery.status.<opened|clicked|
unsubscribed>` bus message (through the outbox) and a `profile_reports` row: what profile must
still be told. `ProfileReporter` tells it — for an unsubscribe, `SetConsent` withdrawn for the
message's purpose and channel; for every engagement, `Track` of an `email_unsubscribed`,
`email_opened` or `link_clicked` event of the message's person, with an id derived from the
engagement, so a report repeated after a failure is stored once — and deletes the row once
profile took it. A row profile could not take waits with a back-off on the injectable clock and
is tried again, however long profile is away: an unsubscribe recorded is never lost.

Until profile has taken an unsubscribe, delivery applies it itself: `UnsubscribeAwareProfiles`
answers the send decisions' profile lookups with the withdrawals still waiting in
`profile_reports`, so once the POST is answered no message needing that consent goes out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import grpc
import sqlalchemy as sa
import structlog
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans.common.v1 import common_pb2
from relevans.kit.auth import mint_token
from relevans.kit.clock import Clock
from relevans.kit.enums import enum_value
from relevans.kit.grpc_client import bearer
from relevans.kit.outbox import enqueue
from relevans.kit.proto import to_timestamp
from relevans.profile.v1 import profile_pb2, profile_pb2_grpc
from services.delivery.domain import ProfileView
from services.delivery.domain.tracking import (
    CLICK,
    ENGAGEMENT_EVENT,
    ENGAGEMENT_STATUS,
    UNSUBSCRIBE,
    UNSUBSCRIBE_SOURCE,
    LinkToken,
    event_id,
    link_key,
    withdrawn_purpose,
)
from services.delivery.journal import status_changed
from services.delivery.profiles import ProfileClient, ProfileLookupError
from services.delivery.store import MessageRow
from services.delivery.tables import engagements, history, messages, outbox, profile_reports

log = structlog.get_logger(__name__)

REPORT_BATCH = 100
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 300.0
# Real seconds between looks for reports come due (a new one wakes the reporter at once).
POLL_S = 0.5
TOKEN_LIFETIME = timedelta(minutes=5)
# Profile's answers that no repeat of the same report can change.
_PERMANENT = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND})
WITHDRAWN = "withdrawn"


@dataclass(frozen=True, slots=True)
class Engaged:
    """What recording an engagement came to: whether it was the first of its kind (and link) for
    the message (a repeat is only counted)."""

    first: bool


def _reason(kind: str, url: str, purpose: str, channel: str) -> str:
    if kind == CLICK:
        return url
    if kind == UNSUBSCRIBE:
        return f"one_click: {withdrawn_purpose(purpose)} consent on {channel} withdrawn"
    return "pixel"


class EngagementStore:
    def __init__(self, engine: AsyncEngine, *, notify_relay: Callable[[], None]) -> None:
        self.engine = engine
        self.notify_relay = notify_relay

    async def record(self, token: LinkToken, now: datetime) -> Engaged | None:
        """Record one use of a message's link; None when the message is unknown (or erased)."""
        link = link_key(token.kind, token.url)
        async with self.engine.begin() as conn:
            m = (
                await conn.execute(
                    sa.select(messages).where(
                        messages.c.tenant_id == token.tenant_id, messages.c.message_id == token.message_id
                    )
                )
            ).first()
            if m is None:
                return None
            insert = pg_insert(engagements).values(
                tenant_id=token.tenant_id,
                message_id=token.message_id,
                kind=token.kind,
                link=link,
                count=1,
                first_at=now,
                last_at=now,
            )
            count = (
                await conn.execute(
                    insert.on_conflict_do_update(
                        index_elements=[c.name for c in engagements.primary_key.columns],
                        set_={"count": engagements.c.count + 1, "last_at": now},
                    ).returning(engagements.c.count)
                )
            ).scalar_one()
            if count == 1:
                await self._first(conn, m, token, now)
        if count == 1:
            self.notify_relay()
        return Engaged(first=count == 1)

    async def _first(self, conn: AsyncConnection, m: sa.Row[Any], token: LinkToken, now: datetime) -> None:
        """The history entry, bus message and profile report of a first engagement."""
        status = ENGAGEMENT_STATUS[token.kind]
        reason = _reason(token.kind, token.url, m.purpose, m.channel)
        row = MessageRow(
            m.tenant_id, m.message_id, m.idempotency_key, m.profile_id, m.trigger_id, m.status, m.attempts
        )
        await conn.execute(
            history.insert().values(
                tenant_id=m.tenant_id, message_id=m.message_id, status=status, reason=reason, at=now
            )
        )
        await enqueue(conn, outbox, [status_changed(row, status, reason, now)], now)
        await conn.execute(
            profile_reports.insert().values(
                tenant_id=m.tenant_id,
                message_id=m.message_id,
                kind=token.kind,
                url=token.url,
                at=now,
                attempts=0,
                next_at=now,
                last_error="",
            )
        )


class _Permanent(Exception):
    """Profile will never take this report (the person is gone, or it refused the report)."""


def _retry_in(attempts: int) -> timedelta:
    return timedelta(seconds=min(FIRST_RETRY_S * 2 ** max(attempts - 1, 0), MAX_RETRY_S))


class ProfileReporter:
    """Tells profile what engagements did, from the `profile_reports` rows."""

    def __init__(
        self, engine: AsyncEngine, channel: grpc.aio.Channel, *, secret: str, clock: Clock, deadline_s: float
    ) -> None:
        self.engine = engine
        self.stub = profile_pb2_grpc.ProfileServiceStub(channel)
        self.secret = secret
        self.clock = clock
        self.deadline_s = deadline_s
        self._wake = asyncio.Event()

    def notify(self) -> None:
        """A report was written: look at once rather than at the next poll."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Report what is due until `stop` is set."""
        while not stop.is_set():
            self._wake.clear()
            try:
                await self.report()
            except Exception:
                log.exception("engagement reports not read; retrying")
            stopping = asyncio.ensure_future(stop.wait())
            woken = asyncio.ensure_future(self._wake.wait())
            await asyncio.wait({stopping, woken}, timeout=POLL_S, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            woken.cancel()

    async def report(self, tenant_id: str = "", message_id: str = "") -> None:
        """Report the engagements due (only one message's, due or not, when it is named) that no
        other reporter has in hand; the ones profile does not take wait for their next try."""
        now = self.clock.now()
        r, m = profile_reports, messages
        query = (
            sa.select(r, m.c.profile_id, m.c.trigger_id, m.c.purpose, m.c.channel)
            .join(m, sa.and_(m.c.tenant_id == r.c.tenant_id, m.c.message_id == r.c.message_id))
            .order_by(r.c.id)
            .limit(REPORT_BATCH)
            .with_for_update(of=r, skip_locked=True)
        )
        if message_id:
            query = query.where(r.c.tenant_id == tenant_id, r.c.message_id == message_id)
        else:
            query = query.where(r.c.next_at <= now)
        async with self.engine.begin() as conn:
            rows = (await conn.execute(query)).all()
            done: list[int] = []
            failed = 0
            for row in rows:
                try:
                    await self._report(row)
                    done.append(row.id)
                except _Permanent as exc:
                    log.warning("engagement report dropped", message_id=row.message_id, why=str(exc))
                    done.append(row.id)
                except grpc.aio.AioRpcError as exc:
                    # profile is away or busy: this one backs off, the rest wait for the next round
                    failed += 1
                    await conn.execute(
                        r.update()
                        .where(r.c.id == row.id)
                        .values(
                            attempts=row.attempts + 1,
                            next_at=now + _retry_in(row.attempts + 1),
                            last_error=f"{exc.code().name}: {exc.details()}"[:500],
                        )
                    )
                    break
            if done:
                await conn.execute(r.delete().where(r.c.id.in_(done)))
        if failed:
            log.warning("profile did not take engagement reports; retrying later", count=failed)

    async def _report(self, row: Any) -> None:
        metadata = bearer(
            mint_token(
                self.secret, row.tenant_id, ["ingest", "read"], expires_at=self.clock.now() + TOKEN_LIFETIME
            )
        )
        try:
            person = await self._person(row.profile_id, metadata)
            if row.kind == UNSUBSCRIBE:
                await self.stub.SetConsent(
                    profile_pb2.SetConsentRequest(
                        profile_id=person.profile_id,
                        consent=profile_pb2.ConsentInput(
                            purpose=enum_value(
                                common_pb2.Purpose, withdrawn_purpose(row.purpose), "PURPOSE_"
                            ),
                            channel=enum_value(common_pb2.Channel, row.channel, "CHANNEL_"),
                            status=common_pb2.CONSENT_STATUS_WITHDRAWN,
                            source=UNSUBSCRIBE_SOURCE,
                            evidence=f"message {row.message_id}",
                        ),
                    ),
                    metadata=metadata,
                    timeout=self.deadline_s,
                )
            await self.stub.Track(
                profile_pb2.TrackRequest(event=self._event(row, person)),
                metadata=metadata,
                timeout=self.deadline_s,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _PERMANENT:
                raise _Permanent(f"{exc.code().name}: {exc.details()}") from exc
            raise

    async def _person(self, profile_id: str, metadata: Any) -> profile_pb2.Profile:
        """The message's person as profile knows them now (the survivor of a merge)."""
        reply = await self.stub.BatchGetProfiles(
            profile_pb2.BatchGetProfilesRequest(profile_ids=[profile_id]),
            metadata=metadata,
            timeout=self.deadline_s,
        )
        if not reply.profiles:
            raise _Permanent("the person is no longer known to profile")
        person: profile_pb2.Profile = reply.profiles[0]
        if not (person.customer_id or person.email):
            raise _Permanent("the person has no customer id or email to attribute the event by")
        return person

    @staticmethod
    def _event(row: Any, person: profile_pb2.Profile) -> profile_pb2.Event:
        """The engagement as the person's event: by their customer id, else their email (Track
        takes no profile id)."""
        event = profile_pb2.Event(
            message_id=event_id(row.message_id, row.kind, row.url),
            type=ENGAGEMENT_EVENT[row.kind],
            timestamp=to_timestamp(row.at),
        )
        if person.customer_id:
            event.customer_id = person.customer_id
        else:
            event.email = person.email
        event.properties.update({"message_id": row.message_id, "trigger_id": row.trigger_id})
        if row.kind == CLICK:
            event.properties["url"] = row.url
        return event


class UnsubscribeAwareProfiles(ProfileClient):
    """The profile service as the send decisions see it, with the unsubscribes it has not taken
    yet applied: their consent shows as withdrawn."""

    def __init__(
        self, target: str, *, deadline_s: float, secret: str, clock: Clock, engine: AsyncEngine
    ) -> None:
        super().__init__(target, deadline_s=deadline_s, secret=secret, clock=clock)
        self.engine = engine

    async def batch_get(self, tenant: str, profile_ids: Sequence[str]) -> dict[str, ProfileView]:
        found = await super().batch_get(tenant, profile_ids)
        if not found:
            return found
        people = sorted({*found, *(v.profile_id for v in found.values())})
        try:
            withdrawn = await self._waiting(tenant, people)
        except Exception as exc:  # the decisions cannot be made without them: retried later
            raise ProfileLookupError(f"pending unsubscribes unreadable: {exc}") from exc
        if not withdrawn:
            return found
        out = {}
        for requested, view in found.items():
            mine = withdrawn.get(requested, set()) | withdrawn.get(view.profile_id, set())
            if mine:
                view = replace(view, consents={**view.consents, **dict.fromkeys(mine, WITHDRAWN)})
            out[requested] = view
        return out

    async def _waiting(self, tenant: str, people: Sequence[str]) -> dict[str, set[tuple[str, str]]]:
        """(purpose, channel) of each person's unsubscribes profile has not taken yet."""
        r, m = profile_reports, messages
        query = (
            sa.select(m.c.profile_id, m.c.purpose, m.c.channel)
            .join(m, sa.and_(m.c.tenant_id == r.c.tenant_id, m.c.message_id == r.c.message_id))
            .where(r.c.tenant_id == tenant, r.c.kind == UNSUBSCRIBE, m.c.profile_id.in_(people))
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        waiting: dict[str, set[tuple[str, str]]] = {}
        for row in rows:
            waiting.setdefault(row.profile_id, set()).add((withdrawn_purpose(row.purpose), row.channel))
        return waiting
