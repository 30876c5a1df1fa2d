"""Delivery's small HTTP endpoint (aiohttp): the links its messages carry.

- `POST /u/<token>` with the RFC 8058 body `List-Unsubscribe=One-Click` unsubscribes: recorded
  durably first, and from then on applied by delivery's own send decisions; then the consent is
  withdrawn in profile before the answer where profile answers in time, else retried until it
  does (see engagements.py). Once recorded the answer is 200 whatever profile does. Repeats
  change nothing. Database away: 503, so the mail client tries again.
- `GET /u/<token>` only shows a page with a button that makes that POST: mail scanners follow
  links, and a GET changes nothing.
- `GET /o/<token>` answers a 1x1 GIF and records an open; `GET /c/<token>` records a click and
  redirects (302) to the URL the message carried, which the token holds under its signature.
- A token that is forged, altered or for another route changes nothing and answers 400.

The socket is bound when the endpoint is built, so a port in use stops the service from starting
and the public URL can name the port the OS chose; it serves while the service runs.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from html import escape
from urllib.parse import quote

import grpc
import structlog
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.kit.clock import Clock
from relevans.kit.server import ServiceHost
from relevans.kit.settings import Settings
from services.delivery.domain.tracking import (
    CLICK,
    ONE_CLICK_BODY,
    OPEN,
    PIXEL_GIF,
    ROUTES,
    UNSUBSCRIBE,
    ForgedToken,
    LinkMaker,
    LinkSigner,
    LinkToken,
    tracking_key,
)
from services.delivery.engagements import EngagementStore, ProfileReporter

log = structlog.get_logger(__name__)

# Bodies larger than this are refused (a one-click POST is 26 bytes).
MAX_BODY_BYTES = 16 * 1024
RETRY_AFTER_S = "30"
# What a URL may hold as it is (reserved characters, and % of an existing escape).
_URL_SAFE = ":/?#[]@!$&'()*+,;=%~"
_FIELD, _VALUE = ONE_CLICK_BODY.split("=")
_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
    "X-Content-Type-Options": "nosniff",
}
_PAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"


def bind(listen: str, *, shared: bool = False) -> socket.socket:
    """A socket bound to `listen` (host:port; port 0 lets the OS choose), not yet listening;
    `shared`: other processes bind the same port (SO_REUSEPORT, Linux) and the kernel spreads the
    connections over them."""
    host, _, port = listen.rpartition(":")
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]") or None, int(port), type=socket.SOCK_STREAM
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"delivery: cannot listen for HTTP on {listen}: {exc}") from None
    sock.setblocking(False)
    return sock


def public_url(sock: socket.socket) -> str:
    """The base URL of a bound socket, for when no public URL is configured: its address, or
    localhost for a socket on every address."""
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "localhost"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _page(title: str, text: str, status: int = 200, form: str = "") -> web.Response:
    body = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width">'
        f"<title>{escape(title)}</title></head>\n"
        '<body style="font-family:sans-serif;max-width:32em;margin:3em auto">'
        f"<h1>{escape(title)}</h1><p>{escape(text)}</p>{form}</body></html>\n"
    )
    return web.Response(
        text=body,
        status=status,
        content_type="text/html",
        headers={**_SECURITY_HEADERS, "Content-Security-Policy": _PAGE_CSP},
    )


def _forged() -> web.Response:
    return _page("This link is not valid", "It was not made by us or was altered. Nothing was changed.", 400)


def _unknown() -> web.Response:
    return _page("This link no longer works", "The message it came with is no longer on record.", 404)


def _unavailable() -> web.Response:
    page = _page("Please try again", "We could not record this just now. Nothing was changed.", 503)
    page.headers["Retry-After"] = RETRY_AFTER_S
    return page


async def _is_one_click(request: web.Request) -> bool:
    """Whether the POST's body is RFC 8058's `List-Unsubscribe=One-Click`: as a form (urlencoded
    or multipart, as the RFC has it), or as bare text from a client that named no form type."""
    try:
        if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            return (await request.post()).get(_FIELD) == _VALUE
        return (await request.text()).strip() == ONE_CLICK_BODY
    except (ValueError, web.HTTPException):
        return False


def open_tracking(
    settings: Settings,
    engine: AsyncEngine,
    profile_channel: grpc.aio.Channel,
    clock: Clock,
    *,
    notify_relay: Callable[[], None],
) -> TrackingEndpoint:
    """The endpoint of `settings`, its socket bound, with the links it serves (`.links`, for the
    transports) and the reporter of engagements to profile; `attach` it to the service's host."""
    sock = bind(settings.delivery_http_listen, shared=settings.processes("delivery") > 1)
    signer = LinkSigner(tracking_key(settings.token_secret))
    reporter = ProfileReporter(
        engine, profile_channel, secret=settings.token_secret, clock=clock, deadline_s=settings.call_deadline
    )
    return TrackingEndpoint(
        sock,
        links=LinkMaker(signer, settings.delivery_public_url or public_url(sock)),
        signer=signer,
        store=EngagementStore(engine, notify_relay=notify_relay),
        reporter=reporter,
        clock=clock,
        grace_s=settings.shutdown_grace,
    )


class TrackingEndpoint:
    """The HTTP endpoint of one delivery process."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        links: LinkMaker,
        signer: LinkSigner,
        store: EngagementStore,
        reporter: ProfileReporter,
        clock: Clock,
        grace_s: float,
    ) -> None:
        self.sock = sock
        self.links = links
        self.signer = signer
        self.store = store
        self.reporter = reporter
        self.clock = clock
        self.grace_s = grace_s
        self.port: int = sock.getsockname()[1]
        self.app = web.Application(client_max_size=MAX_BODY_BYTES)
        self.app.router.add_get(f"/{ROUTES[UNSUBSCRIBE]}/{{token}}", self.confirm, allow_head=False)
        self.app.router.add_post(f"/{ROUTES[UNSUBSCRIBE]}/{{token}}", self.unsubscribe)
        self.app.router.add_get(f"/{ROUTES[OPEN]}/{{token}}", self.opened, allow_head=False)
        self.app.router.add_get(f"/{ROUTES[CLICK]}/{{token}}", self.clicked, allow_head=False)

    # ---- lifecycle ------------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then let requests under way finish within the grace period."""
        runner = web.AppRunner(self.app, handle_signals=False, access_log=None, shutdown_timeout=self.grace_s)
        await runner.setup()
        try:
            await web.SockSite(runner, self.sock).start()
            log.info("delivery HTTP endpoint serving", port=self.port)
            await stop.wait()
        finally:
            await runner.cleanup()

    def attach(self, host: ServiceHost) -> None:
        """Serve, and report engagements to profile, while `host` runs."""
        host.add_worker("tracking-http", self.serve)
        host.add_worker("profile-reports", self.reporter.run)
        host.add_closer(self.close)

    async def close(self) -> None:
        """Release the socket (when the service stops before or after serving on it)."""
        self.sock.close()

    # ---- routes ---------------------------------------------------------------------------------

    def _token(self, request: web.Request, kind: str) -> LinkToken | None:
        try:
            return self.signer.verify(request.match_info["token"], kind)
        except ForgedToken as exc:
            log.info("link token refused", kind=kind, why=str(exc))
            return None

    async def confirm(self, request: web.Request) -> web.Response:
        """The unsubscribe link opened in a browser (or by a scanner): a button, no change."""
        if self._token(request, UNSUBSCRIBE) is None:
            return _forged()
        form = (
            f'<form method="post"><input type="hidden" name="{_FIELD}" value="{_VALUE}">'
            '<button type="submit">Unsubscribe</button></form>'
        )
        return _page("Unsubscribe?", "Press the button to get no more messages like this one.", form=form)

    async def unsubscribe(self, request: web.Request) -> web.Response:
        token = self._token(request, UNSUBSCRIBE)
        if token is None:
            return _forged()
        if not await _is_one_click(request):
            return _page("Not an unsubscribe request", f"Expected the body {ONE_CLICK_BODY}.", 400)
        try:
            engaged = await self.store.record(token, self.clock.now())
        except Exception:
            log.exception("unsubscribe not recorded")
            return _unavailable()
        if engaged is None:
            return _unknown()
        if not engaged.first:
            return _page("You are unsubscribed", "You had already unsubscribed with this link.")
        # Profile told at once where it answers; delivery applies the withdrawal itself until then.
        try:
            await self.reporter.report(token.tenant_id, token.message_id)
        except Exception:
            log.exception("unsubscribe recorded; reporting it to profile failed")
        return _page("You are unsubscribed", "You will get no more messages like this one.")

    async def opened(self, request: web.Request) -> web.Response:
        token = self._token(request, OPEN)
        if token is None:
            return _forged()
        await self._record(token)
        return web.Response(body=PIXEL_GIF, content_type="image/gif", headers=_SECURITY_HEADERS)

    async def clicked(self, request: web.Request) -> web.Response:
        token = self._token(request, CLICK)
        if token is None or not token.url.lower().startswith(("https://", "http://")):
            return _forged()
        await self._record(token)
        # percent-encoded where not ASCII (a header cannot carry it); nothing else changed
        location = quote(token.url, safe=_URL_SAFE)
        return web.Response(status=302, headers={**_SECURITY_HEADERS, "Location": location})

    async def _record(self, token: LinkToken) -> None:
        """Record an open or click; the person gets the pixel or their page even when that fails."""
        try:
            engaged = await self.store.record(token, self.clock.now())
        except Exception:
            log.exception("engagement not recorded", kind=token.kind)
            return
        if engaged is not None and engaged.first:
            self.reporter.notify()
