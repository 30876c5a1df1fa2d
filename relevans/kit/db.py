"""Database helpers: one async engine per service, its own database, its own Alembic lineage."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import orjson
import structlog
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

log = structlog.get_logger(__name__)

SERVICES_ROOT = Path(__file__).resolve().parents[2] / "services"


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    """An asyncpg engine; JSON columns are (de)serialized with orjson, several times faster on the
    ingest path than the standard library."""
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=False,
        json_serializer=_json_dumps,
        json_deserializer=orjson.loads,
    )


def _json_dumps(value: object) -> str:
    return orjson.dumps(value).decode()


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
