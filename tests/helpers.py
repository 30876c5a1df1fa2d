"""Small helpers shared by the integration and end-to-end tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
import grpc
import sqlalchemy as sa
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.kit.db import json_value

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]], *, timeout: float = 10.0, interval: float = 0.02
) -> T:
    """Poll `probe` until it returns something truthy; fail after `timeout` real seconds.

    For waiting on asynchronous effects (a message crossing the bus), never for
    passing domain time: tests move the ManualClock for that.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last result: {result!r})")
        await asyncio.sleep(interval)


async def stays(probe: Callable[[], Awaitable[T]], *, duration: float = 0.5, interval: float = 0.02) -> None:
    """Assert `probe` stays falsy for `duration` real seconds (an effect that must not happen)."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        result = await probe()
        if result:
            raise AssertionError(f"unexpected effect: {result!r}")
        await asyncio.sleep(interval)


def field_violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    """The google.rpc.BadRequest field violations of an error, as {field: description}."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "error carries no google.rpc.Status"
    out: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.update({v.field: v.description for v in bad.field_violations})
    return out


# ---- what a statement reads ----------------------------------------------------------------------
# For tests that a statement's work follows the rows it touches, not the size of its tables: fill
# the tables, ANALYZE them, and count the rows the statement's plan reads.


def rows_read(plan: dict[str, Any]) -> int:
    """Table rows the scans of an EXPLAIN ANALYZE plan (JSON) read: those they returned and those
    their filters removed (a bitmap's index scan only marks the rows its heap scan reads)."""
    read = 0
    if plan["Node Type"].endswith("Scan") and plan["Node Type"] != "Bitmap Index Scan":
        read = int(plan["Actual Rows"]) + int(plan.get("Rows Removed by Filter", 0))
    return read + sum(rows_read(child) for child in plan.get("Plans", []))


def blocks_read(plan: dict[str, Any]) -> int:
    """Pages (of tables and indexes) an EXPLAIN (ANALYZE, BUFFERS) plan (JSON) touched."""
    return int(plan.get("Shared Hit Blocks", 0)) + int(plan.get("Shared Read Blocks", 0))


async def explain(
    conn: asyncpg.Connection, statement: str, parameters: Sequence[Any] = (), *, setup: str = ""
) -> dict[str, Any]:
    """The plan of `statement` run with `parameters`, as EXPLAIN (ANALYZE, BUFFERS) gives it in JSON
    (run in a transaction rolled back after, after `setup`, e.g. SET LOCAL settings)."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        if setup:
            await conn.execute(setup)
        found = await conn.fetchval(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, *parameters, column=0
        )
    finally:
        await transaction.rollback()
    plan: dict[str, Any] = json_value(found)[0]["Plan"]
    return plan


@asynccontextmanager
async def statements_run(engine: AsyncEngine) -> AsyncIterator[list[tuple[str, Sequence[Any]]]]:
    """The statements (as sent, with their parameters) run on `engine` meanwhile."""
    seen: list[tuple[str, Sequence[Any]]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if not many:
            seen.append((statement, tuple(parameters or ())))

    sa.event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(engine.sync_engine, "before_cursor_execute", record)
