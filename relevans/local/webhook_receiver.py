"""A local webhook receiver that checks each delivery's signature and keeps it as a JSON file.

`relevans up` starts it beside the SMTP sink, so the demo (and the tests) see real signed
HTTP requests. It knows no endpoint by itself: whoever creates an endpoint in delivery
(`PutWebhookEndpoint` with the receiver's `url(name)`) hands it the secret from the answer
with `write_secret` (a file `<root>/<name>/secret`, so another process can do it). Each
POST to `/hooks/<name>` is stored as `<root>/<name>/<arrival>.json`, genuine or not:

    {"received_at": ..., "verified": true, "problem": null, "webhook_id": ...,
     "webhook_timestamp": ..., "webhook_signature": ..., "body": "<as received>",
     "payload": {...parsed JSON, or null}}

and answered 204 when the signature verifies, 401 when it does not.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from relevans.kit.resource_ids import resource_id_problem
from relevans.local.http_stand_in import HttpStandIn, write_atomically
from services.delivery.domain.webhooks import verification_problem

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 1024 * 1024
SECRET_FILE = "secret"


def write_secret(root: Path, name: str, secret: str) -> None:
    """Tell the receiver the secret of endpoint `name` (readable by its owner only)."""
    folder = Path(root) / _checked(name)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SECRET_FILE
    path.touch(mode=0o600)
    path.write_text(secret)


def read_deliveries(root: Path, name: str) -> list[dict[str, Any]]:
    """Every delivery stored for endpoint `name`, oldest first."""
    folder = Path(root) / _checked(name)
    if not folder.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def _checked(name: str) -> str:
    problem = resource_id_problem(name)
    if problem:
        raise ValueError(f"endpoint name {problem}")
    return name


def _parsed(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


class WebhookReceiver(HttpStandIn):
    """HTTP server on `host:port` (0 picks a free port, see `port` after start) keeping what is
    posted to `/hooks/<name>` under `root`. `now` is the clock signatures are checked against."""

    def __init__(
        self,
        root: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        super().__init__(root, host, port)
        self.root = self.folder
        self.now = now
        self._counter = itertools.count(1)

    def url(self, name: str) -> str:
        return f"http://{self.host}:{self.port}/hooks/{_checked(name)}"

    def write_secret(self, name: str, secret: str) -> None:
        write_secret(self.root, name, secret)

    def deliveries(self, name: str) -> list[dict[str, Any]]:
        return read_deliveries(self.root, name)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/hooks/{name}", self._receive)
        return app

    async def start(self) -> None:
        await super().start()
        log.info("webhook receiver listening", port=self.port, root=str(self.root))

    async def _receive(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if resource_id_problem(name):
            return web.Response(status=404, text="no such endpoint\n")
        body = await request.read()
        secret_path = self.root / name / SECRET_FILE
        secret = secret_path.read_text().strip() if secret_path.is_file() else ""
        problem = (
            verification_problem(secret, request.headers, body, self.now())
            if secret
            else "the receiver has no secret for this endpoint"
        )
        record = {
            "received_at": datetime.now(UTC).isoformat(),
            "verified": problem is None,
            "problem": problem,
            "webhook_id": request.headers.get("webhook-id"),
            "webhook_timestamp": request.headers.get("webhook-timestamp"),
            "webhook_signature": request.headers.get("webhook-signature"),
            "body": body.decode("utf-8", errors="replace"),
            "payload": _parsed(body),
        }
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        path = self.root / name / f"{stamp}-{next(self._counter):06d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(
            write_atomically, path, json.dumps(record, ensure_ascii=False, indent=2).encode()
        )
        log.info("webhook receiver stored a delivery", path=str(path), verified=problem is None)
        if problem is not None:
            return web.Response(status=401, text=f"{problem}\n")
        return web.Response(status=204)
