"""A local SMS provider that keeps every message it accepts as a `.json` file.

It answers the Twilio Messages API shape the delivery service's SMS transport speaks
(`POST /2010-04-01/Accounts/{AccountSid}/Messages.json`, form-encoded To, From and Body, HTTP
basic auth with the account SID as the user name; 201 with the message's `sid`), so
`relevans up` and the tests see real HTTP requests, and a person (or `relevans demo`, from
another process) can read the messages from a folder. Each file is written before the 201.
It runs on the caller's event loop (aiohttp), not in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from relevans.local.http_stand_in import HttpStandIn, write_atomically

log = structlog.get_logger(__name__)

MESSAGES_PATH = "/2010-04-01/Accounts/{account_sid}/Messages.json"
# The form fields a message needs, with Twilio's error code for each one missing.
_REQUIRED = {"To": 21604, "From": 21603, "Body": 21602}


@dataclass(frozen=True, slots=True)
class StoredSms:
    """One accepted message, as the sink stored it."""

    sid: str
    account_sid: str
    to: str
    sender: str
    body: str
    date_created: str


def read_sms_dir(sms_dir: Path) -> list[StoredSms]:
    """Every message stored in `sms_dir`, oldest first (file names sort by arrival)."""
    if not sms_dir.is_dir():
        return []
    out: list[StoredSms] = []
    for path in sorted(sms_dir.glob("*.json")):
        data = json.loads(path.read_text("utf-8"))
        out.append(
            StoredSms(
                sid=data["sid"],
                account_sid=data["account_sid"],
                to=data["to"],
                sender=data["from"],
                body=data["body"],
                date_created=data["date_created"],
            )
        )
    return out


def _error(status: int, code: int, message: str) -> web.Response:
    """An error as Twilio words one."""
    return web.json_response({"code": code, "message": message, "status": status}, status=status)


def _basic_user(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, _ = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user if sep else None


class SmsSink(HttpStandIn):
    """HTTP server on `host:port` (0 picks a free port, see `port` after start) storing messages in
    `sms_dir`. `url` is the base URL the delivery service's `RELEVANS_SMS_PROVIDER_URL` takes."""

    def __init__(self, sms_dir: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(sms_dir, host, port)
        self.sms_dir = self.folder
        self._counter = itertools.count(1)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(MESSAGES_PATH, self._create_message)
        return app

    async def start(self) -> None:
        await super().start()
        log.info("sms sink listening", port=self.port, sms_dir=str(self.sms_dir))

    def messages(self) -> list[StoredSms]:
        return read_sms_dir(self.sms_dir)

    async def _create_message(self, request: web.Request) -> web.Response:
        account_sid = request.match_info["account_sid"]
        if _basic_user(request) != account_sid:
            return _error(401, 20003, "Authenticate")
        form = await request.post()
        fields: dict[str, str] = {}
        for name, code in _REQUIRED.items():
            value = form.get(name)
            if not isinstance(value, str) or not value:
                return _error(400, code, f"A '{name}' is required.")
            fields[name] = value
        now = datetime.now(UTC)
        stored: dict[str, Any] = {
            "sid": "SM" + uuid.uuid4().hex,
            "account_sid": account_sid,
            "to": fields["To"],
            "from": fields["From"],
            "body": fields["Body"],
            "status": "queued",
            "date_created": now.isoformat(),
        }
        path = self.sms_dir / f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{next(self._counter):06d}.json"
        content = json.dumps(stored, ensure_ascii=False).encode("utf-8")
        await asyncio.to_thread(write_atomically, path, content)
        log.info("sms sink stored message", path=str(path), to=fields["To"])
        return web.json_response(stored, status=201)
