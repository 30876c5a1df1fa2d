"""Event batches of several partitions share a transaction while others are in flight (group
commit), and a group that fails is applied again batch by batch (`consumers.EventConsumer`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from relevans.kit.clock import ManualClock
from relevans.profile.v1 import bus_pb2, profile_pb2
from services.trigger.consumers import EventConsumer
from services.trigger.domain import EventFacts, Plan

T0 = datetime(2026, 5, 4, 12, tzinfo=UTC)


async def ready() -> None:
    """Let the tasks created so far run up to their first wait (no time passes)."""
    await asyncio.sleep(0)


@dataclass
class FakeMsg:
    subject: str
    data: bytes


def batch(*event_ids: str) -> list[Any]:
    out = []
    for event_id in event_ids:
        msg = bus_pb2.EnrichedEvent(
            tenant_id="shop",
            event_id=event_id,
            profile_id=f"p-{event_id}",
            event=profile_pb2.Event(type="view"),
        )
        out.append(FakeMsg("rv.events.0", msg.SerializeToString()))
    return out


class FakeStore:
    """Records each transaction's events; the first one waits until released."""

    def __init__(self, failing: str | None = None) -> None:
        self.transactions: list[list[str]] = []
        self.release = asyncio.Event()
        self.failing = failing

    async def apply_facts(self, facts: Sequence[EventFacts], now: datetime) -> Plan:
        ids = [f.event_id for f in facts]
        if not self.transactions:
            self.transactions.append(ids)
            await self.release.wait()
        else:
            self.transactions.append(ids)
        if self.failing in ids:
            raise RuntimeError(f"bad event {self.failing}")
        return Plan([], {}, [])


async def test_batches_that_arrive_while_a_transaction_is_in_flight_share_the_next() -> None:
    store = FakeStore()
    consumer = EventConsumer(store, ManualClock(T0), writers=1)  # type: ignore[arg-type]
    first = asyncio.create_task(consumer.handle(batch("a")))
    await ready()
    waiting = [asyncio.create_task(consumer.handle(batch(e))) for e in ("b", "c", "d")]
    await ready()
    store.release.set()
    await asyncio.gather(first, *waiting)
    assert store.transactions == [["a"], ["b", "c", "d"]]


async def test_a_failed_group_is_applied_again_batch_by_batch_and_only_the_bad_one_fails() -> None:
    store = FakeStore(failing="c")
    consumer = EventConsumer(store, ManualClock(T0), writers=1)  # type: ignore[arg-type]
    first = asyncio.create_task(consumer.handle(batch("a")))
    await ready()
    waiting = {e: asyncio.create_task(consumer.handle(batch(e))) for e in ("b", "c")}
    await ready()
    store.release.set()
    await first
    await waiting["b"]
    with pytest.raises(RuntimeError, match="bad event c"):
        await waiting["c"]
    assert store.transactions[:2] == [["a"], ["b", "c"]]
    assert sorted(map(tuple, store.transactions[2:])) == [("b",), ("c",)]
