"""What `relevans triggers apply|list|delete|explain` and `policy set` say and do (relevans/cli/triggers.py),
against a fake trigger service that answers as the real one does: CreateTrigger idempotent by id and
definition, ALREADY_EXISTS for another definition, INVALID_ARGUMENT with field violations. The same
commands against the real service are tests/integration/test_cli_triggers.py."""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime
from pathlib import Path

import grpc
from google.protobuf import duration_pb2

from relevans.cli import triggers
from relevans.cli.triggers import Refused
from relevans.cli.triggers_file import TriggersFile, load_triggers_file
from relevans.common.v1 import common_pb2
from relevans.trigger.v1 import trigger_pb2

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "triggers.yaml"


class FakeTriggers:
    """The trigger service's answers, in memory; `calls` records the changing ones."""

    def __init__(self) -> None:
        self.triggers: dict[str, trigger_pb2.Trigger] = {}
        self.policy = trigger_pb2.Policy(default_time_zone="UTC")
        self.decisions: list[trigger_pb2.Decision] = []
        self.calls: list[str] = []

    async def list_triggers(self) -> list[trigger_pb2.Trigger]:
        return [self.triggers[k] for k in sorted(self.triggers)]

    async def create(self, trigger: trigger_pb2.Trigger) -> trigger_pb2.Trigger:
        if trigger.absence.delay.seconds == 0 and trigger.WhichOneof("condition") == "absence":
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                "trigger is invalid",
                [("trigger.absence.delay", "must be between 1 second and 90 days")],
            )
        stored = self.triggers.get(trigger.trigger_id)
        if stored is not None:
            if stored != trigger:
                raise Refused(grpc.StatusCode.ALREADY_EXISTS, f"trigger {trigger.trigger_id} exists")
            return stored
        self.calls.append(f"create {trigger.trigger_id}")
        self.triggers[trigger.trigger_id] = trigger
        return trigger

    async def delete(self, trigger_id: str) -> None:
        if trigger_id not in self.triggers:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"no trigger {trigger_id}")
        self.calls.append(f"delete {trigger_id}")
        del self.triggers[trigger_id]

    async def get_policy(self) -> trigger_pb2.Policy:
        return self.policy

    async def set_policy(self, policy: trigger_pb2.Policy) -> trigger_pb2.Policy:
        if policy.quiet_hours.start and policy.quiet_hours.start == policy.quiet_hours.end:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                "policy is invalid",
                [("policy.quiet_hours", "must not start and end at the same minute")],
            )
        self.calls.append("set policy")
        self.policy = trigger_pb2.Policy()
        self.policy.CopyFrom(policy)
        self.policy.update_time.FromSeconds(len(self.calls))
        return self.policy

    async def explain(
        self, profile_id: str, trigger_id: str, page_size: int, page_token: str
    ) -> trigger_pb2.ExplainDecisionsResponse:
        mine = [d for d in self.decisions if d.profile_id == profile_id and trigger_id in ("", d.trigger_id)]
        start = int(page_token or 0)
        page = mine[start : start + page_size]
        more = start + page_size < len(mine)
        return trigger_pb2.ExplainDecisionsResponse(
            decisions=page, next_page_token=str(start + page_size) if more else ""
        )


async def applied(service: FakeTriggers, file: TriggersFile, replace: bool = False) -> tuple[int, list[str]]:
    out = io.StringIO()
    status, _ = await triggers.apply(service, file, "t.yaml", replace, out)
    return status, out.getvalue().splitlines()


def cart(delay_s: int = 14400) -> trigger_pb2.Trigger:
    return trigger_pb2.Trigger(
        trigger_id="abandoned-cart",
        absence=trigger_pb2.AbsenceCondition(
            start_event_type="add_to_cart",
            cancel_event_type="purchase",
            delay=duration_pb2.Duration(seconds=delay_s),
        ),
        channel=common_pb2.CHANNEL_EMAIL,
        purpose=common_pb2.PURPOSE_MARKETING,
        template_id="cart-reminder",
    )


async def test_applying_the_example_creates_everything_and_again_changes_nothing() -> None:
    service = FakeTriggers()
    file = load_triggers_file(str(EXAMPLE))
    status, lines = await applied(service, file)
    assert status == 0
    assert lines == [
        "policy: set",
        "abandoned-cart: created",
        "toy-interest: created",
        "lapsing-member: created",
        "birthday: created",
        "vip-welcome: created",
        "t.yaml: 5 triggers: 5 created",
    ]
    calls = list(service.calls)
    status, lines = await applied(service, file)
    assert status == 0
    assert lines[0] == "policy: unchanged", "update_time is not part of the policy"
    assert lines[-1] == "t.yaml: 5 triggers: 5 unchanged"
    assert service.calls == [*calls, "set policy"], "only the policy is set again (to the same)"


async def test_a_changed_trigger_is_left_alone_unless_replace_which_says_what_it_cancels() -> None:
    service = FakeTriggers()
    await service.create(cart())
    changed = TriggersFile(policy=None, triggers=[cart(delay_s=7200)])
    status, lines = await applied(service, changed)
    assert status == 1
    assert lines == [
        "abandoned-cart: differs from the trigger on the service; left alone (--replace deletes that one, "
        "cancelling its pending timers, and creates this one)",
        "t.yaml: 1 triggers: 1 left alone",
    ]
    assert service.triggers["abandoned-cart"].absence.delay.seconds == 14400

    status, lines = await applied(service, changed, replace=True)
    assert status == 0
    assert lines[0] == (
        "abandoned-cart: replaced (the old definition is deleted and its pending timers cancelled)"
    )
    assert service.calls[-2:] == ["delete abandoned-cart", "create abandoned-cart"]
    assert service.triggers["abandoned-cart"].absence.delay.seconds == 7200


async def test_a_refused_trigger_prints_each_field_violation_and_the_others_are_applied() -> None:
    service = FakeTriggers()
    other = trigger_pb2.Trigger()
    other.CopyFrom(cart())
    other.trigger_id = "second"
    await service.create(trigger_pb2.Trigger(trigger_id="old-one", template_id="x"))
    file = TriggersFile(
        policy=trigger_pb2.Policy(quiet_hours=trigger_pb2.QuietHours(start="22:00", end="22:00")),
        triggers=[cart(delay_s=0), other],
    )
    status, lines = await applied(service, file)
    assert status == 1
    assert lines == [
        "policy: refused:",
        "    quiet_hours: must not start and end at the same minute",
        "abandoned-cart: refused:",
        "    absence.delay: must be between 1 second and 90 days",
        "second: created",
        "on the service, not in the file (left as they are): old-one",
        "t.yaml: 2 triggers: 1 created, 1 refused; the policy was refused",
    ]


async def test_list_is_a_table_of_the_triggers() -> None:
    service = FakeTriggers()
    out = io.StringIO()
    assert await triggers.list_triggers(service, out) == 0
    assert out.getvalue() == "no triggers\n"
    for t in load_triggers_file(str(EXAMPLE)).triggers:
        await service.create(t)
    out = io.StringIO()
    await triggers.list_triggers(service, out)
    rows = [line.split() for line in out.getvalue().splitlines()]
    assert rows[0] == ["id", "kind", "channel", "purpose", "template", "priority"]
    assert ["abandoned-cart", "absence", "email", "marketing", "cart-reminder", "5"] in rows
    assert ["vip-welcome", "trait_change", "email", "marketing", "vip-welcome", "10"] in rows


async def test_delete_says_what_it_cancels_and_a_missing_trigger_is_status_1() -> None:
    service = FakeTriggers()
    await service.create(cart())
    out = io.StringIO()
    assert await triggers.delete(service, "abandoned-cart", out) == 0
    assert out.getvalue() == "deleted abandoned-cart; its pending timers are cancelled\n"
    assert await triggers.delete(service, "abandoned-cart", io.StringIO()) == 1


def decision(n: int, outcome: int, **fields: object) -> trigger_pb2.Decision:
    d = trigger_pb2.Decision(decision_id=str(n), profile_id="p1", outcome=outcome, **fields)  # type: ignore[arg-type]
    d.decide_time.FromDatetime(datetime(2026, 3, 1, 21, n, tzinfo=UTC))
    return d


async def test_explain_is_a_table_of_the_trace_newest_first_with_the_outcome_in_words() -> None:
    service = FakeTriggers()
    out = io.StringIO()
    assert await triggers.explain(service, "p1", "", 50, out) == 0
    assert out.getvalue() == "no decisions about p1\n"

    deferred = decision(
        15, trigger_pb2.DECISION_OUTCOME_DEFERRED, trigger_id="cart", reason_code="quiet_hours", count=1
    )
    deferred.reason = "quiet hours 22:00-07:00 (Europe/Copenhagen)"
    deferred.defer_until.FromDatetime(datetime(2026, 3, 2, 6, 0, tzinfo=UTC))
    service.decisions = [
        deferred,
        decision(
            10,
            trigger_pb2.DECISION_OUTCOME_NOT_FIRED,
            trigger_id="toys",
            reason_code="condition_false",
            count=7,
        ),
        decision(5, trigger_pb2.DECISION_OUTCOME_FIRED, trigger_id="cart", reason_code="condition_true"),
    ]
    out = io.StringIO()
    assert await triggers.explain(service, "p1", "", 50, out) == 0
    rows = [re.split(r"\s{2,}", line.strip()) for line in out.getvalue().splitlines()]
    assert rows[0] == ["time (UTC)", "trigger", "outcome", "reason", "until (UTC)", "count"]
    assert rows[2:] == [
        [
            "2026-03-01 21:15:00",
            "cart",
            "deferred",
            "quiet hours 22:00-07:00 (Europe/Copenhagen)",
            "2026-03-02 06:00:00",
            "1",
        ],
        ["2026-03-01 21:10:00", "toys", "not_fired", "condition_false", "7"],
        ["2026-03-01 21:05:00", "cart", "fired", "condition_true", "1"],
    ]

    out = io.StringIO()
    await triggers.explain(service, "p1", "cart", 1, out)
    lines = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines[2:-1]] == ["cart"]
    assert lines[-1] == "(the newest 1; --limit shows more)"
