"""Traits a client sets (declared or backend): names, values and their validation.

A trait is held per source; the effective value is the one of the first source in
`PRECEDENCE` that has it — what the person told us, then what a system of record says,
then what their behaviour suggests (computed traits, see enrichment.py). Values are
JSON scalars; None removes a source's value. A Value with no kind set (`UNSET`) is neither a
value nor a removal: refused, as in event properties.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from relevans.kit.errors import Violations
from relevans.kit.proto import UNSET, UNSET_PROBLEM
from services.profile.domain.counters import same_value

DECLARED, BACKEND, BEHAVIOURAL = "declared", "backend", "behavioural"
PRECEDENCE = (DECLARED, BACKEND, BEHAVIOURAL)
# Sources a client may write; behavioural traits come from events only.
WRITABLE_SOURCES = (DECLARED, BACKEND)
TRAIT_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_TRAITS_PER_CALL = 100
MAX_TRAIT_VALUE_BYTES = 1024

TraitScalar = str | int | float | bool


def check_traits(
    raw: Mapping[str, object], path: str, v: Violations, *, allow_remove: bool, per: str = "call"
) -> dict[str, TraitScalar | None]:
    """The valid traits of `raw`; a violation per bad one, named `<path>.<name>`."""
    out: dict[str, TraitScalar | None] = {}
    if len(raw) > MAX_TRAITS_PER_CALL:
        v.add(path, f"at most {MAX_TRAITS_PER_CALL} traits per {per}, got {len(raw)}")
        return out
    for name, value in sorted(raw.items()):
        field = f"{path}.{name[:64]}"
        if not TRAIT_NAME_RE.match(name):
            v.add(field, "name must be lower_snake_case: a-z, 0-9, _ (at most 64)")
        elif value is UNSET:
            v.add(field, UNSET_PROBLEM)
        elif value is None:
            if allow_remove:
                out[name] = None
            else:
                v.add(field, "must be a string, a number or a boolean")
        elif isinstance(value, str):
            if len(value.encode()) > MAX_TRAIT_VALUE_BYTES:
                v.add(field, f"value must be at most {MAX_TRAIT_VALUE_BYTES} bytes")
            elif "\x00" in value:
                v.add(field, "must not contain NUL characters")
            else:
                out[name] = value
        elif isinstance(value, bool):
            out[name] = value
        elif isinstance(value, int | float) and math.isfinite(value):
            out[name] = int(value) if isinstance(value, float) and value.is_integer() else value
        else:
            v.add(field, "must be a string, a finite number or a boolean")
    return out


def validate_set_traits(
    profile_id: str, source: str, raw: Mapping[str, object]
) -> dict[str, TraitScalar | None]:
    v = Violations()
    if not profile_id:
        v.add("profile_id", "is required")
    if source not in WRITABLE_SOURCES:
        v.add("source", f"must be one of {', '.join(WRITABLE_SOURCES)} (behavioural traits come from events)")
    if not raw:
        v.add("traits", "at least one trait is required")
    traits = check_traits(raw, "traits", v, allow_remove=True)
    v.raise_if_any()
    return traits


def effective(by_source: Mapping[str, Mapping[str, object]]) -> dict[str, object]:
    """The effective traits from each source's values, by PRECEDENCE."""
    out: dict[str, object] = {}
    for source in reversed(PRECEDENCE):
        out.update(by_source.get(source, {}))
    return out


@dataclass(frozen=True, slots=True)
class TraitChange:
    """How a write changed one profile's effective traits: what a TraitsChanged message carries."""

    profile_id: str
    # Every effective trait after the change.
    traits: Mapping[str, object]
    # The changed traits' effective values before it; a changed trait absent here had none.
    previous: Mapping[str, object]
    # The names whose effective value changed (set, changed or removed), sorted.
    changed: tuple[str, ...]


def trait_change(
    profile_id: str, before: Mapping[str, object], after: Mapping[str, object]
) -> TraitChange | None:
    """The change from `before` to `after` (effective traits), None when no value changed. Values
    compare as JSON, like with like (`same_value`): true is not 1, 1 is 1.0."""
    changed = tuple(
        sorted(
            n
            for n in before.keys() | after.keys()
            if n not in after or not same_value(before.get(n), after[n])
        )
    )
    if not changed:
        return None
    return TraitChange(profile_id, after, {n: before[n] for n in changed if n in before}, changed)
