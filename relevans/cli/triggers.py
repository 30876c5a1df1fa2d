"""The work behind `relevans triggers apply|list|delete|explain` and `relevans policy show|set`: the
trigger service's RPCs, what they answered said in lines and tables, and the expected failures (an
unreachable service, a refused token) in one line.

`apply` makes the service hold what a file says, and changes nothing when it already does: the policy
is set (replaced whole) when the file has one; each trigger is created, or found "unchanged" when one
with the same id and definition exists. A trigger whose stored definition differs is left alone and
reported, unless `replace`: then it is deleted (its pending timers are cancelled: people waiting for
the old definition get nothing) and created anew. A refused policy or trigger is printed with each
field violation and does not stop the others. Exit status: 0 when everything applied, 1 when something
was refused or left alone, 2 when the command could not run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar

import grpc
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rich import box
from rich.table import Table

from relevans.cli.console import console, print_table, quiet_broken_pipe, say
from relevans.cli.triggers_file import TriggersFile, policy_yaml, trigger_place
from relevans.common.v1 import common_pb2
from relevans.kit.grpc_client import bearer
from relevans.trigger.v1 import trigger_pb2, trigger_pb2_grpc

if TYPE_CHECKING:
    from relevans.trigger.v1.trigger_pb2_grpc import TriggerServiceAsyncStub

CALL_TIMEOUT = 10.0  # seconds each call may take
LIST_PAGE = 100
EXPLAIN_PAGE = 200
OUTCOMES = ("created", "unchanged", "replaced", "left alone", "refused")
T = TypeVar("T")


class CannotRun(Exception):
    """The command cannot go on (the service unreachable, the token refused); one line says why."""


@dataclass(frozen=True)
class Refused(Exception):
    """The service refused one request for what it holds: its code, and each field violation."""

    code: grpc.StatusCode
    message: str
    violations: list[tuple[str, str]] = field(default_factory=list)


class Triggers(Protocol):
    """The trigger service's RPCs as the commands use them (tests put a fake in its place)."""

    async def list_triggers(self) -> list[trigger_pb2.Trigger]: ...
    async def create(self, trigger: trigger_pb2.Trigger) -> trigger_pb2.Trigger: ...
    async def delete(self, trigger_id: str) -> None: ...
    async def get_policy(self) -> trigger_pb2.Policy: ...
    async def set_policy(self, policy: trigger_pb2.Policy) -> trigger_pb2.Policy: ...
    async def explain(
        self, profile_id: str, trigger_id: str, page_size: int, page_token: str
    ) -> trigger_pb2.ExplainDecisionsResponse: ...


class TriggerClient:
    """The trigger service at `target`, called with `token`; errors become Refused or CannotRun."""

    def __init__(self, target: str, token: str) -> None:
        self.target = target
        self.metadata = bearer(token)
        self.channel = grpc.aio.insecure_channel(target)
        self.stub: TriggerServiceAsyncStub = trigger_pb2_grpc.TriggerServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close(None)

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as err:
            code = err.code()
            if code in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.ALREADY_EXISTS,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.FAILED_PRECONDITION,
            ):
                raise Refused(code, err.details() or code.name, field_violations(err)) from None
            raise CannotRun(self._unusable(err)) from None

    def _unusable(self, err: grpc.aio.AioRpcError) -> str:
        code = err.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            return f"cannot reach trigger at {self.target} (is the stack running? `relevans health` checks)"
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return (
                f"the token was refused ({err.details()}): pass --tenant-token, set RELEVANS_TOKEN, "
                "or run `relevans up` (its dev token)"
            )
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return f"{err.details()} (apply, delete and policy set need a token with the admin scope)"
        return f"{code.name}: {err.details()}"

    async def list_triggers(self) -> list[trigger_pb2.Trigger]:
        out: list[trigger_pb2.Trigger] = []
        page_token = ""
        while True:
            reply = await self._call(
                self.stub.ListTriggers(
                    trigger_pb2.ListTriggersRequest(page_size=LIST_PAGE, page_token=page_token),
                    metadata=self.metadata,
                    timeout=CALL_TIMEOUT,
                )
            )
            out += reply.triggers
            page_token = reply.next_page_token
            if not page_token:
                return out

    async def create(self, trigger: trigger_pb2.Trigger) -> trigger_pb2.Trigger:
        reply = await self._call(
            self.stub.CreateTrigger(
                trigger_pb2.CreateTriggerRequest(trigger=trigger),
                metadata=self.metadata,
                timeout=CALL_TIMEOUT,
            )
        )
        return reply.trigger

    async def delete(self, trigger_id: str) -> None:
        await self._call(
            self.stub.DeleteTrigger(
                trigger_pb2.DeleteTriggerRequest(trigger_id=trigger_id),
                metadata=self.metadata,
                timeout=CALL_TIMEOUT,
            )
        )

    async def get_policy(self) -> trigger_pb2.Policy:
        reply = await self._call(
            self.stub.GetPolicy(trigger_pb2.GetPolicyRequest(), metadata=self.metadata, timeout=CALL_TIMEOUT)
        )
        return reply.policy

    async def set_policy(self, policy: trigger_pb2.Policy) -> trigger_pb2.Policy:
        reply = await self._call(
            self.stub.SetPolicy(
                trigger_pb2.SetPolicyRequest(policy=policy), metadata=self.metadata, timeout=CALL_TIMEOUT
            )
        )
        return reply.policy

    async def explain(
        self, profile_id: str, trigger_id: str, page_size: int, page_token: str
    ) -> trigger_pb2.ExplainDecisionsResponse:
        return await self._call(
            self.stub.ExplainDecisions(
                trigger_pb2.ExplainDecisionsRequest(
                    profile_id=profile_id, trigger_id=trigger_id, page_size=page_size, page_token=page_token
                ),
                metadata=self.metadata,
                timeout=CALL_TIMEOUT,
            )
        )


def field_violations(err: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """The google.rpc.BadRequest field violations an error carries, as (field path, description)."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]  # an aio error is a call too
    out: list[tuple[str, str]] = []
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out += [(v.field, v.description) for v in bad.field_violations]
    return out


def run(command: str, target: str, token: str, work: Callable[[Triggers], Awaitable[int]]) -> int:
    """Runs `work(client, ...)` against the trigger service; its exit status, or 2 when it could not
    run (said in one line as `relevans <command>: ...`)."""

    async def main() -> int:
        client = TriggerClient(target, token)
        try:
            return await work(client)
        finally:
            await client.close()

    try:
        return asyncio.run(main())
    except CannotRun as exc:
        say(f"relevans {command}: {exc}")
        return 2
    except BrokenPipeError:  # the reader of the output went away (`| head -1`)
        quiet_broken_pipe()
        return 1


# ---- apply --------------------------------------------------------------------------------------


@dataclass
class Applied:
    """What `apply` did to each part of the file."""

    counts: dict[str, int] = field(default_factory=dict)
    policy_refused: bool = False

    def add(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    @property
    def complete(self) -> bool:
        return not (self.policy_refused or self.counts.get("refused") or self.counts.get("left alone"))


def _refusal_lines(name: str, refused: Refused, prefix: str) -> list[str]:
    """`name: refused: ...` then each violation, its path without the request's `prefix`."""
    if not refused.violations:
        return [f"{name}: refused: {refused.message}"]
    return [f"{name}: refused:"] + [
        f"    {path.removeprefix(prefix) or path}: {why}" for path, why in refused.violations
    ]


def _without_update_time(policy: trigger_pb2.Policy) -> trigger_pb2.Policy:
    copy = trigger_pb2.Policy()
    copy.CopyFrom(policy)
    copy.ClearField("update_time")
    return copy


async def _apply_trigger(
    service: Triggers, trigger: trigger_pb2.Trigger, name: str, existed: bool, replace: bool
) -> tuple[str, list[str]]:
    """What became of one trigger of the file, and the lines that say so."""
    try:
        await service.create(trigger)
        outcome = "unchanged" if existed else "created"
        return outcome, [f"{name}: {outcome}"]
    except Refused as refused:
        if refused.code != grpc.StatusCode.ALREADY_EXISTS:
            return "refused", _refusal_lines(name, refused, "trigger.")
    if not replace:
        return "left alone", [
            f"{name}: differs from the trigger on the service; left alone (--replace deletes that one, "
            "cancelling its pending timers, and creates this one)"
        ]
    try:
        await service.delete(trigger.trigger_id)
        await service.create(trigger)
    except Refused as refused:
        return "refused", _refusal_lines(name, refused, "trigger.")
    return "replaced", [f"{name}: replaced (the old definition is deleted and its pending timers cancelled)"]


async def apply(
    service: Triggers, file: TriggersFile, path: str, replace: bool, out: IO[str]
) -> tuple[int, Applied]:
    """Applies the file (see the module's docstring); the exit status and what was done."""
    screen = console(out)
    done = Applied()
    existing = {t.trigger_id for t in await service.list_triggers()}
    if file.policy is not None:
        before = _without_update_time(await service.get_policy())
        try:
            after = _without_update_time(await service.set_policy(file.policy))
        except Refused as refused:
            done.policy_refused = True
            lines = _refusal_lines("policy", refused, "policy.")
        else:
            lines = ["policy: unchanged" if after == before else "policy: set"]
        for text in lines:
            screen.print(text, markup=False)
    for index, trigger in enumerate(file.triggers):
        name = trigger.trigger_id or trigger_place(index, {})
        outcome, lines = await _apply_trigger(service, trigger, name, trigger.trigger_id in existing, replace)
        done.add(outcome)
        for text in lines:
            screen.print(text, markup=False)
    if untouched := sorted(existing - {t.trigger_id for t in file.triggers}):
        screen.print(
            f"on the service, not in the file (left as they are): {', '.join(untouched)}", markup=False
        )
    parts = [f"{n} {what}" for what in OUTCOMES if (n := done.counts.get(what, 0))]
    policy = "; the policy was refused" if done.policy_refused else ""
    screen.print(f"{path}: {len(file.triggers)} triggers: {', '.join(parts) or 'none'}{policy}", markup=False)
    return (0 if done.complete else 1), done


# ---- list, delete, explain, policy --------------------------------------------------------------


def _name(enum: Any, value: int, prefix: str) -> str:
    """An enum value as a word: CHANNEL_EMAIL -> email; unset -> empty."""
    return "" if value == 0 else str(enum.Name(value)).removeprefix(prefix).lower()


async def list_triggers(service: Triggers, out: IO[str]) -> int:
    triggers = await service.list_triggers()
    if not triggers:
        say("no triggers", out)
        return 0
    table = Table("id", "kind", "channel", "purpose", "template", "priority", box=box.SIMPLE_HEAD)
    for t in triggers:
        table.add_row(
            t.trigger_id,
            t.WhichOneof("condition") or "",
            _name(common_pb2.Channel, t.channel, "CHANNEL_"),
            _name(common_pb2.Purpose, t.purpose, "PURPOSE_"),
            t.template_id,
            str(t.policy.priority),
        )
    print_table(table, out)
    return 0


async def delete(service: Triggers, trigger_id: str, out: IO[str]) -> int:
    try:
        await service.delete(trigger_id)
    except Refused as refused:
        say(f"relevans triggers delete: {refused.message}")
        return 1
    say(f"deleted {trigger_id}; its pending timers are cancelled", out)
    return 0


def _time(ts: timestamp_pb2.Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return ""
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S")


async def explain(service: Triggers, profile_id: str, trigger_id: str, limit: int, out: IO[str]) -> int:
    """The decision trace of a person, newest first, at most `limit` rows."""
    decisions: list[trigger_pb2.Decision] = []
    page_token = ""
    try:
        while len(decisions) < limit:
            reply = await service.explain(
                profile_id, trigger_id, min(EXPLAIN_PAGE, limit - len(decisions)), page_token
            )
            decisions += reply.decisions
            page_token = reply.next_page_token
            if not page_token:
                break
    except Refused as refused:
        for text in _refusal_lines("relevans triggers explain", refused, ""):
            say(text)
        return 1
    about = f"{profile_id}" + (f" by trigger {trigger_id}" if trigger_id else "")
    if not decisions:
        say(f"no decisions about {about}", out)
        return 0
    table = Table("time (UTC)", "trigger", "outcome", "reason", "until (UTC)", "count", box=box.SIMPLE_HEAD)
    for d in decisions:
        table.add_row(
            _time(d.decide_time),
            d.trigger_id,
            _name(trigger_pb2.DecisionOutcome, d.outcome, "DECISION_OUTCOME_"),
            d.reason or d.reason_code,
            _time(d.defer_until),
            str(d.count or 1),
        )
    print_table(table, out)
    if page_token:
        say(f"(the newest {len(decisions)}; --limit shows more)", out)
    return 0


async def show_policy(service: Triggers, out: IO[str]) -> int:
    out.write(policy_yaml(await service.get_policy()))
    return 0


async def set_policy(service: Triggers, policy: trigger_pb2.Policy, path: str, out: IO[str]) -> int:
    try:
        stored = await service.set_policy(policy)
    except Refused as refused:
        for text in _refusal_lines(path, refused, "policy."):
            say(text)
        return 1
    out.write(policy_yaml(stored))
    say(f"{path}: policy set")
    return 0
