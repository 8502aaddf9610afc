"""The send timeout (`LOGITSERVE_SEND_TIMEOUT`): a client that stops reading a response without closing its
connection must not hold the response's results forever.

uvicorn's `send` of a body chunk first waits until the connection's write buffer has drained (`FlowControl.drain`:
the transport paused writing above its high-water mark and resumes when the client has taken the bytes), then
writes the chunk. A reader that stalls keeps that wait open forever, and with it the results the body is made
from (and their share of the results budget). `SendTimeoutGuard` bounds each send: one that waits longer than the
timeout drops the connection at once (the transport's `abort`, which discards what is buffered; `close` would wait
for a reader that may never read), counts it in `logitserve_send_timeouts_total`, and raises `SendTimedOut` into
the response, which releases its results as on a disconnect (`responses.BudgetedResponse`).

The timeout is per send, not per body: a send waits only until the client has taken about one chunk (a 1 MiB
slice of a safetensors body, ~256 KiB of JSON) and the part of the kernel's send buffer that must free up before
the socket counts as writable again (a third of it), so a client that reads steadily, however long the body, never
meets it. Rates measured on either side of the line are in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import logging

logger = logging.getLogger("logitserve.app")


class SendTimedOut(Exception):
    """Raised by a send that waited longer than the send timeout; the connection is already dropped."""


def _transport(send):
    """The connection's transport behind uvicorn's `send` (its `RequestResponseCycle.send`, for both the httptools
    and the h11 protocol), or None for any other server: ASGI has no message that drops a connection."""
    return getattr(getattr(send, "__self__", None), "transport", None)


class SendTimeoutGuard:
    """The application's outermost layer (`app.LogitServe`): each HTTP send is given `timeout_s` to complete.

    It must be outermost: it reaches the connection through the server's own `send`."""

    def __init__(self, app, timeout_s: float, counter):
        self.app = app
        self.timeout_s = timeout_s
        self.counter = counter  # logitserve_send_timeouts_total

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        transport = _transport(send)
        timed_out = False

        async def send_in_time(message) -> None:
            nonlocal timed_out
            if timed_out:
                raise SendTimedOut("the connection was dropped after a send timed out")
            try:
                await asyncio.wait_for(send(message), self.timeout_s)
            except asyncio.TimeoutError:
                timed_out = True
                self.counter.inc()
                client = scope.get("client") or ("?", 0)
                logger.warning("%s:%s %s %s: a send waited %gs for the client to read (send timeout): connection "
                               "dropped", client[0], client[1], scope.get("method"), scope.get("path"), self.timeout_s)
                if transport is not None:
                    transport.abort()
                raise SendTimedOut(f"no send completed within the send timeout of {self.timeout_s:g}s") from None

        try:
            await self.app(scope, receive, send_in_time)
        except SendTimedOut:
            if transport is None:  # the server closes the connection its own way
                raise
        if timed_out:
            # The abort's connection_lost is scheduled, not run: let it mark the request disconnected so that
            # uvicorn does not report a response that ended unfinished.
            await asyncio.sleep(0)
