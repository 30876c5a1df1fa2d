"""The SMS channel's transport: one HTTP POST per message to a provider (aiohttp), classified for
at-most-once sending.

An `SmsProvider` says what one provider's API looks like: where a message is posted, with which
headers and body, and what its answer says. `TwilioProvider` is the Twilio Messages API shape
(which the local sink, relevans/local/sms_sink.py, speaks too); another provider is another
class with the same four members, chosen in `services/delivery/channels/__init__.py`.

Each outcome says whether the provider took the message and, if not, whether trying again is
safe (the rules are `SmsChannel.classify` in the domain):

- `sent`: a 2xx answer;
- `transient`: the request never left (connection refused, DNS, connect timeout), or the
  provider asked to try later (429, 5xx): retried;
- `permanent`: any other answer (4xx): never retried;
- `unknown`: a timeout or broken connection after the request was sent: the provider may have
  taken it, so it is not sent again. aiohttp never repeats a POST on its own.

A batch is spread over a few lanes (`SMS_CONNECTIONS`) sharing one keep-alive session, each
taking the next message when it is free. A message is claimed through the worker's `Handover`
right before its request is made; one whose connection then cannot be opened goes back to
pending (nothing was sent).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Protocol
from urllib.parse import quote, urlencode

import aiohttp
import structlog

from services.delivery.channels.base import Handover, Outgoing, Refused
from services.delivery.domain import Send, SendFailure, SendOutcome
from services.delivery.domain.channels.sms import CONNECT, REQUEST, SmsChannel, sms_segments, too_long

log = structlog.get_logger(__name__)

# Requests one worker has in flight at once; each lane carries one message at a time.
SMS_CONNECTIONS = 8
# How much of a provider's answer is read (its id or error), and kept in a reason.
MAX_REPLY_BYTES = 64 * 1024
MAX_DETAIL_CHARS = 300
# The stage of an attempt that got an HTTP answer.
RESPONSE = "response"


class SmsProvider(Protocol):
    """One provider's HTTP API: each message is one POST of `payload` to `url` with `headers`."""

    @property
    def url(self) -> str: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    def payload(self, to: str, body: str) -> bytes:
        """The request body sending `body` to the E.164 number `to`."""
        ...

    def detail(self, status: int, reply: bytes) -> str:
        """What the answer says, for the message's reason: the provider's message id when it took
        the message, its error otherwise."""
        ...


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 3] + "..."


class TwilioProvider:
    """The Twilio Messages API: POST {base_url}/2010-04-01/Accounts/{sid}/Messages.json, form-encoded
    To, From and Body, HTTP basic auth sid:token; 201 with the message's `sid` in JSON, errors as
    JSON `code` and `message`."""

    def __init__(self, base_url: str, account_sid: str, auth_token: str, sender: str) -> None:
        self.url = f"{base_url.rstrip('/')}/2010-04-01/Accounts/{quote(account_sid, safe='')}/Messages.json"
        credentials = base64.b64encode(f"{account_sid}:{auth_token}".encode()).decode("ascii")
        self.headers: Mapping[str, str] = {
            "Authorization": f"Basic {credentials}",
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        self.sender = sender

    def payload(self, to: str, body: str) -> bytes:
        return urlencode({"To": to, "From": self.sender, "Body": body}).encode("ascii")

    def detail(self, status: int, reply: bytes) -> str:
        try:
            data = json.loads(reply)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return _short(f"{status} {reply.decode('utf-8', 'replace')}")
        if 200 <= status < 300:
            return _short(f"{status} {data.get('sid') or 'no sid'}")
        return _short(" ".join(str(p) for p in (status, data.get("code", ""), data.get("message", "")) if p))


class SmsTransport:
    def __init__(
        self,
        provider: SmsProvider,
        *,
        max_segments: int,
        timeout_s: float = 10.0,
        connections: int = SMS_CONNECTIONS,
    ) -> None:
        self.provider = provider
        self.max_segments = max_segments
        self.timeout_s = timeout_s
        self.connections = max(1, connections)
        self.rules = SmsChannel()
        self._session: aiohttp.ClientSession | None = None

    def compose(self, message_id: str, send: Send, now: datetime) -> Outgoing:
        """The provider's request for the message; `Refused` when the body has too many segments."""
        segments = sms_segments(send.body_text)
        refused = too_long(segments, self.max_segments)
        if refused:
            raise Refused(refused)
        payload = self.provider.payload(send.recipient, send.body_text)
        return Outgoing(send.recipient, payload, sms_segments=segments.count)

    async def send_many(self, messages: Sequence[Outgoing], handover: Handover) -> None:
        """Send the messages over a few lanes, each taking the next message when it is free."""
        session = self._open()
        queue = iter(enumerate(messages))
        lanes = min(self.connections, len(messages))
        await asyncio.gather(*(self._send_lane(session, queue, handover) for _ in range(lanes)))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _open(self) -> aiohttp.ClientSession:
        """The transport's one session, opened on first use (on the running event loop)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.connections),
                # No total: a connect timeout means nothing was sent, a read timeout that it was.
                timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout_s, sock_read=self.timeout_s),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def _send_lane(
        self, session: aiohttp.ClientSession, queue: Iterator[tuple[int, Outgoing]], handover: Handover
    ) -> None:
        for index, message in queue:
            if await handover.claim(index):
                handover.report(index, await self._post(session, message))

    async def _post(self, session: aiohttp.ClientSession, message: Outgoing) -> SendOutcome:
        """One message's request and what came of it."""
        try:
            async with session.post(
                self.provider.url,
                data=message.content,
                headers=self.provider.headers,
                allow_redirects=False,
            ) as response:
                status = response.status
                reply = await _read_reply(response)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            return self._failed(CONNECT, exc)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return self._failed(REQUEST, exc)
        detail = self.provider.detail(status, reply)
        if 200 <= status < 300:
            return SendOutcome("sent", detail)
        return SendOutcome(self.rules.classify(SendFailure(RESPONSE, status)), detail)

    def _failed(self, stage: str, exc: Exception) -> SendOutcome:
        detail = _short(f"{type(exc).__name__}: {exc}")
        kind = self.rules.classify(SendFailure(stage, None))
        if kind == "unknown":
            log.warning("sms request broke after it was sent; outcome unknown", error=detail)
        return SendOutcome(kind, detail)


async def _read_reply(response: aiohttp.ClientResponse) -> bytes:
    """The start of the answer's body (enough for an id or an error); b"" when it broke off,
    since the status already says what happened."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.content.iter_chunked(16 * 1024):
            chunks.append(chunk)
            size += len(chunk)
            if size >= MAX_REPLY_BYTES:
                break
    except (aiohttp.ClientError, OSError, TimeoutError):
        return b""
    return b"".join(chunks)[:MAX_REPLY_BYTES]
