"""`relevans serve --allow-dev-secret` and `relevans migrate` on the test's PostgreSQL and NATS, as a
user runs them (issue 16 finding 7, issue 17 item 2)."""

from __future__ import annotations

import asyncio
import os
import sys

from relevans.kit.settings import Settings, env_name
from relevans.local.embedded import free_port
from tests.helpers import eventually, serving


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELEVANS_")}
    env.update(
        {
            env_name("postgres_url"): settings.postgres_url,
            env_name("nats_url"): settings.nats_url,
            env_name("profile_database_url"): settings.profile_database_url,
            env_name("trigger_database_url"): settings.trigger_database_url,
            env_name("delivery_database_url"): settings.delivery_database_url,
            env_name("profile_metrics_port"): "0",
            env_name("shutdown_grace"): "1",
            env_name("log_level"): "warning",
            **extra,
        }
    )
    return env


async def test_serve_starts_with_the_published_secret_only_when_told_it_is_development(
    settings: Settings,
) -> None:
    """The refusal without the flag is tests/unit/test_cli.py::test_serve_refuses_the_published_secret."""
    target = f"127.0.0.1:{free_port()}"
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "relevans.cli.main", "serve", "profile", "--allow-dev-secret"),
        env=_env(settings, **{env_name("profile_listen"): target}),
    )
    try:
        await eventually(lambda: serving(target), timeout=30, interval=0.2)
        health = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "relevans.cli.main", "health", "profile"),
            env=_env(settings, **{env_name("profile_listen"): target}),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await health.communicate()
        assert health.returncode == 0
        assert target in out.decode() and "SERVING" in out.decode()
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), timeout=30) == 0


async def test_migrate_says_what_it_did(settings: Settings) -> None:
    """Issue 17 item 2: `relevans migrate` printed nothing when it succeeded."""
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "relevans.cli.main", "migrate", "profile", "trigger"),
        env=_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    said = (out + err).decode().strip().splitlines()
    profile_db = settings.profile_database_url.rsplit("/", 1)[-1]
    trigger_db = settings.trigger_database_url.rsplit("/", 1)[-1]
    assert said == [
        f"profile: database {profile_db} is up to date",
        f"trigger: database {trigger_db} is up to date",
    ]
