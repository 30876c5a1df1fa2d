"""The delivery service vs the raw limits, each measured in the same run.

dispatch    `--mails` (20,000) delivery requests for as many people (imported into
            `relevans serve profile` with email-marketing consent) published on rv.delivery.requests
            at `--dispatch-rate` (2,000/s) while `relevans serve delivery` sends them to an SMTP sink
            (relevans/local/smtp_sink.py, a process of its own): each request's consent asked of
            profile at send time, the mail rendered, claimed, sent and recorded. Throughput = mails
            sent / (last `sent` - first publish); latency = the message's `sent` time in its history
            minus the request's publish time (one machine, one clock).
            Raw: the same number of mails, of the size delivery sends, from the SMTP client
            delivery uses, alone (no database, no claims), over as many connections as delivery
            uses, to the same sink: its intake rate.
banner      `--profiles` (100,000) people each holding a banner (rows written with COPY into the
            delivery database, as web messages leave them), loaded by `relevans serve delivery` at
            start the way it always loads them; then `GetBanner` at `--rate` (2,000/s) for
            `--seconds` (10) from a load process of its own (bench/h2grpc.py), asking by profile id
            and by anonymous id, a tenth of them people without a banner: p50/p95/p99 of each call,
            send -> answer.
            Raw: the same open loop against an empty gRPC method of the same server (the health
            `Check`), measured in the same run: the ratio says what answering from the inbox adds.
            `--rounds N` runs the pair N times, alternating; in the first round nearly every answer
            is a banner's first show (`opened` written and published), in later ones they are not.
            `--processes N` serves delivery with RELEVANS_DELIVERY_PROCESSES=N: N processes on one
            port, each holding every banner; the kernel spreads the load's connections
            (`--channels`, give it several per process) over them.
memory      the delivery process's RSS holding the banners before the load and after it, and its
            peak while answering (with several processes, the largest).

    .venv/bin/python bench/delivery.py --part dispatch
    .venv/bin/python bench/delivery.py --part dispatch --mails 4000
    .venv/bin/python bench/delivery.py --part dispatch --processes 2 --pg-statements
    .venv/bin/python bench/delivery.py --part banner
    .venv/bin/python bench/delivery.py --part banner --profiles 5000 --seconds 2
    .venv/bin/python bench/delivery.py --part banner --rounds 2 --processes 2 --channels 8
    RELEVANS_EVENT_LOOP=asyncio .venv/bin/python bench/delivery.py --part banner
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil
import uvloop
from grpc_health.v1 import health_pb2
from h2grpc import CallError, Channel, request_headers
from harness import (
    PG_STATEMENTS,
    CpuWatch,
    PeakRss,
    Service,
    embedded_stack,
    largest_rss_mb,
    reset_statements,
    service_process,
    stack_processes,
    statement_costs,
)

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import bus_pb2, delivery_pb2, delivery_pb2_grpc
from relevans.kit.auth import mint_token
from relevans.kit.bus import Bus
from relevans.kit.settings import Settings, env_name
from relevans.local.embedded import free_port
from relevans.local.smtp_sink import SmtpSink
from relevans.profile.v1 import profile_pb2, profile_pb2_grpc
from services.delivery.channels.smtp_client import SmtpSession
from services.delivery.consumers import FILTER_SUBJECT as DISPATCH_SUBJECT
from services.delivery.domain.channels.email import email_bytes

SECRET = "bench-secret"
TENANT = "bench"
PLACEMENT = "cart-reminder"
GET_BANNER = "/relevans.delivery.v1.DeliveryService/GetBanner"
CHECK = "/grpc.health.v1.Health/Check"
PARTS = ("dispatch", "banner")
TEMPLATE_ID = "abandoned-cart"
CART_BODY = "Hi {{ first_name | fallback('there') }},\n\nyou left {{ event.product_name }} in your cart.\n"


# ---- the banners ------------------------------------------------------------------------------------


async def write_banners(db_url: str, profiles: int) -> float:
    """One web message and its banner per person, as the web channel leaves them; seconds the COPY
    took."""
    now = datetime.now(UTC)
    rows = [
        (
            TENANT,
            f"m-{i}",
            f"p-{i}",
            [f"anon-{i}"],
            "abandoned-cart",
            "marketing",
            PLACEMENT,
            "Ada, your cart is waiting",
            "You left Blue running shoes in your cart. They are still there, and 15 % off for 12 hours.",
            f"https://shop.example/cart?p=sku-{i % 500}",
            i % 5,
            now,
            now + timedelta(days=1),
            now,
        )
        for i in range(profiles)
    ]
    messages = [
        (
            *(TENANT, f"m-{i}", f"abandoned-cart:p-{i}:1", f"p-{i}", "abandoned-cart", "web", "marketing"),
            *(
                "cart-banner",
                "{}",
                "sent",
                "banner placed",
                f"p-{i}",
                "Ada, your cart is waiting",
                0,
                now,
                now,
            ),
        )
        for i in range(profiles)
    ]
    conn = await asyncpg.connect(db_url)
    try:
        started = time.perf_counter()
        await conn.copy_records_to_table(
            "messages",
            records=messages,
            columns=[
                "tenant_id",
                "message_id",
                "idempotency_key",
                "profile_id",
                "trigger_id",
                "channel",
                "purpose",
                "template_id",
                "variables",
                "status",
                "reason",
                "recipient",
                "subject",
                "attempts",
                "created_at",
                "updated_at",
            ],
        )
        await conn.copy_records_to_table(
            "banners",
            records=rows,
            columns=[
                "tenant_id",
                "message_id",
                "profile_id",
                "anonymous_ids",
                "trigger_id",
                "purpose",
                "placement",
                "title",
                "body_text",
                "link_url",
                "priority",
                "placed_at",
                "expire_at",
                "requested_at",
            ],
        )
        return time.perf_counter() - started
    finally:
        await conn.close()


def questions(profiles: int, count: int) -> list[bytes]:
    """GetBanner requests: by profile id and by anonymous id in turn; every tenth of nobody."""
    out = []
    for n in range(count):
        i = (n * 7919) % profiles
        if n % 10 == 9:
            request = delivery_pb2.GetBannerRequest(profile_id=f"nobody-{n}", placement=PLACEMENT)
        elif n % 2:
            request = delivery_pb2.GetBannerRequest(anonymous_id=f"anon-{i}", placement=PLACEMENT)
        else:
            request = delivery_pb2.GetBannerRequest(profile_id=f"p-{i}", placement=PLACEMENT)
        out.append(request.SerializeToString())
    return out


# ---- the load process (a child; prints one JSON line) ----------------------------------------------------


async def load(args: argparse.Namespace) -> dict[str, Any]:
    """Open loop at `rate` calls/s for `seconds`: call i starts at i / rate whether or not earlier
    ones answered; each call's latency is send -> answer."""
    path = GET_BANNER if args.mode == "banner" else CHECK
    metadata = [("authorization", f"Bearer {mint_token(SECRET, TENANT, ['read'])}")]
    targets = args.target.split(",")  # connections go to each in turn
    channels = []
    for i in range(args.channels):
        target = targets[i % len(targets)]
        host, port = target.rsplit(":", 1)
        block = request_headers(target, path, metadata, timeout_s=10)
        channels.append(await Channel.open(host, int(port), block))
    count = int(args.rate * args.seconds)
    if args.mode == "banner":
        requests = questions(args.profiles, count)
    else:
        requests = [health_pb2.HealthCheckRequest().SerializeToString()] * count
    calls = [c.call for c in channels]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    found = 0
    perf = time.perf_counter
    pending: set[asyncio.Future[bytes]] = set()

    def answered(started: float, answer: asyncio.Future[bytes]) -> None:
        nonlocal found
        pending.discard(answer)
        error = answer.exception()
        if error is None:
            latencies.append(perf() - started)
            found += args.mode == "banner" and len(answer.result()) > 0
        else:
            code = error.code if isinstance(error, CallError) else type(error).__name__
            errors[code] = errors.get(code, 0) + 1

    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    cpu0 = time.process_time()
    started = perf()
    sent = 0
    while sent < count:
        due = min(count, int((perf() - started) * args.rate) + 1)
        for i in range(sent, due):
            answer = calls[i % len(calls)](requests[i])
            pending.add(answer)
            answer.add_done_callback(functools.partial(answered, perf()))
        sent = due
        await asyncio.sleep(0.001)
    if pending:
        await asyncio.wait(pending)
    elapsed = perf() - started
    for c in channels:
        c.close()
    return {
        "latencies": latencies,
        "errors": errors,
        "found": found,
        "elapsed": elapsed,
        "cpu": time.process_time() - cpu0,
    }


@dataclass
class Run:
    calls: int
    rate: float
    p50: float
    p95: float
    p99: float
    found: int
    errors: dict[str, int]
    cpu: dict[str, float]

    def line(self, name: str) -> str:
        errors = ("   errors " + ", ".join(f"{n} {c}" for c, n in self.errors.items())) if self.errors else ""
        latency = f"p50 {self.p50:6.2f}  p95 {self.p95:6.2f}  p99 {self.p99:6.2f} ms"
        return f"{name:<34}{self.rate:8,.0f} /s   {latency}   ({self.calls:,} calls){errors}"

    def cpu_line(self) -> str:
        cpu = dict(self.cpu)
        machine = cpu.pop("machine")
        other = machine - sum(cpu.values())
        per_call = {k: v / max(1, self.calls) * 1e6 for k, v in cpu.items()}
        parts = ", ".join(f"{k} {v:.0f}" for k, v in per_call.items())
        other_per_call = other / max(1, self.calls) * 1e6
        return f"      CPU µs per call: {parts}   (other work on the box: {other_per_call:.0f})"


async def run_load(args: argparse.Namespace, target: str, mode: str, watch: CpuWatch) -> Run:
    # the load process writes its figures to a file (a large line on its stdout came back cut short)
    result = Path(tempfile.mkdtemp(prefix="relevans-bench-load-")) / "result.json"
    cmd = [
        *(sys.executable, __file__, "--worker", str(result), "--mode", mode, "--target", target),
        *("--rate", str(args.rate), "--seconds", str(args.seconds), "--channels", str(args.channels)),
        *("--profiles", str(args.profiles)),
    ]
    child = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None and child.stdin is not None
    if (await child.stdout.readline()).strip() != b"ready":
        raise RuntimeError("the load generator did not start")
    watch.restart()
    child.stdin.write(b"go\n")
    child.stdin.close()
    await child.communicate()
    out = json.loads(result.read_text())
    result.unlink()
    result.parent.rmdir()
    cpu = watch.used()
    cpu["load"] = out["cpu"]
    latencies = sorted(out["latencies"])
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return Run(
        calls=len(latencies),
        rate=len(latencies) / out["elapsed"],
        p50=q[49] * 1000,
        p95=q[94] * 1000,
        p99=q[98] * 1000,
        found=out["found"],
        errors=out["errors"],
        cpu=cpu,
    )


# ---- dispatch -------------------------------------------------------------------------------------


_drains: set[asyncio.Task[bytes]] = set()


async def sink_process(port: int, mail_dir: Path) -> asyncio.subprocess.Process:
    """The SMTP sink in a process of its own (its CPU counted apart), serving until its stdin closes."""
    child = await asyncio.create_subprocess_exec(
        *(sys.executable, __file__, "--sink", str(port), "--mail-dir", str(mail_dir)),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    while (line := await child.stdout.readline()).strip() != b"ready":  # its log lines come first
        if not line:
            raise RuntimeError("the SMTP sink did not start")
    # What it logs per mail must not fill the pipe and stop it.
    _drains.add(asyncio.create_task(child.stdout.read()))
    return child


async def run_sink(port: int, mail_dir: Path) -> None:
    async with SmtpSink(mail_dir, port=port):
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def raw_smtp(port: int, mails: int) -> tuple[float, float]:
    """(mails/s, client CPU s): the SMTP client delivery uses, alone (no database, no claims),
    sending `mails` of delivery's size over as many connections as delivery's SMTP transport,
    to the sink."""
    content = email_bytes(
        message_id="raw",
        sender="relevans <no-reply@relevans.local>",
        recipient="ada@example.com",
        subject="Ada, you left something in your cart",
        body_text="Hi Ada,\n\nyou left Blue running shoes in your cart. It is still waiting for you.\n",
        now=datetime.now(UTC),
    )
    queue = iter(range(mails))

    async def lane() -> None:
        session = await SmtpSession.open("127.0.0.1", port, local_hostname="relevans.local", timeout_s=30)
        for _ in queue:
            await session.begin("no-reply@relevans.local", "ada@example.com")
            await session.content(content)
        await session.quit()

    cpu0 = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(Settings.smtp_connections)))
    return mails / (time.perf_counter() - started), time.process_time() - cpu0


async def import_people(target: str, n: int) -> None:
    """`n` people with an email address, a first name and email-marketing consent."""
    metadata = [("authorization", f"Bearer {mint_token(SECRET, TENANT, ['admin'])}")]
    granted = profile_pb2.ConsentInput(
        purpose=common_pb2.PURPOSE_MARKETING,
        channel=common_pb2.CHANNEL_EMAIL,
        status=common_pb2.CONSENT_STATUS_GRANTED,
        source="bench",
    )

    async def batches() -> Any:
        for start in range(0, n, 1000):
            rows = [
                profile_pb2.ImportRow(
                    row_number=i + 1,
                    email=f"p{i}@example.com",
                    first_name="Ada",
                    marketing_email_consent=granted,
                )
                for i in range(start, min(n, start + 1000))
            ]
            yield profile_pb2.ImportProfilesRequest(source="bench", rows=rows)

    async with grpc.aio.insecure_channel(target) as channel:
        reply = await profile_pb2_grpc.ProfileServiceStub(channel).ImportProfiles(
            batches(), metadata=metadata, timeout=600
        )
    if reply.rows_failed:
        raise RuntimeError(f"{reply.rows_failed} people were not imported")


async def put_template(target: str) -> None:
    metadata = [("authorization", f"Bearer {mint_token(SECRET, TENANT, ['admin'])}")]
    template = delivery_pb2.Template(
        template_id=TEMPLATE_ID,
        channel=common_pb2.CHANNEL_EMAIL,
        subject="{{ first_name | fallback('Hi there') }}, you left something in your cart",
        body_text=CART_BODY,
    )
    async with grpc.aio.insecure_channel(target) as channel:
        await delivery_pb2_grpc.DeliveryServiceStub(channel).PutTemplate(
            delivery_pb2.PutTemplateRequest(template=template), metadata=metadata, timeout=30
        )


def delivery_request(i: int, profile_id: str) -> bytes:
    request = bus_pb2.DeliveryRequest(
        idempotency_key=f"bench:{i}",
        tenant_id=TENANT,
        profile_id=profile_id,
        trigger_id="abandoned-cart",
        channel=common_pb2.CHANNEL_EMAIL,
        purpose=common_pb2.PURPOSE_MARKETING,
        template_id=TEMPLATE_ID,
    )
    request.variables.update({"event": {"product_name": "Blue running shoes"}})
    request.request_time.FromDatetime(datetime.now(UTC))
    return request.SerializeToString()


async def publish_paced(bus: Bus, profile_ids: list[str], rate: float) -> dict[str, float]:
    """Publish one request per person at `rate` a second; each request's publish time by key."""
    sent: dict[str, float] = {}
    started = time.perf_counter()
    n = 0
    while n < len(profile_ids):
        due = min(len(profile_ids), int((time.perf_counter() - started) * rate) + 1)
        now = time.time()
        batch = [(DISPATCH_SUBJECT, delivery_request(i, profile_ids[i]), f"bench:{i}") for i in range(n, due)]
        await bus.publish_batch(batch, timeout=30)
        sent.update({f"bench:{i}": now for i in range(n, due)})
        n = due
        await asyncio.sleep(0.005)
    return sent


async def sent_times(db_url: str, expected: int, stall_s: float = 60.0) -> dict[str, float]:
    """Each message's `sent` time by idempotency key, once `expected` messages are final (or nothing
    changed for `stall_s`)."""
    conn = await asyncpg.connect(db_url)
    try:
        last, changed = -1, time.monotonic()
        while True:
            final = await conn.fetchval(
                "SELECT count(*) FROM messages WHERE status IN ('sent', 'failed', 'suppressed', 'bounced')"
            )
            if final >= expected or time.monotonic() - changed > stall_s:
                break
            if final != last:
                last, changed = final, time.monotonic()
            await asyncio.sleep(1.0)  # the count reads the whole table: PostgreSQL's time it takes is ours
        rows = await conn.fetch(
            "SELECT m.idempotency_key, h.at FROM message_status_history h "
            "JOIN messages m USING (tenant_id, message_id) WHERE h.status = 'sent'"
        )
        return {r["idempotency_key"]: r["at"].timestamp() for r in rows}
    finally:
        await conn.close()


async def print_statements(db_url: str, database: str, mails: int) -> None:
    """The costliest statements of `database` by PostgreSQL's own account, per mail."""
    rows = (await statement_costs(db_url, database))[:12]
    conn = await asyncpg.connect(db_url)
    try:
        wal = await conn.fetchrow("SELECT wal_records, wal_fpi, wal_bytes FROM pg_stat_wal")
        updates = await conn.fetchrow(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'messages'"
        )
    finally:
        await conn.close()
    print(f"      {database}'s statements (pg_stat_statements), µs per mail executing (planning):")
    if database == "relevans_delivery":  # the server's WAL, once
        per_mail = {k: wal[k] / max(1, mails) for k in ("wal_records", "wal_fpi", "wal_bytes")}
        print(
            f"      the server's WAL per mail: {per_mail['wal_records']:.1f} records, "
            f"{per_mail['wal_fpi']:.2f} full-page images, {per_mail['wal_bytes']:,.0f} bytes; "
            f"messages updated in place (HOT): {updates['n_tup_hot_upd']:,} of {updates['n_tup_upd']:,}"
        )
    for r in rows:
        executing = r["total_exec_time"] * 1000 / max(1, mails)
        planning = r["total_plan_time"] * 1000 / max(1, mails)
        counts = f"{r['calls']:7,} calls {r['rows']:8,} rows"
        print(f"      {executing:7.0f} ({planning:4.0f})  {counts}  {r['query']}")


def mail_folder(folder: Path) -> Path:
    """Where the sink keeps the mail: in memory (/dev/shm) where the machine has it, so what is
    measured is the sink and not the ext4 journal of a shared disk (writing a small file there
    cost the sink 0.1-0.7 ms of CPU, depending on what else wrote to the disk)."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="relevans-bench-mail-", dir=shm)) if shm.is_dir() else folder / "mail"


async def dispatch_part(args: argparse.Namespace, folder: Path) -> None:
    n = args.mails
    pg_settings = PG_STATEMENTS if args.pg_statements else None
    async with embedded_stack(folder, ("profile", "delivery"), pg_settings) as stack:
        port = free_port()
        mail = mail_folder(folder)
        sink = await sink_process(port, mail)
        try:
            raw_rate, raw_cpu = await raw_smtp(port, n)
            os.environ[env_name("smtp_port")] = str(port)
            rss = PeakRss()
            async with service_process(stack, "profile", SECRET) as profile:
                await import_people(profile.target, n)
                os.environ[env_name("profile_target")] = profile.target
                conn = await asyncpg.connect(stack.profile_db)
                ids = [
                    r["profile_id"]
                    for r in await conn.fetch("SELECT profile_id FROM profiles ORDER BY email")
                ]
                await conn.close()
                # an HTTP port no other run on the machine holds (the default port is one for all)
                os.environ[env_name("delivery_http_listen")] = f"127.0.0.1:{free_port()}"
                os.environ[env_name("delivery_processes")] = str(args.processes)
                async with service_process(stack, "delivery", SECRET) as delivery:
                    await all_serving(delivery, args.processes)
                    rss.watch(delivery.process.pid)
                    await put_template(delivery.target)
                    roots = {
                        "service": [psutil.Process(delivery.process.pid)],
                        "profile": [psutil.Process(profile.process.pid)],
                        "sink": [psutil.Process(sink.pid)],
                        **{k: v for k, v in stack_processes(stack, delivery).items() if k != "service"},
                    }
                    watch = CpuWatch(roots)
                    bus = Bus(stack.nats_url, "bench-dispatch")
                    await bus.connect()
                    if args.pg_statements:
                        for service in ("delivery", "profile"):
                            await reset_statements(stack.database(service))
                    cpu0 = time.process_time()
                    published = await publish_paced(bus, ids, args.dispatch_rate)
                    publisher_cpu = time.process_time() - cpu0
                    await bus.close()
                    sent = await sent_times(stack.database("delivery"), n)
                    cpu = watch.used()
                    await rss.stop()
                    if args.pg_statements:
                        for service in ("delivery", "profile"):
                            await print_statements(stack.database(service), f"relevans_{service}", n)
        finally:
            assert sink.stdin is not None
            sink.stdin.close()
            await sink.wait()
            shutil.rmtree(mail, ignore_errors=True)
    cpu["publisher"] = publisher_cpu
    latencies = sorted(sent[k] - published[k] for k in sent if k in published)
    if not latencies:
        print("dispatch: no mail was sent")
        return
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
    rate = len(sent) / (max(sent.values()) - min(published.values()))
    print()
    print(
        f"raw  SMTP client alone -> sink ({Settings.smtp_connections} connections): {raw_rate:8,.0f} mails/s"
    )
    print(f"      CPU µs per mail: client {raw_cpu / n * 1e6:.0f}")
    print(
        f"ours requests -> delivery -> sink, {len(sent):,} of {n:,} sent: {rate:8,.0f} mails/s "
        f"(offered {args.dispatch_rate:,.0f}/s)"
    )
    print(
        f"      fired -> sent: p50 {q[49] * 1000:.0f}  p95 {q[94] * 1000:.0f}  p99 {q[98] * 1000:.0f} ms"
        "   (target: >= 2,000 mails/s, p99 <= 1 s)"
    )
    machine = cpu.pop("machine")
    parts = ", ".join(
        f"{'delivery' if k == 'service' else k} {v / len(sent) * 1e6:.0f}" for k, v in cpu.items()
    )
    print(f"      CPU µs per mail: {parts}   (the box: {machine / len(sent) * 1e6:.0f})")
    print(f"ratio ours/raw: {rate / raw_rate:.2f}")
    print(f"delivery peak RSS: {rss.peak_mb:.0f} MB (target <= 200 MB)")


# ---- the parts ------------------------------------------------------------------------------------


async def all_serving(delivery: Service, processes: int, timeout_s: float = 300.0) -> list[int]:
    """The pids of the service's `processes` processes, once each listens on its port (the first
    starts the others, which load every banner before they listen)."""
    port = int(delivery.target.rsplit(":", 1)[1])
    root = psutil.Process(delivery.process.pid)
    deadline = time.monotonic() + timeout_s
    while True:
        procs = [root, *root.children()]
        listening = [
            p
            for p in procs
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in p.net_connections("tcp"))
        ]
        if len(listening) == processes:
            return [p.pid for p in listening]
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(listening)} of {processes} delivery processes listen")
        await asyncio.sleep(0.2)


async def banner_part(args: argparse.Namespace, folder: Path) -> None:
    async with embedded_stack(folder, ("delivery",)) as stack:
        copied = await write_banners(stack.database("delivery"), args.profiles)
        print(f"{args.profiles:,} banners written with COPY in {copied:.1f} s")
        rss = PeakRss()
        started = time.perf_counter()
        # an HTTP port no other run on the machine holds (the default port is one for all)
        os.environ[env_name("delivery_http_listen")] = f"127.0.0.1:{free_port()}"
        os.environ[env_name("delivery_processes")] = str(args.processes)
        async with service_process(stack, "delivery", SECRET) as delivery:
            pids = await all_serving(delivery, args.processes)
            print(
                f"{args.processes} delivery process(es) serving after {time.perf_counter() - started:.1f} s"
                " (banners loaded at start)"
            )
            rss.watch(delivery.process.pid)
            watch = CpuWatch(stack_processes(stack, delivery))
            target = delivery.target
            idle_mb = largest_rss_mb(delivery.process.pid)
            await run_load(args, target, "echo", watch)  # warm both sides up
            runs = []
            for _ in range(args.rounds):  # alternating, so that both see the box alike
                runs.append((await run_load(args, target, "echo", watch), watch.loop_busy()))
                runs.append((await run_load(args, target, "banner", watch), watch.loop_busy()))
            await asyncio.sleep(1.0)
            after_mb = max(largest_rss_mb(pid) for pid in pids)
            await rss.stop()
        del os.environ[env_name("delivery_processes")]
    print()
    for i in range(0, len(runs), 2):
        (echo, echo_busy), (ours, ours_busy) = runs[i], runs[i + 1]
        if args.rounds > 1:
            print(f"round {i // 2 + 1}:")
        print(echo.line("raw  no-op gRPC (health Check):"))
        print(echo.cpu_line() + f"   busiest event loop {echo_busy:.0%}")
        print(ours.line("ours GetBanner:"))
        print(ours.cpu_line() + f"   busiest event loop {ours_busy:.0%}")
        print(f"      answered with a banner: {ours.found:,} of {ours.calls:,} (a tenth ask for nobody)")
        print(
            f"ratio p99 ours/no-op gRPC: {ours.p99 / max(echo.p99, 1e-9):.2f}   "
            f"p50: {ours.p50 / max(echo.p50, 1e-9):.2f}   (target: p99 <= 2 ms at 2,000/s)"
        )
    print(
        f"delivery RSS ({args.processes} process(es), the largest): {idle_mb:.0f} MB holding "
        f"{args.profiles:,} banners before the load, {after_mb:.0f} MB after it, peak {rss.peak_mb:.0f} MB "
        "(target <= 200 MB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--profiles", type=int, default=100_000, help="people holding a banner")
    parser.add_argument("--rate", type=float, default=2_000.0, help="GetBanner calls per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the load runs")
    parser.add_argument("--channels", type=int, default=2, help="HTTP/2 connections of the load process")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="RELEVANS_DELIVERY_PROCESSES: each holds every banner and takes its share of the requests; "
        "the kernel spreads the load's connections over them",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="banner part: empty method, then GetBanner, N times"
    )
    parser.add_argument("--mails", type=int, default=20_000, help="delivery requests of the dispatch part")
    parser.add_argument("--dispatch-rate", type=float, default=2_000.0, help="delivery requests per second")
    parser.add_argument(
        "--pg-statements",
        action="store_true",
        help="dispatch: load pg_stat_statements and print the costliest statements per mail",
    )
    parser.add_argument("--sink", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--mail-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["banner", "echo"], default="banner", help=argparse.SUPPRESS)
    parser.add_argument("--target", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        Path(args.worker).write_text(json.dumps(uvloop.run(load(args))))
        return
    if args.sink:
        uvloop.run(run_sink(args.sink, Path(args.mail_dir)))
        return
    parts = PARTS if args.part == "all" else (args.part,)
    with tempfile.TemporaryDirectory(prefix="relevans-bench-delivery-") as tmp:
        for part in parts:
            if part == "dispatch":
                uvloop.run(dispatch_part(args, Path(tmp) / part))
            if part == "banner":
                uvloop.run(banner_part(args, Path(tmp) / part))


if __name__ == "__main__":
    main()
