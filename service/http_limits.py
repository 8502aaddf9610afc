"""Limits on what a connection may send before the application sees a request: the size of the request line and
headers (431 above `max_header_bytes`) and the time to send them (408 after `header_timeout`, counted from the
connection's first moment or the request's first byte).

uvicorn's httptools protocol has neither: the parser keeps every header byte it is sent (a 50 MB header is 50 MB of
the server's memory until the connection closes) and a connection that never finishes its headers is never closed
(slowloris). `guarded_protocol(settings)` is that protocol with both limits, counted on the bytes received while a
request's head is incomplete, so that nothing past the limit is ever handed to the parser. The body's time is
bounded where it is read (`deps.read_body`, `body_timeout`).

Without httptools (uvicorn's h11 protocol) h11's own limit applies (`h11_max_incomplete_event_size`), answered 400.
"""

from __future__ import annotations

import logging

import orjson

logger = logging.getLogger("logitserve.app")

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - uvicorn without httptools
    HttpToolsProtocol = None


def _refusal(status: int, reason: str, kind: str, message: str) -> bytes:
    body = orjson.dumps({"error": {"type": kind, "message": message, "param": None}})
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode("ascii") + body


if HttpToolsProtocol is not None:

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol with the head limits (set on a subclass by `guarded_protocol`)."""

        max_header_bytes: int
        header_timeout: float

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._chunk = 0
            self._head_timer = None
            self._start_head(0)

        def _start_head(self, received: int) -> None:
            self._reading_head = True
            self._head_bytes = received
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_too_slow)

        def _end_head(self) -> None:
            self._reading_head = False
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return
            self._chunk = len(data)
            if self._reading_head:
                self._head_bytes += len(data)
            super().data_received(data)
            # Checked after the parser has seen the chunk (a chunk may end the head and start the body): what the
            # parser holds of an unfinished head is at most the limit plus one read.
            if self._reading_head and self._head_bytes > self.max_header_bytes and not self.transport.is_closing():
                self._refuse(431, "Request Header Fields Too Large", "headers_too_large",
                             f"the request line and headers are larger than the limit of {self.max_header_bytes} bytes")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if not self._reading_head:  # the next request on a kept-alive connection
                self._start_head(self._chunk)

        def on_headers_complete(self) -> None:
            self._end_head()
            super().on_headers_complete()

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if self._reading_head and not self.transport.is_closing():
                self._refuse(408, "Request Timeout", "request_timeout",
                             f"the request's headers did not arrive within {self.header_timeout:g}s")

        def _refuse(self, status: int, reason: str, kind: str, message: str) -> None:
            self._end_head()
            client = self.client or ("?", 0)
            logger.info("%s:%s: %s (%d), connection closed", client[0], client[1], message, status)
            # A request head that is still arriving has no response cycle yet: the connection answers itself.
            self.transport.write(_refusal(status, reason, kind, message))
            self.transport.close()

        def connection_lost(self, exc) -> None:
            self._end_head()
            super().connection_lost(exc)



def guarded_protocol(max_header_bytes: int, header_timeout: float):
    """uvicorn's `http` protocol class with the head limits; None where httptools is not installed."""
    if HttpToolsProtocol is None:  # pragma: no cover
        return None
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,),
                {"max_header_bytes": max_header_bytes, "header_timeout": header_timeout})


def uvicorn_http_options(settings) -> dict:
    """The `http` keyword arguments of uvicorn.Config for these settings."""
    protocol = guarded_protocol(settings.max_header_bytes, settings.header_timeout)
    if protocol is None:  # pragma: no cover
        return {"http": "h11", "h11_max_incomplete_event_size": settings.max_header_bytes}
    return {"http": protocol}
