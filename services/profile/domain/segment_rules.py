"""Segment conditions as saved: parsed from JSON (as a Struct delivers it) and checked against the
tenant's counter definitions, so every `counter.<name>` and `count` node can be answered. Pure."""

from __future__ import annotations

from relevans import conditions as c
from relevans.kit.errors import Violations
from services.profile.domain.enrichment import Enrichment, counter_for

NO_COUNTER = "no counter counts these events; create one with EnrichmentService.CreateCounter"


def parse(data: object, path: str = "condition") -> c.Condition:
    """The condition a JSON-like value describes (a Struct as `relevans.kit.proto.from_struct` gives
    it: whole numbers are ints); InvalidArgument naming paths."""
    return c.parse_condition(data, path)


def check_answerable(cond: c.Condition, enrichment: Enrichment, path: str = "condition") -> None:
    """Raises InvalidArgument naming each node that names an undefined counter or counts events no
    counter definition counts (over a long enough window)."""
    violations = Violations()
    names = {d.name for d in enrichment.counters}

    def walk(node: c.Condition, at: str) -> None:
        if isinstance(node, c.All | c.Any):
            key = "all" if isinstance(node, c.All) else "any"
            for i, child in enumerate(node.children):
                walk(child, f"{at}.{key}[{i}]")
        elif isinstance(node, c.Not):
            walk(node.child, f"{at}.not")
        elif isinstance(node, c.Compare):
            split = c.split_field(node.field)
            if split is not None and split[0] == c.COUNTER and split[1][0] not in names:
                violations.add(
                    f"{at}.compare.field",
                    f"no counter named {split[1][0]!r}; create one with EnrichmentService.CreateCounter",
                )
        elif (
            counter_for(enrichment.counters, node.event_type, node.window, node.property, node.property_value)
            is None
        ):
            violations.add(f"{at}.count", NO_COUNTER)

    walk(cond, path)
    violations.raise_if_any()
