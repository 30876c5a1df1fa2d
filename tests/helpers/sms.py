"""An SMS provider that answers as a test scripts it: given statuses first (429, 500, 400 ...), a
connection dropped after the request arrived, or no answer at all, then 201 for everything after.
A plain asyncio HTTP/1.1 server, so it can misbehave in ways a web framework would not let it."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from types import TracebackType
from urllib.parse import parse_qs

# Close the connection once the request has arrived, without answering.
DROP = "drop"
# Keep the connection open without answering, until the client gives up.
HANG = "hang"

_CONTENT_LENGTH = re.compile(rb"(?im)^content-length:\s*(\d+)\s*$")
_ERRORS = {
    400: {"code": 21211, "message": "Invalid 'To' Phone Number"},
    429: {"code": 20429, "message": "Too Many Requests"},
    500: {"code": 20500, "message": "Internal Server Error"},
}


class ScriptedProvider:
    def __init__(self, script: Sequence[int | str] = ()) -> None:
        self.script = list(script)
        # The form of every request that arrived, answered or not: {"To": ..., "Body": ...}.
        self.requests: list[dict[str, str]] = []
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> ScriptedProvider:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = _CONTENT_LENGTH.search(head)
                body = await reader.readexactly(int(length.group(1)) if length else 0)
                self.requests.append({k: v[0] for k, v in parse_qs(body.decode()).items()})
                answer = self.script.pop(0) if self.script else 201
                if answer == DROP:
                    return
                if answer == HANG:
                    await reader.read()  # until the client closes the connection
                    return
                status = int(answer)
                reply = {"sid": f"SM{len(self.requests)}"} if status < 300 else _ERRORS.get(status, {})
                payload = json.dumps({**reply, "status": status}).encode()
                writer.write(
                    f"HTTP/1.1 {status} Scripted\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client hung up: this connection's requests are over
        finally:
            writer.close()
