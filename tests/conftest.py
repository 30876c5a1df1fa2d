"""Real infrastructure for the tests: one PostgreSQL and one NATS JetStream per session, and the
whole system on them.

Both start from the pip-installed binaries on free ports in a temp folder, unless
RELEVANS_TEST_POSTGRES_URL / RELEVANS_TEST_NATS_URL point at external servers.
Every test gets fresh, migrated databases (cloned from a migrated template) and an
empty bus, so tests never see each other's data.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import nats
import pytest
import pytest_asyncio

from relevans.kit.bus import STREAMS
from relevans.kit.clock import ManualClock
from relevans.kit.db import migrate
from relevans.kit.logging import configure_logging
from relevans.kit.settings import SERVICES, Settings
from relevans.local.embedded import EmbeddedNats, EmbeddedPostgres
from relevans.local.sms_sink import SmsSink
from relevans.local.smtp_sink import SmtpSink
from tests.helpers.auth import TEST_SECRET
from tests.helpers.system import System

_db_counter = itertools.count(1)


def pytest_configure(config: pytest.Config) -> None:
    configure_logging(level=os.environ.get("RELEVANS_TEST_LOG_LEVEL", "warning"), fmt="console")


@pytest.fixture(scope="session")
def servers_dir() -> Iterator[Path]:
    """The session's server data, outside pytest's numbered temp folders: pytest keeps only the
    newest three of those and deletes older ones when another session starts, which pulled the
    data folder from under a running PostgreSQL when several test sessions shared a machine."""
    path = Path(tempfile.mkdtemp(prefix="relevans-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server_tmp() -> Iterator[Path]:
    """A fresh folder for one test's own PostgreSQL data, outside pytest's temp folders: root runs
    PostgreSQL as another user, who must traverse the folder's parents, and every pytest session
    that starts on the machine takes group and other access off pytest's folder (pytest-of-<user>);
    a PostgreSQL under tmp_path then could not be stopped or restarted."""
    path = Path(tempfile.mkdtemp(prefix="relevans-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest_asyncio.fixture(scope="session")
async def postgres_url(servers_dir: Path) -> AsyncIterator[str]:
    external = os.environ.get("RELEVANS_TEST_POSTGRES_URL")
    if external:
        yield external.rstrip("/")
        return
    async with EmbeddedPostgres(servers_dir / "pg" / "data") as pg:
        yield pg.url.rsplit("/", 1)[0]


@pytest_asyncio.fixture(scope="session")
async def nats_url(servers_dir: Path) -> AsyncIterator[str]:
    external = os.environ.get("RELEVANS_TEST_NATS_URL")
    if external:
        yield external
        return
    async with EmbeddedNats(servers_dir / "nats") as server:
        yield server.url


async def _on_server(postgres_url: str, statements: list[str]) -> None:
    """Run `statements` (creating and dropping databases) on the server's maintenance database."""
    admin = await asyncpg.connect(f"{postgres_url}/postgres")
    try:
        for statement in statements:
            await admin.execute(statement)
    finally:
        await admin.close()


@pytest_asyncio.fixture(scope="session")
async def template_databases(postgres_url: str) -> dict[str, str]:
    """One migrated template database per service, cloned for each test."""
    names = {service: f"relevans_tmpl_{os.getpid()}_{service}" for service in SERVICES}
    await _on_server(
        postgres_url, [f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in names.values()]
    )
    for service, name in names.items():
        await migrate(service, f"postgresql+asyncpg://{postgres_url.split('://', 1)[1]}/{name}")
    return names


async def _empty_bus(url: str) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for spec in STREAMS:
            try:
                await js.delete_stream(spec.name)
            except nats.js.errors.NotFoundError:
                pass
    finally:
        await nc.close()


@pytest_asyncio.fixture
async def settings(
    postgres_url: str, nats_url: str, template_databases: dict[str, str]
) -> AsyncIterator[Settings]:
    """Settings for one test: fresh migrated databases, an empty bus, ports chosen by the OS."""
    n = next(_db_counter)
    databases = {s: f"relevans_t{os.getpid()}_{n}_{s}" for s in SERVICES}
    await _on_server(
        postgres_url,
        [f'CREATE DATABASE "{name}" TEMPLATE "{template_databases[s]}"' for s, name in databases.items()],
    )
    await _empty_bus(nats_url)
    base = postgres_url.split("://", 1)[1]
    yield Settings(
        postgres_url=postgres_url,
        nats_url=nats_url,
        token_secret=TEST_SECRET,
        profile_database_url=f"postgresql+asyncpg://{base}/{databases['profile']}",
        trigger_database_url=f"postgresql+asyncpg://{base}/{databases['trigger']}",
        delivery_database_url=f"postgresql+asyncpg://{base}/{databases['delivery']}",
        profile_listen="127.0.0.1:0",
        trigger_listen="127.0.0.1:0",
        delivery_listen="127.0.0.1:0",
        delivery_http_listen="127.0.0.1:0",
        profile_metrics_port=0,
        trigger_metrics_port=0,
        delivery_metrics_port=0,
        shutdown_grace=1.0,
        log_format="console",
    )
    await _on_server(
        postgres_url, [f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in databases.values()]
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest_asyncio.fixture
async def system(settings: Settings, clock: ManualClock, tmp_path: Path) -> AsyncIterator[System]:
    """The three services started, mail going to an SMTP sink and text messages to an SMS sink
    (tests/helpers/system.py)."""
    sink = SmtpSink(tmp_path / "mail")
    await sink.start()
    sms_sink = SmsSink(tmp_path / "sms")
    await sms_sink.start()
    sys_ = System(
        replace(settings, smtp_port=sink.port, sms_provider_url=sms_sink.url),
        clock,
        sink,
        {},
        {},
        sms_sink=sms_sink,
    )
    try:
        for service in ("profile", "trigger", "delivery"):
            await sys_.start(service)
        yield sys_
    finally:
        await sys_.close()
