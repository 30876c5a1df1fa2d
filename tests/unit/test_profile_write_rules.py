"""The rules behind refusing profile input when it is written (issue 16, finding 6): names without
control characters."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from relevans.kit.errors import InvalidArgument
from services.profile.domain import RawIdentify, validate_identify
from services.profile.domain.imports import RawImportRow, validate_row

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
