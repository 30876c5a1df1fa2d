"""Database helpers: one async engine per service, its own database, its own Alembic lineage."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import orjson
import structlog
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

log = structlog.get_logger(__name__)

SERVICES_ROOT = Path(__file__).resolve().parents[2] / "services"


# For connections whose every statement reads and writes rows by their keys (see `create_engine`).
_LOOKUPS_ONLY = {"enable_seqscan": "off", "enable_bitmapscan": "off"}


def create_engine(
    url: str, *, pool_size: int = 10, lookups_only: bool = False, plan_each_run: bool = False
) -> AsyncEngine:
    """An asyncpg engine; JSON columns are (de)serialized with orjson, several times faster on the
    ingest path than the standard library.

    `lookups_only`: the connections plan without table and bitmap scans (unless nothing else can
    answer), for a hot path whose statements find rows by key. Without it, a plan made while a
    table was small (a new database under load) scans the table; with the statement run for every
    batch of a table growing by thousands of rows a second, that is the difference between a few
    index probes and reading the table until PostgreSQL next analyzes it.
    A prepared statement is then planned once, for any parameters (a generic plan): PostgreSQL
    otherwise plans afresh at every run when it estimates a plan for the parameters given cheaper
    than the generic one, and for single-row statements planning took longer than running.
    `plan_each_run` plans every run instead (a custom plan), for statements over whole batches:
    a generic plan keeps the sizes the tables had when it was made, and one made while a table
    was empty found a batch's rows through the smallest index whose first column matched (the
    tenant's, read in full) rather than the primary key. Figures: bench/README.md."""
    settings = {}
    if lookups_only:
        plan = "force_custom_plan" if plan_each_run else "force_generic_plan"
        settings = {**_LOOKUPS_ONLY, "plan_cache_mode": plan}
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=False,
        json_serializer=_json_dumps,
        json_deserializer=orjson.loads,
        connect_args={"server_settings": settings} if settings else {},
    )


def _json_dumps(value: object) -> str:
    return orjson.dumps(value).decode()


def json_value(raw: object) -> Any:
    """A json(b) result column's value: statements written as text hand the driver no column types,
    so it may pass the JSON over as a string."""
    return orjson.loads(raw) if isinstance(raw, str) else raw


T = TypeVar("T")

# A transaction that failed with one of these lost a race and may simply run again.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock detected


def sqlstate(exc: DBAPIError) -> str | None:
    """PostgreSQL's error code of a failed statement, as the driver (or its cause) carries it."""
    for candidate in (exc.orig, getattr(exc.orig, "__cause__", None)):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if code:
            return str(code)
    return None


def retryable(exc: BaseException) -> bool:
    """Whether a failed statement lost a race (through SQLAlchemy or on the driver directly)."""
    if isinstance(exc, DBAPIError):
        return sqlstate(exc) in RETRYABLE_SQLSTATES
    return isinstance(exc, asyncpg.PostgresError) and exc.sqlstate in RETRYABLE_SQLSTATES


class DriverStatement:
    """A statement written with :named parameters (read as SQLAlchemy's `text()` reads them),
    run on the asyncpg connection under a SQLAlchemy one (see `driver_connection`) as $1, $2, ...:
    about a third of the client CPU of running it through SQLAlchemy, which a hot path of small
    transactions, like single-event ingest, feels (figures: bench/README.md). The rows are asyncpg
    Records."""

    __slots__ = ("names", "sql")

    def __init__(self, sql: str) -> None:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match.group(1) not in names:
                names.append(match.group(1))
            return f"${names.index(match.group(1)) + 1}"

        self.sql = re.sub(r"(?<![:\w]):(\w+)", number, sql)  # not the `::` of a cast
        self.names = tuple(names)

    async def fetch(self, conn: asyncpg.Connection, params: Mapping[str, Any]) -> list[asyncpg.Record]:
        return await conn.fetch(self.sql, *[params[name] for name in self.names])


async def driver_connection(conn: AsyncConnection) -> asyncpg.Connection:
    """The asyncpg connection under `conn`, for `DriverStatement`s in its transaction. SQLAlchemy
    begins a transaction on the server with its first statement, so run one through `conn` first."""
    driver: asyncpg.Connection = (await conn.get_raw_connection()).driver_connection
    if not driver.is_in_transaction():
        raise RuntimeError("no transaction on the server yet: run a statement through the connection first")
    return driver


async def run_transaction(
    engine: AsyncEngine,
    work: Callable[[AsyncConnection], Awaitable[T]],
    *,
    attempts: int,
    again: tuple[type[Exception], ...] = (),
) -> T:
    """Run `work` in one transaction, from the start again (after a short random pause, at most
    `attempts` times in all) when it lost a race: a serialization failure or a deadlock, or one of
    the `again` exceptions the work raises itself on seeing a concurrent change."""
    for attempt in range(1, attempts + 1):
        try:
            async with engine.begin() as conn:
                return await work(conn)
        except again:
            if attempt == attempts:
                raise RuntimeError("gave up after repeated concurrent changes") from None
        except (DBAPIError, asyncpg.PostgresError) as exc:
            if not retryable(exc) or attempt == attempts:
                raise
        await asyncio.sleep(random.uniform(0, 0.002 * attempt))
    raise AssertionError("unreachable")


async def ensure_database(url: str) -> None:
    """Create the database named in `url` if the server does not have it yet."""
    parsed = make_url(url)
    name = parsed.database
    if not name:
        raise ValueError(f"database URL {parsed.render_as_string(hide_password=True)} names no database")
    admin_dsn = parsed.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    conn = await asyncpg.connect(admin_dsn)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
                log.info("database created", database=name)
            except asyncpg.DuplicateDatabaseError:
                pass
    finally:
        await conn.close()


def alembic_config(service: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SERVICES_ROOT / service / "migrations"))
    return cfg


async def migrate(service: str, url: str) -> None:
    """Create the service's database if needed and upgrade it to head.

    An advisory lock serialises instances that start at the same time.
    """
    await ensure_database(url)
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('relevans-migrate'))"))
            await conn.run_sync(_upgrade, service)
    finally:
        await engine.dispose()


def _upgrade(connection: Connection, service: str) -> None:
    cfg = alembic_config(service)
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


def run_migrations_from_env() -> None:
    """The body of every service's `migrations/env.py`: run on the connection `migrate` hands over."""
    from alembic import context

    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations with `relevans migrate`, which passes a connection")
    context.configure(connection=connection, target_metadata=None, transaction_per_migration=False)
    with context.begin_transaction():
        context.run_migrations()


# ---- many rows as one statement on the driver ---------------------------------------------------
# A hot path's batch as one `DriverStatement` whose every column is an array parameter, unnested
# server-side: one round trip and one bound value per column, where an executemany through
# SQLAlchemy converted and sent each row's values one by one (figures: bench/README.md, "Trigger").


def unnest(alias: str, columns: Sequence[tuple[str, str]], *, prefix: str = "") -> str:
    """`unnest(CAST(:a AS t[]), ...) WITH ORDINALITY AS alias(a, ..., ord)` for (name, type) columns:
    the parameter of each column is named as the column, after `prefix` (for a statement that
    unnests two lists with a column of the same name)."""
    arrays = ", ".join(f"CAST(:{prefix}{name} AS {kind}[])" for name, kind in columns)
    return f"unnest({arrays}) WITH ORDINALITY AS {alias}({', '.join(n for n, _ in columns)}, ord)"


def json_text(value: object) -> str:
    """A JSON(B) value as text, for a text[] parameter cast to jsonb in the statement."""
    return orjson.dumps(value).decode()


async def fetch_on_driver(
    conn: AsyncConnection, statement: DriverStatement, params: Mapping[str, Any]
) -> list[asyncpg.Record]:
    """Run `statement` in `conn`'s transaction, begun through SQLAlchemy if it has not run one yet."""
    driver: asyncpg.Connection = (await conn.get_raw_connection()).driver_connection
    if not driver.is_in_transaction():
        await conn.execute(text("SELECT 1"))
    return await statement.fetch(driver, params)
