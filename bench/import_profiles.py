"""`relevans import` of a nightly ticketing file vs the raw limit, measured in the same run.

Ours: the real `relevans import FILE.csv` command (its own process) against a separate
`relevans serve profile` process — every row validated, profiles upserted by customer_id
or email, identifiers bound, tags, a backend trait and marketing consent recorded (with a
ConsentChanged outbox message per decision) — timed from start to exit, then once more
for a re-run of the same file (which must change nothing).
Raw: asyncpg COPY of the same rows (as read from the file) into one plain table with a
column per CSV column.

    .venv/bin/python bench/import_profiles.py              # 500,000 rows
    .venv/bin/python bench/import_profiles.py --rows 100000
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import random
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psutil
from harness import embedded_stack, profile_service

from relevans.kit.auth import mint_token

SECRET = "bench-secret"
TENANT = "bench"
COLUMNS = ("customer_id", "email", "first_name", "last_name", "phone", "address", "show", "marketing_consent")
FIRST = ("Anna", "Erik", "Maria", "Johan", "Sara", "Lars", "Karin", "Peter", "Emma", "Olof", "Åsa", "Björn")
LAST = ("Berg", "Lund", "Nilsson", "Ek", "Holm", "Ström", "Dahl", "Wall", "Sjöberg", "Nyman", "Öberg")
DOMAINS = ("example.com", "mail.example.se", "Example.org", "post.example.net", "TELIA.example")
STREETS = ("Storgatan", "Kungsgatan", "Drottninggatan", "Vasagatan", "Sveavägen", "Götgatan")
CITIES = ("111 22 Stockholm", "411 19 Göteborg", "211 41 Malmö", "753 20 Uppsala")
SHOWS = ("Hamlet 2026-11-20", "Carmen 2026-11-22", "The Nutcracker 2026-12-01", "Swan Lake 2026-12-10")


def make_csv(path: Path, n: int, seed: int = 3) -> int:
    """A ticketing file of `n` rows: one ticket per row, a tenth of them a second ticket of an
    earlier buyer, about 1 % bad rows (bad email or phone, no key, a short line, a bad
    consent answer). Returns the number of distinct people among the good rows."""
    rnd = random.Random(seed)
    people: list[list[str]] = []
    good_people: set[int] = set()
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for _ in range(n):
            if people and rnd.random() < 0.1:
                j = rnd.randrange(len(people))
                row = list(people[j])
                row[6] = rnd.choice(SHOWS)
            else:
                j = len(people)
                first, last = rnd.choice(FIRST), rnd.choice(LAST)
                local = f"{first}.{last}{j}".lower().replace("å", "a").replace("ö", "o").replace("ä", "a")
                phone = rnd.choice(("+46 70 {} {} {}", "+4673{}{}{}", "+46 76-{} {} {}", ""))
                row = [
                    f"T-{100000 + j}" if rnd.random() < 0.8 else "",
                    f"{local.title() if rnd.random() < 0.2 else local}@{rnd.choice(DOMAINS)}",
                    first,
                    last,
                    phone.format(rnd.randint(100, 999), rnd.randint(10, 99), rnd.randint(10, 99)),
                    f"{rnd.choice(STREETS)} {rnd.randint(1, 99)}, {rnd.choice(CITIES)}",
                    rnd.choice(SHOWS),
                    rnd.choice(("yes", "no", "")),
                ]
                people.append(row)
            bad = rnd.random() < 0.01
            if bad:
                kind = rnd.randrange(5)
                row = list(row)
                if kind == 0:
                    row[1] = row[1].replace("@", " at ")
                elif kind == 1:
                    row[4] = "12345"
                elif kind == 2:
                    row[0] = row[1] = ""
                elif kind == 3:
                    row = row[:5]
                else:
                    row[7] = "maybe"
            else:
                good_people.add(j)
            w.writerow(row)
    return len(good_people)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process and its live children used so far."""
    p = psutil.Process(pid)
    return sum(sum(x.cpu_times()[:2]) for x in (p, *p.children(recursive=True)))


@dataclass
class Run:
    seconds: float
    summary: str
    # CPU seconds spent by the CLI, the profile service and PostgreSQL during the run: the
    # wall time on a busy machine varies, these say where the work went.
    cli_cpu: float
    service_cpu: float
    pg_cpu: float


async def run_cli(target: str, token: str, path: Path, service_pid: int, pg_pid: int) -> Run:
    cli_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    service_before, pg_before = cpu_seconds(service_pid), cpu_seconds(pg_pid)
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relevans.cli.main",
        "import",
        str(path),
        "--tenant-token",
        token,
        "--target",
        target,
        "--source",
        "ticketing-nightly",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    elapsed = time.perf_counter() - started
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"relevans import exited {proc.returncode}: {err.decode()}")
    cli = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Run(
        elapsed,
        out.decode().splitlines()[0],
        cli.ru_utime + cli.ru_stime - cli_before.ru_utime - cli_before.ru_stime,
        cpu_seconds(service_pid) - service_before,
        cpu_seconds(pg_pid) - pg_before,
    )


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError("no VmHWM")


async def raw(pg_url: str, path: Path) -> float:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader)
        records = [tuple(r) for r in reader if len(r) == len(COLUMNS)]
    conn = await asyncpg.connect(pg_url)
    await conn.execute("DROP TABLE IF EXISTS bench_raw_import")
    await conn.execute(
        "CREATE TABLE bench_raw_import (" + ", ".join(f"{c} text" for c in COLUMNS) + ")",
    )
    started = time.perf_counter()
    await conn.copy_records_to_table("bench_raw_import", records=records, columns=list(COLUMNS))
    elapsed = time.perf_counter() - started
    await conn.close()
    return elapsed


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--keep", help="copy the generated CSV file here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="relevans-bench-") as tmp:
        path = Path(tmp) / "tickets.csv"
        people = make_csv(path, args.rows)
        if args.keep:
            Path(args.keep).write_bytes(path.read_bytes())
        async with embedded_stack(Path(tmp)) as stack:
            async with profile_service(stack, SECRET) as svc:
                token = mint_token(SECRET, TENANT, ["ingest"])
                pg_pid = int((Path(tmp) / "pg" / "postmaster.pid").read_text().split()[0])
                first = await run_cli(svc.target, token, path, svc.process.pid, pg_pid)
                again = await run_cli(svc.target, token, path, svc.process.pid, pg_pid)
                rss_mb = peak_rss_mb(svc.process.pid)
            conn = await asyncpg.connect(stack.profile_db)
            profiles = await conn.fetchval("SELECT count(*) FROM profiles WHERE tenant_id = $1", TENANT)
            await conn.close()
            raw_s = await raw(stack.profile_db, path)

    n = args.rows
    print(f"rows {n:,} ({people:,} distinct people in the good rows; {profiles:,} profiles stored)")
    for name, r in (("first run", first), ("re-run", again)):
        print(f"  {name}: {r.summary}")
        print(
            f"    CPU seconds: cli {r.cli_cpu:.1f}, profile service {r.service_cpu:.1f}, "
            f"postgresql {r.pg_cpu:.1f}"
        )
    first_s, again_s = first.seconds, again.seconds
    limit_s = 60 * n / 500_000
    print(f"ours  relevans import, first run: {n / first_s:10,.0f} rows/s ({first_s:.1f} s)")
    print(f"ours  relevans import, re-run:    {n / again_s:10,.0f} rows/s ({again_s:.1f} s)")
    print(f"raw   asyncpg COPY of the rows:   {n / raw_s:10,.0f} rows/s ({raw_s:.1f} s)")
    print(f"ratio ours/raw (first run): {raw_s / first_s:.3f}")
    print(f"profile service peak RSS: {rss_mb:.0f} MB")
    print(f"machine load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    # A benchmark reports; it does not pass or fail (the exit status is 0 whatever it measured).
    for target, met in (
        (f"first run <= {limit_s:.0f} s", first_s <= limit_s),
        ("peak RSS <= 200 MB", rss_mb <= 200),
        ("one profile per distinct person", profiles == people),
    ):
        print(f"target {target}: {'met' if met else 'missed'}")


if __name__ == "__main__":
    asyncio.run(main())
