"""What a statement reads: for tests that a statement's work follows the rows it touches, not the
size of its tables (fill the tables, ANALYZE them, and count the rows the statement's plan reads)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.kit.db import json_value


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
