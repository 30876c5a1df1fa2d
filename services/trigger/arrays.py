"""Many rows as one statement on the driver: each column an array parameter, unnested server-side.

The hot statements of the event path and the timer worker go this way (`DriverStatement` on the
asyncpg connection under the SQLAlchemy one): one round trip and one bound value per column per
batch, where an executemany through SQLAlchemy converted and sent every row's values one by one
(figures: bench/README.md, "Trigger").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from relevans.kit.db import DriverStatement


def unnest(alias: str, columns: Sequence[tuple[str, str]]) -> str:
    """`unnest(CAST(:a AS t[]), ...) WITH ORDINALITY AS alias(a, ..., ord)` for (name, type) columns:
    the parameter of each column is named as the column."""
    arrays = ", ".join(f"CAST(:{name} AS {kind}[])" for name, kind in columns)
    return f"unnest({arrays}) WITH ORDINALITY AS {alias}({', '.join(n for n, _ in columns)}, ord)"


def json_text(value: object) -> str:
    """A JSON(B) value as text, for a text[] parameter cast to jsonb in the statement."""
    return orjson.dumps(value).decode()


async def run(
    conn: AsyncConnection, statement: DriverStatement, params: Mapping[str, Any]
) -> list[asyncpg.Record]:
    """Run `statement` in `conn`'s transaction, begun through SQLAlchemy if it has not run one yet."""
    driver: asyncpg.Connection = (await conn.get_raw_connection()).driver_connection
    if not driver.is_in_transaction():
        await conn.execute(sa.text("SELECT 1"))
    return await statement.fetch(driver, params)
