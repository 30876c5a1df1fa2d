"""Segments: named conditions over profiles, answered by PostgreSQL.

`compile_sql` turns a condition tree into one boolean SQL expression over `profiles p`, with the
same semantics as the Python evaluator on `enrichment.profile_view` (the property test in
tests/integration/test_segments.py holds them together). The expression is built for a
sequential scan of a tenant's profiles: plain predicates on the jsonb columns, uncorrelated
`IN (subquery)` for tags and consents (a semi-join, or a hashed subplan under OR/NOT), counter
windows summed by one key lookup per day (see `window_sum`) and only for profiles that have the
counter at all. Every user value is a bound parameter; every leaf is true or false, never NULL,
so NOT is exact.

`SegmentStore` saves segments (recording their members at creation), counts and pages members.
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans import conditions as c
from relevans.kit.errors import AlreadyExists, FieldViolation, InvalidArgument, NotFound, Violations
from relevans.kit.paging import PageSize, decode_page_token, encode_page_token
from services.profile.domain.enrichment import MAX_HALVINGS, Enrichment, counter_for
from services.profile.domain.ids import time_ordered_ids
from services.profile.domain.segment_rules import check_answerable
from services.profile.store.enrichment import load_enrichment
from services.profile.store.tables import segment_members, segments

MAX_NAME_CHARS = 100
MAX_DESCRIPTION_CHARS = 1000
# A page of members is at most 1,000 ids; more is refused, not clamped, as segment.proto says.
MEMBER_PAGES = PageSize(default=100, maximum=1000, refuse_over_maximum=True)
# Counter windows up to this many days are summed by key lookups, longer ones by a subquery.
MAX_LOOKUP_DAYS = 31
_FIRST_TIME = datetime.min.replace(tzinfo=UTC)

# ---------------------------------------------------------------------------------------------- parsing


# ---------------------------------------------------------------------------------------------- SQL


@dataclass(frozen=True, slots=True)
class SqlCondition:
    """A boolean SQL expression over `profiles p` and its bound parameters (`:tenant` is the caller's)."""

    sql: str
    params: dict[str, Any]


_ORDER_SQL = {c.EQ: "=", c.NE: "<>", c.LT: "<", c.LE: "<=", c.GT: ">", c.GE: ">="}
_COMPARE = {
    c.EQ: operator.eq,
    c.NE: operator.ne,
    c.LT: operator.lt,
    c.LE: operator.le,
    c.GT: operator.gt,
    c.GE: operator.ge,
}


def _items(value: object) -> list[Any]:
    """The values of an `in` operand (a single value is a list of one)."""
    return list(value) if isinstance(value, tuple | list) else [value]


def _json(value: object) -> str:
    return json.dumps(value, allow_nan=False)


class _Compiler:
    def __init__(self, enrichment: Enrichment, now: datetime) -> None:
        self.enrichment = enrichment
        self.counters = {d.name: d for d in enrichment.counters}
        self.today = now.astimezone(UTC).date()
        self.now = now
        self.params: dict[str, Any] = {}
        self._score: str | None = None

    def param(self, value: object, sql_type: str) -> str:
        name = f"c{len(self.params)}"
        self.params[name] = value
        return f"CAST(:{name} AS {sql_type})"

    def node(self, cond: c.Condition) -> str:
        if isinstance(cond, c.All | c.Any):
            if not cond.children:
                return "TRUE" if isinstance(cond, c.All) else "FALSE"
            joiner = " AND " if isinstance(cond, c.All) else " OR "
            return "(" + joiner.join(self.node(child) for child in cond.children) + ")"
        if isinstance(cond, c.Not):
            return f"(NOT {self.node(cond.child)})"
        if isinstance(cond, c.CountInWindow):
            return self.count(cond)
        return self.compare(cond)

    # -- count nodes and counters

    def window_sum(self, name: str, days: int) -> str:
        """The sum of a counter's daily buckets from today - (days - 1) to today; 0 without any.

        Up to a month, one key lookup per day: a plain expression, so the scan stays parallel. Longer
        windows sum the buckets in a subquery (one per profile that has the counter, in one process)."""
        n = self.param(name, "text")
        if days <= MAX_LOOKUP_DAYS:
            window = [(self.today - timedelta(days=i)).isoformat() for i in range(days)]
            terms = " + ".join(
                f"coalesce(CAST(p.counters -> {n} ->> {self.param(day, 'text')} AS bigint), 0)"
                for day in window
            )
        else:
            first = self.param((self.today - timedelta(days=days - 1)).isoformat(), "text")
            last = self.param(self.today.isoformat(), "text")
            terms = (
                f"(SELECT coalesce(sum(CAST(b.value AS bigint)), 0) FROM jsonb_each_text(p.counters -> {n}) b"
                f" WHERE b.key >= {first} AND b.key <= {last})"
            )
        return f"(CASE WHEN p.counters -> {n} IS NULL THEN 0 ELSE {terms} END)"

    def count(self, cond: c.CountInWindow) -> str:
        d = counter_for(
            self.enrichment.counters, cond.event_type, cond.window, cond.property, cond.property_value
        )
        if d is None:  # saved before its counter was deleted: nothing is counted (as in Python)
            return "TRUE" if _COMPARE[cond.op](0, cond.value) else "FALSE"
        total = self.window_sum(d.name, cond.window.days)
        return f"({total} {_ORDER_SQL[cond.op]} {self.param(cond.value, 'bigint')})"

    # -- compare nodes

    def compare(self, cond: c.Compare) -> str:
        split = c.split_field(cond.field)
        if split is None or cond.op not in c.FIELD_OPS[split[0]]:
            raise ValueError(f"invalid condition {cond!r}; validate it with parse")
        kind, keys = split
        if kind == c.TRAIT:
            return self.trait(keys[0], cond.op, cond.value)
        if kind == c.TAG:
            if cond.op == c.CONTAINS:
                match = f"g.tag = {self.param(cond.value, 'text')}"
            else:
                match = f"g.tag = ANY({self.param(_items(cond.value), 'text[]')})"
            return (
                f"(p.profile_id IN (SELECT g.profile_id FROM profile_tags g"
                f" WHERE g.tenant_id = :tenant AND {match}))"
            )
        if kind == c.CONSENT:
            return self.consent(keys[0], keys[1], cond.op, cond.value)
        if kind == c.LAST_SEEN:
            at = f"CAST(p.last_seen_types ->> {self.param(keys[0], 'text')} AS timestamptz)"
            if cond.op == c.EXISTS:
                return f"({at} IS NOT NULL)"
            if cond.op == c.NE:
                return f"(NOT coalesce({at} = {self.param(cond.value, 'timestamptz')}, false))"
            return f"coalesce({at} {_ORDER_SQL[cond.op]} {self.param(cond.value, 'timestamptz')}, false)"
        if kind == c.COUNTER:
            d = self.counters.get(keys[0])
            if d is None:  # an undefined counter is missing: only ne holds
                return "TRUE" if cond.op == c.NE else "FALSE"
            if cond.op == c.EXISTS:
                return "TRUE"
            return self.number(self.window_sum(d.name, min(d.windows)), cond.op, cond.value)
        return self.number(self.score(), cond.op, cond.value)

    def number(self, expr: str, op: str, value: object) -> str:
        """A never-NULL number compared with a number (float8, as the Python floats compare)."""
        if op == c.IN:
            return f"({expr} = ANY({self.param([float(v) for v in _items(value)], 'float8[]')}))"
        return f"({expr} {_ORDER_SQL[op]} {self.param(float(value), 'float8')})"  # type: ignore[arg-type]

    def trait(self, name: str, op: str, value: object) -> str:
        t = f"(p.traits -> {self.param(name, 'text')})"
        if op == c.EXISTS:
            return f"coalesce(jsonb_typeof({t}) <> 'null', false)"
        if op == c.IN:
            return f"coalesce({t} = ANY({self.param([_json(v) for v in _items(value)], 'jsonb[]')}), false)"
        if op == c.CONTAINS:
            string = (
                f" WHEN 'string' THEN strpos({t} #>> '{{}}', {self.param(value, 'text')}) > 0"
                if isinstance(value, str)
                else ""
            )
            array = f" WHEN 'array' THEN {t} @> {self.param(_json([value]), 'jsonb')}"
            return f"coalesce(CASE jsonb_typeof({t}){string}{array} ELSE false END, false)"
        target = self.param(_json(value), "jsonb")
        if op == c.EQ:
            return f"coalesce({t} = {target}, false)"
        if op == c.NE:
            return f"(NOT coalesce({t} = {target}, false))"
        # jsonb orders numbers numerically, as Python does ints and floats; other types never match.
        return f"coalesce(jsonb_typeof({t}) = 'number' AND {t} {_ORDER_SQL[op]} {target}, false)"

    def consent(self, purpose: str, channel: str, op: str, value: object) -> str:
        match = f"k.purpose = {self.param(purpose, 'text')} AND k.channel = {self.param(channel, 'text')}"
        if op == c.IN:
            match += f" AND k.status = ANY({self.param(_items(value), 'text[]')})"
        elif op != c.EXISTS:
            match += f" AND k.status = {self.param(value, 'text')}"
        held = (
            f"p.profile_id IN (SELECT k.profile_id FROM consents k WHERE k.tenant_id = :tenant AND {match})"
        )
        return f"(NOT ({held}))" if op == c.NE else f"({held})"

    def score(self) -> str:
        """`enrichment.score_now` in SQL, term by term in the same order (so the floats agree)."""
        if self._score is not None:
            return self._score
        scoring = self.enrichment.scoring
        expr = "p.score"
        if scoring.half_life_days > 0:
            now = self.param(self.now, "timestamptz")
            half = self.param(scoring.half_life_days * 86400.0, "float8")
            # PostgreSQL raises on a float underflow where Python rounds to 0: points older than
            # MAX_HALVINGS half-lives (a factor below 1e-270) count as 0, so neither power() nor
            # the product underflows for any score above 1e-53.
            horizon = scoring.half_life_days * MAX_HALVINGS
            gone = ""
            if horizon < (self.now - _FIRST_TIME).days:
                cutoff = self.param(self.now - timedelta(days=horizon), "timestamptz")
                gone = f" WHEN p.score_at <= {cutoff} THEN 0"
            age = f"greatest(CAST(extract(epoch FROM ({now} - p.score_at)) AS float8), 0)"
            expr = (
                f"(CASE WHEN p.score_at IS NULL OR p.score = 0 THEN p.score{gone}"
                f" ELSE p.score * power(CAST(0.5 AS float8), {age} / {half}) END)"
            )
        if any(rule.trait is not None for rule in scoring.rules):
            points = "CAST(0 AS float8)"
            for rule in scoring.rules:
                if rule.trait is None:
                    continue
                t = f"p.traits -> {self.param(rule.trait.name, 'text')}"
                hit = f"coalesce({t} = {self.param(_json(rule.trait.value), 'jsonb')}, false)"
                points = f"({points} + CASE WHEN {hit} THEN {self.param(rule.points, 'float8')} ELSE 0 END)"
            expr = f"({expr} + {points})"
        self._score = expr
        return expr


def compile_sql(cond: c.Condition, enrichment: Enrichment, now: datetime) -> SqlCondition:
    """`cond` as a boolean SQL expression over `profiles p` as of `now` (the query binds `:tenant`)."""
    compiler = _Compiler(enrichment, now)
    return SqlCondition(compiler.node(cond), compiler.params)


# ---------------------------------------------------------------------------------------------- store


@dataclass(frozen=True, slots=True)
class Segment:
    segment_id: str
    name: str
    description: str
    condition: dict[str, Any]
    created_at: datetime


def _segment(row: Any) -> Segment:
    return Segment(row.segment_id, row.name, row.description, row.condition, row.created_at)


def validate_segment(name: str, description: str) -> None:
    violations = Violations()
    if not name.strip():
        violations.add("name", "is required")
    elif len(name) > MAX_NAME_CHARS:
        violations.add("name", f"must be at most {MAX_NAME_CHARS} characters")
    if len(description) > MAX_DESCRIPTION_CHARS:
        violations.add("description", f"must be at most {MAX_DESCRIPTION_CHARS} characters")
    violations.raise_if_any()


def after_profile_id(token: str) -> str:
    """The last profile id of the previous page ("" for the first page); InvalidArgument on a token
    this service did not make."""
    data = decode_page_token(token, after=str)
    return "" if data is None else str(data["after"])


# Read the whole tenant once: enough memory to hash a tag's or a consent's profiles, no JIT
# compilation (it costs more than it saves on these scans), each statement planned for its values.
_COUNT_SETTINGS = sa.text(
    "SELECT set_config('work_mem', '64MB', true), set_config('jit', 'off', true),"
    " set_config('plan_cache_mode', 'force_custom_plan', true)"
)
_LIVE = "p.tenant_id = :tenant AND p.merged_into IS NULL"


class SegmentStore:
    """Segments of every tenant; each call is one transaction, counts and pages evaluated live."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def _compiled(
        self, conn: AsyncConnection, tenant: str, cond: c.Condition, now: datetime, *, check: bool
    ) -> SqlCondition:
        enrichment = await load_enrichment(conn, tenant)
        if check:
            check_answerable(cond, enrichment)
        return compile_sql(cond, enrichment, now)

    async def create(
        self, tenant: str, name: str, description: str, cond: c.Condition, now: datetime
    ) -> Segment:
        """Saves a segment and records its current members, in one transaction; AlreadyExists when
        the tenant has a segment of that name."""
        validate_segment(name, description)
        segment_id = time_ordered_ids(now)()
        async with self.engine.begin() as conn:
            compiled = await self._compiled(conn, tenant, cond, now, check=True)
            inserted = (
                await conn.execute(
                    sa.text(
                        "INSERT INTO segments"
                        " (tenant_id, segment_id, name, description, condition, created_at)"
                        " VALUES (:tenant, :segment_id, :name, :description, CAST(:condition AS jsonb), :now)"
                        " ON CONFLICT (tenant_id, name) DO NOTHING RETURNING segment_id"
                    ),
                    {
                        "tenant": tenant,
                        "segment_id": segment_id,
                        "name": name,
                        "description": description,
                        "condition": _json(c.to_dict(cond)),
                        "now": now,
                    },
                )
            ).first()
            if inserted is None:
                raise AlreadyExists(f"a segment named {name!r} exists")
            await conn.execute(_COUNT_SETTINGS)
            await conn.execute(
                sa.text(
                    "INSERT INTO segment_members (tenant_id, segment_id, profile_id, entered_at)"
                    f" SELECT :tenant, :segment_id, p.profile_id, :now FROM profiles p"
                    f" WHERE {_LIVE} AND {compiled.sql}"
                ),
                {**compiled.params, "tenant": tenant, "segment_id": segment_id, "now": now},
            )
        return Segment(segment_id, name, description, c.to_dict(cond), now)

    async def get(self, tenant: str, segment_id: str) -> Segment:
        async with self.engine.connect() as conn:
            return await self._get(conn, tenant, segment_id)

    async def _get(self, conn: AsyncConnection, tenant: str, segment_id: str) -> Segment:
        if not segment_id:
            raise InvalidArgument(FieldViolation("segment_id", "is required"))
        row = (
            await conn.execute(
                sa.select(segments).where(segments.c.tenant_id == tenant, segments.c.segment_id == segment_id)
            )
        ).first()
        if row is None:
            raise NotFound(f"segment {segment_id!r} not found")
        return _segment(row)

    async def list_segments(self, tenant: str) -> list[Segment]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(segments)
                .where(segments.c.tenant_id == tenant)
                .order_by(segments.c.name, segments.c.segment_id)
            )
            return [_segment(r) for r in rows]

    async def delete(self, tenant: str, segment_id: str) -> None:
        """Removes a segment and its membership records; NotFound when the tenant has no such segment."""
        if not segment_id:
            raise InvalidArgument(FieldViolation("segment_id", "is required"))
        async with self.engine.begin() as conn:
            deleted = await conn.execute(
                segments.delete()
                .where(segments.c.tenant_id == tenant, segments.c.segment_id == segment_id)
                .returning(segments.c.segment_id)
            )
            if deleted.first() is None:
                raise NotFound(f"segment {segment_id!r} not found")
            await conn.execute(
                segment_members.delete().where(
                    segment_members.c.tenant_id == tenant, segment_members.c.segment_id == segment_id
                )
            )

    async def _condition_of(self, conn: AsyncConnection, tenant: str, segment_id: str) -> c.Condition:
        return c.parse_condition((await self._get(conn, tenant, segment_id)).condition)

    async def count(
        self, tenant: str, now: datetime, *, segment_id: str = "", condition: c.Condition | None = None
    ) -> int:
        """Live profiles of the tenant matching a saved segment or an unsaved condition at `now`; an
        unsaved condition must name existing counters (a saved one is evaluated as it stands)."""
        async with self.engine.begin() as conn:
            if condition is None:
                condition = await self._condition_of(conn, tenant, segment_id)
                compiled = await self._compiled(conn, tenant, condition, now, check=False)
            else:
                compiled = await self._compiled(conn, tenant, condition, now, check=True)
            await conn.execute(_COUNT_SETTINGS)
            found = await conn.scalar(
                sa.text(f"SELECT count(*) FROM profiles p WHERE {_LIVE} AND {compiled.sql}"),
                {**compiled.params, "tenant": tenant},
            )
            return int(found or 0)

    async def members(
        self, tenant: str, segment_id: str, now: datetime, limit: int, after: str
    ) -> tuple[list[str], str]:
        """One page of the segment's members at `now` by profile id, after `after`; and the token
        of the next page ("" on the last)."""
        async with self.engine.begin() as conn:
            condition = await self._condition_of(conn, tenant, segment_id)
            compiled = await self._compiled(conn, tenant, condition, now, check=False)
            await conn.execute(_COUNT_SETTINGS)
            rows = await conn.execute(
                sa.text(
                    f"SELECT p.profile_id FROM profiles p WHERE {_LIVE} AND p.profile_id > :after"
                    f" AND {compiled.sql} ORDER BY p.profile_id LIMIT :limit"
                ),
                {**compiled.params, "tenant": tenant, "after": after, "limit": limit + 1},
            )
            ids = list(rows.scalars())
        if len(ids) > limit:
            return ids[:limit], encode_page_token(after=ids[limit - 1])
        return ids, ""
