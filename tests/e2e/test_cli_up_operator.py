"""The operator's path through `relevans up` (issue 17 item 1, issue 16 findings 7 and 8): a taken
port is said and recorded; `import`, `health` and `token create` reach the stack from the data folder
with no flags; a service killed with -9 comes back while the others run on; Ctrl-C stops all; a
restart keeps the secret (tokens minted before still work) and the ports."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import grpc
import pytest

from relevans.kit.grpc_client import bearer
from relevans.trigger.v1 import trigger_pb2, trigger_pb2_grpc
from tests.helpers import eventually
from tests.helpers.local_stack import up_env

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads a process's children from /proc")

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ticketing-sample.csv"


class Up:
    """A running `relevans up` in `folder` (its data folder is the default `.relevans` there), its
    output collected as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process, folder: Path) -> None:
        self.proc = proc
        self.state_file = folder / ".relevans" / "up.json"
        self.output = ""
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.output += line.decode()

    @classmethod
    async def start(cls, folder: Path, env: dict[str, str]) -> Up:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "relevans.cli.main", "up"),
            cwd=folder,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        up = cls(proc, folder)

        async def ready() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"relevans up exited early:\n{up.output}")
            return up.state_file.exists() and "relevans is up" in up.output

        await eventually(ready, timeout=120, interval=0.2)
        return up

    @property
    def state(self) -> dict[str, object]:
        state: dict[str, object] = json.loads(self.state_file.read_text())
        return state

    def services(self) -> dict[str, int]:
        """The pid of each service `up` runs now."""
        pids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        found = {}
        for pid in pids:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"serve" in args:
                found[args[args.index(b"serve") + 1].decode()] = int(pid)
        return found

    async def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(self.proc.wait(), timeout=60) == 0, self.output
        await self.reader


async def relevans(folder: Path, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """`relevans ARGS` run in `folder` with no RELEVANS_* variable: it finds the stack on its own."""
    bare = {k: v for k, v in env.items() if not k.startswith("RELEVANS_")}
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "relevans.cli.main", *args),
        cwd=folder,
        env=bare,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _list_triggers(target: str, token: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        await trigger_pb2_grpc.TriggerServiceStub(channel).ListTriggers(
            trigger_pb2.ListTriggersRequest(), metadata=bearer(token), timeout=10
        )


async def _serving(folder: Path, env: dict[str, str]) -> bool:
    code, _, _ = await relevans(folder, env, "health")
    return code == 0


async def test_the_operators_path_through_up(server_tmp: Path) -> None:
    """`up` runs in `server_tmp`, in memory where the machine allows: its PostgreSQL's data is there."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        env = up_env(taken_port)
        up = await Up.start(server_tmp, env)
        try:
            state = up.state
            chosen = int(str(state["profile"]).rsplit(":", 1)[1])
            said = f"port {taken_port} (profile gRPC) is taken; profile gRPC uses {chosen} instead"
            assert said in up.output and state["moved"] == [said]

            code, out, err = await relevans(server_tmp, env, "import", str(SAMPLE))
            assert code == 1, (out, err)  # the sample has five bad rows on purpose
            assert "20 rows read, 15 imported, 5 failed" in out

            code, out, _ = await relevans(server_tmp, env, "health")
            assert code == 0 and out.count("SERVING") == 3 and str(state["profile"]) in out

            code, token, err = await relevans(
                server_tmp, env, "token", "create", "--tenant", "dev", "--scope", "read"
            )
            assert code == 0 and "'dev'" in err and "expires" in err
            await _list_triggers(str(state["trigger"]), token.strip())

            before = up.services()
            os.kill(before["profile"], signal.SIGKILL)
            await eventually(lambda: _restarted(up, before["profile"]), timeout=60, interval=0.2)
            await eventually(lambda: _serving(server_tmp, env), timeout=60, interval=0.5)
            after = up.services()
            assert after["profile"] != before["profile"]
            assert (after["trigger"], after["delivery"]) == (before["trigger"], before["delivery"])
            assert (
                f"profile (pid {before['profile']}) exited: killed by SIGKILL; restarting in 1 s" in up.output
            )
        finally:
            await up.stop()
    assert not up.state_file.exists()
    assert "stopped" in up.output

    up = await Up.start(server_tmp, env)
    try:
        assert up.state["trigger"] == state["trigger"] and up.state["delivery"] == state["delivery"]
        assert up.state["profile"] == f"127.0.0.1:{taken_port}"  # free again: the documented one
        await _list_triggers(str(up.state["trigger"]), token.strip())  # the same secret
    finally:
        await up.stop()


async def _restarted(up: Up, old_pid: int) -> bool:
    return "profile restarted" in up.output and up.services().get("profile", old_pid) != old_pid
