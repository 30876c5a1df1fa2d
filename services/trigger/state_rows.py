"""Per-person trigger state (`trigger_states`) and the after-lock check of a batch's people, one
driver statement each with one array per column (`relevans.kit.db.unnest`): read the states of a
batch's people, write back what changed, and find who a merge or an erasure took meanwhile."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from relevans.kit.db import DriverStatement, fetch_on_driver, json_text, json_value, unnest
from services.trigger.domain import StateKey
from services.trigger.domain.kinds import kind_named

_STATE_OF = (("tenant_id", "text"), ("trigger_id", "text"), ("profile_id", "text"))
_WRITE_STATES = DriverStatement(f"""
INSERT INTO trigger_states (tenant_id, trigger_id, profile_id, state, updated_at)
SELECT tenant_id, trigger_id, profile_id, CAST(state AS jsonb), CAST(:now AS timestamptz)
FROM {unnest("u", (*_STATE_OF, ("state", "text")))} ORDER BY ord
ON CONFLICT (tenant_id, trigger_id, profile_id) DO UPDATE SET
    state = excluded.state, updated_at = excluded.updated_at
""")
# The state as text: parsed (orjson, then the kind) only when a decision asks for it (`StoredStates`).
_READ_STATES = DriverStatement(f"""
SELECT s.tenant_id, s.trigger_id, s.profile_id, CAST(s.state AS text) AS state
FROM {unnest("u", (("tenant_id", "text"), ("profile_id", "text")))}
CROSS JOIN LATERAL (
    SELECT * FROM trigger_states s WHERE s.tenant_id = u.tenant_id AND s.profile_id = u.profile_id
) s
""")

_PERSONS = unnest("u", (("tenant_id", "text"), ("profile_id", "text")))
# After the people's locks: which of them a merge retired or an erasure removed meanwhile.
GONE = DriverStatement(f"""
SELECT u.tenant_id, u.profile_id,
       EXISTS (SELECT 1 FROM merged_profiles m
               WHERE m.tenant_id = u.tenant_id AND m.profile_id = u.profile_id) AS merged
FROM {_PERSONS}
WHERE EXISTS (SELECT 1 FROM merged_profiles m WHERE m.tenant_id = u.tenant_id AND m.profile_id = u.profile_id)
   OR EXISTS (SELECT 1 FROM erased_profiles e WHERE e.tenant_id = u.tenant_id AND e.profile_id = u.profile_id)
""")


def persons_params(persons: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    return {"tenant_id": [t for t, _ in persons], "profile_id": [p for _, p in persons]}


class StoredStates(Mapping[StateKey, Any]):
    """States as read, each parsed on first access: a batch reads every state of its people, and
    its facts reach only some of their triggers."""

    def __init__(self, raw: dict[StateKey, tuple[str, str]]) -> None:
        self._raw = raw  # key -> (kind name, state JSON)
        self._parsed: dict[StateKey, Any] = {}

    def get(self, key: StateKey, default: Any = None) -> Any:
        """(Without the KeyError `Mapping.get` would raise and catch for every key not stored.)"""
        found = self._parsed.get(key)
        if found is None:
            raw = self._raw.get(key)
            if raw is None:
                return default
            kind, text = raw
            found = self._parsed[key] = kind_named(kind).state_from_json(json_value(text))
        return found

    def __getitem__(self, key: StateKey) -> Any:
        found = self.get(key)
        if found is None:
            raise KeyError(key)
        return found

    def __iter__(self) -> Iterator[StateKey]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


async def read_states(
    conn: AsyncConnection,
    persons: Sequence[tuple[str, str]],
    kinds: Mapping[str, Mapping[str, str]],
) -> StoredStates:
    """The stored states of these people's triggers that exist (`kinds`: tenant -> trigger -> kind)."""
    rows = await fetch_on_driver(
        conn,
        _READ_STATES,
        {"tenant_id": [t for t, _ in persons], "profile_id": [p for _, p in persons]},
    )
    raw: dict[StateKey, tuple[str, str]] = {}
    for r in rows:
        kind = kinds.get(r["tenant_id"], {}).get(r["trigger_id"])
        if kind is not None:
            raw[(r["tenant_id"], r["trigger_id"], r["profile_id"])] = (kind, r["state"])
    return StoredStates(raw)


async def write_states(
    conn: AsyncConnection,
    states: Mapping[StateKey, Any],
    kinds: Mapping[str, Mapping[str, str]],
    now: datetime,
) -> None:
    if not states:
        return
    await fetch_on_driver(
        conn,
        _WRITE_STATES,
        {
            "tenant_id": [tenant for tenant, _, _ in states],
            "trigger_id": [trigger for _, trigger, _ in states],
            "profile_id": [profile for _, _, profile in states],
            "state": [
                json_text(kind_named(kinds[tenant][trigger]).state_to_json(st))
                for (tenant, trigger, _), st in states.items()
            ],
            "now": now,
        },
    )
