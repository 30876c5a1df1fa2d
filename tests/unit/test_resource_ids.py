"""The one id rule of the things clients define (`relevans/kit/resource_ids.py`): a trigger's
template_id and the template's own id, a trigger's id."""

from __future__ import annotations

import pytest

from relevans.kit.resource_ids import RESOURCE_ID_RULE, resource_id_problem


@pytest.mark.parametrize("value", ["cart-reminder", "a", "0", "welcome_2", "x" * 63])
def test_an_id_is_lower_case_letters_digits_dash_and_underscore(value: str) -> None:
    assert resource_id_problem(value) is None


@pytest.mark.parametrize(
    "value", ["{{ ''.__class__.__mro__ }}", "Cart", "-cart", "_cart", "a b", "x" * 64, "ümlaut", "a\n"]
)
def test_anything_else_is_not_an_id(value: str) -> None:
    assert resource_id_problem(value) == RESOURCE_ID_RULE


def test_an_empty_id_is_missing() -> None:
    assert resource_id_problem("") == "is required"
