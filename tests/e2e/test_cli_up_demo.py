"""The user's path: `relevans up`, `relevans demo`, Ctrl-C, and `up` again with the data kept."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import aiohttp
import grpc

from relevans.delivery.v1 import delivery_pb2, delivery_pb2_grpc
from relevans.kit.grpc_client import bearer
from relevans.local.smtp_sink import read_mail_dir
from relevans.trigger.v1 import trigger_pb2, trigger_pb2_grpc
from tests.helpers import eventually, field_violations
from tests.helpers.local_stack import up_env


async def _start_up(data_dir: Path, env: dict[str, str]) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relevans.cli.main",
        "up",
        "--data-dir",
        str(data_dir),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )

    async def ready() -> bool:
        if proc.returncode is not None:
            out = await proc.stdout.read() if proc.stdout else b""
            raise AssertionError(f"relevans up exited early:\n{out.decode()}")
        return (data_dir / "up.json").exists()

    await eventually(ready, timeout=90, interval=0.2)
    return proc


async def _stop(proc: asyncio.subprocess.Process) -> str:
    proc.send_signal(signal.SIGINT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, out.decode()
    return out.decode()


async def _trigger_ids(state: dict[str, str]) -> list[str]:
    async with grpc.aio.insecure_channel(state["trigger"]) as channel:
        reply = await trigger_pb2_grpc.TriggerServiceStub(channel).ListTriggers(
            trigger_pb2.ListTriggersRequest(), metadata=bearer(state["token"]), timeout=5
        )
    return [t.trigger_id for t in reply.triggers]


async def _put_endpoint(state: dict[str, str], url: str) -> grpc.aio.AioRpcError | None:
    """PutWebhookEndpoint on the running stack; the error, or None when it was saved."""
    async with grpc.aio.insecure_channel(state["delivery"]) as channel:
        try:
            await delivery_pb2_grpc.DeliveryServiceStub(channel).PutWebhookEndpoint(
                delivery_pb2.PutWebhookEndpointRequest(
                    endpoint=delivery_pb2.WebhookEndpoint(endpoint_id="crm", url=url)
                ),
                metadata=bearer(state["token"]),
                timeout=5,
            )
        except grpc.aio.AioRpcError as err:
            return err
    return None


async def _unsubscribe_page_answers(data_dir: Path) -> None:
    """The demo mail's one-click link is served by the delivery process `up` started, at the address
    it announced."""
    state = json.loads((data_dir / "up.json").read_text())
    [mail] = read_mail_dir(data_dir / "mail")
    [link] = [p.strip(" <>") for p in str(mail["List-Unsubscribe"]).split(",") if "/u/" in p]
    assert link.startswith(state["delivery_http"] + "/u/")
    async with aiohttp.ClientSession() as http, http.get(link) as page:
        assert page.status == 200
        assert "Unsubscribe" in await page.text()


async def test_up_demo_stop_and_restart_keeps_data(server_tmp: Path) -> None:
    data_dir = server_tmp / "data"
    env = up_env()
    up = await _start_up(data_dir, env)
    try:
        demo = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relevans.cli.main",
            "demo",
            "--data-dir",
            str(data_dir),
            "--delay",
            "1s",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(demo.communicate(), timeout=60)
        text = out.decode()
        assert demo.returncode == 0, text
        assert "Hi Ada," in text and "Blue running shoes" in text
        assert "demo passed" in text
        await _unsubscribe_page_answers(data_dir)

        # The demo webhook receiver, on loopback over http, is allowed; nothing else on loopback is.
        state = json.loads((data_dir / "up.json").read_text())
        assert await _put_endpoint(state, state["webhook_receiver"] + "crm") is None
        refused = await _put_endpoint(state, "http://127.0.0.1:9/hooks/crm")
        assert refused is not None and set(field_violations(refused)) == {"endpoint.url"}
    finally:
        printed = await _stop(up)
    assert "relevans is up" in printed and "dev token" in printed
    assert f"sms sink  {env['RELEVANS_SMS_PROVIDER_URL']} -> {data_dir / 'sms'}" in printed
    assert "(unsubscribe, open and click links)" in printed
    assert not (data_dir / "up.json").exists()
    mails = list((data_dir / "mail").glob("*.eml"))
    assert len(mails) == 1

    up = await _start_up(data_dir, env)
    try:
        state = json.loads((data_dir / "up.json").read_text())
        assert "demo-cart-1s" in await _trigger_ids(state)
    finally:
        await _stop(up)
