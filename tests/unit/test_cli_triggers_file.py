"""The files `relevans triggers apply` and `relevans policy set` read (relevans/cli/triggers_file.py): the
example parses into the messages it means, and every problem is named by file, trigger and field before
anything is sent (issue 18 item 4)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format

from relevans.cli.triggers_file import (
    FileError,
    load_policy_file,
    load_triggers_file,
    parse_policy_file,
    policy_yaml,
)
from relevans.common.v1 import common_pb2
from relevans.trigger.v1 import trigger_pb2

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "triggers.yaml"


def problems(text: str, tmp_path: Path) -> list[str]:
    """The problems `relevans triggers apply` would print for a file holding `text`."""
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(FileError) as caught:
        load_triggers_file(str(path))
    return [p.removeprefix(f"{path}: ") for p in caught.value.problems]


def test_the_example_holds_every_kind_the_readme_shows_and_the_policy() -> None:
    parsed = load_triggers_file(str(EXAMPLE))
    kinds = {t.trigger_id: t.WhichOneof("condition") for t in parsed.triggers}
    assert kinds == {
        "abandoned-cart": "absence",
        "toy-interest": "threshold",
        "lapsing-member": "inactivity",
        "birthday": "date",
        "vip-welcome": "trait_change",
    }
    cart, toys, lapsing, birthday, vip = parsed.triggers
    assert cart.absence.delay.seconds == 4 * 3600 and cart.policy.priority == 5
    assert cart.channel == common_pb2.CHANNEL_EMAIL and cart.purpose == common_pb2.PURPOSE_MARKETING
    count = toys.threshold.event_count
    assert (count.event_type, count.count, count.window.seconds) == ("page_view", 11, 7 * 86400)
    assert json_format.MessageToDict(count.condition) == {
        "compare": {"field": "event.category", "op": "eq", "value": "toys"}
    }
    assert list(lapsing.inactivity.event_types) == ["check_in"]
    assert lapsing.inactivity.duration.seconds == 14 * 86400
    assert (birthday.date.date_trait, birthday.date.yearly, birthday.date.local_time) == (
        "birthday",
        True,
        "10:00",
    )
    assert vip.trait_change.transition == trigger_pb2.TRAIT_TRANSITION_TAKES
    assert vip.trait_change.value.string_value == "gold"
    assert vip.policy.reentry.mode == trigger_pb2.REENTRY_MODE_ONCE_EVER

    policy = parsed.policy
    assert policy is not None
    email, all_channels = policy.caps
    assert (email.channel, email.max_messages, email.calendar_day) == (common_pb2.CHANNEL_EMAIL, 3, True)
    assert all_channels.channel == common_pb2.CHANNEL_UNSPECIFIED
    assert (all_channels.max_messages, all_channels.rolling.seconds) == (6, 7 * 86400)
    assert (policy.quiet_hours.start, policy.quiet_hours.end) == ("22:00", "07:00")
    assert policy.default_time_zone == "Europe/Copenhagen"


def test_a_time_of_day_or_a_date_left_unquoted_stays_text(tmp_path: Path) -> None:
    """YAML 1.1 reads 22:00 as 1320 (base 60) and 2026-05-01 as a date; the files mean the text."""
    path = tmp_path / "t.yaml"
    path.write_text(
        "policy: {quietHours: {start: 22:00, end: 07:00}}\n"
        "triggers:\n"
        "  - {triggerId: b, date: {dateTrait: birthday, localTime: 10:30}}\n"
        "  - {triggerId: v, traitChange: {traitName: renewal, transition: TRAIT_TRANSITION_TAKES,"
        " value: 2026-05-01}}\n"
    )
    parsed = load_triggers_file(str(path))
    assert parsed.policy is not None and parsed.policy.quiet_hours.start == "22:00"
    assert parsed.triggers[0].date.local_time == "10:30"
    assert parsed.triggers[1].trait_change.value.string_value == "2026-05-01"
    assert yaml.safe_load("x: 22:00") == {"x": 1320}, "the loader changed only its own copy"


def test_proto_field_names_are_read_as_well_as_json_names(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(
        "triggers:\n  - {trigger_id: a, template_id: t, policy: {capped_action: CAPPED_ACTION_DROP}}\n"
    )
    [trigger] = load_triggers_file(str(path)).triggers
    assert (trigger.trigger_id, trigger.template_id) == ("a", "t")
    assert trigger.policy.capped_action == trigger_pb2.CAPPED_ACTION_DROP


def test_without_a_policy_the_policy_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("triggers: []\n")
    assert load_triggers_file(str(path)).policy is None


def test_an_unknown_field_names_the_trigger_by_index_and_id_and_the_field_path(tmp_path: Path) -> None:
    assert problems(
        "triggers:\n"
        "  - {triggerId: a, absence: {startEventType: x, cancelEventType: y, delay: 60s}}\n"
        "  - {triggerId: toy-interest, threshold: {eventCount: {eventType: page_view, windw: 604800s}}}\n",
        tmp_path,
    ) == [
        "triggers[1] (toy-interest): threshold.eventCount.windw: unknown field of EventCount "
        "(its fields: eventType, condition, count, window)"
    ]


def test_every_problem_of_the_file_is_named_at_once(tmp_path: Path) -> None:
    found = problems(
        "extra: 1\n"
        "policy: {caps: [{maxMessages: three}], defaultExpiry: 6 hours}\n"
        "triggers:\n"
        "  - {triggerId: a, absence: {delay: 4 hours}}\n"
        "  - {triggerId: b, channel: EMAIL}\n"
        "  - {templateId: 5, policy: {priority: high}}\n"
        "  - {triggerId: d, absence: {}, event: {}}\n"
        "  - just text\n"
        "  - {triggerId: a}\n"
        "  - {triggerId: g, event: {eventType: purchase, condition: [1]}}\n",
        tmp_path,
    )
    assert found == [
        "extra: unknown key; a triggers file holds `policy:` and `triggers:`",
        "policy.caps[0].maxMessages: expected a whole number, got 'three'",
        "policy.defaultExpiry: '6 hours' is not a duration: seconds with an s, e.g. 14400s (4 hours) or "
        "604800s (7 days)",
        "triggers[0] (a): absence.delay: '4 hours' is not a duration: seconds with an s, e.g. 14400s "
        "(4 hours) or 604800s (7 days)",
        "triggers[1] (b): channel: 'EMAIL' is not one of CHANNEL_UNSPECIFIED, CHANNEL_EMAIL, CHANNEL_SMS, "
        "CHANNEL_WEB, CHANNEL_WEBHOOK",
        "triggers[2]: templateId: expected text, got 5 (quote it)",
        "triggers[2]: policy.priority: expected a whole number, got 'high'",
        "triggers[3] (d): condition: holds absence and event; keep one",
        "triggers[4]: expected a mapping of Trigger fields",
        "triggers[5] (a): triggerId: triggers[0] (a) has the same id",
        "triggers[6] (g): event.condition: expected a mapping (a condition tree), got [1]",
    ]


def test_the_shape_of_the_file_itself(tmp_path: Path) -> None:
    assert problems("triggers: {a: 1}\n", tmp_path) == ["triggers: expected a list of triggers"]
    assert problems("- a\n", tmp_path) == ["expected a mapping with `policy:` and `triggers:`"]
    assert problems("", tmp_path) == ["expected a mapping with `policy:` and `triggers:`"]
    assert problems("triggers: [\n", tmp_path) == [
        "line 2, column 1: not valid YAML: expected the node content, but found '<stream end>'"
    ]
    path = tmp_path / "missing.yaml"
    with pytest.raises(FileError, match=r"missing.yaml: cannot read it: No such file or directory"):
        load_triggers_file(str(path))


def test_a_policy_file_holds_just_the_policy_and_round_trips_through_policy_show() -> None:
    policy = load_triggers_file(str(EXAMPLE)).policy
    assert policy is not None
    shown = trigger_pb2.Policy()
    shown.CopyFrom(policy)
    shown.update_time.FromSeconds(1_700_000_000)
    text = policy_yaml(shown)
    assert "updateTime" not in text and "maxMessages: 3" in text and "'22:00'" in text
    assert parse_policy_file(yaml.safe_load(text), "p.yaml") == policy
    assert policy_yaml(trigger_pb2.Policy()) == "{}\n"


def test_a_policy_file_names_its_problems_and_refuses_a_triggers_file(tmp_path: Path) -> None:
    with pytest.raises(FileError) as caught:
        parse_policy_file({"quietHours": {"start": "22:00", "finish": "07:00"}}, "p.yaml")
    assert caught.value.problems == [
        "p.yaml: quietHours.finish: unknown field of QuietHours (its fields: start, end)"
    ]
    with pytest.raises(FileError, match="that is a triggers file, for `triggers apply`"):
        load_policy_file(str(EXAMPLE))
    with pytest.raises(FileError, match=r"p\.yaml: expected a mapping of Policy fields"):
        parse_policy_file(["caps"], "p.yaml")
    assert parse_policy_file(None, "p.yaml") == trigger_pb2.Policy()


def test_a_file_that_does_not_parse_is_refused_before_the_service_is_asked(tmp_path: Path) -> None:
    """No token and no stack: the file's problems are what the command says, with exit status 2."""
    path = tmp_path / "bad.yaml"
    path.write_text("triggers:\n  - {triggerId: a, absence: {dely: 3s}}\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "relevans.cli.main",
            "triggers",
            "apply",
            str(path),
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"{path}: triggers[0] (a): absence.dely: unknown field of AbsenceCondition (its fields: "
        "startEventType, cancelEventType, delay, cancelCondition, matchProperties)",
        f"relevans triggers apply: {path}: nothing was applied",
    ]
