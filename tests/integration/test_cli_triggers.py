"""`relevans triggers` and `relevans policy` as a user runs them, against the trigger service running in
the test on real PostgreSQL and NATS (issue 18 items 4 and 9): the example file applied twice, the
list, the policy shown and set again, an empty decision trace, a refused trigger beside applied ones,
a changed trigger left alone and then replaced, a delete."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
import yaml

from relevans.kit.auth import mint_token
from relevans.kit.clock import ManualClock
from relevans.kit.settings import Settings
from tests.helpers.auth import TEST_SECRET
from tests.helpers.trigger import TENANT, Harness

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "triggers.yaml"
EXAMPLE_IDS = ["abandoned-cart", "toy-interest", "lapsing-member", "birthday", "vip-welcome"]


@pytest_asyncio.fixture
async def harness(settings: Settings, clock: ManualClock, nats_url: str) -> AsyncIterator[Harness]:
    async with Harness.running(settings, clock, nats_url) as h:
        yield h


class Cli:
    """`relevans ARGS` in a fresh process against the harness's trigger service, with an admin token
    of its tenant and an empty data folder (no `relevans up` of this machine is found)."""

    def __init__(self, harness: Harness, data_dir: Path) -> None:
        self.target = f"127.0.0.1:{harness.hosts[-1].port}"
        self.data_dir = data_dir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RELEVANS_")}
        self.env["RELEVANS_TOKEN"] = mint_token(TEST_SECRET, TENANT, ["admin"])

    async def __call__(self, *args: str) -> tuple[int, str, str]:
        """Exit status, stdout and stderr; run without blocking the loop the service runs on."""
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "relevans.cli.main", *args),
            *("--target", self.target, "--data-dir", str(self.data_dir)),
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()


async def test_the_example_file_applies_once_and_then_changes_nothing(
    harness: Harness, tmp_path: Path
) -> None:
    relevans = Cli(harness, tmp_path)
    status, out, err = await relevans("triggers", "apply", str(EXAMPLE))
    assert status == 0, out + err
    lines = out.splitlines()
    assert lines[0] == "policy: set"
    assert lines[1:6] == [f"{trigger_id}: created" for trigger_id in EXAMPLE_IDS]
    assert lines[-1] == f"{EXAMPLE}: 5 triggers: 5 created"

    status, out, err = await relevans("triggers", "apply", str(EXAMPLE))
    assert status == 0, out + err
    lines = out.splitlines()
    assert lines[0] == "policy: unchanged"
    assert lines[1:6] == [f"{trigger_id}: unchanged" for trigger_id in EXAMPLE_IDS]
    assert lines[-1] == f"{EXAMPLE}: 5 triggers: 5 unchanged"

    status, out, err = await relevans("triggers", "list")
    assert status == 0, err
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert rows == {
        "abandoned-cart": ["absence", "email", "marketing", "cart-reminder", "5"],
        "birthday": ["date", "email", "marketing", "happy-birthday", "8"],
        "lapsing-member": ["inactivity", "email", "marketing", "we-miss-you", "4"],
        "toy-interest": ["threshold", "email", "marketing", "toy-offer", "3"],
        "vip-welcome": ["trait_change", "email", "marketing", "vip-welcome", "10"],
    }

    status, out, err = await relevans("policy", "show")
    assert status == 0, err
    shown = yaml.safe_load(out)
    assert shown["caps"] == [
        {"channel": "CHANNEL_EMAIL", "maxMessages": 3, "calendarDay": True},
        {"maxMessages": 6, "rolling": "604800s"},
    ]
    assert shown["quietHours"] == {"start": "22:00", "end": "07:00"}
    assert shown["defaultTimeZone"] == "Europe/Copenhagen"
    assert "updateTime" not in shown
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(out)
    status, out, err = await relevans("policy", "set", str(policy_file))
    assert status == 0, err
    assert yaml.safe_load(out) == shown

    status, out, err = await relevans("triggers", "explain", "p-nobody")
    assert (status, out, err) == (0, "no decisions about p-nobody\n", "")


async def test_a_refused_trigger_names_its_field_and_the_others_are_applied(
    harness: Harness, tmp_path: Path
) -> None:
    relevans = Cli(harness, tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "triggers:\n"
        "  - triggerId: welcome\n"
        "    event: {eventType: signup}\n"
        "    channel: CHANNEL_EMAIL\n"
        "    purpose: PURPOSE_MARKETING\n"
        "    templateId: welcome\n"
        "  - triggerId: too-soon\n"
        "    absence: {startEventType: add_to_cart, cancelEventType: purchase, delay: 0s}\n"
        "    channel: CHANNEL_EMAIL\n"
        "    purpose: PURPOSE_MARKETING\n"
        "    templateId: cart-reminder\n"
    )
    status, out, err = await relevans("triggers", "apply", str(bad))
    assert status == 1, out + err
    lines = out.splitlines()
    assert lines[0] == "welcome: created"
    assert lines[1] == "too-soon: refused:"
    assert lines[2].lstrip().startswith("absence.delay: ")
    assert lines[-1] == f"{bad}: 2 triggers: 1 created, 1 refused"
    status, out, _ = await relevans("triggers", "list")
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["welcome"]


async def test_a_changed_trigger_is_left_alone_until_replace_and_delete_removes_it(
    harness: Harness, tmp_path: Path
) -> None:
    relevans = Cli(harness, tmp_path)
    first, changed = tmp_path / "first.yaml", tmp_path / "changed.yaml"
    trigger = (
        "triggers:\n"
        "  - triggerId: abandoned-cart\n"
        "    absence: {{startEventType: add_to_cart, cancelEventType: purchase, delay: {delay}}}\n"
        "    channel: CHANNEL_EMAIL\n"
        "    purpose: PURPOSE_MARKETING\n"
        "    templateId: cart-reminder\n"
    )
    first.write_text(trigger.format(delay="14400s"))
    changed.write_text(trigger.format(delay="7200s"))
    assert (await relevans("triggers", "apply", str(first)))[0] == 0

    status, out, _ = await relevans("triggers", "apply", str(changed))
    assert status == 1
    assert out.splitlines()[0].startswith(
        "abandoned-cart: differs from the trigger on the service; left alone"
    )
    status, out, _ = await relevans("triggers", "apply", str(changed), "--replace")
    assert status == 0, out
    assert "abandoned-cart: replaced" in out and "pending timers cancelled" in out
    [stored] = (await relevans("triggers", "list"))[1].splitlines()[2:]
    assert stored.split()[:2] == ["abandoned-cart", "absence"]
    assert (await relevans("triggers", "apply", str(changed)))[1].splitlines()[
        0
    ] == "abandoned-cart: unchanged"

    status, out, _ = await relevans("triggers", "delete", "abandoned-cart")
    assert (status, out) == (0, "deleted abandoned-cart; its pending timers are cancelled\n")
    status, _, err = await relevans("triggers", "delete", "abandoned-cart")
    assert status == 1 and err.startswith("relevans triggers delete: ")
    assert (await relevans("triggers", "list"))[1] == "no triggers\n"
