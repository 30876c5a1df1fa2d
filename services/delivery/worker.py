"""Decoded delivery requests -> at most one message each, on the request's channel.

`DeliveryWorker.process` takes a batch of requests and, per idempotency key, runs
these phases on one database connection:

1. lock: takes the request's advisory lock (held until the batch is done; a key another
   live worker holds is retried later) and reads its message row, if any: already final
   -> nothing to do; left in `sending` by a worker that died mid-send -> failed
   "outcome_unknown", never sent a second time (sent, when its channel can tell it went out:
   `KnowsWhatWentOut`, the web channel's placed banners); `pending` and due -> decided again as
   its next attempt; `pending` with a retry scheduled later -> left to the retry worker
   (retries.py). A request for a profile that was merged away is handled as the survivor's;
   one for an erased person is dropped;
2. look up: asks profile for the people (one `BatchGetProfiles` per tenant, consent as it
   is now) and loads the templates, picking each person's locale's variant;
3. decide: in ONE transaction inserts the new messages (pending, unique per idempotency
   key), decides each (consent, address, template, render, suppressed addresses), and records
   the suppressed and failed ones with their `DeliveryStatusChanged` outbox messages; the
   ones to send stay pending;
4. send: hands the messages to their channel's transport, which claims each one (`sending`,
   committed) right before its content goes out — after waiting for the channel's rate
   limit — and records each outcome as soon as it is known — sent, failed (refused, outcome
   unknown, retries exhausted), bounced (the address is suppressed with it), or pending
   again with its next attempt scheduled for a transient failure — through the
   `SendJournal` (journal.py): one message in flight per SMTP connection, outcomes retried
   until written.

A transient failure is not left to the bus: the message's next attempt is a row
(`next_attempt_at`, after `RetryPolicy`'s back-off), the request is acked, and the retry
worker hands the message back to `process` when it is due; `retries_scheduled` tells it a
new one was written.

How these steps make each effect happen once: docs/architecture.md, "Guarantees",
"Effects happen once" and "Consent at send time".
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from relevans.kit import metrics
from relevans.kit.clock import Clock
from relevans.kit.merges import Person
from services.delivery.channels.base import KnowsWhatWentOut, Outgoing, Refused, Transport
from services.delivery.domain import (
    ADDRESS_BOUNCED,
    BOUNCED,
    CHANNELS,
    FAILED,
    FINAL_STATUSES,
    OUTCOME_UNKNOWN,
    PENDING,
    SENDING,
    SENT,
    SUPPORTED_CHANNELS,
    SUPPRESSED,
    DeliveryRequest,
    Final,
    ProfileView,
    Renderer,
    RetryPolicy,
    Send,
    SendOutcome,
    Template,
    after_transient,
    decide,
    redelivery,
    request_problem,
)
from services.delivery.domain.decision import Decision
from services.delivery.journal import Outcome, SendJournal, write_outcomes
from services.delivery.profiles import ProfileClient, ProfileLookupError
from services.delivery.rate_limits import RateLimiter
from services.delivery.store import Claim, DeliveryStore, Key, MessageRow, StatusUpdate
from services.delivery.suppressions import Suppression, suppression_reasons
from services.delivery.template_rows import pick_templates, record_locales

log = structlog.get_logger(__name__)

COMPOSE_FAILED = "compose_failed"
# A message found mid-send whose channel saw it go out.
WENT_OUT = "went_out_before_a_restart"
CLAIMS_NOT_WRITTEN = "database unavailable: messages not claimed"
DEFAULT_RETRY_POLICY = RetryPolicy()

# ---- outcomes -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Sending:
    """A message to send, with what its transport hands over and the subject it is claimed with."""

    request: DeliveryRequest
    row: MessageRow
    outgoing: Outgoing
    subject: str


@dataclass(frozen=True, slots=True)
class _LookedUp:
    """What the decisions need besides the requests: people, why a tenant's lookup failed, and each
    request's template variant (the person's locale's)."""

    views: dict[Person, ProfileView]
    unavailable: dict[str, str]
    templates: dict[Key, Template]


def _outcome(
    row: MessageRow,
    channel: str,
    final: Final,
    attempts: int = 0,
    *,
    next_attempt_at: datetime | None = None,
    recipient: str | None = None,
    suppress: Suppression | None = None,
) -> Outcome:
    return Outcome(
        row,
        channel,
        StatusUpdate(
            tenant_id=row.tenant_id,
            message_id=row.message_id,
            status=final.status,
            reason=final.reason,
            recipient=recipient,
            attempts=attempts,
            next_attempt_at=next_attempt_at,
        ),
        suppress,
    )


class _Handover:
    """One channel's sends of a batch: each claimed (once the channel's rate limit lets it go) and
    its outcome recorded through the journal."""

    def __init__(
        self,
        sends: Sequence[_Sending],
        journal: SendJournal,
        settle: Callable[[_Sending, SendOutcome], Outcome],
        limiter: RateLimiter | None,
    ) -> None:
        self.sends = sends
        self.journal = journal
        self.settle = settle
        self.limiter = limiter

    async def claim(self, index: int) -> bool:
        s = self.sends[index]
        if self.limiter is not None:
            await self.limiter.acquire()
        claim = Claim(s.row, s.outgoing.recipient, s.subject, sms_segments=s.outgoing.sms_segments)
        return await self.journal.claim(claim)

    def report(self, index: int, outcome: SendOutcome) -> None:
        self.journal.record(self.settle(self.sends[index], outcome))


# ---- the worker ---------------------------------------------------------------------------------


class DeliveryWorker:
    def __init__(
        self,
        store: DeliveryStore,
        profiles: ProfileClient,
        transports: Mapping[str, Transport],
        renderer: Renderer,
        clock: Clock,
        *,
        make_id: Callable[[], str],
        notify: Callable[[], None] = lambda: None,
        retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY,
        rate_limits: Mapping[str, float] | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        missing = SUPPORTED_CHANNELS - transports.keys()
        if missing:
            raise ValueError(f"no transport for the registered channel(s) {', '.join(sorted(missing))}")
        self.store = store
        self.profiles = profiles
        self.transports = transports
        self.renderer = renderer
        self.clock = clock
        self.make_id = make_id
        self.notify = notify
        self.retry_policy = retry_policy
        self.rand = rand
        # Messages per second per channel (one bucket per process, shared by every lane); a
        # channel without a positive rate is not limited.
        self.limiters = {c: RateLimiter(rate, clock) for c, rate in (rate_limits or {}).items() if rate > 0}
        # Set when a retry was scheduled, so the retry worker looks at its next due time again.
        self.retries_scheduled = asyncio.Event()
        # One batch sends at a time (first attempts and retries alike), so the transports'
        # connections bound the messages claimed and not yet recorded: a message's outcome is
        # committed with or before its connection's next claim only within one send journal.
        # Batches handled at once overlap their lookups and inserts with another's sends.
        self._sending = asyncio.Lock()

    async def process(self, requests: Sequence[DeliveryRequest]) -> list[str]:
        """Handle decoded requests; return why some must be retried (empty when all are done)."""
        unique: dict[Key, DeliveryRequest] = {}
        for r in requests:
            unique.setdefault(r.key, r)
        if not unique:
            return []
        async with self.store.worker_connection() as conn:
            mine, retry = await self._lock(conn, unique)
            if not mine:
                return retry
            todo, new, done = await self._left_to_do(conn, mine)
            looked_up = await self._look_up(conn, [r for r in todo if request_problem(r) is None])
            sends = await self._decide(conn, todo, new, done, looked_up)
            if sends:
                async with self._sending:
                    retry += await self._send(sends)
        return retry

    # ---- 1. lock --------------------------------------------------------------------------------

    async def _lock(
        self, conn: AsyncConnection, unique: Mapping[Key, DeliveryRequest]
    ) -> tuple[list[DeliveryRequest], list[str]]:
        """The requests whose advisory lock this worker now holds, and why the rest wait."""
        locked = await self.store.try_lock(conn, list(unique))
        retry = ["another worker is handling the same request"] if len(locked) < len(unique) else []
        return [r for k, r in unique.items() if k in locked], retry

    async def _left_to_do(
        self, conn: AsyncConnection, mine: Sequence[DeliveryRequest]
    ) -> tuple[list[DeliveryRequest], set[Key], list[Outcome]]:
        """The requests still to decide (and which of them have no message row yet), each as its
        message's next attempt, and the rows a dead worker left mid-send, failed
        "outcome_unknown". A request for a merged-away profile becomes the survivor's (trigger
        may not know of the merge yet); one for an erased person is dropped; a request whose
        message is final, or whose next attempt is not yet due, is done for now."""
        async with conn.begin():
            existing = await self.store.load_rows(conn, [r.key for r in mine])
            survivors = await self.store.survivors(conn, [(r.tenant_id, r.profile_id) for r in mine])
            mine = [
                replace(r, profile_id=survivors.get((r.tenant_id, r.profile_id), r.profile_id)) for r in mine
            ]
            gone = await self.store.erased(conn, [(r.tenant_id, r.profile_id) for r in mine])
        if gone:
            kept = [r for r in mine if (r.tenant_id, r.profile_id) not in gone]
            log.info("requests for erased people dropped", count=len(mine) - len(kept))
            mine = kept
        done: list[Outcome] = []
        todo: list[DeliveryRequest] = []
        now = self.clock.now()
        went_out = await self._went_out(mine, existing)
        for r in mine:
            row = existing.get(r.key)
            action = "process" if row is None else redelivery(row.status, row.next_attempt_at, now)
            if action == "process":
                todo.append(replace(r, attempt=1 if row is None else row.attempts + 1))
            elif action == "outcome_unknown" and row is not None:
                log.warning("message found mid-send; not sending it again", key=r.idempotency_key)
                final = Final(SENT, WENT_OUT) if r.key in went_out else Final(FAILED, OUTCOME_UNKNOWN)
                done.append(_outcome(row, r.channel, final))
        return todo, {r.key for r in todo if r.key not in existing}, done

    async def _went_out(
        self, mine: Sequence[DeliveryRequest], existing: Mapping[Key, MessageRow]
    ) -> set[Key]:
        """Of the messages found mid-send, those whose channel can tell that they went out."""
        found: set[Key] = set()
        for channel, transport in self.transports.items():
            if not isinstance(transport, KnowsWhatWentOut):
                continue
            rows = [
                existing[r.key]
                for r in mine
                if r.channel == channel and r.key in existing and existing[r.key].status == SENDING
            ]
            if rows:
                out = await transport.went_out([(row.tenant_id, row.message_id) for row in rows])
                found |= {row.key for row in rows if (row.tenant_id, row.message_id) in out}
        return found

    # ---- 2. look up -----------------------------------------------------------------------------

    async def _look_up(self, conn: AsyncConnection, valid: Sequence[DeliveryRequest]) -> _LookedUp:
        """The people (with their consent now) and the templates, before any row changes."""
        views, unavailable = await self._profiles(valid)
        async with conn.begin():
            templates = await pick_templates(conn, valid, views)
        return _LookedUp(views, unavailable, templates)

    async def _profiles(
        self, todo: Sequence[DeliveryRequest]
    ) -> tuple[dict[Person, ProfileView], dict[str, str]]:
        """Profiles by (tenant, profile id), and why a tenant's lookup failed."""
        by_tenant: dict[str, list[str]] = {}
        for r in todo:
            by_tenant.setdefault(r.tenant_id, []).append(r.profile_id)
        views: dict[Person, ProfileView] = {}
        unavailable: dict[str, str] = {}
        tenants = list(by_tenant)
        answers = await asyncio.gather(
            *(self.profiles.batch_get(t, by_tenant[t]) for t in tenants), return_exceptions=True
        )
        for tenant, answer in zip(tenants, answers, strict=True):
            if isinstance(answer, ProfileLookupError):
                log.warning("profile lookup failed; will retry", tenant=tenant, error=str(answer))
                unavailable[tenant] = str(answer)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                views.update({(tenant, pid): view for pid, view in answer.items()})
        return views, unavailable

    # ---- 3. decide ------------------------------------------------------------------------------

    async def _decide(
        self,
        conn: AsyncConnection,
        todo: Sequence[DeliveryRequest],
        new: set[Key],
        done: Sequence[Outcome],
        looked_up: _LookedUp,
    ) -> list[_Sending]:
        """In one transaction: record the new requests, decide each, and write the decisions
        (with `done`); return the sends, which stay pending until claimed."""
        now = self.clock.now()
        async with conn.begin():
            fresh = [r for r in todo if r.key in new]
            chosen = looked_up.templates
            await self.store.insert_pending(
                conn,
                [(r, self.make_id()) for r in fresh],
                [dict(r.variables) for r in fresh],
                [chosen[r.key].locale if r.key in chosen else "" for r in fresh],
                now,
            )
            rows = await self.store.load_rows(conn, [r.key for r in todo])
            # A retry's person may have changed their locale since the message was first decided.
            retried = {k: t for k, t in chosen.items() if k in rows and k not in new}
            await record_locales(conn, {(k[0], rows[k].message_id): t.locale for k, t in retried.items()})
            decisions = self._decisions(todo, looked_up)
            suppressed = await suppression_reasons(
                conn,
                {
                    (r.tenant_id, r.channel, d.recipient)
                    for r in todo
                    if isinstance(d := decisions.get(r.key), Send)
                },
            )
            decided, sends = self._claims(todo, rows, decisions, suppressed, looked_up.unavailable, now)
            await write_outcomes(self.store, conn, [*done, *decided], now)
        self._committed([*done, *decided])
        return sends

    def _decisions(self, todo: Sequence[DeliveryRequest], looked_up: _LookedUp) -> dict[Key, Decision]:
        """Each request's decision; none for a valid request whose tenant's profiles are unavailable."""
        decisions: dict[Key, Decision] = {}
        for r in todo:
            if r.tenant_id in looked_up.unavailable and request_problem(r) is None:
                continue
            decisions[r.key] = decide(
                r,
                looked_up.views.get((r.tenant_id, r.profile_id)),
                looked_up.templates.get(r.key),
                self.renderer,
            )
        return decisions

    def _claims(
        self,
        todo: Sequence[DeliveryRequest],
        rows: Mapping[Key, MessageRow],
        decisions: Mapping[Key, Decision],
        suppressed: Mapping[tuple[str, str, str], str],
        unavailable: Mapping[str, str],
        now: datetime,
    ) -> tuple[list[Outcome], list[_Sending]]:
        """The state each message moves to: retried later (no decision) or final, or the message
        to send when its content could be built."""
        decided: list[Outcome] = []
        sends: list[_Sending] = []
        for r in todo:
            row = rows[r.key]
            if r.key not in decisions:
                decided.append(self._transient(r, row, unavailable[r.tenant_id], now))
                continue
            decision = decisions[r.key]
            if isinstance(decision, Send) and (r.tenant_id, r.channel, decision.recipient) in suppressed:
                decision = Final(SUPPRESSED, suppressed[(r.tenant_id, r.channel, decision.recipient)])
            if isinstance(decision, Send):
                outgoing = self._compose(r.channel, row, decision, now)
                if isinstance(outgoing, Outgoing):
                    sends.append(_Sending(r, row, outgoing, decision.subject))
                    continue
                decision = outgoing
            decided.append(_outcome(row, r.channel, decision))
        return decided, sends

    def _compose(self, channel: str, row: MessageRow, send: Send, now: datetime) -> Outgoing | Final:
        """The message as its transport hands it over, built before the message is claimed, so
        nothing can fail mid-send."""
        try:
            return self.transports[channel].compose(row.message_id, send, now)
        except Refused as exc:
            return Final(SUPPRESSED, exc.reason)
        except (ValueError, TypeError, LookupError) as exc:
            return Final(FAILED, f"{COMPOSE_FAILED}: {exc}")

    def _transient(self, r: DeliveryRequest, row: MessageRow, why: str, now: datetime) -> Outcome:
        return self._after_attempt(r, row, after_transient(r.attempt, why), now)

    def _after_attempt(
        self, r: DeliveryRequest, row: MessageRow, final: Final, now: datetime, recipient: str | None = None
    ) -> Outcome:
        """The outcome of the request's attempt: counted, its next attempt scheduled when it is to be
        tried again, the address suppressed on the channel when it bounced."""
        next_at = None
        if final.status == PENDING:
            next_at = self.retry_policy.next_attempt_at(r.attempt, now, self.rand())
        suppress = None
        if final.status == BOUNCED and recipient:
            suppress = Suppression(r.tenant_id, r.channel, recipient, ADDRESS_BOUNCED)
        return _outcome(
            row,
            r.channel,
            final,
            r.attempt,
            next_attempt_at=next_at,
            recipient=recipient if final.status == BOUNCED else None,
            suppress=suppress,
        )

    def _settle(self, s: _Sending, outcome: SendOutcome) -> Outcome:
        """What a send's outcome makes of its message (the channel's rules, then the retry policy)."""
        final = CHANNELS[s.request.channel].final(outcome, s.request.attempt)
        return self._after_attempt(s.request, s.row, final, self.clock.now(), s.outgoing.recipient)

    # ---- 4. send --------------------------------------------------------------------------------

    async def _send(self, sends: Sequence[_Sending]) -> list[str]:
        """Hand the messages to their channels' transports (the channels side by side), each one
        claimed right before it goes out and its outcome written as soon as it is known; return
        why some must be handled again (claims that could not be written). Returns once every
        outcome is written."""
        by_channel: dict[str, list[_Sending]] = {}
        for s in sends:
            by_channel.setdefault(s.request.channel, []).append(s)
        async with SendJournal(self.store, self.clock, self._committed) as journal:
            await asyncio.gather(
                *(
                    self.transports[c].send_many(
                        [s.outgoing for s in group],
                        _Handover(group, journal, self._settle, self.limiters.get(c)),
                    )
                    for c, group in by_channel.items()
                )
            )
        return [CLAIMS_NOT_WRITTEN] if journal.unwritten_claims else []

    def _committed(self, outcomes: Sequence[Outcome]) -> None:
        finals = [o for o in outcomes if o.update.status in FINAL_STATUSES]
        for o in finals:
            metrics.MESSAGES_BY_STATUS.labels(o.update.status, o.channel).inc()
        if finals:
            self.notify()
        if any(o.update.next_attempt_at is not None for o in outcomes):
            self.retries_scheduled.set()
