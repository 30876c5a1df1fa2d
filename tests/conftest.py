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
import hypothesis
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
    # Timings never decide a test: hypothesis's deadline (200 ms an example) and its too-slow check
    # failed properties whose examples a loaded machine merely ran slowly.
    hypothesis.settings.register_profile(
        "relevans", deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
    )
    hypothesis.settings.load_profile("relevans")


# Server data lives in memory when the machine has a tmpfs here: every commit, CREATE DATABASE and
# DROP DATABASE of the suite syncs its files, which on a disk cost a second or two per test (and
# the data is thrown away with the session anyway).
MEMORY_DIR = Path("/dev/shm")


def _server_folder() -> Path:
    """A fresh folder for server data, outside pytest's numbered temp folders: pytest keeps only the
    newest three of those and deletes older ones when another session starts (which pulled the data
    folder from under a running PostgreSQL when several sessions shared a machine), and every pytest
    session takes group and other access off pytest-of-<user>, which root's PostgreSQL (run as
    another user) must traverse."""
    memory = MEMORY_DIR.is_dir() and os.access(MEMORY_DIR, os.W_OK | os.X_OK)
    return Path(tempfile.mkdtemp(prefix="relevans-test-", dir=MEMORY_DIR if memory else None))


# The tests that take tens of seconds each (`pytest --durations=40`), longest first. They run first,
# one worker's queue each in turn, so none of them starts near the end and holds the run up alone.
# A name that is gone only loses its place; a new long test just runs where it is collected.
LONGEST_FIRST = (
    "tests/e2e/test_cli_up_operator.py",
    "tests/e2e/test_fuzz.py",
    "tests/integration/test_delivery_web_crash.py",
    "tests/integration/test_delivery_sms_crash.py",
    "tests/integration/test_delivery_webhook_crash.py",
    "tests/e2e/test_cli_up_demo.py",
    "tests/integration/test_delivery_crash.py::test_kill_9_during_2000_sends_sends_none_twice_and_loses_at_most_the_in_flight",
    "tests/e2e/test_abandoned_cart.py::test_trigger_service_killed_while_timer_waits_still_sends_once",
    "tests/e2e/test_abandoned_cart.py::test_consent_withdrawn_after_firing_stops_the_send",
    "tests/integration/test_cli_triggers.py::test_a_changed_trigger_is_left_alone_until_replace_and_delete_removes_it",
    "tests/integration/test_segments.py::test_sql_and_python_evaluators_agree",
    "tests/unit/test_profile_import.py::test_the_plain_phone_fast_path_agrees_with_phonenumbers",
    "tests/integration/test_delivery_crash.py::test_kill_9_while_retries_are_being_sent_sends_none_twice",
    "tests/integration/test_cli_triggers.py::test_the_example_file_applies_once_and_then_changes_nothing",
    "tests/unit/test_profile_import.py::test_the_plain_email_fast_path_agrees_with_email_validator",
    "tests/unit/test_conditions.py::test_double_negation_and_compiled_evaluation_agree",
)


def _longest_rank(item: pytest.Item) -> int | None:
    for rank, name in enumerate(LONGEST_FIRST):
        if item.nodeid == name or item.nodeid.startswith(name + "::"):
            return rank
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the longest tests at the head of each worker's first share. pytest-xdist's `worksteal`
    (make test) gives worker k the k-th contiguous share of the collection (len // workers left
    each), so the long ones are dealt to the shares' heads; every worker computes the same order."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    long = sorted((r, i) for i, item in enumerate(items) if (r := _longest_rank(item)) is not None)
    if not long:
        return
    heads_of: list[list[pytest.Item]] = [[] for _ in range(workers)]
    for j, (_, i) in enumerate(long):  # dealt 0, 1, .., n-1, n-1, .., 0, 0, ..: shares even out
        turn, seat = divmod(j, workers)
        heads_of[seat if turn % 2 == 0 else workers - 1 - seat].append(items[i])
    rest = iter([item for item in items if _longest_rank(item) is None])
    ordered: list[pytest.Item] = []
    for share, heads in enumerate(heads_of):
        size = (len(items) - len(ordered)) // (workers - share)
        ordered += heads + list(itertools.islice(rest, max(0, size - len(heads))))
    ordered += list(rest)
    items[:] = ordered


@pytest.fixture(scope="session")
def servers_dir() -> Iterator[Path]:
    """The session's server data (PostgreSQL, NATS)."""
    path = _server_folder()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server_tmp() -> Iterator[Path]:
    """A fresh folder for one test's own PostgreSQL data (a test that stops and restarts it)."""
    path = _server_folder()
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
        # FILE_COPY copies the template's few files; the default (WAL_LOG) writes every block of
        # them to the WAL, several times slower for databases this small
        [
            f'CREATE DATABASE "{name}" TEMPLATE "{template_databases[s]}" STRATEGY FILE_COPY'
            for s, name in databases.items()
        ],
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
