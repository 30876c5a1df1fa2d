"""A lean SMTP client for the email transport: one session, one mail at a time, the envelope pipelined.

Only what sending through a relay takes (RFC 5321): the greeting, EHLO (HELO when the server
refuses it), MAIL, RCPT and DATA — sent together when the server offers PIPELINING (RFC 2920) —
then the content once the caller has claimed the message, RSET, QUIT. aiosmtplib, which this
replaces, spent ~0.4 ms of CPU per mail on its command machinery, a third of everything the
delivery process spent per mail (bench/README.md, "Delivery, second pass").

Every failure is a `SmtpError` saying at which stage it came ("connect", "mail", "rcpt",
"data_command" — the reply to DATA, nothing of the content sent yet — or "data", the content on
the wire) and with which reply, if any; the transport classifies it (`EmailChannel.classify`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re

# Lines of the content that start with a dot get another (RFC 5321 4.5.2); bare LFs become CRLF.
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)
_BARE_LF = re.compile(rb"(?<!\r)\n")
_UNSAFE_IN_ADDRESS = re.compile(r"[\r\n<>\s]")


class SmtpError(Exception):
    """The session failed at `stage`: with the server's reply (`code`, `message`), or without one
    (`code` None: the connection broke, timed out or could not be made)."""

    def __init__(self, stage: str, code: int | None, message: str) -> None:
        super().__init__(f"{code} {message}".strip() if code is not None else message)
        self.stage = stage
        self.code = code
        self.message = message


class UnusableAddress(ValueError):
    """An address that cannot go into an SMTP command as it is (not ASCII, or a line break)."""


def _command_address(address: str) -> str:
    if not address.isascii() or _UNSAFE_IN_ADDRESS.search(address):
        raise UnusableAddress(f"address not usable in SMTP: {address!r}")
    return address


def wire_content(content: bytes) -> bytes:
    """The content as DATA carries it: CRLF line endings, dot-stuffed, ending with the final dot."""
    if content.count(b"\n") != content.count(b"\r\n"):  # mail as delivery writes it has none
        content = _BARE_LF.sub(b"\r\n", content)
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    if content.startswith(b".") or b"\n." in content:
        content = _LEADING_DOT.sub(b"..", content)
    return content + b".\r\n"


class SmtpSession:
    """An open SMTP session (`await SmtpSession.open(...)`). Each wait for a reply is bounded by
    `timeout_s`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout_s: float) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout_s = timeout_s
        self.pipelining = False

    @classmethod
    async def open(cls, host: str, port: int, *, local_hostname: str, timeout_s: float) -> SmtpSession:
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError) as exc:
            raise SmtpError("connect", None, f"{type(exc).__name__}: {exc}".strip()) from exc
        session = cls(reader, writer, timeout_s)
        try:
            await session._expect("connect", 220)
            session.writer.write(f"EHLO {local_hostname}\r\n".encode())
            code, lines = await session._reply("connect")
            if code == 250:
                session.pipelining = any(line.upper().startswith("PIPELINING") for line in lines[1:])
            else:
                session.writer.write(f"HELO {local_hostname}\r\n".encode())
                await session._expect("connect", 250)
        except BaseException:
            session.close()
            raise
        return session

    @property
    def is_open(self) -> bool:
        return not self.writer.is_closing()

    async def begin(self, sender: str, recipient: str) -> None:
        """MAIL FROM, RCPT TO and DATA (in one write when the server pipelines): afterwards the
        server waits for the content (`content`), which nothing but closing the session cancels."""
        mail = f"MAIL FROM:<{_command_address(sender)}>\r\n".encode()
        rcpt = f"RCPT TO:<{_command_address(recipient)}>\r\n".encode()
        if self.pipelining:
            self.writer.write(mail + rcpt + b"DATA\r\n")
            mail_reply, rcpt_reply = await self._reply("mail"), await self._reply("rcpt")
            data_reply = await self._reply("data_command")
            _check("mail", mail_reply, 250)
            _check("rcpt", rcpt_reply, 250, 251)
            _check("data_command", data_reply, 354)
        else:
            for command, stage, codes in ((mail, "mail", (250,)), (rcpt, "rcpt", (250, 251))):
                self.writer.write(command)
                await self._expect(stage, *codes)
            self.writer.write(b"DATA\r\n")
            await self._expect("data_command", 354)

    async def content(self, content: bytes) -> str:
        """The content after `begin`; the server's reply to the final dot ("250 ...")."""
        self.writer.write(wire_content(content))
        code, lines = await self._expect("data", 250)
        return f"{code} {' '.join(lines)}".strip()

    async def reset(self) -> None:
        self.writer.write(b"RSET\r\n")
        await self._expect("mail", 250)

    async def quit(self) -> None:
        """Say goodbye and close; a server that does not answer QUIT changes nothing (every mail of
        the session has its outcome already)."""
        with contextlib.suppress(SmtpError):
            self.writer.write(b"QUIT\r\n")
            await self._reply("quit")
        self.close()

    def close(self) -> None:
        self.writer.close()

    async def _expect(self, stage: str, *codes: int) -> tuple[int, list[str]]:
        return _check(stage, await self._reply(stage), *codes)

    async def _reply(self, stage: str) -> tuple[int, list[str]]:
        """One reply: its code and its lines' text (a multi-line reply ends at "NNN text")."""
        lines: list[str] = []
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    raw = await self.reader.readline()
                    if not raw.endswith(b"\n"):
                        raise SmtpError(stage, None, "connection closed by the server")
                    line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                    if len(line) < 3 or not line[:3].isdigit():
                        raise SmtpError(stage, None, f"malformed reply: {line[:100]!r}")
                    lines.append(line[4:])
                    if line[3:4] != "-":
                        return int(line[:3]), lines
        except SmtpError:
            self.close()
            raise
        except (OSError, TimeoutError) as exc:
            self.close()
            raise SmtpError(stage, None, f"{type(exc).__name__}: {exc}".strip()) from exc


def _check(stage: str, reply: tuple[int, list[str]], *codes: int) -> tuple[int, list[str]]:
    code, lines = reply
    if code not in codes:
        raise SmtpError(stage, code, " ".join(lines))
    return reply
