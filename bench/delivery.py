"""The delivery service vs the raw limits, each measured in the same run.

banner      `--profiles` (100,000) people each holding a banner (rows written with COPY into the
            delivery database, as web messages leave them), loaded by `relevans serve delivery` at
            start the way it always loads them; then `GetBanner` at `--rate` (2,000/s) for
            `--seconds` (10) from a load process of its own (bench/h2grpc.py), asking by profile id
            and by anonymous id, a tenth of them people without a banner: p50/p95/p99 of each call,
            send -> answer.
            Raw: the same open loop against an empty gRPC method of the same server (the health
            `Check`), measured in the same run: the ratio says what answering from the inbox adds.
memory      the delivery process's peak RSS while it holds the banners and answers.

    .venv/bin/python bench/delivery.py --part banner
    .venv/bin/python bench/delivery.py --part banner --profiles 5000 --seconds 2
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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import uvloop
from grpc_health.v1 import health_pb2
from h2grpc import CallError, Channel, request_headers
from harness import CpuWatch, PeakRss, embedded_stack, service_process, stack_processes

from relevans.delivery.v1 import delivery_pb2
from relevans.kit.auth import mint_token

SECRET = "bench-secret"
TENANT = "bench"
PLACEMENT = "cart-reminder"
GET_BANNER = "/relevans.delivery.v1.DeliveryService/GetBanner"
CHECK = "/grpc.health.v1.Health/Check"
PARTS = ("banner",)


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
    host, port = args.target.rsplit(":", 1)
    path = GET_BANNER if args.mode == "banner" else CHECK
    metadata = [("authorization", f"Bearer {mint_token(SECRET, TENANT, ['read'])}")]
    block = request_headers(args.target, path, metadata, timeout_s=10)
    channels = [await Channel.open(host, int(port), block) for _ in range(args.channels)]
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
    cmd = [
        *(sys.executable, __file__, "--worker", "--mode", mode, "--target", target),
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
    out = json.loads((await child.communicate())[0])
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


# ---- the parts ------------------------------------------------------------------------------------


async def banner_part(args: argparse.Namespace, folder: Path) -> None:
    async with embedded_stack(folder, ("delivery",)) as stack:
        copied = await write_banners(stack.database("delivery"), args.profiles)
        print(f"{args.profiles:,} banners written with COPY in {copied:.1f} s")
        rss = PeakRss()
        started = time.perf_counter()
        async with service_process(stack, "delivery", SECRET) as delivery:
            print(f"delivery serving after {time.perf_counter() - started:.1f} s (banners loaded at start)")
            rss.watch(delivery.process.pid)
            watch = CpuWatch(stack_processes(stack, delivery))
            await run_load(args, delivery.target, "echo", watch)  # warm both sides up
            echo = await run_load(args, delivery.target, "echo", watch)
            ours = await run_load(args, delivery.target, "banner", watch)
            await rss.stop()
    print()
    print(echo.line("raw  no-op gRPC (health Check):"))
    print(echo.cpu_line())
    print(ours.line("ours GetBanner:"))
    print(ours.cpu_line())
    print(f"      answered with a banner: {ours.found:,} of {ours.calls:,} (a tenth ask for nobody)")
    print(
        f"ratio p99 ours/no-op gRPC: {ours.p99 / max(echo.p99, 1e-9):.2f}   "
        f"p50: {ours.p50 / max(echo.p50, 1e-9):.2f}   (target: p99 <= 2 ms at 2,000/s)"
    )
    print(f"delivery peak RSS: {rss.peak_mb:.0f} MB with {args.profiles:,} banners (target <= 200 MB)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--profiles", type=int, default=100_000, help="people holding a banner")
    parser.add_argument("--rate", type=float, default=2_000.0, help="GetBanner calls per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the load runs")
    parser.add_argument("--channels", type=int, default=2, help="HTTP/2 connections of the load process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["banner", "echo"], default="banner", help=argparse.SUPPRESS)
    parser.add_argument("--target", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(uvloop.run(load(args))))
        return
    parts = PARTS if args.part == "all" else (args.part,)
    with tempfile.TemporaryDirectory(prefix="relevans-bench-delivery-") as tmp:
        for part in parts:
            if part == "banner":
                uvloop.run(banner_part(args, Path(tmp) / part))


if __name__ == "__main__":
    main()
