"""A local SMTP server that keeps every mail it receives as a `.eml` file.

The delivery service sends real SMTP; in `relevans up` and in the tests this sink
receives it, so a person (or `relevans demo`, from another process) can read the
mails from a folder. It runs on the caller's event loop, not in a thread.

Given an `SmtpScript`, it answers as a real server sometimes does instead of accepting:
a recipient's first RCPTs refused (451 greylisting, 550 no such mailbox), or each
message's first DATA answered 451, so retries and bounces can be tested end to end.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import weakref
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
from aiosmtpd.smtp import SMTP

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


class _StoreHandler:
    """aiosmtpd handler: one file per accepted DATA, written before the 250 reply; the script's
    replies instead, while it has some for the recipient or message."""

    def __init__(self, mail_dir: Path, script: SmtpScript) -> None:
        self.mail_dir = mail_dir
        self.script = script
        self._counter = itertools.count(1)
        # RCPT commands per recipient and DATA commands per Message-ID seen so far.
        self.rcpt_attempts: Counter[str] = Counter()
        self.data_attempts: Counter[bytes] = Counter()

    async def handle_RCPT(
        self, server: SMTP, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        key = address.lower()
        replies = self.script.rcpt.get(key, ())
        attempt = self.rcpt_attempts[key]
        self.rcpt_attempts[key] += 1
        if attempt < len(replies):
            return replies[attempt]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        content = envelope.content
        if isinstance(content, str):
            content = content.encode("utf-8", errors="surrogateescape")
        if self.script.data:
            found = _MESSAGE_ID.search(content or b"")
            message_id = found.group(1) if found else b""
            attempt = self.data_attempts[message_id]
            self.data_attempts[message_id] += 1
            if attempt < len(self.script.data):
                return self.script.data[attempt]
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        path = self.mail_dir / f"{stamp}-{next(self._counter):06d}.eml"
        await asyncio.to_thread(write_atomically, path, content or b"")
        log.info("smtp sink stored mail", path=str(path), to=list(envelope.rcpt_tos))
        return "250 OK"


class SmtpSink:
    """SMTP server on `host:port` (0 picks a free port, see `port` after start) storing mail in
    `mail_dir`, answering as `script` says first."""

    def __init__(
        self, mail_dir: Path, host: str = "127.0.0.1", port: int = 0, script: SmtpScript | None = None
    ) -> None:
        self.mail_dir = Path(mail_dir)
        self.host = host
        self.port = port
        self._handler = _StoreHandler(self.mail_dir, script or SmtpScript())
        self._server: asyncio.Server | None = None
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()  # open connections

    async def start(self) -> None:
        if self._server is not None:
            return
        self.mail_dir.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()

        def protocol() -> SMTP:
            smtp = SMTP(self._handler, hostname="relevans-smtp-sink", loop=loop)
            self._sessions.add(smtp)
            return smtp

        self._server = await loop.create_server(protocol, self.host, self.port)
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
        return self._handler.rcpt_attempts[address.lower()]
