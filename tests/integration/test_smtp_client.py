"""Delivery's SMTP client against real servers over loopback: aiosmtpd (an implementation not our
own), the local sink (pipelined), and scripted servers that refuse, fall back and break."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from relevans.local.smtp_sink import SmtpSink
from services.delivery.channels.smtp_client import SmtpError, SmtpSession, UnusableAddress
from services.delivery.domain import SendFailure
from services.delivery.domain.channels.email import EmailChannel

CONTENT = b"Subject: hi\r\n\r\n.a line with a leading dot\nand a bare LF\r\n"


class _Keep:
    def __init__(self) -> None:
        self.contents: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.contents.append(envelope.content)
        return "250 OK kept"


async def test_a_mail_through_aiosmtpd_arrives_as_written() -> None:
    loop = asyncio.get_running_loop()
    keep = _Keep()
    server = await loop.create_server(lambda: SMTP(keep, hostname="other", loop=loop), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        session = await SmtpSession.open("127.0.0.1", port, local_hostname="relevans.local", timeout_s=5)
        await session.begin("no-reply@relevans.local", "ada@example.com")
        assert (await session.content(CONTENT)).startswith("250 OK kept")
        await session.quit()
    finally:
        server.close()
        await server.wait_closed()
    assert keep.contents == [b"Subject: hi\r\n\r\n.a line with a leading dot\r\nand a bare LF\r\n"]


async def test_pipelined_mails_to_the_sink_share_one_session(tmp_path: Path) -> None:
    async with SmtpSink(tmp_path / "mail") as sink:
        session = await SmtpSession.open("127.0.0.1", sink.port, local_hostname="relevans.local", timeout_s=5)
        assert session.pipelining
        for _ in range(3):
            await session.begin("no-reply@relevans.local", "ada@example.com")
            await session.content(CONTENT)
        await session.quit()
        assert len(sink.messages()) == 3


@asynccontextmanager
async def scripted(answer: Callable[[str], str | None]) -> AsyncIterator[int]:
    """A server greeting with 220 and answering each command line with `answer(line)` (None: close
    the connection); after a 354 it reads the content up to the final dot and answers it with
    `answer("<content>")`."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 scripted\r\n")
        in_data = False
        while line := await reader.readline():
            text = line.decode().rstrip("\r\n")
            if in_data:
                if text != ".":
                    continue
                text, in_data = "<content>", False
            reply = answer(text)
            if reply is None:
                break
            in_data = reply.startswith("354")
            writer.write(reply.encode() + b"\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def _plain_server(
    data_command: str = "354 go on", content: str | None = "250 taken"
) -> Callable[[str], str | None]:
    """No EHLO (502, so the client says HELO and sends command by command)."""

    def answer(line: str) -> str | None:
        verb = line.split(" ", 1)[0].upper()
        replies = {"EHLO": "502 not here", "HELO": "250 hello", "MAIL": "250 ok", "RCPT": "250 ok"}
        if verb in replies:
            return replies[verb]
        if verb == "DATA":
            return data_command
        if line == "<content>":
            return content
        return "221 bye" if verb == "QUIT" else "250 ok"

    return answer


async def test_a_server_without_ehlo_gets_helo_and_one_command_at_a_time() -> None:
    async with scripted(_plain_server()) as port:
        session = await SmtpSession.open("127.0.0.1", port, local_hostname="relevans.local", timeout_s=5)
        assert not session.pipelining
        await session.begin("no-reply@relevans.local", "ada@example.com")
        assert await session.content(CONTENT) == "250 taken"
        await session.quit()


async def test_a_refused_data_command_is_permanent_and_nothing_of_the_content_went_out() -> None:
    async with scripted(_plain_server(data_command="554 5.5.1 no valid recipients")) as port:
        session = await SmtpSession.open("127.0.0.1", port, local_hostname="relevans.local", timeout_s=5)
        with pytest.raises(SmtpError) as refused:
            await session.begin("no-reply@relevans.local", "ada@example.com")
    error = refused.value
    assert (error.stage, error.code) == ("data_command", 554)
    assert EmailChannel().classify(SendFailure(error.stage, error.code, error.message)) == "permanent"


async def test_a_session_broken_after_the_content_is_of_unknown_outcome() -> None:
    async with scripted(_plain_server(content=None)) as port:
        session = await SmtpSession.open("127.0.0.1", port, local_hostname="relevans.local", timeout_s=5)
        await session.begin("no-reply@relevans.local", "ada@example.com")
        with pytest.raises(SmtpError) as broken:
            await session.content(CONTENT)
    error = broken.value
    assert (error.stage, error.code) == ("data", None)
    assert EmailChannel().classify(SendFailure(error.stage, error.code, error.message)) == "unknown"
    assert not session.is_open


async def test_an_address_that_would_inject_a_command_is_refused_before_anything_is_written() -> None:
    seen: list[str] = []

    def answer(line: str) -> str | None:
        seen.append(line)
        return _plain_server()(line)

    async with scripted(answer) as port:
        session = await SmtpSession.open("127.0.0.1", port, local_hostname="relevans.local", timeout_s=5)
        for address in ("ada@example.com>\r\nRCPT TO:<eve@example.com", "åse@example.com"):
            with pytest.raises(UnusableAddress):
                await session.begin("no-reply@relevans.local", address)
        await session.quit()
    assert [line.split(" ")[0] for line in seen] == ["EHLO", "HELO", "QUIT"]
