"""Bus messages into the trigger service's outbox as one statement per batch (the kit's `enqueue`
runs one INSERT per message: a timer round hands hundreds of delivery requests at once)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from relevans.kit.db import DriverStatement, fetch_on_driver, unnest
from relevans.kit.outbox import OutboxMessage

# In the order given: the relay publishes by id.
_ENQUEUE = DriverStatement(f"""
INSERT INTO outbox (subject, payload, created_at)
SELECT subject, payload, CAST(:now AS timestamptz)
FROM {unnest("u", (("subject", "text"), ("payload", "bytea")))} ORDER BY ord
""")


async def enqueue(conn: AsyncConnection, messages: Sequence[OutboxMessage], now: datetime) -> None:
    """Add messages to the outbox inside the caller's transaction."""
    if messages:
        await fetch_on_driver(
            conn,
            _ENQUEUE,
            {"subject": [m.subject for m in messages], "payload": [m.payload for m in messages], "now": now},
        )
