"""The trigger service vs the raw limits, each measured in the same run.

latency     Track calls at `--rate` (1,000/s) into `relevans serve profile`, through the bus into
            `relevans serve trigger`, with 50 triggers of every kind for the tenant and one more,
            an event trigger "bench-probe" that fires on every event of the load: latency = the
            probe's `fired` decision's `decided_at` minus the client's send time of that event
            (matched by the event id Track returns; one machine, one clock).
            Raw: the same load with no trigger service, a bare JetStream pull consumer (the
            kit's `Consumer`, acking only) on rv.events.> instead: send -> received.
throughput  `--events` (200,000) EnrichedEvents of `--profiles` people (profile snapshots with
            traits, counters, a score and consents) published to RV_EVENTS while the trigger
            service is stopped, its 50 triggers defined; then it starts, timed from its first
            delivery until its event consumers have acked every event.
            Raw: the same messages through the kit's `Consumer` with a handler that does
            nothing (acks only), same batch size, one per filter the service's consumers use.
timers      `--timers` (100,000) due timers, 5 event triggers x `--timers / 5` people, written
            with COPY into the trigger database; the service's timer worker fires them (firing
            recorded, delivery request in the outbox), timed from its first firing until none
            is pending.
            Raw: the same rows claimed with plain SQL on one connection in batches of the
            worker's size (UPDATE ... RETURNING, then an INSERT of as many rows into a copy of
            the outbox table).
memory      the trigger process's peak RSS while the parts run.

Each part runs on its own embedded stack. CPU µs per event of every process (trigger service,
profile service, PostgreSQL, NATS, load or raw client) are printed, so a run says which one is
the ceiling. A benchmark reports; it never passes or fails.

    .venv/bin/python bench/triggers.py --part all
    .venv/bin/python bench/triggers.py --part throughput --events 20000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil
import uvloop
from google.protobuf import duration_pb2
from h2grpc import CallError, Channel, request_headers
from harness import (
    PG_STATEMENTS,
    CpuWatch,
    PeakRss,
    Service,
    Stack,
    embedded_stack,
    process_roots,
    profile_service,
    reset_statements,
    statement_costs,
    trigger_service,
)
from nats.aio.msg import Msg

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import bus_pb2 as delivery_bus_pb2
from relevans.kit.auth import mint_token
from relevans.kit.bus import Bus, Consumer, event_subject
from relevans.kit.grpc_client import bearer
from relevans.kit.outbox import RELAY_BATCH
from relevans.kit.proto import to_struct, to_value
from relevans.kit.settings import Settings
from relevans.profile.v1 import bus_pb2, profile_pb2
from relevans.trigger.v1 import trigger_pb2, trigger_pb2_grpc
from services.trigger.consumers import EVENT_BATCH
from services.trigger.timers import DEFAULT_BATCH as TIMER_BATCH

SECRET = "bench-secret"
TENANT = "bench"
EVENT_TYPE = "page_view"  # every event of the latency load; bench-probe fires on each
PROBE = "bench-probe"
TRACK = "/relevans.profile.v1.ProfileService/Track"
CATEGORIES = ("toys", "books", "garden", "kitchen", "sports")
# What the trigger service's event consumers fetch at a time.
CONSUMER_BATCH = EVENT_BATCH
EVENT_CONSUMERS = "trigger-events"  # one durable, or one per partition (trigger-events-<p>)


# ---- the triggers -------------------------------------------------------------------------------


def _duration(d: timedelta) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromTimedelta(d)
    return out


def _compare(field: str, op: str, value: Any) -> dict[str, Any]:
    return {"compare": {"field": field, "op": op, "value": value}}


def _trigger(trigger_id: str, **kind: Any) -> trigger_pb2.Trigger:
    return trigger_pb2.Trigger(
        trigger_id=trigger_id,
        display_name=trigger_id.replace("-", " "),
        channel=common_pb2.CHANNEL_EMAIL,
        purpose=common_pb2.PURPOSE_MARKETING,
        template_id="bench",
        **kind,
    )


def _on_event(trigger_id: str, event_type: str, when: dict[str, Any] | None = None) -> trigger_pb2.Trigger:
    event = trigger_pb2.EventCondition(event_type=event_type)
    if when is not None:
        event.condition.CopyFrom(to_struct(when))
    return _trigger(trigger_id, event=event)


def _count(
    trigger_id: str, event_type: str, count: int, window: timedelta, when: dict[str, Any] | None = None
) -> trigger_pb2.Trigger:
    counted = trigger_pb2.EventCount(event_type=event_type, count=count, window=_duration(window))
    if when is not None:
        counted.condition.CopyFrom(to_struct(when))
    return _trigger(trigger_id, threshold=trigger_pb2.ThresholdCondition(event_count=counted))


def mixed_triggers() -> list[trigger_pb2.Trigger]:
    """50 triggers of every kind, as a tenant's marketing team might have them: 15 event, 8
    threshold, 6 inactivity, 6 absence, 5 date, 5 segment, 5 trait change."""
    day = timedelta(days=1)
    out = []
    for n, cat in enumerate(CATEGORIES):
        out.append(
            _on_event(
                f"view-{cat}-gold",
                "page_view",
                {"all": [_compare("event.category", "eq", cat), _compare("trait.tier", "eq", "gold")]},
            )
        )
        out.append(_on_event(f"cart-{cat}-big", "add_to_cart", _compare("event.price", "gt", 50 + 10 * n)))
        out.append(
            _on_event(
                f"buy-{cat}-engaged",
                "purchase",
                {"all": [_compare("event.category", "eq", cat), _compare("score", "ge", 20)]},
            )
        )
    for cat in CATEGORIES[:4]:
        out.append(
            _count(f"views-{cat}-11-in-7d", "page_view", 11, 7 * day, _compare("event.category", "eq", cat))
        )
    for score in (50, 100):
        reached = trigger_pb2.ProfileValue(field="score", value=score)
        out.append(
            _trigger(f"score-{score}", threshold=trigger_pb2.ThresholdCondition(profile_value=reached))
        )
    out.append(_count("carts-3-in-1d", "add_to_cart", 3, day))
    out.append(_count("purchases-2-in-30d", "purchase", 2, 30 * day))
    for trigger_id, types, days in (
        ("no-visit-14d", ["page_view"], 14),
        ("no-visit-30d", ["page_view"], 30),
        ("no-visit-60d", ["page_view"], 60),
        ("no-purchase-90d", ["purchase"], 90),
        ("no-cart-or-purchase-30d", ["add_to_cart", "purchase"], 30),
        ("no-login-14d", ["login"], 14),
    ):
        out.append(
            _trigger(
                trigger_id,
                inactivity=trigger_pb2.InactivityCondition(event_types=types, duration=_duration(days * day)),
            )
        )
    for trigger_id, start, cancel, delay, match in (
        ("abandoned-cart", "add_to_cart", "purchase", timedelta(hours=1), ["product_id"]),
        ("abandoned-cart-24h", "add_to_cart", "purchase", day, []),
        ("browse-abandon", "page_view", "add_to_cart", timedelta(hours=2), []),
        ("browse-no-purchase", "page_view", "purchase", day, []),
        ("checkout-abandon", "checkout_started", "purchase", timedelta(minutes=30), []),
        ("signup-no-login", "signup", "login", 3 * day, []),
    ):
        absence = trigger_pb2.AbsenceCondition(
            start_event_type=start, cancel_event_type=cancel, delay=_duration(delay), match_properties=match
        )
        out.append(_trigger(trigger_id, absence=absence))
    for trigger_id, trait, offset, yearly, at in (
        ("birthday", "birthday", 0, True, "10:00"),
        ("renewal-30d", "renewal_date", -30, False, "09:00"),
        ("renewal-7d", "renewal_date", -7, False, "09:00"),
        ("renewal-day", "renewal_date", 0, False, "08:00"),
        ("voucher-expiry", "voucher_expiry", -1, False, "18:00"),
    ):
        date = trigger_pb2.DateCondition(date_trait=trait, offset_days=offset, yearly=yearly, local_time=at)
        out.append(_trigger(trigger_id, date=date))
    for trigger_id, segment, entered in (
        ("vip-entered", "vip", True),
        ("vip-exited", "vip", False),
        ("churn-risk-entered", "churn-risk", True),
        ("newsletter-entered", "newsletter", True),
        ("lapsed-exited", "lapsed", False),
    ):
        moved = trigger_pb2.SEGMENT_TRANSITION_ENTERED if entered else trigger_pb2.SEGMENT_TRANSITION_EXITED
        out.append(
            _trigger(trigger_id, segment=trigger_pb2.SegmentCondition(segment_id=segment, transition=moved))
        )
    for trigger_id, trait, transition, taken in (
        ("tier-gold", "tier", trigger_pb2.TRAIT_TRANSITION_TAKES, "gold"),
        ("tier-left-gold", "tier", trigger_pb2.TRAIT_TRANSITION_LEAVES, "gold"),
        ("credit-limit", "credit_limit_reached", trigger_pb2.TRAIT_TRANSITION_TAKES, True),
        ("payment-missed", "payment_missed", trigger_pb2.TRAIT_TRANSITION_TAKES, True),
        ("plan-changed", "plan", trigger_pb2.TRAIT_TRANSITION_CHANGED, None),
    ):
        change = trigger_pb2.TraitChangeCondition(trait_name=trait, transition=transition)
        if taken is not None:
            change.value.CopyFrom(to_value(taken))
        out.append(_trigger(trigger_id, trait_change=change))
    assert len(out) == 50, len(out)
    return out


async def create_triggers(target: str, defs: Sequence[trigger_pb2.Trigger]) -> None:
    metadata = bearer(mint_token(SECRET, TENANT, ["admin"]))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = trigger_pb2_grpc.TriggerServiceStub(channel)
        for d in defs:
            try:
                await stub.CreateTrigger(
                    trigger_pb2.CreateTriggerRequest(trigger=d), metadata=metadata, timeout=30
                )
            except grpc.aio.AioRpcError as exc:
                raise RuntimeError(
                    f"CreateTrigger {d.trigger_id}: {exc.code().name} {exc.details()}"
                ) from None


# ---- processes and CPU --------------------------------------------------------------------------


def stack_roots(
    stack: Stack, **services: asyncio.subprocess.Process | None
) -> dict[str, list[psutil.Process]]:
    """Process groups whose CPU is counted: `service` is the trigger service (CpuWatch.loop_busy
    reads it), then the others given, PostgreSQL and NATS."""
    out = {name: [psutil.Process(p.pid)] for name, p in services.items() if p is not None}
    out["postgres"] = process_roots(str(stack.folder / "pg"))
    out["nats"] = process_roots(str(stack.folder / "nats"))
    return out


def cpu_line(cpu: dict[str, float], n: int, unit: str = "event") -> str:
    """CPU µs per `unit` of each group; `other` is what the rest of the box used meanwhile."""
    cpu = dict(cpu)
    machine = cpu.pop("machine")
    other = machine - sum(cpu.values())
    parts = ", ".join(f"{k} {v / n * 1e6:.0f}" for k, v in cpu.items())
    return f"      CPU µs per {unit}: {parts}   (other work on the box: {other / n * 1e6:.0f})"


def quantiles_ms(values: Sequence[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=100) if len(values) > 1 else [values[0] if values else 0.0] * 99
    return q[49] * 1000, q[94] * 1000, q[98] * 1000


# ---- PostgreSQL's own account (--pg-statements) ---------------------------------------------------


def pg_settings(args: argparse.Namespace) -> dict[str, str] | None:
    return PG_STATEMENTS if args.pg_statements else None


class Statements:
    """pg_stat_statements of the trigger database in windows of a run (`mark` ends one): µs per
    event of the costliest statements, and PostgreSQL's CPU per event, window by window, so a
    statement whose cost per event grows with the tables shows."""

    def __init__(self, stack: Stack) -> None:
        self.url = stack.trigger_db
        self.marks: list[tuple[int, float, dict[int, Any]]] = []

    async def _fetch(self) -> dict[int, Any]:
        return {r["queryid"]: r for r in await statement_costs(self.url, "relevans_trigger")}

    async def reset(self, postgres_cpu: float) -> None:
        await reset_statements(self.url)
        self.marks = [(0, postgres_cpu, {})]

    async def mark(self, events: int, postgres_cpu: float) -> None:
        """The end of a window: `events` done since the reset, PostgreSQL's CPU seconds so far (a
        window without events is joined to the one before)."""
        if len(self.marks) > 1 and events <= self.marks[-1][0]:
            self.marks.pop()
        self.marks.append((events, postgres_cpu, await self._fetch()))

    def lines(self, top: int = 12) -> list[str]:
        if len(self.marks) < 2:
            return []
        windows = list(zip(self.marks, self.marks[1:], strict=False))
        counts = [b[0] - a[0] for a, b in windows]
        head = " ".join(f"{a[0] // 1000:>4}-{b[0] // 1000}k" for a, b in windows)
        cpu = [(b[1] - a[1]) / max(1, c) * 1e6 for (a, b), c in zip(windows, counts, strict=True)]
        out = [
            "      PostgreSQL CPU µs per event, by window of the run: " + ", ".join(f"{c:.0f}" for c in cpu),
            "      relevans_trigger's statements (pg_stat_statements), µs per event executing by window "
            f"({head}), and planning over the run:",
        ]
        last = self.marks[-1][2]
        ranked = sorted(last.values(), key=lambda r: -(r["total_exec_time"] + r["total_plan_time"]))[:top]
        for r in ranked:
            per: list[str] = []
            for (a, b), c in zip(windows, counts, strict=True):
                before, after = a[2].get(r["queryid"]), b[2].get(r["queryid"])
                ms = (after["total_exec_time"] if after else 0.0) - (
                    before["total_exec_time"] if before else 0.0
                )
                per.append(f"{ms * 1000 / max(1, c):6.1f}")
            plan = r["total_plan_time"] * 1000 / max(1, self.marks[-1][0])
            out.append(f"      {' '.join(per)}  (plan {plan:4.1f})  {r['calls']:7,} calls  {r['query']}")
        return out


# ---- part 1: event -> decision latency ----------------------------------------------------------


def load_event(i: int, run: str, customers: int) -> profile_pb2.Event:
    e = profile_pb2.Event(message_id=f"{run}-{i}", type=EVENT_TYPE, customer_id=f"c-{i % customers}")
    e.properties.update(
        {"product_id": f"sku-{i % 500}", "category": CATEGORIES[i % len(CATEGORIES)], "price": 5.0 + i % 120}
    )
    return e


async def load(args: argparse.Namespace) -> dict[str, Any]:
    """The load-generator child: open loop at `rate` Track calls/s; each call's event id and wall
    clock send time (the decision's `decided_at` is compared with it)."""
    host, port = args.target.rsplit(":", 1)
    metadata = [("authorization", f"Bearer {mint_token(SECRET, TENANT, ['ingest'])}")]
    block = request_headers(args.target, TRACK, metadata, timeout_s=10)
    channels = [await Channel.open(host, int(port), block) for _ in range(args.channels)]
    requests = [
        profile_pb2.TrackRequest(event=load_event(i, args.run, args.customers)).SerializeToString()
        for i in range(args.offset, args.offset + args.events)
    ]
    sent: list[tuple[float, asyncio.Future[bytes]]] = []
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    cpu0 = time.process_time()
    started = time.perf_counter()
    n = 0
    while n < len(requests):
        due = min(len(requests), int((time.perf_counter() - started) * args.rate) + 1)
        for i in range(n, due):
            sent.append((time.time(), channels[i % len(channels)].call(requests[i])))
        n = due
        await asyncio.sleep(0.001)
    await asyncio.wait([f for _, f in sent])
    elapsed = time.perf_counter() - started
    out: list[tuple[str, float]] = []
    errors: dict[str, int] = {}
    for at, answer in sent:
        error = answer.exception()
        if error is None:
            out.append((profile_pb2.TrackResponse.FromString(answer.result()).event_id, at))
        else:
            code = error.code if isinstance(error, CallError) else type(error).__name__
            errors[code] = errors.get(code, 0) + 1
    cpu = time.process_time() - cpu0
    for c in channels:
        c.close()
    return {"sent": out, "errors": errors, "elapsed": elapsed, "cpu": cpu}


async def run_load(
    args: argparse.Namespace, target: str, events: int, offset: int
) -> tuple[list[tuple[str, float]], dict[str, int], float, float]:
    """Run the load child; (event id, send time) of each answered call, errors, its CPU, seconds."""
    cmd = [
        *(sys.executable, __file__, "--worker", "--target", target, "--run", args.run),
        *("--events", str(events), "--offset", str(offset), "--rate", str(args.rate)),
        *("--channels", str(args.channels), "--customers", str(args.customers)),
    ]
    child = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None and child.stdin is not None
    if (await child.stdout.readline()).strip() != b"ready":
        raise RuntimeError("the load generator did not start")
    child.stdin.write(b"go\n")
    child.stdin.close()
    out = json.loads((await child.communicate())[0])
    return [(e, t) for e, t in out["sent"]], out["errors"], out["cpu"], out["elapsed"]


async def probe_decisions(pg_url: str, expected: int, stall_s: float = 30.0) -> dict[str, float]:
    """event id -> `decided_at` (epoch seconds) of bench-probe's `fired` decisions, once there are
    `expected` of them or none has come for `stall_s`."""
    conn = await asyncpg.connect(pg_url)
    try:
        query = "FROM decisions WHERE tenant_id = $1 AND trigger_id = $2 AND outcome = 'fired'"
        last, last_change = -1, time.monotonic()
        while True:
            n = await conn.fetchval(f"SELECT count(*) {query}", TENANT, PROBE)
            if n >= expected or time.monotonic() - last_change > stall_s:
                break
            if n != last:
                last, last_change = n, time.monotonic()
            await asyncio.sleep(0.2)
        rows = await conn.fetch(f"SELECT event_id, decided_at {query}", TENANT, PROBE)
        return {r["event_id"]: r["decided_at"].timestamp() for r in rows}
    finally:
        await conn.close()


@dataclass
class Latency:
    matched: int
    sent: int
    p50: float
    p95: float
    p99: float
    low: float  # the smallest, ms: below 0 would mean the decision's time is not when it was made
    errors: dict[str, int]
    cpu: dict[str, float]
    loop_busy: float = 0.0

    def line(self, name: str) -> str:
        errors = ("   errors " + ", ".join(f"{n} {c}" for c, n in self.errors.items())) if self.errors else ""
        return (
            f"{name:<44}p50 {self.p50:7.1f}  p95 {self.p95:7.1f}  p99 {self.p99:7.1f} ms"
            f"   ({self.matched:,} of {self.sent:,} events; min {self.low:.1f} ms){errors}"
        )


def latency_of(sent: Sequence[tuple[str, float]], seen: dict[str, float]) -> list[float]:
    """Seconds from each event's send to when it was seen, sorted (events never seen left out)."""
    return sorted(seen[e] - t for e, t in sent if e in seen)


async def mark_decisions(statements: Statements, watch: CpuWatch, before: int, every: float) -> None:
    """`statements.mark` every `every` seconds, by the probe's decisions made since the reset."""
    conn = await asyncpg.connect(statements.url)
    try:
        while True:
            await asyncio.sleep(every)
            done = await conn.fetchval(_PROBE_FIRED, TENANT, PROBE) - before
            await statements.mark(done, watch.used()["postgres"])
    finally:
        await conn.close()


_PROBE_FIRED = "SELECT count(*) FROM decisions WHERE tenant_id = $1 AND trigger_id = $2 AND outcome = 'fired'"
# What `ours_latency` found in pg_stat_statements (--pg-statements), printed with its part.
statements_lines: list[str] = []


async def ours_latency(
    args: argparse.Namespace, stack: Stack, profile: Service, rss: PeakRss, measured: int
) -> Latency:
    """The load with the trigger service and its triggers: send -> the probe's decision."""
    warm = int(args.rate * 2)
    async with trigger_service(stack, SECRET) as trigger:
        rss.watch(trigger.process.pid)
        await create_triggers(trigger.target, [*mixed_triggers(), _on_event(PROBE, EVENT_TYPE)])
        await asyncio.sleep(1.0)  # the service's workers start, its consumers subscribe
        watch = CpuWatch(stack_roots(stack, service=trigger.process, profile=profile.process))
        _, errors, _, _ = await run_load(args, profile.target, warm, 10_000_000)
        before = warm - sum(errors.values())
        await probe_decisions(stack.trigger_db, before)
        watch.restart()
        statements = Statements(stack)
        marking = None
        if args.pg_statements:
            await statements.reset(0.0)
            marking = asyncio.create_task(mark_decisions(statements, watch, before, args.seconds / 4))
        sent, errors, load_cpu, _ = await run_load(args, profile.target, measured, 0)
        seen = await probe_decisions(stack.trigger_db, before + len(sent))
        cpu = watch.used() | {"load": load_cpu}
        busy = watch.loop_busy()
        if marking is not None:
            marking.cancel()
            await asyncio.gather(marking, return_exceptions=True)
            await statements.mark(len(seen) - before, cpu["postgres"])
            statements_lines.extend(statements.lines())
    found = latency_of(sent, seen)
    return Latency(
        len(found), measured, *quantiles_ms(found), min(found, default=0) * 1000, errors, cpu, busy
    )


async def raw_latency(args: argparse.Namespace, stack: Stack, profile: Service, measured: int) -> Latency:
    """The same load with no trigger service: send -> received by a bare consumer on rv.events.>."""
    args.run = uuid.uuid4().hex[:8]
    bus = Bus(stack.nats_url, "bench-raw")
    await bus.connect()
    received: dict[str, float] = {}

    async def receive(msgs: Sequence[Msg]) -> None:
        now = time.time()
        for m in msgs:
            received[bus_pb2.EnrichedEvent.FromString(m.data).event_id] = now

    stop = asyncio.Event()
    consumer = Consumer(
        bus,
        service="bench",
        stream="RV_EVENTS",
        durable="bench-latency",
        filter_subject="rv.events.>",
        handler=receive,
    )
    task = asyncio.create_task(consumer.run(stop))
    await asyncio.sleep(0.5)
    while (await backlog(bus, ["bench-latency"]))[0]:  # the events of the runs before, first
        await asyncio.sleep(0.1)
    watch = CpuWatch(stack_roots(stack, profile=profile.process))
    bench_cpu = time.process_time()
    sent, errors, load_cpu, _ = await run_load(args, profile.target, measured, 20_000_000)
    deadline = time.monotonic() + 30
    while any(e not in received for e, _ in sent) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    cpu = watch.used() | {"consumer": time.process_time() - bench_cpu, "load": load_cpu}
    stop.set()
    await task
    await bus.close()
    found = latency_of(sent, received)
    return Latency(len(found), measured, *quantiles_ms(found), min(found, default=0) * 1000, errors, cpu)


async def part_latency(args: argparse.Namespace, rss: PeakRss) -> list[str]:
    measured = int(args.rate * args.seconds)
    with tempfile.TemporaryDirectory(prefix="relevans-bench-") as tmp:
        async with (
            embedded_stack(Path(tmp), ("profile", "trigger"), pg_settings(args)) as stack,
            profile_service(stack, SECRET) as profile,
        ):
            ours = await ours_latency(args, stack, profile, rss, measured)
            raw = await raw_latency(args, stack, profile, measured)
    return [
        f"event -> decision latency: Track at {args.rate:,.0f}/s for {args.seconds:.0f} s, "
        f"{args.customers:,} customers, 50 triggers + {PROBE}",
        ours.line("ours  Track -> profile -> bus -> decision:"),
        cpu_line(ours.cpu, measured) + f"; trigger event loop {ours.loop_busy:.0%} busy",
        *statements_lines,
        raw.line("raw   Track -> profile -> bus -> consumer:"),
        cpu_line(raw.cpu, measured),
        f"ratio p99 ours/raw: {ours.p99 / raw.p99 if raw.p99 else float('nan'):.2f}   "
        f"ours - raw: p50 {ours.p50 - raw.p50:+.1f}, p99 {ours.p99 - raw.p99:+.1f} ms"
        "   (target: p99 <= 50 ms)",
    ]


# ---- part 2: evaluation throughput ---------------------------------------------------------------


def enriched_events(n: int, profiles: int) -> list[tuple[str, bytes, str]]:
    """(subject, EnrichedEvent, msg id) of `n` events of `profiles` people, as profile publishes them:
    page views mostly, carts and purchases; each with the person's profile snapshot."""
    partitions = Settings().event_partitions
    now = datetime.now(UTC)
    snapshots = []
    for p in range(min(n, profiles)):
        profile_id = str(uuid.UUID(int=p + 1))
        snap = profile_pb2.Profile(
            profile_id=profile_id, customer_id=f"c-{p}", email=f"c-{p}@example.com", score=float(p % 130)
        )
        for name, value in {
            "tier": ("bronze", "silver", "gold")[p % 3],
            "time_zone": ("Europe/Copenhagen", "America/Los_Angeles", "Australia/Sydney")[p % 3],
            "birthday": f"19{50 + p % 50}-{1 + p % 12:02d}-{1 + p % 28:02d}",
            "plan": ("basic", "plus", "pro")[p % 3],
        }.items():
            snap.traits[name].CopyFrom(to_value(value))
        snap.counters.add(name="toy_views", window_days=7, count=p % 15)
        snap.counters.add(name="purchases", window_days=30, count=p % 4)
        snap.consents.add(
            purpose=common_pb2.PURPOSE_MARKETING,
            channel=common_pb2.CHANNEL_EMAIL,
            status=common_pb2.CONSENT_STATUS_GRANTED,
        )
        snap.tags.extend(sorted({"newsletter", ("app", "web")[p % 2]}))
        snap.last_seen[EVENT_TYPE].FromDatetime(now)
        snapshots.append(snap)
    out = []
    for i in range(n):
        snap = snapshots[i % len(snapshots)]
        kind = "purchase" if i % 20 == 0 else "add_to_cart" if i % 20 < 4 else EVENT_TYPE
        msg = bus_pb2.EnrichedEvent(
            tenant_id=TENANT,
            event_id=str(uuid.uuid4()),
            profile_id=snap.profile_id,
            event=profile_pb2.Event(type=kind, message_id=f"m-{i}", customer_id=snap.customer_id),
            profile=snap,
        )
        msg.event.timestamp.FromDatetime(now)
        msg.receive_time.FromDatetime(now)
        msg.event.properties.update(
            {
                "product_id": f"sku-{i % 500}",
                "category": CATEGORIES[i % len(CATEGORIES)],
                "price": 5.0 + i % 120,
            }
        )
        out.append(
            (event_subject(TENANT, snap.profile_id, partitions), msg.SerializeToString(), f"bench-{i}")
        )
    return out


async def event_consumers(bus: Bus) -> list[tuple[str, str]]:
    """(durable, filter subject) of the trigger service's event consumers."""
    infos = await bus.js.consumers_info("RV_EVENTS")
    return sorted(
        (i.name, i.config.filter_subject or "rv.events.>")
        for i in infos
        if i.name.startswith(EVENT_CONSUMERS)
    )


async def backlog(bus: Bus, durables: Sequence[str]) -> tuple[int, int]:
    """(messages not yet acked, messages delivered) over these consumers."""
    left = delivered = 0
    for d in durables:
        info = await bus.js.consumer_info("RV_EVENTS", d)
        left += (info.num_pending or 0) + (info.num_ack_pending or 0)
        delivered += (info.delivered.consumer_seq or 0) if info.delivered else 0
    return left, delivered


async def part_throughput(args: argparse.Namespace, rss: PeakRss) -> list[str]:
    n = args.events
    messages = enriched_events(n, args.profiles)
    with tempfile.TemporaryDirectory(prefix="relevans-bench-") as tmp:
        async with embedded_stack(Path(tmp), ("trigger",), pg_settings(args)) as stack:
            async with trigger_service(stack, SECRET) as trigger:  # creates the streams and consumers
                rss.watch(trigger.process.pid)
                await create_triggers(trigger.target, mixed_triggers())
                await asyncio.sleep(1.0)
            bus = Bus(stack.nats_url, "bench")
            await bus.connect()
            durables = await event_consumers(bus)
            if not durables:
                raise RuntimeError(f"the trigger service made no {EVENT_CONSUMERS}* consumer on RV_EVENTS")
            for i in range(0, n, RELAY_BATCH):
                await bus.publish_batch(messages[i : i + RELAY_BATCH], timeout=30)
            del messages

            # raw: the kit's Consumer, acks only, one per filter the service's consumers use
            handled = 0
            done = asyncio.Event()

            async def nothing(msgs: Sequence[Msg]) -> None:
                nonlocal handled
                handled += len(msgs)
                if handled >= n:
                    done.set()

            filters = sorted({f for _, f in durables})
            watch = CpuWatch(stack_roots(stack))
            stop = asyncio.Event()
            bench_cpu = time.process_time()
            started = time.perf_counter()
            tasks = [
                asyncio.create_task(
                    Consumer(
                        bus,
                        service="bench",
                        stream="RV_EVENTS",
                        durable=f"bench-raw-{k}",
                        filter_subject=f,
                        handler=nothing,
                        batch=CONSUMER_BATCH,
                    ).run(stop)
                )
                for k, f in enumerate(filters)
            ]
            await done.wait()
            raw_s = time.perf_counter() - started
            raw_cpu = watch.used() | {"consumer": time.process_time() - bench_cpu}
            stop.set()
            await asyncio.gather(*tasks)
            for k in range(len(filters)):
                await bus.js.delete_consumer("RV_EVENTS", f"bench-raw-{k}")

            # ours: the service starts on the backlog
            async with trigger_service(stack, SECRET) as trigger:
                rss.watch(trigger.process.pid)
                launched = time.perf_counter()
                watch = CpuWatch(stack_roots(stack, service=trigger.process))
                statements = Statements(stack)
                first = 0.0
                while True:
                    names = [d for d, _ in await event_consumers(bus)]
                    left, delivered = await backlog(bus, names)
                    now = time.perf_counter()
                    if delivered and not first:
                        first = now
                        watch.restart()
                        if args.pg_statements:
                            await statements.reset(0.0)
                    if first and args.pg_statements and n - left >= (len(statements.marks) * n) // 4:
                        await statements.mark(n - left, watch.used()["postgres"])
                    if first and not left:
                        break
                    if now - launched > 1800:
                        raise RuntimeError(f"{left} events not evaluated within 30 minutes")
                    await asyncio.sleep(0.02)
                ours_s = time.perf_counter() - first
                cpu = watch.used()
                busy = watch.loop_busy()
                startup = first - launched
            await bus.close()

    ours_rate, raw_rate = n / ours_s, n / raw_s
    return [
        f"evaluation throughput: {n:,} events of {min(n, args.profiles):,} people, 50 triggers, "
        f"{len(durables)} event consumer(s) ({', '.join(d for d, _ in durables)}), batch {CONSUMER_BATCH}",
        f"ours  trigger service evaluated and acked:  {ours_rate:10,.0f} events/s ({ours_s:.2f} s; "
        f"first delivery {startup:.1f} s after launch)",
        cpu_line(cpu, n) + f"; trigger event loop {busy:.0%} busy",
        *statements.lines(),
        f"raw   kit Consumer, acks only:              {raw_rate:10,.0f} events/s ({raw_s:.2f} s)",
        cpu_line(raw_cpu, n),
        f"ratio ours/raw: {ours_rate / raw_rate:.2f}   (target: >= 10,000 events/s evaluated)",
    ]


# ---- part 3: timers --------------------------------------------------------------------------------

TIMER_TRIGGERS = 5
TIMER_COLUMNS = [
    "tenant_id",
    "trigger_id",
    "profile_id",
    "occurrence",
    "started_at",
    "due_at",
    "first_due_at",
    "status",
    "variables",
    "created_at",
]


async def raw_timers(conn: asyncpg.Connection, n: int, now: datetime) -> float:
    """Seconds to claim `n` due rows of bench_timers in batches of the worker's size and write as many
    outbox rows, one transaction per batch, on one connection."""
    payload = delivery_bus_pb2.DeliveryRequest(
        idempotency_key="x" * 64,
        tenant_id=TENANT,
        profile_id=str(uuid.uuid4()),
        trigger_id="timer-0",
        channel=common_pb2.CHANNEL_EMAIL,
        purpose=common_pb2.PURPOSE_MARKETING,
        template_id="bench",
    ).SerializeToString()
    claim = await conn.prepare(
        """WITH due AS (
               SELECT tenant_id, trigger_id, profile_id, occurrence FROM bench_timers
               WHERE status = 'pending' AND due_at <= $1 ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED)
           UPDATE bench_timers t SET status = 'fired', fired_at = $1 FROM due
           WHERE (t.tenant_id, t.trigger_id, t.profile_id, t.occurrence)
                 = (due.tenant_id, due.trigger_id, due.profile_id, due.occurrence)
           RETURNING t.tenant_id, t.trigger_id, t.profile_id, t.occurrence"""
    )
    write = await conn.prepare(
        "INSERT INTO bench_outbox (subject, payload, created_at) "
        "SELECT 'rv.delivery.requests', p, $2 FROM unnest($1::bytea[]) AS u(p)"
    )
    fired = 0
    started = time.perf_counter()
    while fired < n:
        async with conn.transaction():
            rows = await claim.fetch(now, TIMER_BATCH)
            if not rows:
                break
            await write.fetch([payload] * len(rows), now)
        fired += len(rows)
    return time.perf_counter() - started


async def part_timers(args: argparse.Namespace, rss: PeakRss) -> list[str]:
    n = args.timers - args.timers % TIMER_TRIGGERS
    people = n // TIMER_TRIGGERS
    with tempfile.TemporaryDirectory(prefix="relevans-bench-") as tmp:
        async with embedded_stack(Path(tmp), ("trigger",)) as stack:
            async with trigger_service(stack, SECRET) as trigger:
                rss.watch(trigger.process.pid)
                await create_triggers(
                    trigger.target, [_on_event(f"timer-{k}", f"timer_{k}") for k in range(TIMER_TRIGGERS)]
                )
            conn = await asyncpg.connect(stack.trigger_db)
            now = datetime.now(UTC)
            due = now - timedelta(seconds=1)
            rows = [
                (
                    TENANT,
                    f"timer-{k}",
                    str(uuid.UUID(int=p + 1)),
                    str(uuid.uuid4()),
                    due,
                    due,
                    due,
                    "pending",
                    "{}",
                    due,
                )
                for p in range(people)
                for k in range(TIMER_TRIGGERS)
            ]
            await conn.execute("CREATE TABLE bench_timers (LIKE timers INCLUDING ALL)")
            await conn.execute("CREATE TABLE bench_outbox (LIKE outbox INCLUDING ALL)")
            for table in ("timers", "bench_timers"):
                await conn.copy_records_to_table(table, records=rows, columns=TIMER_COLUMNS)
            await conn.execute("ANALYZE timers; ANALYZE bench_timers")
            del rows

            watch = CpuWatch(stack_roots(stack))
            bench_cpu = time.process_time()
            raw_s = await raw_timers(conn, n, now)
            raw_cpu = watch.used() | {"client": time.process_time() - bench_cpu}

            async with trigger_service(stack, SECRET) as trigger:
                rss.watch(trigger.process.pid)
                launched = time.perf_counter()
                watch = CpuWatch(stack_roots(stack, service=trigger.process))
                first = 0.0
                while True:
                    left = await conn.fetchval("SELECT count(*) FROM timers WHERE status = 'pending'")
                    t = time.perf_counter()
                    if left < n and not first:
                        first = t
                        watch.restart()
                    if not left:
                        break
                    if t - launched > 1800:
                        raise RuntimeError(f"{left} timers still pending after 30 minutes")
                    await asyncio.sleep(0.05)
                ours_s = time.perf_counter() - first
                cpu = watch.used()
                busy = watch.loop_busy()
                startup = first - launched
            counts = await conn.fetchrow(
                """SELECT (SELECT count(*) FROM firings) AS firings, (SELECT count(*) FROM outbox) AS outbox,
                          (SELECT count(*) FROM timers WHERE status = 'fired') AS fired"""
            )
            await conn.close()

    ours_rate, raw_rate = n / ours_s, n / raw_s
    return [
        f"timers: {n:,} due timers, {people:,} people x {TIMER_TRIGGERS} event triggers, batch {TIMER_BATCH}",
        f"ours  timer worker fired:                      {ours_rate:10,.0f} timers/s ({ours_s:.2f} s; "
        f"first firing {startup:.1f} s after launch)",
        f"      fired {counts['fired']:,}, firings {counts['firings']:,}, delivery requests in the outbox "
        f"{counts['outbox']:,}",
        cpu_line(cpu, n, "timer") + f"; trigger event loop {busy:.0%} busy",
        f"raw   UPDATE ... RETURNING + outbox INSERT:    {raw_rate:10,.0f} timers/s ({raw_s:.2f} s)",
        cpu_line(raw_cpu, n, "timer"),
        f"ratio ours/raw: {ours_rate / raw_rate:.2f}   (target: >= 5,000 timers/s)",
    ]


# ---- the run -----------------------------------------------------------------------------------------

PARTS = {"latency": part_latency, "throughput": part_throughput, "timers": part_timers}


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=[*PARTS, "all"], default="all")
    ap.add_argument("--rate", type=float, default=1_000, help="latency: Track calls/s (1,000)")
    ap.add_argument("--seconds", type=float, default=10, help="latency: length of the measured load (10)")
    ap.add_argument("--customers", type=int, default=5_000, help="latency: customers of the load (5,000)")
    ap.add_argument("--channels", type=int, default=4, help="latency: HTTP/2 connections of the load (4)")
    ap.add_argument("--events", type=int, default=200_000, help="throughput: events (200,000)")
    ap.add_argument("--profiles", type=int, default=20_000, help="throughput: people (20,000)")
    ap.add_argument("--timers", type=int, default=100_000, help="timers: due timers (100,000)")
    ap.add_argument(
        "--pg-statements",
        action="store_true",
        help="latency, throughput: load pg_stat_statements and print the trigger database's costliest "
        "statements per event, in four windows of the run (does a statement's cost grow with the tables?)",
    )
    # the load-generator child
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--run", default=uuid.uuid4().hex[:8], help=argparse.SUPPRESS)
    ap.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(await load(args)))
        return 0

    rss = PeakRss()
    for name in PARTS if args.part == "all" else [args.part]:
        lines = await PARTS[name](args, rss)
        print("\n".join(lines), flush=True)
        print(flush=True)
    await rss.stop()
    print(f"memory: trigger service peak RSS {rss.peak_mb:.0f} MB (target <= 200 MB per process)")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(uvloop.run(main()))
