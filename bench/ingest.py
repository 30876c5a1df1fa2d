"""Batched ingest through the profile service vs the raw limit, measured in the same run.

Ours: BatchTrack over gRPC into a separate `relevans serve profile` process — event
stored, profile resolved and updated, EnrichedEvent published to JetStream through the
outbox — timed until every event is in the RV_EVENTS stream.
Raw: asyncpg COPY of the same rows into a table of the same shape, plus JetStream
publish (acked, with Nats-Msg-Id) of the same EnrichedEvent payloads, two ways: as the
outbox relay publishes (`Bus.publish_batch`: a batch's frames written at once, one ack
each; the raw limit the ratio is taken against) and with nats-py's own pipelined
`js.publish_async` (the limit earlier runs were measured against, for comparison).

    make bench            # or: .venv/bin/python bench/ingest.py --events 50000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import grpc
import nats
import uvloop
from harness import CpuWatch, embedded_stack, largest_rss_mb, profile_service, stack_processes

from relevans.kit.auth import mint_token
from relevans.kit.bus import Bus
from relevans.kit.grpc_client import bearer
from relevans.kit.outbox import RELAY_BATCH
from relevans.profile.v1 import bus_pb2, profile_pb2

SECRET = "bench-secret"
TENANT = "bench"


def make_events(n: int, customers: int) -> list[profile_pb2.Event]:
    events = []
    now = datetime.now(UTC)
    for i in range(n):
        e = profile_pb2.Event(
            message_id=f"m-{i}",
            type="add_to_cart" if i % 10 == 0 else "page_view",
            customer_id=f"c-{i % customers}",
        )
        e.timestamp.FromDatetime(now)
        e.properties.update({"product_id": f"sku-{i % 500}", "category": "toys", "price": 19.9})
        events.append(e)
    return events


BATCH_TRACK = "/relevans.profile.v1.ProfileService/BatchTrack"


async def ours(
    target: str, events: list[profile_pb2.Event], batch: int, concurrency: int, nats_url: str, watch: CpuWatch
) -> tuple[float, dict[str, float], float]:
    """Seconds until every event is in RV_EVENTS, CPU seconds per process group meanwhile
    (`client`: this load generator), and how busy the service's event loop thread was."""
    md = bearer(mint_token(SECRET, TENANT, ["ingest"]))
    # requests serialized before the clock starts and answers left unparsed, as the raw side's
    # rows and payloads are built before its clock starts: the generator's CPU goes to calls
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for i in range(0, len(events), batch):
        queue.put_nowait(profile_pb2.BatchTrackRequest(events=events[i : i + batch]).SerializeToString())
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    # One connection per client, as separate clients would have: with several service processes
    # on one port, the kernel spreads connections (not calls) over them.
    channels = [grpc.aio.insecure_channel(target) for _ in range(concurrency)]
    try:
        calls = [c.unary_unary(BATCH_TRACK) for c in channels]
        # warm-up outside the timing: connections, caches, streams
        for n, call in enumerate(calls):
            warm = profile_pb2.Event(type="page_view", customer_id="warm-up", message_id=f"warm-up-{n}")
            await call(
                profile_pb2.BatchTrackRequest(events=[warm]).SerializeToString(), metadata=md, timeout=30
            )
        base = (await js.stream_info("RV_EVENTS")).state.messages
        while base < len(calls):  # the warm-up events are published too
            await asyncio.sleep(0.01)
            base = (await js.stream_info("RV_EVENTS")).state.messages

        async def worker(call: grpc.aio.UnaryUnaryMultiCallable) -> None:
            while not queue.empty():
                await call(queue.get_nowait(), metadata=md, timeout=60)

        watch.restart()
        client_cpu = time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(worker(call) for call in calls))
        while (await js.stream_info("RV_EVENTS")).state.messages < base + len(events):
            if time.perf_counter() - started > 600:
                raise RuntimeError("events were not all published within 10 minutes")
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        cpu = watch.used() | {"client": time.process_time() - client_cpu}
        loop_busy = watch.loop_busy()
    finally:
        for c in channels:
            await c.close()
    await nc.close()
    return elapsed, cpu, loop_busy


async def raw(
    pg_url: str, nats_url: str, events: list[profile_pb2.Event], watch: CpuWatch, *, batched: bool
) -> tuple[float, dict[str, float]]:
    """COPY, then publish `batched` as the relay does, or one `js.publish_async` per message."""
    conn = await asyncpg.connect(pg_url)
    await conn.execute("DROP TABLE IF EXISTS bench_raw_events")
    await conn.execute(
        """CREATE TABLE bench_raw_events (tenant_id text, event_id uuid PRIMARY KEY, message_id text,
           profile_id uuid, type text, occurred_at timestamptz, received_at timestamptz, properties jsonb,
           UNIQUE (tenant_id, message_id))"""
    )
    now = datetime.now(UTC)
    rows = []
    payloads = []
    for e in events:
        event_id, profile_id = uuid.uuid4(), uuid.uuid4()
        props = {k: v for k, v in e.properties.items()}
        rows.append((TENANT, event_id, e.message_id, profile_id, e.type, now, now, json.dumps(props)))
        payloads.append(
            bus_pb2.EnrichedEvent(
                tenant_id=TENANT, event_id=str(event_id), profile_id=str(profile_id), event=e
            ).SerializeToString()
        )
    bus = Bus(nats_url, "bench-raw")
    await bus.connect()
    with contextlib.suppress(nats.js.errors.NotFoundError):  # absent on the first raw run
        await bus.js.delete_stream("BENCH_RAW")
    await bus.js.add_stream(name="BENCH_RAW", subjects=["bench.raw.>"])
    watch.restart()
    client_cpu = time.process_time()
    started = time.perf_counter()
    await conn.copy_records_to_table(
        "bench_raw_events",
        records=rows,
        columns=[
            "tenant_id",
            "event_id",
            "message_id",
            "profile_id",
            "type",
            "occurred_at",
            "received_at",
            "properties",
        ],
    )
    if batched:
        messages = [(f"bench.raw.{i % 8}", p, f"raw-{i}") for i, p in enumerate(payloads)]
        for i in range(0, len(messages), RELAY_BATCH):
            await bus.publish_batch(messages[i : i + RELAY_BATCH])
    else:
        acks = [
            await bus.js.publish_async(f"bench.raw.{i % 8}", p, headers={"Nats-Msg-Id": f"raw-{i}"})
            for i, p in enumerate(payloads)
        ]
        await asyncio.gather(*acks)
    elapsed = time.perf_counter() - started
    cpu = watch.used() | {"client": time.process_time() - client_cpu}
    await bus.close()
    await conn.close()
    return elapsed, cpu


async def wal_position(pg_url: str) -> int:
    """PostgreSQL's write-ahead log position in bytes: the difference over a run is what the run
    wrote to it (what a replica receives and a backup keeps)."""
    conn = await asyncpg.connect(pg_url)
    try:
        return int(await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))
    finally:
        await conn.close()


def cpu_line(cpu: dict[str, float], events: int) -> str:
    """CPU µs per event of each process group; `machine`: the whole box meanwhile."""
    return "      CPU µs per event: " + ", ".join(f"{k} {v / events * 1e6:.0f}" for k, v in cpu.items())


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--customers", type=int, default=5_000)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="relevans-bench-") as tmp:
        async with embedded_stack(Path(tmp)) as stack:
            async with profile_service(stack, SECRET) as svc:
                events = make_events(args.events, args.customers)
                watch = CpuWatch(stack_processes(stack, svc))
                wal_before = await wal_position(stack.profile_db)
                ours_s, cpu, loop_busy = await ours(
                    svc.target, events, args.batch, args.concurrency, stack.nats_url, watch
                )
                ours_wal = await wal_position(stack.profile_db) - wal_before
                rss_mb = largest_rss_mb(svc.process.pid)
            del watch.roots["service"]
            wal_before = await wal_position(stack.profile_db)
            raw_s, raw_cpu = await raw(stack.profile_db, stack.nats_url, events, watch, batched=True)
            raw_wal = await wal_position(stack.profile_db) - wal_before
            client_s, _ = await raw(stack.profile_db, stack.nats_url, events, watch, batched=False)

    ours_rate, raw_rate, client_rate = (args.events / s for s in (ours_s, raw_s, client_s))
    print(f"events {args.events}, batch {args.batch}, concurrency {args.concurrency}")
    print(f"ours  stored + profile updated + published: {ours_rate:10,.0f} events/s ({ours_s:.2f} s)")
    print(cpu_line(cpu, args.events) + f"; service event loop {loop_busy:.0%} busy")
    print(f"      PostgreSQL WAL: {ours_wal / args.events:,.0f} bytes per event")
    print(f"raw   asyncpg COPY + JetStream publish:     {raw_rate:10,.0f} events/s ({raw_s:.2f} s)")
    print(cpu_line(raw_cpu, args.events))
    print(f"      PostgreSQL WAL: {raw_wal / args.events:,.0f} bytes per event")
    print(f"      (publishing with nats-py's js.publish_async instead: {client_rate:,.0f} events/s)")
    print(
        f"ratio ours/raw: {ours_rate / raw_rate:.2f}   (target >= 0.50; >= 10,000 events/s)"
        f"   (vs the js.publish_async raw: {ours_rate / client_rate:.2f})"
    )
    print(f"profile service RSS after the run: {rss_mb:.0f} MB (target <= 200 MB per process)")
    return 0


if __name__ == "__main__":
    sys.exit(uvloop.run(main()))  # as the services run: the load generator costs less CPU per call
