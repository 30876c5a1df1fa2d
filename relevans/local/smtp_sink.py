"""A local SMTP server that keeps every mail it receives as a `.eml` file.

The delivery service sends real SMTP; in `relevans up` and in the tests this sink
receives it, so a person (or `relevans demo`, from another process) can read the
mails from a folder. It runs on the caller's event loop, not in a thread.

It speaks the part of SMTP a mail client sends (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT, with
PIPELINING) as one asyncio protocol per connection: aiosmtpd took ~0.9 ms of CPU a mail, more than
the delivery service spends sending it, so the sink was the limit of every dispatch measurement.

Given an `SmtpScript`, it answers as a real server sometimes does instead of accepting:
a recipient's first RCPTs refused (451 greylisting, 550 no such mailbox), or each
message's first DATA answered 451, so retries and bounces can be tested end to end.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path
from types import TracebackType
from typing import cast

import structlog

from relevans.local.http_stand_in import write_atomically

log = structlog.get_logger(__name__)


def read_mail_dir(mail_dir: Path) -> list[EmailMessage]:
    """Every mail stored in `mail_dir`, oldest first (file names sort by arrival)."""
    if not mail_dir.is_dir():
        return []
    parser = BytesParser(policy=default_policy)
    messages: list[EmailMessage] = []
    for path in sorted(mail_dir.glob("*.eml")):
        with path.open("rb") as f:
            messages.append(parser.parse(f))
    return messages


_MESSAGE_ID = re.compile(rb"^Message-ID:\s*(\S+)", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class SmtpScript:
    """Replies the sink gives instead of accepting, attempt by attempt; once a list runs out it
    accepts. `rcpt`: per recipient address (lower case), the replies to its successive RCPT
    commands, e.g. ["451 4.7.1 greylisted", "451 4.7.1 greylisted"] or ["550 5.1.1 no such
    user"] * 100; `data`: the replies to the successive DATA of each message (told apart by its
    Message-ID header), the same for every message."""

    rcpt: Mapping[str, Sequence[str]] = field(default_factory=dict)
    data: Sequence[str] = ()


class _Store:
    """What every connection of one sink shares: where mail goes, the script, and what it saw."""

    def __init__(self, mail_dir: Path, script: SmtpScript) -> None:
        self.mail_dir = mail_dir
        self.script = script
        self._counter = itertools.count(1)
        # RCPT commands per recipient and DATA commands per Message-ID seen so far.
        self.rcpt_attempts: Counter[str] = Counter()
        self.data_attempts: Counter[bytes] = Counter()

    def rcpt(self, address: str) -> str:
        key = address.lower()
        replies = self.script.rcpt.get(key, ())
        attempt = self.rcpt_attempts[key]
        self.rcpt_attempts[key] += 1
        return replies[attempt] if attempt < len(replies) else "250 OK"

    def data(self, content: bytes, recipients: Sequence[str]) -> str:
        """One file per accepted DATA, written before the 250 reply (a few KB to the page cache:
        cheaper written here than handed to a thread)."""
        if self.script.data:
            found = _MESSAGE_ID.search(content)
            message_id = found.group(1) if found else b""
            attempt = self.data_attempts[message_id]
            self.data_attempts[message_id] += 1
            if attempt < len(self.script.data):
                return self.script.data[attempt]
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        path = self.mail_dir / f"{stamp}-{next(self._counter):06d}.eml"
        write_atomically(path, content)
        log.info("smtp sink stored mail", path=str(path), to=list(recipients))
        return "250 OK"


_GREETING = b"220 relevans-smtp-sink ESMTP\r\n"
_EHLO = "250-relevans-smtp-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 33554432"
_END_OF_DATA = b"\r\n.\r\n"
_ADDRESS = re.compile(r"^\s*<([^>]*)>", re.ASCII)
MAX_LINE = 4096


def _address(argument: str, prefix: str) -> str | None:
    """The address of `FROM:<a@b> ...` / `TO:<a@b>`, None when the argument is not of that form."""
    if argument[: len(prefix)].upper() != prefix:
        return None
    found = _ADDRESS.match(argument[len(prefix) :])
    return found.group(1) if found else None


class _Session(asyncio.Protocol):
    """One SMTP connection: the commands a mail client sends (RFC 5321, with PIPELINING), read from
    whatever arrives, each answered in order."""

    def __init__(self, store: _Store, sessions: set[_Session]) -> None:
        self.store = store
        self.sessions = sessions
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.greeted = False
        self.sender: str | None = None
        self.recipients: list[str] = []
        self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        self.sessions.add(self)
        self.transport.write(_GREETING)

    def connection_lost(self, exc: Exception | None) -> None:
        self.sessions.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        replies: list[bytes] = []
        while self.transport is not None:
            if self.in_data:
                if not self._take_content(replies):
                    break
                continue
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > MAX_LINE:
                    replies.append(b"500 Error: line too long\r\n")
                    self.buffer.clear()
                break
            line = self.buffer[:end].rstrip(b"\r").decode("utf-8", errors="replace")
            del self.buffer[: end + 1]
            reply = self._command(line)
            replies.append(reply.encode() + b"\r\n")
            if reply.startswith("221"):
                self.transport.write(b"".join(replies))
                self.transport.close()
                return
        if replies and self.transport is not None:
            self.transport.write(b"".join(replies))

    def _take_content(self, replies: list[bytes]) -> bool:
        """The mail's content once its terminating dot has arrived (dot-stuffing undone)."""
        if self.buffer.startswith(b".\r\n"):
            content, rest = b"", 3
        else:
            end = self.buffer.find(_END_OF_DATA)
            if end < 0:
                return False
            content, rest = bytes(self.buffer[: end + 2]), end + 5
        del self.buffer[:rest]
        content = content.replace(b"\r\n..", b"\r\n.")
        if content.startswith(b".."):
            content = content[1:]
        self.in_data = False
        replies.append(self.store.data(content, self.recipients).encode() + b"\r\n")
        self._reset()
        return True

    def _reset(self) -> None:
        self.sender = None
        self.recipients = []

    def _command(self, line: str) -> str:
        verb, _, argument = line.partition(" ")
        verb = verb.upper()
        if verb in ("EHLO", "HELO"):
            self.greeted = True
            self._reset()
            return _EHLO if verb == "EHLO" else "250 relevans-smtp-sink"
        if verb == "NOOP":
            return "250 OK"
        if verb == "QUIT":
            return "221 Bye"
        if verb == "RSET":
            self._reset()
            return "250 OK"
        if verb == "MAIL":
            if not self.greeted:
                return "503 Error: send HELO first"
            if self.sender is not None:
                return "503 Error: nested MAIL command"
            sender = _address(argument, "FROM:")
            if sender is None:
                return "501 Syntax: MAIL FROM: <address>"
            self.sender = sender
            return "250 OK"
        if verb == "RCPT":
            if self.sender is None:
                return "503 Error: need MAIL command"
            recipient = _address(argument, "TO:")
            if not recipient:
                return "501 Syntax: RCPT TO: <address>"
            reply = self.store.rcpt(recipient)
            if reply.startswith("250"):
                self.recipients.append(recipient)
            return reply
        if verb == "DATA":
            if not self.recipients:
                return "503 Error: need RCPT command"
            self.in_data = True
            return "354 End data with <CR><LF>.<CR><LF>"
        return f'500 Error: command "{verb[:20]}" not recognized'


class SmtpSink:
    """SMTP server on `host:port` (0 picks a free port, see `port` after start) storing mail in
    `mail_dir`, answering as `script` says first."""

    def __init__(
        self, mail_dir: Path, host: str = "127.0.0.1", port: int = 0, script: SmtpScript | None = None
    ) -> None:
        self.mail_dir = Path(mail_dir)
        self.host = host
        self.port = port
        self._store = _Store(self.mail_dir, script or SmtpScript())
        self._server: asyncio.Server | None = None
        self._sessions: set[_Session] = set()  # open connections

    async def start(self) -> None:
        if self._server is not None:
            return
        self.mail_dir.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Session(self._store, self._sessions), self.host, self.port
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("smtp sink listening", port=self.port, mail_dir=str(self.mail_dir))

    async def stop(self) -> None:
        server = self._server
        if server is None:
            return
        self._server = None
        server.close()
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()
        await server.wait_closed()

    async def __aenter__(self) -> SmtpSink:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def messages(self) -> list[EmailMessage]:
        return read_mail_dir(self.mail_dir)

    def rcpt_attempts(self, address: str) -> int:
        """How many RCPT commands named `address` so far."""
        return self._store.rcpt_attempts[address.lower()]
