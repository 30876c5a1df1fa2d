"""Withdrawals of waiting banners: a cancel event on a web trigger (`WithdrawMessages`) becomes a
`relevans.delivery.v1.DeliveryWithdrawal` on `rv.delivery.withdrawals`, through the outbox in the
batch's transaction, when a reminder it covers has fired (only then may a banner be waiting).

The absence kind asks once per cancel event it had not seen, so a redelivered cancel withdraws
nothing twice.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from relevans.delivery.v1 import bus_pb2
from relevans.kit.db import DriverStatement, fetch_on_driver, unnest
from relevans.kit.outbox import OutboxMessage
from relevans.kit.proto import to_timestamp
from services.trigger import outbox_rows
from services.trigger.domain import WithdrawMessages

WITHDRAWAL_SUBJECT = "rv.delivery.withdrawals"

# The withdrawals (by ordinal) that cover a fired timer: started at or before the cancel, with the
# same values of the match properties (`timer_rows._CANCEL` covers pending timers the same way).
_FIRED_COVERED = DriverStatement(f"""
SELECT u.ord
FROM {
    unnest(
        "u",
        (
            ("tenant_id", "text"),
            ("trigger_id", "text"),
            ("profile_id", "text"),
            ("until", "timestamptz"),
            ("match", "text"),
        ),
    )
}
WHERE EXISTS (
    SELECT 1 FROM timers t
    WHERE t.tenant_id = u.tenant_id AND t.trigger_id = u.trigger_id AND t.profile_id = u.profile_id
      AND t.status = 'fired' AND t.started_at <= u.until
      AND NOT EXISTS (
          SELECT 1 FROM jsonb_array_elements(CAST(u.match AS jsonb)) AS m(pair)
          WHERE coalesce(t.variables -> 'event' -> (m.pair ->> 0), CAST('null' AS jsonb)) <> m.pair -> 1
      )
)
ORDER BY u.ord
""")


def withdrawal_message(w: WithdrawMessages) -> OutboxMessage:
    msg = bus_pb2.DeliveryWithdrawal(
        tenant_id=w.tenant_id,
        profile_id=w.profile_id,
        trigger_id=w.trigger_id,
        reason=w.reason,
        withdraw_time=to_timestamp(w.until),
    )
    return OutboxMessage(WITHDRAWAL_SUBJECT, msg.SerializeToString())


async def withdraw(conn: AsyncConnection, wanted: Sequence[WithdrawMessages], now: datetime) -> int:
    """Enqueue a withdrawal for each of `wanted` that covers a fired reminder; return how many."""
    if not wanted:
        return 0
    rows = await fetch_on_driver(
        conn,
        _FIRED_COVERED,
        {
            "tenant_id": [w.tenant_id for w in wanted],
            "trigger_id": [w.trigger_id for w in wanted],
            "profile_id": [w.profile_id for w in wanted],
            "until": [w.until for w in wanted],
            "match": [json.dumps([[name, value] for name, value in w.match]) for w in wanted],
        },
    )
    covered = [wanted[r["ord"] - 1] for r in rows]
    await outbox_rows.enqueue(conn, [withdrawal_message(w) for w in covered], now)
    return len(covered)
