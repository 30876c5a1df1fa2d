"""Stored trigger rows as definitions, parsed (conditions compiled) once per row, and the context
a tenant's policy gives the kinds."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy.dialects.postgresql import JSONB

from relevans.kit.db import json_value
from services.trigger.domain import TriggerDef
from services.trigger.domain.kinds import kind_named
from services.trigger.domain.kinds.contract import Context
from services.trigger.domain.policies import TenantPolicy, trigger_policy_from_json
from services.trigger.tables import triggers

# A parsed definition (its conditions compiled) is kept by its stored row: a trigger deleted and
# created again under its id (even at the same instant) is another row, and parsed again.
_DEFINITIONS: dict[tuple[Any, ...], TriggerDef] = {}
_MAX_DEFINITIONS = 10_000


# The columns of a trigger row as statements on the driver read them (`tr` the table's alias): the
# JSON ones as text, which is their cache key as it is and parsed only on a miss.
TRIGGER_COLUMNS = ", ".join(
    f"CAST(tr.{c.name} AS text) AS {c.name}" if isinstance(c.type, JSONB) else f"tr.{c.name}"
    for c in triggers.c
)


def _definition_key(row: Mapping[Any, Any]) -> tuple[Any, ...]:
    return tuple(
        json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value
        for value in (row[c.name] for c in triggers.c)
    )


def trigger_def(row: Mapping[Any, Any]) -> TriggerDef:
    key = _definition_key(row)
    found = _DEFINITIONS.get(key)
    if found is None:
        found = TriggerDef(
            trigger_id=row["trigger_id"],
            display_name=row["display_name"],
            condition=kind_named(row["condition_kind"]).from_json(json_value(row["condition"])),
            channel=row["channel"],
            purpose=row["purpose"],
            template_id=row["template_id"],
            policy=trigger_policy_from_json(json_value(row["policy"])),
            created_at=row["created_at"],
        )
        if len(_DEFINITIONS) >= _MAX_DEFINITIONS:
            _DEFINITIONS.clear()
        _DEFINITIONS[key] = found
    return found


def context(policy: TenantPolicy, now: datetime) -> Context:
    return Context(
        now=now,
        late_event_window=policy.late_event_window,
        default_time_zone=policy.default_time_zone,
        time_zone_trait=policy.time_zone_trait,
    )
