"""Validation of a tenant's enrichment definitions as EnrichmentService receives them.

Counters are validated by `counters.validate_counter` (plus `check_json_string` for their property
value); this module covers computed traits and scoring rules. Each function raises InvalidArgument
naming every offending field, e.g. `scoring_rules.rules[2].event.event_type`. Pure: stdlib only.
"""

from __future__ import annotations

import math
import re

from relevans.conditions import TRAIT_NAME_RE
from relevans.kit.errors import FieldViolation, Violations
from services.profile.domain import counters
from services.profile.domain.counters import (
    COUNTER_NAME_RE,
    EVENT_TYPE_RE,
    MAX_PROPERTY_VALUE_CHARS,
    PROPERTY_NAME_RE,
    CounterDefinition,
)
from services.profile.domain.enrichment import ComputedTrait, EventMatch, ScoreRule, Scoring, TraitMatch
from services.profile.domain.traits import MAX_TRAIT_VALUE_BYTES

# Each is applied to every event the tenant sends, like a counter (see MAX_COUNTERS_PER_TENANT).
MAX_COMPUTED_TRAITS_PER_TENANT = 100
MAX_SCORE_RULES = 100
MAX_SCORE_THRESHOLDS = 20
MAX_HALF_LIFE_DAYS = 3650


def check_json_string(value: object, field: str, violations: Violations) -> None:
    """PostgreSQL's jsonb cannot hold a NUL character: refuse it here rather than fail on save."""
    if isinstance(value, str) and "\x00" in value:
        violations.add(field, "must not contain NUL characters")


def validate_counter(defn: CounterDefinition, prefix: str = "counter") -> CounterDefinition:
    """`counters.validate_counter` with the API's field names (`window_days`, not `windows`), and a
    property value the database can store."""
    violations = Violations()
    counters.check_counter(defn, prefix, violations)
    check_json_string(defn.property_value, f"{prefix}.property_value", violations)
    windows = f"{prefix}.windows"
    violations.items = [
        FieldViolation(f"{prefix}.window_days{v.field.removeprefix(windows)}", v.description)
        if v.field == windows or v.field.startswith(windows + "[")
        else v
        for v in violations.items
    ]
    violations.raise_if_any()
    return counters.validate_counter(defn, prefix)


def validate_computed_trait(trait: ComputedTrait, prefix: str = "computed_trait") -> ComputedTrait:
    """A computed trait's name is lower_snake_case like a counter's, so it is also a valid trait name."""
    violations = Violations()
    _check_pattern(trait.name, COUNTER_NAME_RE, f"{prefix}.name", violations)
    _check_pattern(trait.event_type, EVENT_TYPE_RE, f"{prefix}.event_type", violations)
    _check_pattern(trait.property, PROPERTY_NAME_RE, f"{prefix}.property", violations)
    violations.raise_if_any()
    return trait


def validate_scoring(scoring: Scoring, prefix: str = "scoring_rules") -> Scoring:
    """The scoring with points as floats and thresholds ascending."""
    violations = Violations()
    if len(scoring.rules) > MAX_SCORE_RULES:
        violations.add(f"{prefix}.rules", f"at most {MAX_SCORE_RULES} rules, got {len(scoring.rules)}")
    else:
        for i, rule in enumerate(scoring.rules):
            _check_rule(rule, f"{prefix}.rules[{i}]", violations)
    half_life = scoring.half_life_days
    if (
        isinstance(half_life, bool)
        or not isinstance(half_life, int)
        or not 0 <= half_life <= MAX_HALF_LIFE_DAYS
    ):
        violations.add(
            f"{prefix}.half_life_days",
            f"must be a whole number of days from 0 (no decay) to {MAX_HALF_LIFE_DAYS}",
        )
    if len(scoring.thresholds) > MAX_SCORE_THRESHOLDS:
        violations.add(f"{prefix}.thresholds", f"at most {MAX_SCORE_THRESHOLDS} thresholds")
    else:
        seen: set[float] = set()
        for i, t in enumerate(scoring.thresholds):
            if not _is_finite_number(t):
                violations.add(f"{prefix}.thresholds[{i}]", "must be a finite number")
            elif t in seen:
                violations.add(f"{prefix}.thresholds[{i}]", "is listed twice")
            else:
                seen.add(t)
    violations.raise_if_any()
    return Scoring(
        tuple(ScoreRule(float(r.points), r.event, r.trait) for r in scoring.rules),
        half_life,
        tuple(sorted(float(t) for t in scoring.thresholds)),
    )


def _check_rule(rule: ScoreRule, path: str, violations: Violations) -> None:
    if not _is_finite_number(rule.points):
        violations.add(f"{path}.points", "must be a finite number")
    elif rule.points == 0:
        violations.add(f"{path}.points", "must not be 0")
    if (rule.event is None) == (rule.trait is None):
        violations.add(path, "needs exactly one of event or trait")
    elif rule.event is not None:
        _check_event(rule.event, f"{path}.event", violations)
    elif rule.trait is not None:
        _check_trait(rule.trait, f"{path}.trait", violations)


def _check_event(event: EventMatch, path: str, violations: Violations) -> None:
    _check_pattern(event.event_type, EVENT_TYPE_RE, f"{path}.event_type", violations)
    if event.property is None:
        if event.property_value is not None:
            violations.add(f"{path}.property", "is required when property_value is set")
        return
    _check_pattern(event.property, PROPERTY_NAME_RE, f"{path}.property", violations)
    value = event.property_value
    field = f"{path}.property_value"
    if value is None:
        violations.add(field, "is required when property is set")
    elif isinstance(value, str) and len(value) > MAX_PROPERTY_VALUE_CHARS:
        violations.add(field, f"must be at most {MAX_PROPERTY_VALUE_CHARS} characters")
    elif not _is_scalar(value):
        violations.add(field, "must be a string, a finite number or a boolean")
    check_json_string(value, field, violations)


def _check_trait(trait: TraitMatch, path: str, violations: Violations) -> None:
    _check_pattern(trait.name, TRAIT_NAME_RE, f"{path}.name", violations)
    value = trait.value
    field = f"{path}.value"
    if value is None:
        violations.add(field, "is required")
    elif isinstance(value, str) and len(value.encode()) > MAX_TRAIT_VALUE_BYTES:
        violations.add(field, f"must be at most {MAX_TRAIT_VALUE_BYTES} bytes")
    elif not _is_scalar(value):
        violations.add(field, "must be a string, a finite number or a boolean")
    check_json_string(value, field, violations)


def _check_pattern(value: object, pattern: re.Pattern[str], field: str, violations: Violations) -> None:
    if not value:
        violations.add(field, "is required")
    elif not isinstance(value, str) or not pattern.match(value):
        violations.add(field, f"must match {pattern.pattern}")


def _is_finite_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _is_scalar(value: object) -> bool:
    return isinstance(value, bool | str) or _is_finite_number(value)
