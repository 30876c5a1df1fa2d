"""Statements run on the driver under a SQLAlchemy connection belong to its transaction."""

from __future__ import annotations

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from relevans.kit.db import DriverStatement, create_engine, driver_connection, run_transaction
from relevans.kit.settings import Settings

INSERT = DriverStatement("INSERT INTO scratch (n) SELECT unnest(CAST(:ns AS int[])) RETURNING n")


async def test_driver_statements_commit_and_roll_back_with_the_sqlalchemy_transaction(
    settings: Settings,
) -> None:
    engine = create_engine(settings.database_url("profile"))
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text("CREATE TABLE scratch (n int)"))
        async with engine.begin() as conn:
            await conn.execute(sa.text("INSERT INTO scratch VALUES (1)"))
            rows = await INSERT.fetch(await driver_connection(conn), {"ns": [2, 3]})
            assert [r["n"] for r in rows] == [2, 3]
        with pytest.raises(RuntimeError, match="failed later"):
            async with engine.begin() as conn:
                await conn.execute(sa.text("INSERT INTO scratch VALUES (4)"))
                await INSERT.fetch(await driver_connection(conn), {"ns": [5]})
                raise RuntimeError("failed later")
        async with engine.connect() as conn:
            with pytest.raises(RuntimeError, match="no transaction on the server yet"):
                await driver_connection(conn)  # SQLAlchemy begins it with the first statement
            assert list(await conn.scalars(sa.text("SELECT n FROM scratch ORDER BY n"))) == [1, 2, 3]
    finally:
        await engine.dispose()


async def test_a_transaction_whose_driver_statement_lost_a_race_runs_again(settings: Settings) -> None:
    engine = create_engine(settings.database_url("profile"))
    attempts = []

    async def work(conn: AsyncConnection) -> int:
        await conn.execute(sa.text("SELECT 1"))
        driver = await driver_connection(conn)
        attempts.append(1)
        if len(attempts) == 1:
            # what PostgreSQL raises for a deadlock, here raised on purpose
            await driver.execute("DO $$ BEGIN RAISE EXCEPTION 'lost' USING ERRCODE = '40P01'; END $$")
        return len(attempts)

    try:
        assert await run_transaction(engine, work, attempts=3) == 2
        with pytest.raises(asyncpg.DeadlockDetectedError):
            attempts.clear()
            await run_transaction(engine, work, attempts=1)
    finally:
        await engine.dispose()
