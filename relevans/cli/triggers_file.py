"""The files `relevans triggers apply` and `relevans policy set` read: YAML holding Trigger and Policy
messages in their protobuf JSON form, checked whole before anything is sent.

    policy:                    # optional: the tenant's sending policy (SetPolicy), replaced whole
      caps: [{channel: CHANNEL_EMAIL, maxMessages: 3, calendarDay: true}]
      quietHours: {start: "22:00", end: "07:00"}
      defaultTimeZone: Europe/Copenhagen
    triggers:                  # each a Trigger (CreateTrigger)
      - triggerId: abandoned-cart
        absence: {startEventType: add_to_cart, cancelEventType: purchase, delay: 14400s}
        channel: CHANNEL_EMAIL
        purpose: PURPOSE_MARKETING
        templateId: cart-reminder

Field names are the messages' JSON names (maxMessages) or their proto names (max_messages); enums are
written by name (CHANNEL_EMAIL), durations in seconds with an `s` (14400s). A time of day may be left
unquoted (22:00): YAML 1.1 reads it as a number in base 60, this loader keeps it text, and dates too.

Here the file is checked against the messages' shapes (an unknown field, a wrong type, an enum or a
duration that does not parse), every problem named by file, trigger and field path; what the values
mean (a delay of zero, an unknown time zone) the trigger service checks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from relevans.trigger.v1 import trigger_pb2

# Output-only fields, left out of what `relevans policy show` prints.
OUTPUT_ONLY = ("updateTime", "createTime")
DURATION = "google.protobuf.Duration"
TIMESTAMP = "google.protobuf.Timestamp"
# Messages whose JSON form is not an object of their fields: checked as a whole, not field by field.
STRUCT = "google.protobuf.Struct"
OPAQUE = {DURATION, TIMESTAMP, STRUCT, "google.protobuf.Value", "google.protobuf.ListValue"}
INTEGERS = {
    FieldDescriptor.CPPTYPE_INT32,
    FieldDescriptor.CPPTYPE_INT64,
    FieldDescriptor.CPPTYPE_UINT32,
    FieldDescriptor.CPPTYPE_UINT64,
}


class FileError(ValueError):
    """A file that cannot be applied; `problems` are its lines, each `file: where: what`."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = [f"{path}: {p}" for p in problems]
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class TriggersFile:
    """A parsed triggers file: the policy to set (None: leave it alone) and the triggers to create."""

    policy: trigger_pb2.Policy | None
    triggers: list[trigger_pb2.Trigger]


class _Loader(yaml.SafeLoader):
    """YAML without the two readings that break these files: 22:00 as the number 1320 (base 60) and
    2024-05-01 as a date object; both stay the text they are."""


def _number_or_time_of_day(loader: _Loader, node: yaml.Node) -> Any:
    assert isinstance(node, yaml.ScalarNode)  # the resolvers give these tags to scalars only
    if ":" in str(node.value):
        return loader.construct_scalar(node)
    return loader.construct_yaml_int(node) if node.tag.endswith(":int") else loader.construct_yaml_float(node)


def _text(loader: _Loader, node: yaml.Node) -> Any:
    assert isinstance(node, yaml.ScalarNode)
    return loader.construct_scalar(node)


yaml.add_constructor("tag:yaml.org,2002:int", _number_or_time_of_day, Loader=_Loader)
yaml.add_constructor("tag:yaml.org,2002:float", _number_or_time_of_day, Loader=_Loader)
yaml.add_constructor("tag:yaml.org,2002:timestamp", _text, Loader=_Loader)


def read_yaml(path: str) -> Any:
    """The file's YAML; a FileError when it cannot be read or parsed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise FileError(path, [f"cannot read it: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise FileError(path, ["is not UTF-8 text"]) from None
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "YAML"
        problem = getattr(exc, "problem", None) or str(exc)
        raise FileError(path, [f"{where}: not valid YAML: {problem}"]) from None


def load_triggers_file(path: str) -> TriggersFile:
    return parse_triggers_file(read_yaml(path), path)


def load_policy_file(path: str) -> trigger_pb2.Policy:
    return parse_policy_file(read_yaml(path), path)


def parse_triggers_file(data: Any, path: str) -> TriggersFile:
    """The file's policy and triggers; a FileError naming every problem when any part does not parse."""
    if not isinstance(data, dict) or not data:
        raise FileError(path, ["expected a mapping with `policy:` and `triggers:`"])
    problems = [
        f"{key}: unknown key; a triggers file holds `policy:` and `triggers:`"
        for key in data
        if key not in ("policy", "triggers")
    ]
    policy: trigger_pb2.Policy | None = None
    if "policy" in data:
        policy = trigger_pb2.Policy()
        problems += _parse(data["policy"], policy, "policy")
    raw = data.get("triggers") or []
    triggers: list[trigger_pb2.Trigger] = []
    if not isinstance(raw, list):
        problems.append("triggers: expected a list of triggers")
        raw = []
    first_of: dict[str, str] = {}
    for index, item in enumerate(raw):
        place = trigger_place(index, item)
        trigger = trigger_pb2.Trigger()
        found = _parse(item, trigger, "")
        problems += [f"{place}: {p}" for p in found]
        trigger_id = _raw_id(item)
        if trigger_id in first_of:
            problems.append(f"{place}: triggerId: {first_of[trigger_id]} has the same id")
        elif trigger_id:
            first_of[trigger_id] = place
        if not found:
            triggers.append(trigger)
    if problems:
        raise FileError(path, problems)
    return TriggersFile(policy=policy, triggers=triggers)


def parse_policy_file(data: Any, path: str) -> trigger_pb2.Policy:
    """A file holding just the policy mapping (what `relevans policy show` prints)."""
    policy = trigger_pb2.Policy()
    if isinstance(data, dict) and {"policy", "triggers"} & set(data):
        raise FileError(path, ["holds `policy:`/`triggers:`: that is a triggers file, for `triggers apply`"])
    if problems := _parse(data if data is not None else {}, policy, ""):
        raise FileError(path, problems)
    return policy


def trigger_place(index: int, item: Any) -> str:
    """`triggers[2] (toy-interest)`: where a trigger is in its file, by index and id."""
    trigger_id = _raw_id(item)
    return f"triggers[{index}]" + (f" ({trigger_id})" if trigger_id else "")


def _raw_id(item: Any) -> str:
    return str(item.get("triggerId", item.get("trigger_id")) or "") if isinstance(item, dict) else ""


def policy_yaml(policy: trigger_pb2.Policy) -> str:
    """The policy as `relevans policy set` reads it (and as a triggers file's `policy:` holds it)."""
    data = {k: v for k, v in json_format.MessageToDict(policy).items() if k not in OUTPUT_ONLY}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)


# ---- every problem of a message's JSON form, by field path --------------------------------------


def _parse(data: Any, message: Message, path: str) -> list[str]:
    """Fills `message` from `data`; its problems as `path: what` (empty when it parsed)."""
    if not isinstance(data, dict):
        return [_at(path, f"expected a mapping of {message.DESCRIPTOR.name} fields")]
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as exc:
        return [_at(p, why) for p, why in _problems(data, message.DESCRIPTOR, path)] or [
            _at(path, _cleaned(exc))
        ]
    return []


def _problems(data: dict[Any, Any], descriptor: Descriptor | Any, path: str) -> list[tuple[str, str]]:
    """(path, problem) of each field of `data` that does not parse, looking into nested messages."""
    fields = {f.json_name: f for f in descriptor.fields} | {f.name: f for f in descriptor.fields}
    cls = message_factory.GetMessageClass(descriptor)
    out: list[tuple[str, str]] = []
    for key, value in data.items():
        here = f"{path}.{key}" if path else str(key)
        field = fields.get(key)
        if field is None:
            known = ", ".join(f.json_name for f in descriptor.fields)
            out.append((here, f"unknown field of {descriptor.name} (its fields: {known})"))
            continue
        try:
            json_format.ParseDict({key: value}, cls())
        except json_format.ParseError as exc:
            out += _field_problems(field, value, here) or [(here, _reason(field, value, exc))]
    if not out:  # each field parses alone: two fields of one oneof
        for oneof in descriptor.oneofs:
            if len(chosen := [str(k) for k in data if fields.get(k) in oneof.fields]) > 1:
                out.append(
                    (
                        f"{path}.{oneof.name}" if path else oneof.name,
                        f"holds {' and '.join(chosen)}; keep one",
                    )
                )
    return out


def _field_problems(field: FieldDescriptor, value: Any, path: str) -> list[tuple[str, str]]:
    """The problems inside a field of message type, when it holds the mappings it should."""
    message = field.message_type
    if message is None or message.full_name in OPAQUE or message.GetOptions().map_entry:
        return []
    if field.is_repeated:
        if not isinstance(value, list):
            return []
        out: list[tuple[str, str]] = []
        for i, item in enumerate(value):
            if isinstance(item, dict):
                out += _problems(item, message, f"{path}[{i}]")
            else:
                out.append((f"{path}[{i}]", f"expected a mapping of {message.name} fields"))
        return out
    return _problems(value, message, path) if isinstance(value, dict) else []


def _reason(field: FieldDescriptor, value: Any, exc: json_format.ParseError) -> str:
    """What is wrong with one field's value, in the file's terms."""
    shown = repr(value)
    message = field.message_type
    if field.is_repeated and not isinstance(value, list):
        return f"expected a list, got {shown}"
    if message is not None and message.full_name == DURATION:
        return f"{shown} is not a duration: seconds with an s, e.g. 14400s (4 hours) or 604800s (7 days)"
    if message is not None and message.full_name == TIMESTAMP:
        return f"{shown} is not an RFC 3339 time, e.g. 2026-05-01T10:00:00Z"
    if message is not None and message.full_name == STRUCT:
        return f"expected a mapping (a condition tree), got {shown}"
    if message is not None and message.full_name not in OPAQUE and not isinstance(value, dict):
        return f"expected a mapping of {message.name} fields, got {shown}"
    if field.enum_type is not None:
        return f"{shown} is not one of {', '.join(v.name for v in field.enum_type.values)}"
    if field.cpp_type in INTEGERS:
        return f"expected a whole number, got {shown}"
    if field.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        return f"expected true or false, got {shown}"
    if field.cpp_type == FieldDescriptor.CPPTYPE_STRING:
        return f"expected text, got {shown} (quote it)"
    return _cleaned(exc)


def _at(path: str, problem: str) -> str:
    return f"{path}: {problem}" if path else problem


def _cleaned(exc: json_format.ParseError) -> str:
    """The parser's message without its nesting prefixes, field list and path suffix."""
    text = str(exc).split("\n")[0]
    while match := re.match(r"Failed to parse \w+ field: ", text):
        text = text[match.end() :]
    return re.sub(r'\s+at "?[\w.\[\]]*"?\.*$', "", text).rstrip(".")
