"""SendTest: a template rendered (for a person or for given variables) and sent to a given address
through its channel's transport, now, marked as a test.

The test message goes the way every message goes, so it has a status history: a `messages` row
(pending, `test` set) -> claimed through the `SendJournal` right before its content goes out ->
its outcome. It differs from a real message in that
- its subject starts with "[TEST] ";
- its idempotency key is its own ("test:<message id>"): never deduplicated against real messages;
- it belongs to no trigger, needs no consent, is not retried (a transient failure fails it, the
  caller may simply send again), is not announced on `rv.delivery.status.*` and not counted in
  the message metrics;
- an address of an erased person is still never written to (suppressed "erased").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from relevans.kit.clock import Clock
from relevans.kit.errors import FieldViolation, InvalidArgument
from services.delivery.channels.base import Outgoing, Transport
from services.delivery.domain import (
    ACCEPTED,
    CHANNELS,
    FAILED,
    PENDING,
    SUPPRESSED,
    Final,
    MessageRecord,
    Send,
    SendOutcome,
    check_template_id,
)
from services.delivery.domain.templates import has_line_break
from services.delivery.journal import Outcome, SendJournal, write_outcomes
from services.delivery.previews import Previews
from services.delivery.store import Claim, DeliveryStore, MessageRow, StatusUpdate
from services.delivery.suppressions import suppression_reasons
from services.delivery.tables import history, messages
from services.delivery.worker import COMPOSE_FAILED

TEST_SUBJECT_PREFIX = "[TEST] "
TEST_PURPOSE = "test"
# A test send is not retried: a transient failure ends it with this reason.
TEST_NOT_RETRIED = "test_not_retried"


@dataclass(frozen=True, slots=True)
class SendTestInput:
    """A decoded SendTestRequest."""

    template_id: str
    recipient: str
    variables: Mapping[str, Any]
    profile_id: str = ""
    locale: str = ""


def final_of_test_send(channel: str, outcome: SendOutcome) -> Final:
    """How a test send's attempt ends its message: as the channel says, but never pending again."""
    if outcome.kind == "transient":
        return Final(FAILED, f"{TEST_NOT_RETRIED}: {outcome.detail}")
    return CHANNELS[channel].final(outcome, 1)


class _Handover:
    """The one test message's claim and outcome, through the journal."""

    def __init__(self, row: MessageRow, channel: str, claim: Claim, journal: SendJournal) -> None:
        self.row = row
        self.channel = channel
        self._claim = claim
        self.journal = journal

    async def claim(self, index: int) -> bool:
        return await self.journal.claim(self._claim)

    def report(self, index: int, outcome: SendOutcome) -> None:
        final = final_of_test_send(self.channel, outcome)
        self.journal.record(_outcome(self.row, self.channel, final))


def _outcome(row: MessageRow, channel: str, final: Final) -> Outcome:
    update = StatusUpdate(row.tenant_id, row.message_id, final.status, final.reason)
    return Outcome(row, channel, update, announce=False)


class SendTestHandler:
    def __init__(
        self,
        store: DeliveryStore,
        previews: Previews,
        transports: Mapping[str, Transport],
        clock: Clock,
        *,
        make_id: Callable[[], str],
    ) -> None:
        self.store = store
        self.previews = previews
        self.transports = transports
        self.clock = clock
        self.make_id = make_id

    async def send(self, tenant: str, request: SendTestInput) -> MessageRecord:
        """Render, record and send the test message; the message as it ended. Bad input raises
        InvalidArgument (nothing recorded), an unknown template or profile NotFound, a template
        that cannot be rendered safely FailedPrecondition."""
        check_template_id(request.template_id)
        self.previews.check(request.profile_id, request.locale)
        variants = await self.previews.variants(tenant, request.template_id)
        channel_name = variants[0].channel
        channel = CHANNELS[channel_name]
        recipient = request.recipient.strip()
        if has_line_break(request.recipient):
            raise InvalidArgument(FieldViolation("recipient", "must be one line (no CR or LF)"))
        problem = channel.address_problem(recipient)
        if problem:
            why = f"is not an address a {channel_name} message can go to ({problem})"
            raise InvalidArgument(FieldViolation("recipient", why))
        person = await self.previews.person(tenant, request.profile_id)
        preview = await self.previews.render(
            tenant, variants, request.variables, profile=person, locale=request.locale
        )
        send = Send(
            recipient=recipient,
            subject=TEST_SUBJECT_PREFIX + preview.rendered.subject,
            body_text=preview.rendered.body_text,
            tenant_id=tenant,
        )
        now = self.clock.now()
        message_id = self.make_id()
        row = MessageRow(
            tenant_id=tenant,
            message_id=message_id,
            idempotency_key=f"test:{message_id}",
            profile_id=person.profile_id if person is not None else "",
            trigger_id="",
            status=PENDING,
            attempts=0,
        )
        outgoing = self._compose(channel_name, message_id, send, now)
        async with self.store.engine.begin() as conn:
            await _insert(conn, row, channel_name, request, send, preview.template.locale, now)
            ended = outgoing if isinstance(outgoing, Final) else None
            reasons = await suppression_reasons(conn, [(tenant, channel_name, recipient)])
            if reasons:
                ended = Final(SUPPRESSED, next(iter(reasons.values())))
            if ended is not None:
                await write_outcomes(self.store, conn, [_outcome(row, channel_name, ended)], now)
        if ended is None and isinstance(outgoing, Outgoing):
            await self._send(row, channel_name, send, outgoing)
        return await self.store.get_message(tenant, message_id)

    def _compose(self, channel: str, message_id: str, send: Send, now: datetime) -> Outgoing | Final:
        try:
            return self.transports[channel].compose(message_id, send, now)
        except (ValueError, TypeError, LookupError) as exc:
            return Final(FAILED, f"{COMPOSE_FAILED}: {exc}")

    async def _send(self, row: MessageRow, channel: str, send: Send, outgoing: Outgoing) -> None:
        async with SendJournal(self.store, self.clock, _not_counted) as journal:
            claim = Claim(row, send.recipient, send.subject, sms_segments=outgoing.sms_segments)
            handover = _Handover(row, channel, claim, journal)
            await self.transports[channel].send_many([outgoing], handover)


def _not_counted(outcomes: Sequence[Outcome]) -> None:
    """Test messages are not real sends: the message metrics leave them out."""


async def _insert(
    conn: AsyncConnection,
    row: MessageRow,
    channel: str,
    request: SendTestInput,
    send: Send,
    locale: str,
    now: datetime,
) -> None:
    await conn.execute(
        messages.insert().values(
            tenant_id=row.tenant_id,
            message_id=row.message_id,
            idempotency_key=row.idempotency_key,
            profile_id=row.profile_id,
            trigger_id=row.trigger_id,
            channel=channel,
            purpose=TEST_PURPOSE,
            template_id=request.template_id,
            variables=dict(request.variables),
            status=PENDING,
            reason="",
            recipient=send.recipient,
            subject=send.subject,
            attempts=0,
            locale=locale,
            test=True,
            created_at=now,
            updated_at=now,
        )
    )
    await conn.execute(
        history.insert().values(
            tenant_id=row.tenant_id, message_id=row.message_id, status=PENDING, reason=ACCEPTED, at=now
        )
    )
