"""The local SMTP sink as a mail client meets it over a real socket: pipelined commands answered in
order, dot-stuffing undone, commands out of order refused, the script's replies first."""

from __future__ import annotations

import asyncio
from pathlib import Path

from relevans.local.smtp_sink import SmtpScript, SmtpSink, read_mail_dir


async def _replies(reader: asyncio.StreamReader, count: int) -> list[str]:
    """The next `count` replies (a multi-line reply counts once, by its last line)."""
    out: list[str] = []
    while len(out) < count:
        line = (await reader.readline()).decode().rstrip("\r\n")
        if line[3:4] != "-":
            out.append(line)
    return out


async def test_pipelined_session_stores_the_mail_with_dots_unstuffed(tmp_path: Path) -> None:
    async with SmtpSink(tmp_path / "mail") as sink:
        reader, writer = await asyncio.open_connection("127.0.0.1", sink.port)
        assert (await _replies(reader, 1))[0].startswith("220 ")
        writer.write(
            b"EHLO client.example\r\nMAIL FROM:<shop@example.com>\r\nRCPT TO:<ada@example.com>\r\nDATA\r\n"
        )
        assert [r[:3] for r in await _replies(reader, 4)] == ["250", "250", "250", "354"]
        writer.write(
            b"Subject: dots\r\n\r\n..leading dot\r\nmiddle\r\n...\r\n.\r\n"
            b"MAIL FROM:<shop@example.com>\r\nQUIT\r\n"
        )
        assert [r[:3] for r in await _replies(reader, 3)] == ["250", "250", "221"]
        assert await reader.read() == b""  # the sink closed the connection after QUIT
        writer.close()

    (mail,) = read_mail_dir(tmp_path / "mail")
    assert mail["Subject"] == "dots"
    assert mail.get_payload() == ".leading dot\nmiddle\n..\n"


async def test_commands_out_of_order_are_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    async with SmtpSink(tmp_path / "mail") as sink:
        reader, writer = await asyncio.open_connection("127.0.0.1", sink.port)
        await _replies(reader, 1)
        writer.write(b"MAIL FROM:<a@example.com>\r\n")  # before EHLO
        assert (await _replies(reader, 1))[0].startswith("503 ")
        writer.write(b"HELO c\r\nRCPT TO:<b@example.com>\r\nDATA\r\nMAIL FROM:<a@example.com>\r\n")
        writer.write(
            b"MAIL FROM:<a@example.com>\r\nDATA\r\nRSET\r\nRCPT TO:<b@example.com>\r\nNOOP\r\nWHAT\r\n"
        )
        codes = [r[:3] for r in await _replies(reader, 9)]
        # HELO; RCPT before MAIL; DATA before RCPT; MAIL; nested MAIL; DATA without RCPT; RSET;
        # RCPT after RSET (no MAIL); NOOP; an unknown verb
        assert codes == ["250", "503", "503", "250", "503", "503", "250", "503", "250"]
        assert (await _replies(reader, 1))[0].startswith("500 ")
        writer.close()
    assert read_mail_dir(tmp_path / "mail") == []


async def test_script_replies_come_first_then_mail_is_accepted(tmp_path: Path) -> None:
    script = SmtpScript(rcpt={"ada@example.com": ["451 4.7.1 greylisted"]}, data=["452 4.3.1 full"])
    async with SmtpSink(tmp_path / "mail", script=script) as sink:
        reader, writer = await asyncio.open_connection("127.0.0.1", sink.port)
        await _replies(reader, 1)
        content = b"Message-ID: <m1@example.com>\r\nSubject: hi\r\n\r\nbody\r\n.\r\n"
        session = [b"EHLO c\r\n", b"MAIL FROM:<s@example.com>\r\n", b"RCPT TO:<Ada@Example.com>\r\n"]
        writer.write(b"".join(session))
        assert [r[:3] for r in await _replies(reader, 3)] == ["250", "250", "451"]
        writer.write(b"RSET\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<ada@example.com>\r\nDATA\r\n" + content)
        assert [r[:3] for r in await _replies(reader, 5)] == ["250", "250", "250", "354", "452"]
        writer.write(b"MAIL FROM:<s@example.com>\r\nRCPT TO:<ada@example.com>\r\nDATA\r\n" + content)
        assert [r[:3] for r in await _replies(reader, 4)] == ["250", "250", "354", "250"]
        writer.close()
        assert sink.rcpt_attempts("ADA@example.com") == 3
    assert [m["Subject"] for m in read_mail_dir(tmp_path / "mail")] == ["hi"]
