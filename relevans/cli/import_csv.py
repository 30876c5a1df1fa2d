"""`relevans import FILE.csv`: stream a CSV file of profiles into profile's ImportProfiles.

The file is read as it is sent, in batches of 500 rows, so its size does not matter. The
first line names the columns; `--map column=field` says which column holds what:

    customer_id, email, first_name, last_name, phone   the profile's fields
    tag                                                a tag (several columns may map to it)
    marketing_consent                                  yes/no, true/false, 1/0 (empty: unknown)
    trait:NAME                                         backend trait NAME
    -                                                  ignore the column

Row numbers count the header as row 1, as a spreadsheet does. A row the file itself gets
wrong (a wrong number of columns, an unreadable consent value) is reported like the rows
the service rejects. Exit status: 0 when every row was imported, 1 when some were not,
2 when the import could not run.
"""

from __future__ import annotations

import asyncio
import csv
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, TextIO

import grpc
from rich import box
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from relevans.cli.console import console, print_table, quiet_broken_pipe, say
from relevans.common.v1 import common_pb2
from relevans.kit.grpc_client import bearer
from relevans.profile.v1 import profile_pb2, profile_pb2_grpc

BATCH_ROWS = 500
SHOWN_ERRORS = 20
CONNECT_TIMEOUT = 10.0  # seconds to reach profile before saying it cannot be reached
FIELDS = ("customer_id", "email", "first_name", "last_name", "phone", "tag", "marketing_consent")
DEFAULT_MAP = {
    "customer_id": "customer_id",
    "email": "email",
    "first_name": "first_name",
    "last_name": "last_name",
    "phone": "phone",
    "show": "tag",
    "tag": "tag",
    "marketing_consent": "marketing_consent",
    "address": "trait:address",
}
YES = {"yes", "y", "true", "1", "ja"}
NO = {"no", "n", "false", "0", "nej"}


class UsageError(ValueError):
    """The command line or the file's header cannot work."""


def parse_mapping(items: Sequence[str]) -> dict[str, str]:
    """`column=field` pairs over the defaults; column names are matched case-insensitively."""
    mapping = dict(DEFAULT_MAP)
    for item in items:
        column, sep, target = item.partition("=")
        column, target = column.strip().lower(), target.strip()
        if not sep or not column:
            raise UsageError(f"--map {item!r}: expected column=field")
        if target != "-" and target not in FIELDS and not (target.startswith("trait:") and target[6:]):
            raise UsageError(f"--map {item!r}: field must be one of {', '.join(FIELDS)}, trait:NAME or -")
        mapping[column] = target
    return mapping


@dataclass
class RowError:
    row_number: int
    field: str
    reason: str


@dataclass
class Summary:
    rows_read: int = 0
    rows_upserted: int = 0
    rows_failed: int = 0
    profiles_created: int = 0
    errors: list[RowError] = field(default_factory=list)
    seconds: float = 0.0


class _Counting:
    """The file's lines, counting the characters read (for the progress bar)."""

    def __init__(self, f: TextIO) -> None:
        self.f = f
        self.read = 0

    def __iter__(self) -> Iterator[str]:
        for line in self.f:
            self.read += len(line)
            yield line


class CsvRows:
    """The file's data rows as ImportRows; rows the file gets wrong go to `errors`."""

    def __init__(self, f: TextIO, mapping: Mapping[str, str], source: str) -> None:
        self.lines = _Counting(f)
        self.reader = csv.reader(self.lines)
        self.source = source
        self.errors: list[RowError] = []
        self.read = 0
        try:
            header = next(self.reader)
        except StopIteration:
            raise UsageError("the file is empty; the first line must name the columns") from None
        except csv.Error as exc:
            raise UsageError(f"cannot read the header: {exc}") from None
        self.width = len(header)
        self.columns = [mapping.get(name.strip().lower(), "-") for name in header]
        self.ignored = [name for name, target in zip(header, self.columns, strict=True) if target == "-"]
        if not {"customer_id", "email"} & set(self.columns):
            raise UsageError(
                f"no column holds customer_id or email (columns: {', '.join(header)}); use --map column=email"
            )

    def __iter__(self) -> Iterator[profile_pb2.ImportRow]:
        row_number = 1
        while True:
            try:
                values = next(self.reader)
            except StopIteration:
                return
            except csv.Error as exc:
                row_number += 1
                self.read += 1
                self.errors.append(RowError(row_number, "", f"cannot be read as CSV: {exc}"))
                continue
            row_number += 1
            if not values:  # a blank line
                continue
            self.read += 1
            if len(values) != self.width:
                self.errors.append(
                    RowError(row_number, "", f"has {len(values)} columns, the header has {self.width}")
                )
                continue
            row = self._row(row_number, values)
            if row is not None:
                yield row

    def _row(self, row_number: int, values: list[str]) -> profile_pb2.ImportRow | None:
        row = profile_pb2.ImportRow(row_number=row_number)
        for target, value in zip(self.columns, values, strict=True):
            value = value.strip()
            if target == "-" or not value:
                continue
            if target == "tag":
                row.tags.append(value)
            elif target.startswith("trait:"):
                row.traits[target[6:]] = value
            elif target == "marketing_consent":
                answer = value.lower()
                if answer not in YES and answer not in NO:
                    self.errors.append(
                        RowError(row_number, "marketing_consent", "must be yes/no, true/false or 1/0")
                    )
                    return None
                row.marketing_email_consent.CopyFrom(
                    profile_pb2.ConsentInput(
                        purpose=common_pb2.PURPOSE_MARKETING,
                        channel=common_pb2.CHANNEL_EMAIL,
                        status=common_pb2.CONSENT_STATUS_GRANTED
                        if answer in YES
                        else common_pb2.CONSENT_STATUS_DENIED,
                        source=self.source,
                    )
                )
            else:
                setattr(row, target, value)
        return row


class ImportProgress:
    """A rich progress bar of the file read so far, on stderr when it is a terminal; silent otherwise."""

    def __init__(self, err: IO[str], total_chars: int, enabled: bool) -> None:
        self.bar = Progress(
            TextColumn("importing"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rows]:,} rows"),
            TimeElapsedColumn(),
            console=console(err),
            disable=not enabled,
            transient=False,
        )
        self.task = self.bar.add_task("import", total=max(total_chars, 1), rows=0)

    def __enter__(self) -> ImportProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def update(self, rows: int, chars: int) -> None:
        self.bar.update(self.task, completed=chars, rows=rows)


async def _connected(channel: grpc.aio.Channel, timeout: float) -> bool:
    """Whether the channel connects: False at its first failed attempt (a refused connection) or
    after `timeout` seconds, so an unreachable service is said at once, before any row is sent."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    state = channel.get_state(try_to_connect=True)
    while state != grpc.ChannelConnectivity.READY:
        if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE or loop.time() >= deadline:
            return False
        try:
            await asyncio.wait_for(channel.wait_for_state_change(state), deadline - loop.time())
        except TimeoutError:
            return False
        state = channel.get_state(try_to_connect=True)
    return True


async def run_import(
    f: TextIO,
    path: str,
    *,
    target: str,
    token: str,
    source: str,
    mapping: Mapping[str, str],
    out: IO[str],
    err: IO[str],
    batch_rows: int = BATCH_ROWS,
) -> tuple[int, Summary]:
    """Import the file; the exit status and the summary (also printed to `out`)."""
    started = time.monotonic()
    rows = CsvRows(f, mapping, source)
    if rows.ignored:
        print(f"ignoring columns: {', '.join(rows.ignored)}", file=err)
    progress = ImportProgress(err, os.path.getsize(path), err.isatty())
    sent = [0]  # batches handed to gRPC

    async def requests() -> AsyncIterator[profile_pb2.ImportProfilesRequest]:
        batch = profile_pb2.ImportProfilesRequest(source=source)
        for row in rows:
            batch.rows.append(row)
            if len(batch.rows) >= batch_rows:
                sent[0] += 1
                yield batch
                progress.update(rows.read, rows.lines.read)
                batch = profile_pb2.ImportProfilesRequest()
        if batch.rows or batch.source:
            sent[0] += 1
            yield batch

    with progress:
        async with grpc.aio.insecure_channel(
            target, options=[("grpc.max_send_message_length", 8 * 1024 * 1024)]
        ) as channel:
            stub = profile_pb2_grpc.ProfileServiceStub(channel)
            if not await _connected(channel, CONNECT_TIMEOUT):
                raise ImportFailed(None, target, 0)
            try:
                reply: profile_pb2.ImportProfilesResponse = await stub.ImportProfiles(
                    requests(), metadata=bearer(token)
                )
            except grpc.aio.AioRpcError as exc:
                raise ImportFailed(exc, target, sent[0]) from None
        progress.update(rows.read, rows.lines.read)
    summary = Summary(
        rows_read=rows.read,
        rows_upserted=reply.rows_upserted,
        rows_failed=reply.rows_failed + len(rows.errors),
        profiles_created=reply.profiles_created,
        errors=sorted(
            [*rows.errors, *(RowError(e.row_number, e.field, e.reason) for e in reply.errors)],
            key=lambda e: e.row_number,
        ),
        seconds=time.monotonic() - started,
    )
    print_summary(path, summary, out)
    return (0 if summary.rows_failed == 0 else 1), summary


def print_summary(path: str, s: Summary, out: IO[str]) -> None:
    """The counts in one line, then the rows that were not imported as a table (row, field, problem)."""
    rate = s.rows_read / s.seconds if s.seconds > 0 else 0.0
    screen = console(out)
    screen.print(
        f"{path}: {s.rows_read:,} rows read, {s.rows_upserted:,} imported, {s.rows_failed:,} failed, "
        f"{s.profiles_created:,} profiles created ({s.seconds:.1f} s, {rate:,.0f} rows/s)",
        markup=False,
    )
    if not s.errors:
        return
    shown = f" (the first {SHOWN_ERRORS})" if len(s.errors) > SHOWN_ERRORS else ""
    screen.print(f"rows not imported{shown}:", markup=False)
    table = Table("row", "field", "problem", box=box.SIMPLE_HEAD)
    for e in s.errors[:SHOWN_ERRORS]:
        table.add_row(str(e.row_number), e.field or "(row)", e.reason)
    print_table(table, out)
    more = len(s.errors) - SHOWN_ERRORS
    if more > 0:
        screen.print(f"... and {more:,} more rows not imported", markup=False)


class ImportFailed(Exception):
    """The ImportProfiles call failed; says whether anything can have been imported."""

    def __init__(self, error: grpc.aio.AioRpcError | None, target: str, batches_sent: int) -> None:
        """`error` None: the service could not be reached at all."""
        code = error.code() if error is not None else grpc.StatusCode.UNAVAILABLE
        if error is None:
            what = f"cannot reach profile at {target} (is the stack running? `relevans health` checks)"
        else:
            what = f"{code.name}: {error.details()}"
        refused_at_once = code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
        if refused_at_once or not batches_sent:
            after = "nothing was imported"
        else:
            after = (
                f"of the {batches_sent:,} batches of up to {BATCH_ROWS} rows sent, those the service "
                "received before the failure are imported; running the file again imports the rest "
                "and changes nothing else"
            )
        super().__init__(f"{what}; {after}")


def main(path: str, *, target: str, token: str, source: str, maps: Sequence[str]) -> int:
    """Runs the import; its exit status (see the module's docstring). Expected failures are one line."""
    if not token:
        say(
            "relevans import: needs a token with the ingest scope: --tenant-token TOKEN, RELEVANS_TOKEN, "
            "or a running `relevans up` (its dev token)"
        )
        return 2
    try:
        mapping = parse_mapping(maps)
        f = open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115 (closed below, read errors apart)
    except UsageError as exc:
        say(f"relevans import: {exc}")
        return 2
    except OSError as exc:
        say(f"relevans import: cannot read {path}: {exc.strerror or exc}")
        return 2
    try:
        with f:
            status, _ = asyncio.run(
                run_import(
                    f,
                    path,
                    target=target,
                    token=token,
                    source=source,
                    mapping=mapping,
                    out=sys.stdout,
                    err=sys.stderr,
                )
            )
    except BrokenPipeError:  # the reader of the output went away (`| head -1`); the import itself ran
        quiet_broken_pipe()
        return 1
    except (UsageError, ImportFailed) as exc:
        say(f"relevans import: {exc}")
        return 2
    except (OSError, UnicodeDecodeError) as exc:
        say(f"relevans import: cannot read {path}: {getattr(exc, 'strerror', None) or exc}")
        return 2
    return status
