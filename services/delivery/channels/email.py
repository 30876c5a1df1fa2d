"""The email channel's transport: SMTP (smtp_client.py), classified for at-most-once sending.

Each outcome says whether the server took the message and, if not, whether trying again
is safe (the rules are `EmailChannel.classify` in the domain):

- `sent`: the server answered 250 to the end of DATA;
- `transient`: nothing was handed over (cannot connect, a 4xx reply): retry later;
- `permanent`: the server refused with a 5xx reply, or the address cannot be written into a
  command: never retry;
- `bounced`: the server refused the recipient for good (550/551/553 to RCPT, or an enhanced
  status 5.1.x): never retry, and the address is suppressed;
- `unknown`: the connection broke or timed out after the content was on the wire;
  the server may have accepted it, so the message is not sent again.

A batch is spread over a few connections (`RELEVANS_SMTP_CONNECTIONS`), each taking the next mail
when it is free. A mail is claimed through the worker's `Handover` after the server took its
envelope and DATA command and right before its content, so a mail the server refused, or never
saw, is not claimed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from datetime import datetime

import structlog

from relevans.kit.settings import Settings
from services.delivery.channels.base import Handover, Outgoing
from services.delivery.channels.smtp_client import SmtpError, SmtpSession, UnusableAddress
from services.delivery.domain import Send, SendFailure, SendOutcome
from services.delivery.domain.channels.email import EmailChannel, email_bytes, envelope_sender, sender_domain
from services.delivery.domain.tracking import LinkMaker

log = structlog.get_logger(__name__)


class SmtpTransport:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        sender: str,
        timeout_s: float = 10.0,
        connections: int = Settings.smtp_connections,
        links: LinkMaker | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.sender = sender
        self.envelope_from = envelope_sender(sender)
        self.local_hostname = sender_domain(sender)
        self.timeout_s = timeout_s
        self.connections = max(1, connections)
        self.rules = EmailChannel()
        # Tracked mail (unsubscribe, open and click links) when delivery's HTTP endpoint serves them.
        self.links = links

    def compose(self, message_id: str, send: Send, now: datetime) -> Outgoing:
        content = email_bytes(
            message_id=message_id,
            sender=self.sender,
            recipient=send.recipient,
            subject=send.subject,
            body_text=send.body_text,
            now=now,
            links=self.links.for_message(send.tenant_id, message_id) if self.links else None,
        )
        return Outgoing(send.recipient, content)

    async def send_many(self, mails: Sequence[Outgoing], handover: Handover) -> None:
        """Send the mails over a few connections, each taking the next mail when it is free."""
        queue = iter(enumerate(mails))
        lanes = min(self.connections, len(mails))
        await asyncio.gather(*(self._send_lane(queue, handover) for _ in range(lanes)))

    async def _send_lane(self, queue: Iterator[tuple[int, Outgoing]], handover: Handover) -> None:
        session: SmtpSession | None = None
        try:
            for index, mail in queue:
                session = await self._send_one(session, index, mail, handover)
        finally:
            if session is not None:
                await session.quit()

    async def _send_one(
        self, session: SmtpSession | None, index: int, mail: Outgoing, handover: Handover
    ) -> SmtpSession | None:
        """One mail on the lane's session (opened when needed): the envelope and DATA, then the
        claim, then the content; the outcome goes to `handover`. Returns the session to carry the
        next mail."""
        try:
            if session is None or not session.is_open:
                session = await SmtpSession.open(
                    self.host, self.port, local_hostname=self.local_hostname, timeout_s=self.timeout_s
                )
            await session.begin(self.envelope_from, mail.recipient)
            if not await handover.claim(index):
                # The server waits for content; only closing the session cancels the mail.
                session.close()
                return None
            reply = await session.content(mail.content)
            handover.report(index, SendOutcome("sent", reply))
            return session
        except UnusableAddress as exc:
            # An address that is not ASCII needs SMTPUTF8; this mail can never be sent as is.
            handover.report(index, SendOutcome("permanent", str(exc)))
            return await self._reset(session)
        except SmtpError as exc:
            kind = self.rules.classify(SendFailure(exc.stage, exc.code, exc.message))
            if exc.code is None:
                # No reply: the session broke (the client closed it).
                if kind == "unknown":
                    log.warning("smtp session broke during DATA; outcome unknown", error=str(exc))
                handover.report(index, SendOutcome(kind, str(exc)))
                return None
            # The server answered with an error code: it did not take the message.
            handover.report(index, SendOutcome(kind, str(exc)))
            return await self._reset(session)

    async def _reset(self, session: SmtpSession | None) -> SmtpSession | None:
        """Abort the open mail transaction so the session can carry the next mail."""
        if session is None or not session.is_open:
            return None
        try:
            await session.reset()
            return session
        except SmtpError:
            session.close()
            return None
