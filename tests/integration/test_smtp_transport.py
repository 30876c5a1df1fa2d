"""Delivery's SMTP transport over loopback against aiosmtpd: the connections are the transport's,
shared by the batches it sends at once, never more of them than the setting says."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP

from services.delivery.channels.base import Outgoing
from services.delivery.channels.email import SmtpTransport
from services.delivery.domain import SendOutcome
from tests.helpers import eventually

CONTENT = b"Subject: hi\r\n\r\nhello\r\n"


@dataclass
class _Counts:
    """Connections open now, the most open at once and all opened; mails claimed and not yet
    reported now and the most at once (every batch together); mails the server kept."""

    open_now: int = 0
    most_open: int = 0
    opened: int = 0
    in_flight: int = 0
    most_in_flight: int = 0
    kept: int = 0


class _CountedSmtp(SMTP):
    def __init__(self, counts: _Counts, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(self, hostname="sink", loop=loop)
        self.counts = counts

    def connection_made(self, transport: Any) -> None:
        c = self.counts
        c.open_now += 1
        c.opened += 1
        c.most_open = max(c.most_open, c.open_now)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.counts.open_now -= 1
        super().connection_lost(exc)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.counts.kept += 1
        return "250 OK"


class _Handover:
    """Claims every mail of its batch and keeps the outcomes."""

    def __init__(self, counts: _Counts) -> None:
        self.counts = counts
        self.outcomes: dict[int, SendOutcome] = {}

    async def claim(self, index: int) -> bool:
        c = self.counts
        c.in_flight += 1
        c.most_in_flight = max(c.most_in_flight, c.in_flight)
        await asyncio.sleep(0)  # another lane may run between the claim and the content
        return True

    def report(self, index: int, outcome: SendOutcome) -> None:
        self.counts.in_flight -= 1
        self.outcomes[index] = outcome


async def test_batches_sent_at_once_share_the_transports_connections() -> None:
    loop = asyncio.get_running_loop()
    counts = _Counts()
    server = await loop.create_server(lambda: _CountedSmtp(counts, loop), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = SmtpTransport("127.0.0.1", port, sender="Shop <no-reply@shop.example>", connections=3)
    batches = [_Handover(counts) for _ in range(3)]
    try:
        await asyncio.gather(
            *(
                transport.send_many([Outgoing(f"p{i}@example.com", CONTENT) for i in range(10)], h)
                for h in batches
            )
        )

        async def all_closed() -> bool:
            return counts.open_now == 0

        await eventually(all_closed)  # no batch is sending: the sessions were closed
    finally:
        server.close()
        await server.wait_closed()
    assert [sorted(h.outcomes) for h in batches] == [list(range(10))] * 3
    assert {o.kind for h in batches for o in h.outcomes.values()} == {"sent"}
    assert counts.kept == 30
    # three connections for the three batches together, each carried on to the next batch
    assert counts.opened == 3 and counts.most_open == 3
    assert counts.most_in_flight <= 3
