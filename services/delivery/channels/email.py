"""The email channel's transport: SMTP (aiosmtplib), classified for at-most-once sending.

Each outcome says whether the server took the message and, if not, whether trying again
is safe (the rules are `EmailChannel.classify` in the domain):

- `sent`: the server answered 250 to the end of DATA;
- `transient`: nothing was handed over (cannot connect, a 4xx reply): retry later;
- `permanent`: the server refused with a 5xx reply: never retry;
- `unknown`: the connection broke or timed out after the content was on the wire;
  the server may have accepted it, so the message is not sent again.

A batch is spread over a few connections, each sending its share in turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime

import aiosmtplib
import structlog

from services.delivery.channels.base import Outgoing
from services.delivery.domain import Send, SendFailure, SendOutcome
from services.delivery.domain.channels.email import EmailChannel, email_bytes, envelope_sender, sender_domain

log = structlog.get_logger(__name__)


def _reply(exc: aiosmtplib.SMTPResponseException) -> str:
    return f"{exc.code} {exc.message}".strip()


class SmtpTransport:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        sender: str,
        timeout_s: float = 10.0,
        connections: int = 8,
    ) -> None:
        self.host = host
        self.port = port
        self.sender = sender
        self.envelope_from = envelope_sender(sender)
        self.local_hostname = sender_domain(sender)
        self.timeout_s = timeout_s
        self.connections = max(1, connections)
        self.rules = EmailChannel()

    def compose(self, message_id: str, send: Send, now: datetime) -> Outgoing:
        content = email_bytes(
            message_id=message_id,
            sender=self.sender,
            recipient=send.recipient,
            subject=send.subject,
            body_text=send.body_text,
            now=now,
        )
        return Outgoing(send.recipient, content)

    async def send_many(self, mails: Sequence[Outgoing]) -> list[SendOutcome]:
        """One outcome per mail, in order; never raises for a mail's failure."""
        if not mails:
            return []
        lanes = min(self.connections, len(mails))
        groups = [list(range(i, len(mails), lanes)) for i in range(lanes)]
        results = await asyncio.gather(*(self._send_lane([mails[i] for i in g]) for g in groups))
        outcomes: list[SendOutcome | None] = [None] * len(mails)
        for group, lane_outcomes in zip(groups, results, strict=True):
            for i, outcome in zip(group, lane_outcomes, strict=True):
                outcomes[i] = outcome
        return [o or SendOutcome("unknown", "no outcome") for o in outcomes]

    async def _send_lane(self, mails: Sequence[Outgoing]) -> list[SendOutcome]:
        client: aiosmtplib.SMTP | None = None
        outcomes: list[SendOutcome] = []
        try:
            for mail in mails:
                client, outcome = await self._send_one(client, mail)
                outcomes.append(outcome)
        finally:
            if client is not None:
                await self._quit(client)
        return outcomes

    async def _send_one(
        self, client: aiosmtplib.SMTP | None, mail: Outgoing
    ) -> tuple[aiosmtplib.SMTP | None, SendOutcome]:
        stage = "connect"
        try:
            if client is None or not client.is_connected:
                client = aiosmtplib.SMTP(
                    hostname=self.host,
                    port=self.port,
                    timeout=self.timeout_s,
                    local_hostname=self.local_hostname,
                )
                await client.connect()
            stage = "envelope"
            await client.mail(self.envelope_from)
            await client.rcpt(mail.recipient)
            stage = "data"
            reply = await client.data(mail.content)
            return client, SendOutcome("sent", f"{reply.code} {reply.message}".strip())
        except aiosmtplib.SMTPResponseException as exc:
            # The server answered with an error code: it did not take the message.
            client = await self._reset(client)
            return client, SendOutcome(self.rules.classify(SendFailure(stage, exc.code)), _reply(exc))
        except UnicodeError as exc:
            # An address that is not ASCII needs SMTPUTF8; this mail can never be sent as is.
            client = await self._reset(client)
            return client, SendOutcome("permanent", f"address not ASCII: {exc}")
        except Exception as exc:  # connection refused or lost, timeouts, TLS: whatever broke the session
            if client is not None:
                client.close()
            detail = f"{type(exc).__name__}: {exc}".strip()
            kind = self.rules.classify(SendFailure(stage, None))
            if kind == "unknown":
                log.warning("smtp session broke during DATA; outcome unknown", error=detail)
            return None, SendOutcome(kind, detail)

    async def _reset(self, client: aiosmtplib.SMTP | None) -> aiosmtplib.SMTP | None:
        """Abort the open mail transaction so the connection can carry the next mail."""
        if client is None or not client.is_connected:
            return None
        try:
            await client.rset()
            return client
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            client.close()
            return None

    async def _quit(self, client: aiosmtplib.SMTP) -> None:
        if not client.is_connected:
            return
        try:
            await client.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            client.close()
