"""The rules behind refusing profile input when it is written (issue 16, findings 6 and 9): names
without control characters, and Values with no kind set (the kit's `UNSET`) in event properties
and traits alike."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from google.protobuf import struct_pb2

from relevans.kit.errors import InvalidArgument
from relevans.kit.proto import UNSET, UNSET_PROBLEM, from_struct, from_value, unset_paths
from services.profile.domain import RawEvent, RawIdentify, validate_batch, validate_event, validate_identify
from services.profile.domain.imports import RawImportRow, validate_row
from services.profile.domain.traits import validate_set_traits

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def violations(exc: pytest.ExceptionInfo[InvalidArgument]) -> dict[str, str]:
    return {v.field: v.description for v in exc.value.violations}


# ---- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["Ada\r\nBcc: x@example.com", "A\tB", "A\0B", "A\x1bB", "A\x85B", "A\u2029B"]
)
def test_identify_refuses_a_first_name_with_a_control_character(name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_identify(RawIdentify(email="ada@example.com", first_name=name), NOW)
    assert list(violations(caught)) == ["first_name"]


@pytest.mark.parametrize("name", ["Ada", "Zoë O'Brien-Smith", "李小龍", "  Ada  ", "Ada\n"])
def test_names_of_letters_marks_and_spaces_are_kept_trimmed(name: str) -> None:
    command = validate_identify(RawIdentify(email="ada@example.com", first_name=name), NOW)
    assert command.first_name == name.strip()


def test_an_import_row_names_each_name_with_a_control_character() -> None:
    row, errors = validate_row(
        RawImportRow(2, email="a@example.com", first_name="A\rB", last_name="C\x7fD"), NOW, "crm"
    )
    assert row is None
    assert [(e.row_number, e.field) for e in errors] == [(2, "first_name"), (2, "last_name")]


# ---- Values with no kind set -------------------------------------------------------------------


def struct_with_unset() -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update({"color": "red", "none": None, "cart": {"items": [1, 2]}})
    s.fields["size"].CopyFrom(struct_pb2.Value())
    s.fields["cart"].struct_value.fields["items"].list_value.values.add()
    return s


def test_an_unset_value_is_none_unless_the_caller_asks_for_unset() -> None:
    s = struct_with_unset()
    assert from_struct(s)["size"] is None
    plain = from_struct(s, UNSET)
    assert (plain["size"], plain["none"], plain["cart"]["items"][2]) == (UNSET, None, UNSET)
    assert from_value(struct_pb2.Value(), UNSET) is UNSET
    assert sorted(unset_paths(plain, "event.properties")) == [
        "event.properties.cart.items[2]",
        "event.properties.size",
    ]


def test_an_event_property_with_no_value_is_refused_by_its_path() -> None:
    properties = from_struct(struct_with_unset(), UNSET)
    with pytest.raises(InvalidArgument) as caught:
        validate_event(RawEvent(type="page_view", anonymous_id="a", properties=properties), NOW)
    assert violations(caught) == {
        "event.properties.size": UNSET_PROBLEM,
        "event.properties.cart.items[2]": UNSET_PROBLEM,
    }
    good = RawEvent(type="page_view", anonymous_id="a", properties={"x": None})
    with pytest.raises(InvalidArgument) as caught:
        validate_batch([good, RawEvent(type="page_view", anonymous_id="a", properties={"x": UNSET})], NOW)
    assert list(violations(caught)) == ["events[1].properties.x"]


def test_at_most_ten_unset_properties_are_named_per_event() -> None:
    properties = {f"p{i}": UNSET for i in range(50)}
    with pytest.raises(InvalidArgument) as caught:
        validate_event(RawEvent(type="page_view", anonymous_id="a", properties=properties), NOW)
    assert len(violations(caught)) == 10


def test_an_explicit_null_property_is_a_value() -> None:
    event = validate_event(RawEvent(type="page_view", anonymous_id="a", properties={"x": None}), NOW)
    assert event.properties_json == '{"x":null}'


def test_traits_refuse_an_unset_value_with_the_rule_properties_use() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_identify(RawIdentify(customer_id="c", traits={"plan": UNSET}), NOW)
    assert violations(caught) == {"traits.plan": UNSET_PROBLEM}
    with pytest.raises(InvalidArgument) as caught:
        validate_set_traits("p", "backend", {"plan": UNSET, "tier": None})
    assert violations(caught) == {"traits.plan": UNSET_PROBLEM}
    assert validate_set_traits("p", "backend", {"tier": None}) == {"tier": None}  # null removes
