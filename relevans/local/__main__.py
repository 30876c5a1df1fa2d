"""`python -m relevans.local sms|webhooks --port N --dir D`: one local HTTP stand-in on its own
until SIGTERM or Ctrl-C. docker-compose.yml runs them beside the services from the relevans image
(`relevans up` starts them in its own process). They need only the runtime's packages (aiohttp),
not the `local` extra."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from relevans.kit.logging import configure_logging
from relevans.local.http_stand_in import HttpStandIn
from relevans.local.sms_sink import SmsSink
from relevans.local.webhook_receiver import WebhookReceiver

STAND_INS: dict[str, type[SmsSink] | type[WebhookReceiver]] = {"sms": SmsSink, "webhooks": WebhookReceiver}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m relevans.local", description=__doc__)
    p.add_argument("stand_in", choices=sorted(STAND_INS), help="the SMS sink or the webhook receiver")
    p.add_argument("--dir", type=Path, required=True, help="the folder it keeps what arrives in")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    p.add_argument("--port", type=int, required=True, help="the port to listen on")
    return p


async def serve(stand_in: HttpStandIn) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with stand_in:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    configure_logging()
    asyncio.run(serve(STAND_INS[args.stand_in](args.dir, host=args.host, port=args.port)))


if __name__ == "__main__":
    main()
