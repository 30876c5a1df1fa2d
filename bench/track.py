"""Single-event `Track` through the profile service vs the raw limits, measured in the same run.

Ours: unary Track calls into separate `relevans serve profile` process(es) — event stored,
profile resolved and updated, EnrichedEvent published to JetStream through the outbox — from
several load-generator processes (a few HTTP/2 connections each, many calls in flight). The
generator is bench/h2grpc.py, not grpc.aio: on this box grpc.aio's client cost as much CPU per call
as the service's, and took that CPU from the service it measures (figures: bench/README.md).
Two raw limits at the same concurrency:
  echo: a no-op unary call (grpc.health.v1 Check) to the same server — the gRPC ceiling;
  db:   raw asyncpg one-event transactions (insert the event, upsert the profile, outbox-free)
        plus a pipelined JetStream publish of the same payload — the storage ceiling.
Runs twice: closed loop (as fast as it goes, `--concurrency` calls in flight) for the ceiling,
then open loop at `--rate` events/s for the latency the target is about (p99 at 2,000/s).
CPU seconds of every process (service, PostgreSQL, NATS, load generators) are printed per
event, so the run says which one is the ceiling.

    .venv/bin/python bench/track.py                      # closed loop + 2,000/s
    RELEVANS_PROFILE_PROCESSES=2 .venv/bin/python bench/track.py
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import uvloop
from grpc_health.v1 import health_pb2
from h2grpc import CallError, Channel, request_headers
from harness import CpuWatch, embedded_stack, largest_rss_mb, profile_service, stack_processes

from relevans.kit.auth import mint_token
from relevans.kit.bus import Bus
from relevans.profile.v1 import bus_pb2, profile_pb2

SECRET = "bench-secret"
TENANT = "bench"
TRACK = "/relevans.profile.v1.ProfileService/Track"
CHECK = "/grpc.health.v1.Health/Check"


def make_event(i: int, run: str, customers: int) -> profile_pb2.Event:
    e = profile_pb2.Event(
        message_id=f"{run}-{i}",
        type="add_to_cart" if i % 10 == 0 else "page_view",
        customer_id=f"c-{i % customers}",
    )
    e.properties.update({"product_id": f"sku-{i % 500}", "category": "toys", "price": 19.9})
    return e


# ---- load generator (a child process; prints one JSON line) ----------------------------------


async def load(args: argparse.Namespace) -> dict[str, Any]:
    """Closed loop (`rate` 0) or open loop at `rate` calls/s; one process of the generator."""
    host, port = args.target.rsplit(":", 1)
    path = TRACK if args.mode == "track" else CHECK
    metadata = [("authorization", f"Bearer {mint_token(SECRET, TENANT, ['ingest'])}")]
    block = request_headers(args.target, path, metadata, timeout_s=10)
    # one TCP connection each
    channels = [await Channel.open(host, int(port), block) for _ in range(args.channels)]
    # requests serialized before the clock starts and answers left unparsed: the generator
    # spends its CPU on calls, not on building events
    if args.mode == "echo":
        requests = [health_pb2.HealthCheckRequest().SerializeToString()] * args.events
    else:
        requests = [
            profile_pb2.TrackRequest(event=make_event(i, args.run, args.customers)).SerializeToString()
            for i in range(args.offset, args.offset + args.events)
        ]
    calls = [c.call for c in channels]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(args.events))
    perf = time.perf_counter

    pending: set[asyncio.Future[bytes]] = set()

    def answered(started: float, answer: asyncio.Future[bytes]) -> None:
        """Open loop: a call's future is done (no task per call, so the generator stays cheap)."""
        pending.discard(answer)
        error = answer.exception()
        if error is None:
            latencies.append(perf() - started)
        else:
            code = error.code if isinstance(error, CallError) else type(error).__name__
            errors[code] = errors.get(code, 0) + 1

    async def one(n: int, i: int) -> None:
        started = perf()
        try:
            await calls[n % len(calls)](requests[i])
        except CallError as exc:
            errors[exc.code] = errors.get(exc.code, 0) + 1
            return
        latencies.append(perf() - started)

    # ready: every generator process starts calling at once, none while another still builds its requests
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    cpu0 = time.process_time()
    started = perf()
    if args.rate:
        # open loop: call i starts at started + i / rate, whether or not earlier calls answered;
        # the calls due start together, then the generator sleeps a tick (one timer per tick, not
        # per call, keeps its own CPU small)
        schedule = list(enumerate(counter))
        sent = 0
        while sent < len(schedule):
            due = min(len(schedule), int((perf() - started) * args.rate) + 1)
            for n, i in schedule[sent:due]:
                answer = calls[n % len(calls)](requests[i])
                pending.add(answer)
                answer.add_done_callback(functools.partial(answered, perf()))
            sent = due
            await asyncio.sleep(0.001)
        if pending:
            await asyncio.wait(pending)
    else:

        async def worker(n: int) -> None:
            for i in counter:
                await one(n, i)

        await asyncio.gather(*(worker(n) for n in range(args.concurrency)))
    elapsed = perf() - started
    cpu = time.process_time() - cpu0
    for c in channels:
        c.close()
    return {"latencies": latencies, "errors": errors, "elapsed": elapsed, "cpu": cpu}


# ---- raw storage limit ----------------------------------------------------------------------


async def raw_db(pg_url: str, nats_url: str, events: int, concurrency: int, customers: int) -> float:
    """One transaction per event (insert + profile upsert) and its JetStream publish, `concurrency`
    at a time: what PostgreSQL and NATS on this box give one-event writes, without gRPC or Python
    domain work."""
    pool = await asyncpg.create_pool(pg_url, min_size=concurrency, max_size=concurrency)
    async with pool.acquire() as conn:
        await conn.execute("DROP TABLE IF EXISTS bench_raw_track, bench_raw_profiles")
        await conn.execute(
            """CREATE TABLE bench_raw_track (tenant_id text, event_id uuid PRIMARY KEY, message_id text,
               profile_id text, type text, occurred_at timestamptz, received_at timestamptz,
               properties jsonb, UNIQUE (tenant_id, message_id))"""
        )
        await conn.execute(
            """CREATE TABLE bench_raw_profiles (tenant_id text, profile_id text, last_seen_at timestamptz,
               PRIMARY KEY (tenant_id, profile_id))"""
        )
    bus = Bus(nats_url, "bench-raw")
    await bus.connect()
    await bus.js.add_stream(name="BENCH_RAW_TRACK", subjects=["bench.rawtrack.>"])
    props = json.dumps({"product_id": "sku-1", "category": "toys", "price": 19.9})
    counter = iter(range(events))

    async def worker() -> None:
        for i in counter:
            now = datetime.now(UTC)
            event_id, profile_id = uuid.uuid4(), f"c-{i % customers}"
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO bench_raw_track VALUES ($1, $2, $3, $4, $5, $6, $6, $7)",
                    TENANT,
                    event_id,
                    f"raw-{i}",
                    profile_id,
                    "page_view",
                    now,
                    props,
                )
                await conn.execute(
                    """INSERT INTO bench_raw_profiles VALUES ($1, $2, $3) ON CONFLICT (tenant_id, profile_id)
                       DO UPDATE SET last_seen_at = excluded.last_seen_at""",
                    TENANT,
                    profile_id,
                    now,
                )
            payload = bus_pb2.EnrichedEvent(
                tenant_id=TENANT, event_id=str(event_id), profile_id=profile_id
            ).SerializeToString()
            await bus.js.publish(f"bench.rawtrack.{i % 8}", payload, headers={"Nats-Msg-Id": f"raw-{i}"})

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await bus.close()
    await pool.close()
    return events / elapsed


# ---- the run --------------------------------------------------------------------------------


@dataclass
class Result:
    rate: float
    p50: float
    p95: float
    p99: float
    errors: dict[str, int]  # status code -> calls that failed with it
    load_cpu: float
    cpu: dict[str, float]
    loop_busy: float  # the service's event loop thread, 1.0 = busy all the time

    def line(self, name: str) -> str:
        latency = f"p50 {self.p50:6.1f}  p95 {self.p95:6.1f}  p99 {self.p99:6.1f} ms"
        return f"{name:<28}{self.rate:9,.0f} /s   {latency}" + (
            "   errors " + ", ".join(f"{n} {code}" for code, n in self.errors.items()) if self.errors else ""
        )


async def run_load(
    args: argparse.Namespace, target: str, mode: str, events: int, rate: float, offset: int, watch_roots: Any
) -> Result:
    procs = args.load_processes
    per = events // procs
    children = []
    for n in range(procs):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--target",
            target,
            "--mode",
            mode,
            "--run",
            args.run,
            "--events",
            str(per),
            "--offset",
            str(offset + n * per),
            "--concurrency",
            str(max(1, args.concurrency // procs)),
            "--channels",
            str(args.channels),
            "--customers",
            str(args.customers),
            "--rate",
            str(rate / procs),
        ]
        children.append(
            await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
        )
    for c in children:
        assert c.stdout is not None
        assert (await c.stdout.readline()).strip() == b"ready"
    watch = CpuWatch(watch_roots)
    for c in children:
        assert c.stdin is not None
        c.stdin.write(b"go\n")
        c.stdin.close()
    outs = [json.loads((await c.communicate())[0]) for c in children]
    cpu = watch.used()
    loop_busy = watch.loop_busy()
    latencies = sorted(x for o in outs for x in o["latencies"])
    elapsed = max(o["elapsed"] for o in outs)
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return Result(
        rate=len(latencies) / elapsed,
        p50=q[49] * 1000,
        p95=q[94] * 1000,
        p99=q[98] * 1000,
        errors=dict(sum((Counter(o["errors"]) for o in outs), Counter())),
        load_cpu=sum(o["cpu"] for o in outs),
        cpu=cpu,
        loop_busy=loop_busy,
    )


def _cpu_line(r: Result, events: int) -> str:
    """CPU per call of each group; `other` is what the rest of the box (other work) used meanwhile."""
    cpu = dict(r.cpu)
    machine = cpu.pop("machine")
    parts = [f"{k} {v / events * 1e6:4.0f}" for k, v in cpu.items()]
    parts.append(f"load {r.load_cpu / events * 1e6:4.0f}")
    other = machine - sum(cpu.values()) - r.load_cpu
    return (
        "    CPU µs per call: " + ", ".join(parts) + f"   (other work on the box: {other / events * 1e6:.0f})"
        f"; service event loop {r.loop_busy:.0%} busy"
    )


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000, help="calls per closed-loop run (20,000)")
    ap.add_argument("--concurrency", type=int, default=64, help="calls in flight, closed loop (64)")
    ap.add_argument("--rate", type=float, default=2_000, help="open-loop rate, events/s (2,000; 0 skips)")
    ap.add_argument("--seconds", type=float, default=10, help="length of the open-loop run (10)")
    ap.add_argument("--load-processes", type=int, default=2, help="load-generator processes (2)")
    ap.add_argument("--channels", type=int, default=4, help="gRPC channels per load process (4)")
    ap.add_argument("--customers", type=int, default=5_000)
    ap.add_argument("--skip-raw", action="store_true", help="skip the raw limits")
    # the load-generator child
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="track", help=argparse.SUPPRESS)
    ap.add_argument("--run", default=uuid.uuid4().hex[:8], help=argparse.SUPPRESS)
    ap.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(await load(args)))
        return 0

    with tempfile.TemporaryDirectory(prefix="relevans-bench-") as tmp:
        async with embedded_stack(Path(tmp)) as stack:
            results: dict[str, Result] = {}
            async with profile_service(stack, SECRET) as svc:
                await asyncio.sleep(1.0)  # let every worker process of the service start
                roots = stack_processes(stack, svc)
                target = svc.target
                # warm-up: connections, prepared statements, the first profiles
                await run_load(args, target, "track", 2_000, 0, 10_000_000, roots)
                if not args.skip_raw:
                    results["echo"] = await run_load(args, target, "echo", args.events, 0, 0, roots)
                results["track"] = await run_load(args, target, "track", args.events, 0, 0, roots)
                if args.rate:
                    n = int(args.rate * args.seconds)
                    results["paced"] = await run_load(args, target, "track", n, args.rate, args.events, roots)
                service = psutil.Process(svc.process.pid)
                rss_mb = largest_rss_mb(svc.process.pid)
                workers = 1 + len(service.children(recursive=True))
            raw_rate = 0.0
            if not args.skip_raw:
                raw_rate = await raw_db(
                    stack.profile_db, stack.nats_url, args.events, args.concurrency, args.customers
                )

    track = results["track"]
    print(
        f"single-event Track: {args.events} calls, {args.concurrency} in flight, "
        f"{args.load_processes} load processes x {args.channels} channels, {workers} service process(es)"
    )
    if "echo" in results:
        print(results["echo"].line("raw  no-op gRPC (health):"))
        print(_cpu_line(results["echo"], args.events))
    print(track.line("ours Track, closed loop:"))
    print(_cpu_line(track, args.events))
    if "paced" in results:
        paced = results["paced"]
        print(paced.line(f"ours Track at {args.rate:,.0f}/s:"))
        print(_cpu_line(paced, int(args.rate * args.seconds)))
    if raw_rate:
        print(f"{'raw  asyncpg txn + JS publish:':<28}{raw_rate:9,.0f} /s")
        print(
            f"ratio ours/no-op gRPC: {track.rate / results['echo'].rate:.2f}   "
            f"ours/raw db: {track.rate / raw_rate:.2f}"
        )
    print("target: >= 2,000 events/s at p99 <= 15 ms")
    print(f"profile service RSS after the run: {rss_mb:.0f} MB (target <= 200 MB per process)")
    return 0


if __name__ == "__main__":
    sys.exit(uvloop.run(main()))  # uvloop: the load generator's own CPU per call is lower
