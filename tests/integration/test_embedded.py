"""The embedded servers (`relevans up`, the test session) and the SMTP sink, on real binaries."""

from __future__ import annotations

from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import asyncpg
import nats

from relevans.local.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from relevans.local.smtp_sink import SmtpSink, read_mail_dir


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


async def test_postgres_serves_and_keeps_data_across_restart(server_tmp: Path) -> None:
    data_dir = server_tmp / "pg" / "data"
    pg = EmbeddedPostgres(data_dir)
    await pg.stop()  # never started: a no-op
    async with pg:
        assert pg.port is not None and pg.port not in (5432,)
        assert pg.url == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
        conn = await asyncpg.connect(pg.url)
        try:
            assert await conn.fetchval("select 1") == 1
            await conn.execute("create table kept (v text)")
            await conn.execute("insert into kept values ('survives')")
        finally:
            await conn.close()
    await pg.stop()  # second stop: a no-op
    assert (data_dir / "PG_VERSION").exists()
    assert not (data_dir / "postmaster.pid").exists()

    async with EmbeddedPostgres(data_dir) as again:
        conn = await asyncpg.connect(again.url)
        try:
            assert await conn.fetchval("select v from kept") == "survives"
        finally:
            await conn.close()


async def test_nats_jetstream_publish_ack(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats")
    await server.start()
    try:
        assert server.port is not None and server.port != 4222
        assert server.url == f"nats://127.0.0.1:{server.port}"
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            await js.add_stream(name="EMBEDDED_TEST", subjects=["embedded.test.>"])
            ack = await js.publish("embedded.test.one", b"hello")
            assert ack.stream == "EMBEDDED_TEST"
            assert ack.seq == 1
            info = await js.stream_info("EMBEDDED_TEST")
            assert info.state.messages == 1
        finally:
            await nc.close()
    finally:
        await server.stop()
    await server.stop()  # second stop: a no-op
    assert (tmp_path / "nats" / "nats.log").exists()


async def test_smtp_sink_stores_mail_as_files(tmp_path: Path) -> None:
    mail_dir = tmp_path / "mail"
    async with SmtpSink(mail_dir, port=0) as sink:
        assert sink.port != 0
        message = EmailMessage()
        message["From"] = "shop@example.com"
        message["To"] = "ada@example.com"
        message["Subject"] = "Your basket misses you"
        message.set_content("Hej Ada, the lamp is still waiting.")
        await aiosmtplib.send(message, hostname="127.0.0.1", port=sink.port, start_tls=False)

        received = sink.messages()
        assert len(received) == 1
        assert received[0]["Subject"] == "Your basket misses you"
        assert str(received[0]["To"]) == "ada@example.com"
        body = received[0].get_body(("plain",))
        assert body is not None
        assert "the lamp is still waiting" in body.get_content()
    await sink.stop()  # second stop: a no-op

    files = sorted(mail_dir.iterdir())
    assert len(files) == 1
    assert files[0].suffix == ".eml"
    assert [m["Subject"] for m in read_mail_dir(mail_dir)] == ["Your basket misses you"]
    assert read_mail_dir(tmp_path / "missing") == []
