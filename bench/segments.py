"""CountSegment over gRPC vs the raw limit, measured in the same run.

Loads --profiles profiles (default 500,000) of one tenant straight into PostgreSQL with asyncpg
COPY — traits (city, tier, age), 0-3 tags, daily buckets of two counters, last seen, lead score,
marketing e-mail consent for ~70% — then times CountSegment in a separate `relevans serve
profile` process for typical conditions, several runs each.
Raw: `SELECT count(*) FROM profiles WHERE tenant_id = $1` over asyncpg, the cheapest count of the
same rows.

    .venv/bin/python bench/segments.py --profiles 500000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil
from google.protobuf import struct_pb2
from harness import embedded_stack, profile_service

from relevans.kit.auth import mint_token
from relevans.kit.grpc_client import bearer
from relevans.profile.v1 import segment_pb2, segment_pb2_grpc

SECRET = "bench-secret"
TENANT = "bench"
CITIES = ("london", "paris", "berlin", "madrid", "rome", "vienna", "oslo", "lisbon", "dublin", "prague")
TIERS = ("bronze", "silver", "gold", "platinum")
TAGS = (*(f"tag{i}" for i in range(20)), "hamlet", "vip", "newsletter")

CONDITIONS: dict[str, dict[str, Any]] = {
    "trait eq": {"compare": {"field": "trait.city", "op": "eq", "value": "paris"}},
    "tag + consent": {
        "all": [
            {"compare": {"field": "tag", "op": "contains", "value": "hamlet"}},
            {"compare": {"field": "consent.marketing.email", "op": "eq", "value": "granted"}},
        ]
    },
    "count in 7 days ge 3": {"count": {"event_type": "page_view", "window_days": 7, "op": "ge", "value": 3}},
    "count in 90 days ge 1": {"count": {"event_type": "purchase", "window_days": 90, "op": "ge", "value": 1}},
    "score ge 20": {"compare": {"field": "score", "op": "ge", "value": 20}},
    "all/any mix": {
        "all": [
            {"any": [
                {"compare": {"field": "trait.tier", "op": "in", "value": ["gold", "platinum"]}},
                {"compare": {"field": "tag", "op": "contains", "value": "vip"}},
            ]},
            {"compare": {"field": "counter.purchases", "op": "ge", "value": 1}},
            {"not": {"compare": {"field": "consent.marketing.email", "op": "eq", "value": "withdrawn"}}},
        ]
    },
}  # fmt: skip


Rows = list[tuple[Any, ...]]


def profile_rows(n: int, now: datetime, rng: random.Random) -> tuple[Rows, Rows, Rows]:
    """(profiles, profile_tags, consents) rows; profile ids in random order, as UUIDs are."""
    profiles: Rows = []
    tags: Rows = []
    consents: Rows = []
    today = now.date()
    for i in range(n):
        pid = f"{rng.getrandbits(128):032x}"
        traits = {"city": rng.choice(CITIES), "tier": rng.choice(TIERS), "age": rng.randint(18, 80)}
        counters: dict[str, dict[str, int]] = {}
        if rng.random() < 0.6:
            counters["page_views"] = {
                (today - timedelta(days=d)).isoformat(): rng.randint(1, 4)
                for d in rng.sample(range(30), rng.randint(1, 6))
            }
        if rng.random() < 0.2:
            counters["purchases"] = {(today - timedelta(days=rng.randrange(90))).isoformat(): 1}
        seen = now - timedelta(seconds=rng.randrange(30 * 86400))
        last_seen = {"page_view": seen.isoformat()} if "page_views" in counters else {}
        score = float(rng.randint(0, 60)) if counters else 0.0
        profiles.append(
            (
                TENANT,
                pid,
                now,
                now,
                seen if last_seen else None,
                json.dumps(traits),
                json.dumps(counters),
                json.dumps(last_seen),
                score,
                seen if score else None,
            )
        )
        for tag in rng.sample(TAGS, rng.randint(0, 3)):
            tags.append((TENANT, pid, tag, now))
        if rng.random() < 0.7:
            status = "granted" if rng.random() < 0.85 else rng.choice(("denied", "withdrawn"))
            consents.append((TENANT, pid, "marketing", "email", status, "bench", "", now))
        if i % 100_000 == 99_999:
            print(f"  generated {i + 1:,} profiles", flush=True)
    return profiles, tags, consents


async def load(pg_url: str, n: int, now: datetime) -> None:
    profiles, tags, consents = profile_rows(n, now, random.Random(7))
    conn = await asyncpg.connect(pg_url)
    try:
        started = time.perf_counter()
        await conn.copy_records_to_table(
            "profiles",
            records=profiles,
            columns=[
                "tenant_id",
                "profile_id",
                "created_at",
                "updated_at",
                "last_seen_at",
                "traits",
                "counters",
                "last_seen_types",
                "score",
                "score_at",
            ],
        )
        await conn.copy_records_to_table(
            "profile_tags", records=tags, columns=["tenant_id", "profile_id", "tag", "created_at"]
        )
        await conn.copy_records_to_table(
            "consents",
            records=consents,
            columns=[
                "tenant_id",
                "profile_id",
                "purpose",
                "channel",
                "status",
                "source",
                "evidence",
                "recorded_at",
            ],
        )
        await conn.execute(
            """INSERT INTO counter_definitions
                 (tenant_id, name, event_type, windows, property, property_value, thresholds, created_at)
               VALUES ($1, 'page_views', 'page_view', '{7,30}', NULL, NULL, '{}', $2),
                      ($1, 'purchases', 'purchase', '{30,90}', NULL, NULL, '{}', $2)""",
            TENANT,
            now,
        )
        await conn.execute(
            """INSERT INTO scoring_rules (tenant_id, rules, half_life_days, thresholds, updated_at)
               VALUES ($1, $2, 14, '{}', $3)""",
            TENANT,
            json.dumps(
                [
                    {
                        "event": {"event_type": "page_view", "property": None, "property_value": None},
                        "points": 1,
                    },
                    {"trait": {"name": "tier", "value": "gold"}, "points": 10},
                    {"trait": {"name": "tier", "value": "platinum"}, "points": 20},
                ]
            ),
            now,
        )
        await conn.execute("VACUUM ANALYZE profiles, profile_tags, consents")
        print(
            f"loaded {len(profiles):,} profiles, {len(tags):,} tags, {len(consents):,} consents"
            f" in {time.perf_counter() - started:.1f} s"
        )
    finally:
        await conn.close()


async def raw(pg_url: str, runs: int) -> float:
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.fetchval("SELECT count(*) FROM profiles WHERE tenant_id = $1", TENANT)  # warm
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            await conn.fetchval("SELECT count(*) FROM profiles WHERE tenant_id = $1", TENANT)
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        await conn.close()


async def ours(target: str, runs: int) -> dict[str, tuple[float, int]]:
    md = bearer(mint_token(SECRET, TENANT, ["read"]))
    out: dict[str, tuple[float, int]] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = segment_pb2_grpc.SegmentServiceStub(channel)
        for label, condition in CONDITIONS.items():
            struct = struct_pb2.Struct()
            struct.update(condition)
            request = segment_pb2.CountSegmentRequest(condition=struct)
            reply = await stub.CountSegment(request, metadata=md, timeout=60)  # warm
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                reply = await stub.CountSegment(request, metadata=md, timeout=60)
                times.append(time.perf_counter() - started)
            out[label] = (statistics.median(times), reply.count)
    return out


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", type=int, default=500_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="relevans-bench-") as tmp:
        async with embedded_stack(Path(tmp)) as stack:
            await load(stack.profile_db, args.profiles, now)
            async with profile_service(stack, SECRET) as svc:
                raw_s = await raw(stack.profile_db, args.runs)
                results = await ours(svc.target, args.runs)
                rss_mb = psutil.Process(svc.process.pid).memory_info().rss / 1e6

    print(f"profiles {args.profiles:,}, median of {args.runs} runs each")
    print(f"raw   SELECT count(*) of the tenant's profiles: {raw_s:.3f} s")
    for label, (seconds, count) in results.items():
        print(f"ours  {label:<24} {seconds:6.3f} s  ratio {seconds / raw_s:5.1f}x raw  ({count:,} profiles)")
    print(f"target: each count <= 1 s at 500,000 profiles; profile service RSS {rss_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
