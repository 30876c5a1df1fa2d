"""The `relevans` command as a user runs it, where no stack is needed: help, completion, one-line
errors, the data folder's record and secret, the port chooser and the restart supervisor
(issue 17, issue 16 findings 7 and 8). The commands against a running stack are in
tests/integration/test_cli_commands.py and tests/e2e/test_cli_up_operator.py."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.core import TyperGroup
from typer.main import get_command

from relevans.cli.main import app
from relevans.cli.stack import SECRET_FILE, ensure_secret, stack_settings, write_state
from relevans.cli.supervisor import Backoff, Supervisor, describe_exit
from relevans.cli.up import PortChooser, port_is_free
from relevans.kit.auth import verify_token
from relevans.local.embedded import free_port


def relevans(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`relevans ARGS` in a fresh process, without the caller's RELEVANS_* variables."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RELEVANS_")}
    return subprocess.run(
        [sys.executable, "-m", "relevans.cli.main", *args],
        env={**base, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _commands() -> Iterator[tuple[str, object]]:
    def walk(command: object, path: str) -> Iterator[tuple[str, object]]:
        yield path, command
        if isinstance(command, TyperGroup):
            for name, sub in command.commands.items():
                yield from walk(sub, f"{path} {name}")

    yield from walk(get_command(app), "relevans")


def test_every_command_and_option_has_help_and_a_shown_default() -> None:
    """Issue 17 item 2: `token create --tenant/--scope` and `serve`'s argument had no help, `--scope`
    did not say it repeats, `demo --timeout` showed no default."""
    for path, command in _commands():
        assert command.help, f"{path} has no help"  # type: ignore[attr-defined]
        for param in command.params:  # type: ignore[attr-defined]
            if param.hidden or param.name in ("help", "install_completion", "show_completion"):
                continue
            assert param.help, f"{path} {param.name} has no help"
            if param.multiple or getattr(param, "nargs", 1) == -1:
                assert "repeat" in param.help, f"{path} {param.name}: say that it repeats"
            if param.default not in (None, False) and not param.required:
                assert param.show_default, f"{path} {param.name} hides its default"


def test_help_through_the_cli_names_the_commands_not_internal_names() -> None:
    done = relevans()
    text = done.stdout + done.stderr
    for command in ("up", "serve", "migrate", "health", "demo", "import", "token"):
        assert command in text
    assert "token_command" not in text and "{" not in text.split("Commands")[0]
    shown = relevans("demo", "--help").stdout
    assert "--timeout" in shown and "default: 30.0" in shown
    shown = relevans("token", "create", "--help").stdout
    assert "repeat for several" in shown and "default: 30d" in shown


def test_shell_completion_scripts_are_produced() -> None:
    done = relevans("--show-completion", "bash")
    assert done.returncode == 0 and "complete" in done.stdout and "_RELEVANS_COMPLETE" in done.stdout
    env = {"_RELEVANS_COMPLETE": "complete_bash", "COMP_WORDS": "relevans to", "COMP_CWORD": "1"}
    assert "token" in relevans(env=env).stdout


def _one_line_error(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert done.returncode == code, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_an_unreachable_stack_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """Issue 17 item 1: `migrate` against no PostgreSQL ended in a raw ConnectionRefusedError, and an
    import that never sent a batch claimed "the batches sent before the failure were imported"."""
    nowhere = {
        "RELEVANS_POSTGRES_URL": f"postgresql://postgres@127.0.0.1:{free_port()}",
        "RELEVANS_PROFILE_TARGET": f"127.0.0.1:{free_port()}",
    }
    _one_line_error(relevans("migrate", env=nowhere, cwd=tmp_path), 2, "cannot reach PostgreSQL")
    sample = str(Path(__file__).resolve().parents[2] / "examples" / "ticketing-sample.csv")
    done = relevans("import", sample, "--tenant-token", "t", env=nowhere, cwd=tmp_path)
    _one_line_error(done, 2, "cannot reach profile", "nothing was imported")
    assert "batches sent before" not in done.stderr


def test_serve_refuses_the_published_secret(tmp_path: Path) -> None:
    """Issue 16 finding 7: with RELEVANS_TOKEN_SECRET unset (the published default) `serve` started,
    and anyone who read the README could mint admin tokens. The dev flag that allows it is started
    in tests/integration/test_cli_commands.py."""
    for env in ({}, {"RELEVANS_TOKEN_SECRET": "change-me-in-production"}):
        done = relevans("serve", "profile", env=env, cwd=tmp_path)
        _one_line_error(done, 2, "RELEVANS_TOKEN_SECRET", "--allow-dev-secret")


def test_token_create_says_what_it_gave(tmp_path: Path) -> None:
    """Issue 16 finding 7: `token create` printed the token alone, and without --ttl it never expired."""
    before = datetime.now(UTC)
    done = relevans(
        "token",
        "create",
        "--tenant",
        "acme",
        "--scope",
        "read",
        "--scope",
        "ingest",
        env={"RELEVANS_TOKEN_SECRET": "s3cret"},
    )
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    who = verify_token("s3cret", token, before)
    assert who.tenant_id == "acme" and who.scopes == {"read", "ingest"}
    assert who.expires_at is not None
    expires = datetime.fromtimestamp(who.expires_at, UTC)
    assert timedelta(days=29) < expires - before <= timedelta(days=30, minutes=1)
    said = done.stderr.strip()
    assert "'acme'" in said and "ingest, read" in said and f"{expires:%Y-%m-%d %H:%M}" in said
    assert "30 days" in said


def test_token_create_uses_the_data_folder_secret_and_refuses_the_published_one(tmp_path: Path) -> None:
    done = relevans("token", "create", "--tenant", "acme", "--scope", "read", cwd=tmp_path)
    _one_line_error(done, 2, "no token secret", "relevans up")
    secret = ensure_secret(tmp_path / ".relevans")
    done = relevans("token", "create", "--tenant", "acme", "--scope", "read", cwd=tmp_path)
    assert verify_token(secret, done.stdout.strip(), datetime.now(UTC)).tenant_id == "acme"


def test_the_data_folder_secret_is_random_private_and_kept(tmp_path: Path) -> None:
    first = ensure_secret(tmp_path)
    assert len(first) >= 32 and first != ensure_secret(tmp_path / "other")
    assert ensure_secret(tmp_path) == first
    assert stat.S_IMODE((tmp_path / SECRET_FILE).stat().st_mode) == 0o600


def test_commands_read_the_running_stack_from_the_data_folder_and_the_environment_wins(
    tmp_path: Path,
) -> None:
    write_state(
        tmp_path,
        {"profile": "127.0.0.1:41001", "trigger": "127.0.0.1:41002", "postgres": "postgresql://x@h:1"},
    )
    ensure_secret(tmp_path)
    stack = stack_settings(str(tmp_path), env={})
    assert stack.settings.profile_target == "127.0.0.1:41001"
    assert stack.local_address("trigger") == "127.0.0.1:41002"
    assert stack.settings.postgres_url == "postgresql://x@h:1"
    assert stack.settings.token_secret == (tmp_path / SECRET_FILE).read_text().strip()
    env = {"RELEVANS_PROFILE_TARGET": "10.0.0.1:1", "RELEVANS_TOKEN_SECRET": "mine"}
    stack = stack_settings(str(tmp_path), env=env)
    assert (stack.settings.profile_target, stack.settings.token_secret) == ("10.0.0.1:1", "mine")
    assert stat.S_IMODE((tmp_path / "up.json").stat().st_mode) == 0o600
    assert json.loads((tmp_path / "up.json").read_text())["profile"] == "127.0.0.1:41001"


def _port_in_time_wait() -> int:
    """A port whose listener is gone while a connection it accepted sits in TIME_WAIT (the server's
    side closed first), as after `relevans up` stopped with clients connected."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port: int = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()
    client.recv(1)
    client.close()
    server.close()
    return port


def test_a_port_in_time_wait_is_kept() -> None:
    """Issue 17 item 1: `up` test-bound without SO_REUSEADDR, so a restart within a minute of a session
    with connections moved its ports to random ones, silently."""
    port = _port_in_time_wait()
    chooser = PortChooser()
    assert port_is_free(port)
    assert chooser.choose(port, "profile gRPC") == port and chooser.notes == []


def test_a_taken_port_is_said_and_another_chosen(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        chooser = PortChooser()
        chosen = chooser.choose(port, "profile gRPC")
    assert chosen != port
    assert chooser.notes == [f"port {port} (profile gRPC) is taken; profile gRPC uses {chosen} instead"]
    assert chooser.notes[0] in capsys.readouterr().out


def test_the_restart_delay_doubles_up_to_a_limit() -> None:
    backoff = Backoff(first=1.0, longest=30.0)
    assert [backoff.delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert describe_exit(-9) == "killed by SIGKILL" and describe_exit(3) == "exit status 3"


async def test_the_supervisor_restarts_a_dead_service_with_backoff_and_says_so() -> None:
    """Issue 16 finding 8: `up` stopped everything when one service died. Here a service that exits
    three times in a row is started again after 1, 2 and 4 s (on a fake sleep), each exit said with
    its status, until it stays up; the other service is never touched."""
    exits_left = {"profile": 3}
    said: list[str] = []
    slept: list[float] = []
    spawned: list[str] = []

    async def spawn(service: str) -> asyncio.subprocess.Process:
        spawned.append(service)
        code = "import sys; sys.exit(3)" if exits_left.get(service, 0) > 0 else "import time; time.sleep(60)"
        exits_left[service] = exits_left.get(service, 0) - 1
        return await asyncio.create_subprocess_exec(sys.executable, "-c", code)

    async def ready(service: str, child: asyncio.subprocess.Process) -> None:
        return None

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    supervisor = Supervisor(spawn, ready, said.append, sleep=sleep, clock=lambda: 0.0)
    await supervisor.start(["profile", "trigger"])
    stop = asyncio.Event()
    running = asyncio.create_task(supervisor.run_until(stop))
    try:
        for _ in range(200):
            if supervisor.restarts["profile"] == 3:
                break
            await asyncio.sleep(0.05)
        assert slept == [1.0, 2.0, 4.0]
        assert spawned.count("trigger") == 1 and supervisor.restarts["trigger"] == 0
        exits = [line for line in said if "exited" in line]
        assert len(exits) == 3 and all("profile" in line and "exit status 3" in line for line in exits)
        assert "restarting in 4 s" in exits[-1]
    finally:
        stop.set()
        await running
        for child in supervisor.children.values():
            child.kill()
            await child.wait()
