"""What the trigger service knows of a person between events (`people`): their effective traits
(from rv.profile.traits) and consents (from rv.profile.consent), read when their timers are due
(time zone, consent) and when a date trigger is created."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from relevans.kit.db import DriverStatement, fetch_on_driver, json_value, unnest
from services.trigger.tables import people

Person = tuple[str, str]
Consents = dict[tuple[str, str], str]


@dataclass(frozen=True, slots=True)
class KnownTraits:
    """A person's effective traits as of `at`."""

    tenant_id: str
    profile_id: str
    traits: dict[str, Any]
    at: datetime


@dataclass(frozen=True, slots=True)
class KnownConsent:
    tenant_id: str
    profile_id: str
    purpose: str
    channel: str
    status: str
    at: datetime


@dataclass(slots=True)
class ProfileChanges:
    """A batch of profile changes: what to remember of people, and the facts to decide."""

    traits: list[KnownTraits] = field(default_factory=list)
    consents: list[KnownConsent] = field(default_factory=list)
    # Segment and trait changes (`domain.events`).
    facts: list[Any] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.traits or self.consents or self.facts)


_LOAD = DriverStatement(f"""
SELECT p.tenant_id, p.profile_id, p.traits, p.consents
FROM {unnest("u", (("tenant_id", "text"), ("profile_id", "text")))}
JOIN people p ON p.tenant_id = u.tenant_id AND p.profile_id = u.profile_id
""")


async def load(
    conn: AsyncConnection, persons: Sequence[Person]
) -> dict[Person, tuple[dict[str, Any], Consents]]:
    rows = await fetch_on_driver(
        conn, _LOAD, {"tenant_id": [t for t, _ in persons], "profile_id": [p for _, p in persons]}
    )
    out: dict[Person, tuple[dict[str, Any], Consents]] = {}
    for r in rows:
        consents: Consents = {}
        for key, status in json_value(r["consents"]).items():
            purpose, _, channel = key.partition(".")
            consents[(purpose, channel)] = status
        out[(r["tenant_id"], r["profile_id"])] = (dict(json_value(r["traits"])), consents)
    return out


_TRAITS = pg_insert(people)
# Rows as executemany parameters of a statement built once (see `timer_rows.insert_timers`).
_SET_TRAITS = _TRAITS.on_conflict_do_update(
    index_elements=["tenant_id", "profile_id"],
    set_={"traits": _TRAITS.excluded.traits, "updated_at": _TRAITS.excluded.updated_at},
    where=people.c.updated_at <= _TRAITS.excluded.updated_at,
)


async def remember(conn: AsyncConnection, changes: ProfileChanges, survivor: dict[Person, str]) -> None:
    """Write the batch's traits (the latest snapshot per person wins, also against what is stored)
    and consents, under the surviving ids."""
    latest: dict[Person, KnownTraits] = {}
    for t in changes.traits:
        person = (t.tenant_id, survivor.get((t.tenant_id, t.profile_id), t.profile_id))
        if person not in latest or latest[person].at <= t.at:
            latest[person] = t
    if latest:
        await conn.execute(
            _SET_TRAITS,
            [
                {
                    "tenant_id": p[0],
                    "profile_id": p[1],
                    "traits": t.traits,
                    "consents": {},
                    "updated_at": t.at,
                }
                for p, t in latest.items()
            ],
        )
    for c in changes.consents:
        person = (c.tenant_id, survivor.get((c.tenant_id, c.profile_id), c.profile_id))
        insert = pg_insert(people).values(
            tenant_id=person[0],
            profile_id=person[1],
            traits={},
            consents={f"{c.purpose}.{c.channel}": c.status},
            updated_at=c.at,
        )
        await conn.execute(
            insert.on_conflict_do_update(
                index_elements=["tenant_id", "profile_id"],
                set_={"consents": people.c.consents.concat(insert.excluded.consents)},
            )
        )


async def with_trait(conn: AsyncConnection, tenant_id: str, trait: str) -> list[tuple[str, dict[str, Any]]]:
    """(profile id, traits) of the tenant's people who have `trait`."""
    p = people
    rows = await conn.execute(
        sa.select(p.c.profile_id, p.c.traits).where(p.c.tenant_id == tenant_id, p.c.traits.has_key(trait))
    )
    return [(r.profile_id, dict(r.traits)) for r in rows]
