"""A lean gRPC client for load generation: unary calls as pre-built HTTP/2 frames on one socket.

The benchmarks run the load generator on the machine they measure. grpc.aio's client spends as
much CPU per call as a service spends on a small call, so the load generator took a large share of
the box away from what it measures. This client writes each call as two frames (HEADERS with a
fixed header block, DATA with the message) and reads the answers' frames, for a fraction of that
CPU (figures: bench/README.md). It is what `ghz` or `h2load` are to Go and C clients.

It speaks just enough HTTP/2 for unary gRPC calls (RFC 9113): the connection preface and
SETTINGS, PING and SETTINGS acknowledgements, flow control in both directions, RST_STREAM and
GOAWAY. It asks the server for an HPACK table size of 0 (`SETTINGS_HEADER_TABLE_SIZE`), so every
header block it receives decodes on its own; trailers are decoded with `hpack` once per distinct
block and the `grpc-status` is taken from them (a cache by bytes is exact without a dynamic table).
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from dataclasses import dataclass, field

import hpack

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# frame types, flags and settings (RFC 9113 §6)
_DATA, _HEADERS, _RST_STREAM, _SETTINGS = 0, 1, 3, 4
_PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = 6, 7, 8, 9
_END_STREAM, _ACK, _END_HEADERS, _PADDED, _PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
_HEADER_TABLE_SIZE, _ENABLE_PUSH, _MAX_CONCURRENT_STREAMS, _INITIAL_WINDOW_SIZE = 1, 2, 3, 4
_DEFAULT_WINDOW = 65_535
# what this client lets the server send before it acknowledges (per stream and for the connection)
_RECEIVE_WINDOW = 1 << 24
_FRAME_HEADER = struct.Struct(">I B I")  # length (24 bits) and type packed in the first word


class CallError(Exception):
    """A call ended without an answer: `code` is the gRPC status name (e.g. `UNAVAILABLE`)."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        (len(payload) << 8 | kind).to_bytes(4, "big") + bytes([flags]) + stream.to_bytes(4, "big") + payload
    )


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 §5.1) whose first byte carries `first` in its high bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode()
    return _integer(len(raw), 7, 0) + raw


def _literal(name: str | int, value: str) -> bytes:
    """A header field without indexing (RFC 7541 §6.2.2), its name by static-table index or literal."""
    if isinstance(name, int):
        return _integer(name, 4, 0) + _string(value)
    return b"\x00" + _string(name) + _string(value)


def request_headers(authority: str, path: str, metadata: list[tuple[str, str]], timeout_s: float) -> bytes:
    """The header block of every call to `path`: static-table entries and literals, nothing indexed."""
    block = b"\x83\x86"  # :method POST, :scheme http (RFC 7541 Appendix A, entries 3 and 6)
    block += _literal(4, path) + _literal(1, authority)  # :path, :authority
    block += _literal(31, "application/grpc") + _literal("te", "trailers")  # content-type
    block += _literal("grpc-timeout", f"{max(1, int(timeout_s * 1000))}m")
    for key, value in metadata:
        block += _literal(key, value)
    return block


@dataclass
class _Call:
    answer: asyncio.Future[bytes]
    data: bytearray = field(default_factory=bytearray)
    sent: bool = False


_STATUS_NAMES = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}


class Channel(asyncio.Protocol):
    """One HTTP/2 connection carrying unary calls to one method; `call` may be used concurrently."""

    def __init__(self, header_block: bytes) -> None:
        self._header_block = header_block
        self._transport: asyncio.Transport | None = None
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buffer = bytearray()
        self._calls: dict[int, _Call] = {}
        self._next_stream = 1
        self._closed: CallError | None = None
        # flow control of what this client sends: the server's windows
        self._send_window = _DEFAULT_WINDOW
        self._stream_window = _DEFAULT_WINDOW
        self._max_streams = 1 << 31
        self._open_streams = 0
        # calls held back by the windows or the stream limit
        self._waiting: deque[tuple[int, bytes]] = deque()
        self._unacknowledged = 0  # DATA bytes received since the last WINDOW_UPDATE
        self._statuses: dict[bytes, tuple[str, str]] = {}  # trailer block -> (status name, message)
        self._decoder = hpack.Decoder()
        self._decoder.header_table_size = 0

    @classmethod
    async def open(cls, host: str, port: int, header_block: bytes) -> Channel:
        loop = asyncio.get_running_loop()
        _, channel = await loop.create_connection(lambda: cls(header_block), host, port)
        await channel._ready
        return channel

    # ---- calls --------------------------------------------------------------------------------

    def call(self, message: bytes) -> asyncio.Future[bytes]:
        """Start a unary call; the future gives the answer's message bytes or raises CallError."""
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        if self._closed is not None:
            answer.set_exception(self._closed)
            return answer
        stream = self._next_stream
        self._next_stream += 2
        call = self._calls[stream] = _Call(answer)
        body = b"\x00" + len(message).to_bytes(4, "big") + message
        if self._waiting or not self._can_send(len(body)):
            self._waiting.append((stream, body))
        else:
            self._send(stream, call, body)
        return answer

    def _can_send(self, size: int) -> bool:
        return (
            size <= self._send_window
            and size <= self._stream_window
            and self._open_streams < self._max_streams
        )

    def _send(self, stream: int, call: _Call, body: bytes) -> None:
        assert self._transport is not None
        call.sent = True
        self._open_streams += 1
        self._send_window -= len(body)
        self._transport.write(
            _frame(_HEADERS, _END_HEADERS, stream, self._header_block)
            + _frame(_DATA, _END_STREAM, stream, body)
        )

    def _send_waiting(self) -> None:
        while self._waiting and self._can_send(len(self._waiting[0][1])):
            stream, body = self._waiting.popleft()
            call = self._calls.get(stream)
            if call is not None:
                self._send(stream, call, body)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.write(_frame(_GOAWAY, 0, 0, struct.pack(">II", 0, 0)))
            self._transport.close()

    # ---- the protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = self._transport = transport  # type: ignore[assignment]  # TCP (uvloop's is no subclass)
        settings = struct.pack(
            ">HIHIHI", _HEADER_TABLE_SIZE, 0, _ENABLE_PUSH, 0, _INITIAL_WINDOW_SIZE, _RECEIVE_WINDOW
        )
        tcp.write(
            _PREFACE
            + _frame(_SETTINGS, 0, 0, settings)
            + _frame(_WINDOW_UPDATE, 0, 0, (_RECEIVE_WINDOW - _DEFAULT_WINDOW).to_bytes(4, "big"))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(CallError("UNAVAILABLE", f"connection lost: {exc}" if exc else "connection closed"))

    def _fail_all(self, error: CallError) -> None:
        self._closed = error
        if not self._ready.done():
            self._ready.set_exception(error)
        calls, self._calls = self._calls, {}
        self._waiting.clear()
        for c in calls.values():
            if not c.answer.done():
                c.answer.set_exception(error)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset = 0
        end = len(buffer)
        while end - offset >= 9:
            word, flags, stream = _FRAME_HEADER.unpack_from(buffer, offset)
            length = word >> 8
            if end - offset - 9 < length:
                break
            payload = bytes(buffer[offset + 9 : offset + 9 + length])
            offset += 9 + length
            self._frame_received(word & 0xFF, flags, stream & 0x7FFF_FFFF, payload)
        del buffer[:offset]

    def _frame_received(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == _DATA:
            self._data(flags, stream, payload)
        elif kind == _HEADERS:
            self._headers(flags, stream, payload)
        elif kind == _SETTINGS:
            if not flags & _ACK:
                self._settings(payload)
        elif kind == _WINDOW_UPDATE:
            increment = int.from_bytes(payload[:4], "big") & 0x7FFF_FFFF
            if stream == 0:
                self._send_window += increment
            self._send_waiting()
        elif kind == _PING:
            if not flags & _ACK:
                assert self._transport is not None
                self._transport.write(_frame(_PING, _ACK, 0, payload))
        elif kind == _RST_STREAM:
            code = int.from_bytes(payload[:4], "big")
            self._end(stream, CallError("CANCELLED", f"stream reset by the server (HTTP/2 error {code})"))
        elif kind == _GOAWAY:
            self._fail_all(CallError("UNAVAILABLE", "the server is going away"))
        elif kind == _CONTINUATION:
            self._fail_all(CallError("INTERNAL", "header blocks in several frames are not supported"))

    def _settings(self, payload: bytes) -> None:
        for i in range(0, len(payload) - 5, 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if key == _INITIAL_WINDOW_SIZE:
                self._stream_window = value
            elif key == _MAX_CONCURRENT_STREAMS:
                self._max_streams = value
        assert self._transport is not None
        self._transport.write(_frame(_SETTINGS, _ACK, 0, b""))
        if not self._ready.done():
            self._ready.set_result(None)
        self._send_waiting()

    def _data(self, flags: int, stream: int, payload: bytes) -> None:
        if flags & _PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        self._unacknowledged += len(payload)
        if self._unacknowledged >= _RECEIVE_WINDOW // 2:
            # the calls are short: granting the connection back what was read also covers each stream
            assert self._transport is not None
            self._transport.write(_frame(_WINDOW_UPDATE, 0, 0, self._unacknowledged.to_bytes(4, "big")))
            self._unacknowledged = 0
        call = self._calls.get(stream)
        if call is not None:
            call.data += payload
        if flags & _END_STREAM:
            self._end(stream, CallError("INTERNAL", "the answer ended without trailers"))

    def _headers(self, flags: int, stream: int, block: bytes) -> None:
        if not flags & _END_HEADERS:
            self._fail_all(CallError("INTERNAL", "header blocks in several frames are not supported"))
            return
        if not flags & _END_STREAM:
            return  # the answer's leading headers (:status 200, content-type)
        if flags & _PADDED:
            block = block[1 : len(block) - block[0]]
        if flags & _PRIORITY:
            block = block[5:]
        status = self._statuses.get(block)
        if status is None:
            fields = dict(self._decoder.decode(block, raw=True))
            code = int(fields.get(b"grpc-status", b"2"))
            status = (_STATUS_NAMES.get(code, "UNKNOWN"), fields.get(b"grpc-message", b"").decode())
            self._statuses[block] = status
        call = self._calls.get(stream)
        if call is None:
            return
        if status[0] != "OK":
            self._end(stream, CallError(*status))
        elif len(call.data) < 5:
            self._end(stream, CallError("INTERNAL", "OK without a message"))
        else:
            self._end(stream, None)
            call.answer.set_result(bytes(call.data[5:]))

    def _end(self, stream: int, error: CallError | None) -> None:
        call = self._calls.pop(stream, None)
        if call is None:
            return
        if call.sent:
            self._open_streams -= 1
        if error is not None and not call.answer.done():
            call.answer.set_exception(error)
        if self._waiting:
            self._send_waiting()
