"""Delivery's SMTP transport over loopback against aiosmtpd: the connections are the transport's,
shared by the batches it sends at once, never more of them than the setting says."""

from __future__ import annotations

import asyncio
from typing import Any

from aiosmtpd.smtp import SMTP

from services.delivery.channels.base import Outgoing
from services.delivery.channels.email import SmtpTransport
from services.delivery.domain import SendOutcome
from tests.helpers import eventually

CONTENT = b"Subject: hi\r\n\r\nhello\r\n"


class _Counted(SMTP):
    """aiosmtpd counting the connections open at once, and all it was given."""

    open_now = 0
    most_open = 0
    opened = 0

    def connection_made(self, transport: Any) -> None:
        cls = type(self)
        cls.open_now += 1
        cls.opened += 1
        cls.most_open = max(cls.most_open, cls.open_now)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        type(self).open_now -= 1
        super().connection_lost(exc)


class _Kept:
    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.count += 1
        return "250 OK"


class _Handover:
    """Claims every mail and notes the most claimed and not yet reported at once (all batches)."""

    in_flight = 0
    most_in_flight = 0

    def __init__(self) -> None:
        self.outcomes: dict[int, SendOutcome] = {}

    async def claim(self, index: int) -> bool:
        cls = type(self)
        cls.in_flight += 1
        cls.most_in_flight = max(cls.most_in_flight, cls.in_flight)
        await asyncio.sleep(0)  # another lane may run between the claim and the content
        return True

    def report(self, index: int, outcome: SendOutcome) -> None:
        type(self).in_flight -= 1
        self.outcomes[index] = outcome


async def test_batches_sent_at_once_share_the_transports_connections() -> None:
    loop = asyncio.get_running_loop()
    kept = _Kept()

    class Server(_Counted):
        pass

    server = await loop.create_server(lambda: Server(kept, hostname="sink", loop=loop), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = SmtpTransport("127.0.0.1", port, sender="Shop <no-reply@shop.example>", connections=3)

    class Handover(_Handover):
        pass

    batches = [Handover() for _ in range(3)]
    try:
        await asyncio.gather(
            *(
                transport.send_many([Outgoing(f"p{i}@example.com", CONTENT) for i in range(10)], h)
                for h in batches
            )
        )

        async def all_closed() -> bool:
            return Server.open_now == 0

        await eventually(all_closed)  # no batch is sending: the sessions were closed
    finally:
        server.close()
        await server.wait_closed()
    assert [sorted(h.outcomes) for h in batches] == [list(range(10))] * 3
    assert {o.kind for h in batches for o in h.outcomes.values()} == {"sent"}
    assert kept.count == 30
    # three connections for the three batches together, each carried on to the next batch
    assert Server.opened == 3 and Server.most_open == 3
    assert Handover.most_in_flight <= 3
