"""Delivery requests from the bus -> at most one email each.

`DeliveryWorker.handle` takes a batch of `relevans.delivery.v1.DeliveryRequest`s
from the RV_DELIVERY_REQUESTS work queue and, per idempotency key:

1. takes the request's advisory lock (held until the batch is done; a key another
   live worker holds is retried later) and reads its message row, if any: already
   final -> nothing to do; left in `sending` by a worker that died mid-send ->
   failed "outcome_unknown", never sent a second time;
   A request for a profile that was merged away is handled as the survivor's;
2. asks profile for the people (one `BatchGetProfiles` per tenant, consent as it
   is now) and loads the templates;
3. in ONE transaction inserts the new messages (pending, unique per idempotency
   key), decides each (consent, address, template, render) and records the
   suppressed and failed ones with their `DeliveryStatusChanged` outbox messages,
   and the ones to send as `sending` — so a message is first seen either final
   or on its way;
4. sends over SMTP and commits each outcome: sent, failed (5xx reply, outcome
   unknown, retries exhausted), or pending again for a transient failure.

Requests that must be tried again make `handle` raise after everything else is
committed, so the kit's consumer nak's them for a later redelivery.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import structlog
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import AsyncConnection

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import bus_pb2, delivery_pb2
from relevans.kit import metrics
from relevans.kit.auth import TENANT_RE
from relevans.kit.bus import Bus, Consumer
from relevans.kit.clock import Clock
from relevans.kit.outbox import OutboxMessage
from relevans.kit.proto import to_timestamp
from services.delivery.domain import (
    FAILED,
    FINAL_STATUSES,
    OUTCOME_UNKNOWN,
    PENDING,
    SENDING,
    SENT,
    SMTP_REJECTED,
    DeliveryRequest,
    Final,
    ProfileView,
    Renderer,
    Send,
    after_transient,
    decide,
    email_bytes,
    redelivery,
    request_problem,
)
from services.delivery.domain.decision import ERASED, MAX_IDEMPOTENCY_KEY_CHARS, SUPPRESSED, Decision
from services.delivery.profiles import ProfileClient, ProfileLookupError
from services.delivery.sender import OutgoingMail, SendOutcome, SmtpSender
from services.delivery.store import DeliveryStore, Key, MessageRow, StatusUpdate

log = structlog.get_logger(__name__)

SERVICE = "delivery"
STREAM = "RV_DELIVERY_REQUESTS"
DURABLE = "delivery-requests"
FILTER_SUBJECT = "rv.delivery.requests"
STATUS_SUBJECT_PREFIX = "rv.delivery.status."
COMPOSE_FAILED = "compose_failed"

_STATUS_ENUM = {
    PENDING: delivery_pb2.MESSAGE_STATUS_PENDING,
    SENDING: delivery_pb2.MESSAGE_STATUS_PENDING,
    SENT: delivery_pb2.MESSAGE_STATUS_SENT,
    "suppressed": delivery_pb2.MESSAGE_STATUS_SUPPRESSED,
    FAILED: delivery_pb2.MESSAGE_STATUS_FAILED,
}


class RetryLater(Exception):
    """Some requests of the batch could not be finished now; the bus redelivers them later."""


# ---- decoding -----------------------------------------------------------------------------------


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix).lower()
    except ValueError:
        return str(value)


def plain_value(v: struct_pb2.Value) -> Any:
    """A Struct value as plain Python; whole numbers become ints, so 2.0 prints as "2"."""
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return v.string_value
    if kind == "number_value":
        n = v.number_value
        if not math.isfinite(n):
            return None  # NaN and infinities are not values a message can show
        return int(n) if n.is_integer() and abs(n) < 2**53 else n
    if kind == "bool_value":
        return v.bool_value
    if kind == "struct_value":
        return plain_struct(v.struct_value)
    if kind == "list_value":
        return [plain_value(x) for x in v.list_value.values]
    return None


def plain_struct(s: struct_pb2.Struct) -> dict[str, Any]:
    return {k: plain_value(v) for k, v in s.fields.items()}


def decode_request(data: bytes, attempt: int = 1) -> DeliveryRequest | None:
    """The request, or None when it cannot even be recorded (no tenant or idempotency key)."""
    try:
        m = bus_pb2.DeliveryRequest.FromString(data)
    except DecodeError:
        return None
    if not TENANT_RE.match(m.tenant_id) or not m.idempotency_key:
        return None
    if len(m.idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
        return None
    return DeliveryRequest(
        idempotency_key=m.idempotency_key,
        tenant_id=m.tenant_id,
        profile_id=m.profile_id,
        trigger_id=m.trigger_id,
        channel=_enum_name(common_pb2.Channel, m.channel, "CHANNEL_"),
        purpose=_enum_name(common_pb2.Purpose, m.purpose, "PURPOSE_"),
        template_id=m.template_id,
        variables=plain_struct(m.variables),
        attempt=max(1, attempt),
    )


def _attempt(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered or 1)
    except Exception:  # not a JetStream message (no metadata in its reply subject)
        return 1


# ---- outcomes -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Outcome:
    row: MessageRow
    channel: str
    update: StatusUpdate


def status_changed(row: MessageRow, status: str, reason: str, now: datetime) -> OutboxMessage:
    payload = bus_pb2.DeliveryStatusChanged(
        tenant_id=row.tenant_id,
        message_id=row.message_id,
        idempotency_key=row.idempotency_key,
        profile_id=row.profile_id,
        trigger_id=row.trigger_id,
        status=_STATUS_ENUM[status],
        reason=reason,
        time=to_timestamp(now),
    )
    return OutboxMessage(STATUS_SUBJECT_PREFIX + status, payload.SerializeToString())


def _outcome(row: MessageRow, channel: str, final: Final, attempts: int = 0, **fields: str) -> _Outcome:
    return _Outcome(
        row,
        channel,
        StatusUpdate(
            tenant_id=row.tenant_id,
            message_id=row.message_id,
            status=final.status,
            reason=final.reason,
            recipient=fields.get("recipient"),
            subject=fields.get("subject"),
            attempts=attempts,
        ),
    )


def smtp_final(outcome: SendOutcome, attempt: int) -> Final:
    if outcome.kind == "sent":
        return Final(SENT, f"smtp: {outcome.detail}")
    if outcome.kind == "permanent":
        return Final(FAILED, f"{SMTP_REJECTED}: {outcome.detail}")
    if outcome.kind == "unknown":
        return Final(FAILED, f"{OUTCOME_UNKNOWN}: {outcome.detail}")
    return after_transient(attempt, f"smtp: {outcome.detail}")


# ---- the worker ---------------------------------------------------------------------------------


class DeliveryWorker:
    def __init__(
        self,
        store: DeliveryStore,
        profiles: ProfileClient,
        sender: SmtpSender,
        renderer: Renderer,
        clock: Clock,
        *,
        make_id: Callable[[], str],
        notify: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.profiles = profiles
        self.sender = sender
        self.renderer = renderer
        self.clock = clock
        self.make_id = make_id
        self.notify = notify

    async def handle(self, msgs: Sequence[Msg]) -> None:
        requests: list[DeliveryRequest] = []
        for m in msgs:
            request = decode_request(m.data, _attempt(m))
            if request is None:
                log.error("unusable delivery request dropped", subject=m.subject, size=len(m.data))
                continue
            requests.append(request)
        retry = await self.process(requests)
        if retry:
            raise RetryLater("; ".join(sorted(set(retry)))[:500])

    async def process(self, requests: Sequence[DeliveryRequest]) -> list[str]:
        """Handle decoded requests; return why some must be retried (empty when all are done)."""
        unique: dict[Key, DeliveryRequest] = {}
        for r in requests:
            unique.setdefault(r.key, r)
        if not unique:
            return []
        retry: list[str] = []
        async with self.store.worker_connection() as conn:
            locked = await self.store.try_lock(conn, list(unique))
            if len(locked) < len(unique):
                retry.append("another worker is handling the same request")
            mine = [r for k, r in unique.items() if k in locked]
            if not mine:
                return retry

            # 1. what is left to do: final rows are done, a row left `sending` is failed
            async with conn.begin():
                existing = await self.store.load_rows(conn, [r.key for r in mine])
                # A request for a merged-away profile is the survivor's (trigger may not know yet).
                survivors = await self.store.survivors(conn, [(r.tenant_id, r.profile_id) for r in mine])
                mine = [
                    replace(r, profile_id=survivors.get((r.tenant_id, r.profile_id), r.profile_id))
                    for r in mine
                ]
                gone = await self.store.erased(conn, [(r.tenant_id, r.profile_id) for r in mine])
            if gone:
                kept = [r for r in mine if (r.tenant_id, r.profile_id) not in gone]
                log.info("requests for erased people dropped", count=len(mine) - len(kept))
                mine = kept
            done: list[_Outcome] = []
            todo: list[DeliveryRequest] = []
            for r in mine:
                row = existing.get(r.key)
                action = "process" if row is None else redelivery(row.status)
                if action == "process":
                    todo.append(r)
                elif action == "outcome_unknown" and row is not None:
                    log.warning("message found mid-send; not sending it again", key=r.idempotency_key)
                    done.append(_outcome(row, r.channel, Final(FAILED, OUTCOME_UNKNOWN)))

            # 2. profiles (with their consent now) and templates, before any row changes
            valid = [r for r in todo if request_problem(r) is None]
            views, unavailable = await self._profiles(valid)
            async with conn.begin():
                templates = await self.store.load_templates(
                    conn, {(r.tenant_id, r.template_id) for r in valid}
                )

            # 3. one transaction: record the requests, the decisions and the claims of the sends
            now = self.clock.now()
            decided: list[_Outcome] = []
            sends: list[tuple[DeliveryRequest, MessageRow, OutgoingMail]] = []
            async with conn.begin():
                new = [r for r in todo if r.key not in existing]
                await self.store.insert_pending(
                    conn, [(r, self.make_id()) for r in new], [dict(r.variables) for r in new], now
                )
                rows = await self.store.load_rows(conn, [r.key for r in todo])
                decisions: dict[Key, Decision] = {}
                for r in todo:
                    if r.tenant_id in unavailable and request_problem(r) is None:
                        continue
                    decisions[r.key] = decide(
                        r,
                        views.get((r.tenant_id, r.profile_id)),
                        templates.get((r.tenant_id, r.template_id)),
                        self.renderer,
                    )
                erased = await self.store.suppressed(
                    conn, {(k[0], d.recipient) for k, d in decisions.items() if isinstance(d, Send)}
                )
                for r in todo:
                    row = rows[r.key]
                    if r.key not in decisions:
                        decided.append(self._transient(r, row, unavailable[r.tenant_id]))
                        continue
                    decision = decisions[r.key]
                    if isinstance(decision, Send) and (r.tenant_id, decision.recipient) in erased:
                        decision = Final(SUPPRESSED, ERASED)
                    if isinstance(decision, Send):
                        mail = self._compose(row, decision, now)
                        if isinstance(mail, OutgoingMail):
                            sends.append((r, row, mail))
                            claim = Final(SENDING, "")
                            decided.append(
                                _outcome(
                                    row,
                                    r.channel,
                                    claim,
                                    recipient=decision.recipient,
                                    subject=decision.subject,
                                )
                            )
                            continue
                        decision = mail
                    decided.append(_outcome(row, r.channel, decision))
                await self._write(conn, done + decided, now)
            self._committed(done + decided)
            retry += [o.update.reason for o in decided if o.update.status == PENDING]
            if not sends:
                return retry

            # 4. send, then record what happened
            outcomes = await self.sender.send_many([mail for _, _, mail in sends])
            results = [
                _outcome(row, r.channel, smtp_final(o, r.attempt), attempts=self._attempts(o, r))
                for (r, row, _), o in zip(sends, outcomes, strict=True)
            ]
            now = self.clock.now()
            async with conn.begin():
                await self._write(conn, results, now)
            self._committed(results)
            retry += [o.update.reason for o in results if o.update.status == PENDING]
        return retry

    def _compose(self, row: MessageRow, send: Send, now: datetime) -> OutgoingMail | Final:
        """The mail as bytes, built before the message is claimed, so nothing can fail mid-send."""
        try:
            content = email_bytes(
                message_id=row.message_id,
                sender=self.sender.sender,
                recipient=send.recipient,
                subject=send.subject,
                body_text=send.body_text,
                now=now,
            )
        except (ValueError, TypeError, LookupError) as exc:
            return Final(FAILED, f"{COMPOSE_FAILED}: {exc}")
        return OutgoingMail(send.recipient, content)

    @staticmethod
    def _attempts(outcome: SendOutcome, r: DeliveryRequest) -> int:
        return r.attempt if outcome.kind == "transient" else 0

    def _transient(self, r: DeliveryRequest, row: MessageRow, why: str) -> _Outcome:
        return _outcome(row, r.channel, after_transient(r.attempt, why), attempts=r.attempt)

    async def _profiles(
        self, todo: Sequence[DeliveryRequest]
    ) -> tuple[dict[tuple[str, str], ProfileView], dict[str, str]]:
        """Profiles by (tenant, profile id), and why a tenant's lookup failed."""
        by_tenant: dict[str, list[str]] = {}
        for r in todo:
            by_tenant.setdefault(r.tenant_id, []).append(r.profile_id)
        views: dict[tuple[str, str], ProfileView] = {}
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

    async def _write(self, conn: AsyncConnection, outcomes: Sequence[_Outcome], now: datetime) -> None:
        published = [
            status_changed(o.row, o.update.status, o.update.reason, now)
            for o in outcomes
            if o.update.status in FINAL_STATUSES
        ]
        await self.store.apply(conn, [o.update for o in outcomes], now, published)

    def _committed(self, outcomes: Sequence[_Outcome]) -> None:
        finals = [o for o in outcomes if o.update.status in FINAL_STATUSES]
        for o in finals:
            metrics.MESSAGES_BY_STATUS.labels(o.update.status, o.channel).inc()
        if finals:
            self.notify()


def request_consumer(bus: Bus, worker: DeliveryWorker, *, batch: int = 200) -> Consumer:
    return Consumer(
        bus,
        service=SERVICE,
        stream=STREAM,
        durable=DURABLE,
        filter_subject=FILTER_SUBJECT,
        handler=worker.handle,
        batch=batch,
    )


# ---- profile merges -----------------------------------------------------------------------------
