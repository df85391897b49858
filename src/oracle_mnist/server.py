"""The HTTP server the API runs under: uvicorn with bounds on request heads and on open connections.

    oracle-mnist serve --host 127.0.0.1 --port 8000
    uvicorn oracle_mnist.api:app --http oracle_mnist.server:HttpToolsProtocol     # the same, by hand

uvicorn's own httptools protocol waits forever for a request head and parses one of any size: a connection that
sends a request line and nothing else stays open for good (enough of them exhaust the open-file limit, and then
nobody is answered), and a 100 MB header is parsed whole (its parser copies the value for each piece that
arrives: seconds of CPU, and memory several times its size). `HttpToolsProtocol` is that protocol plus three
bounds, enforced before the app sees a request; settings come from the environment, like the API's
(`oracle_mnist.api.Settings`):

| variable                  | default | bound                                                             |
| ------------------------- | ------- | ----------------------------------------------------------------- |
| ORACLE_MNIST_HEAD_TIMEOUT | 10      | seconds for a request head (request line and headers) to arrive,  |
|                           |         | from the connection's opening, or from its first byte on a        |
|                           |         | kept-alive connection; then 408 (nothing when no byte came) and   |
|                           |         | the connection is closed                                          |
| ORACLE_MNIST_HEAD_BYTES   | 65536   | bytes in a request head: once that many have arrived without its  |
|                           |         | end, 431 and the connection is closed; the rest is never parsed   |
| ORACLE_MNIST_CONNECTIONS  | 1000    | open connections (at most half the open-file limit): past it, a   |
|                           |         | new one closes the one that has waited longest for a request head |
|                           |         | (idle kept-alive ones included), or is closed itself if none is   |
|                           |         | waiting                                                           |

A connection that is sending its body or waiting for its answer is never closed by these bounds (the body has its
own deadline, ORACLE_MNIST_BODY_TIMEOUT, in the app).
"""

from __future__ import annotations

import asyncio
import functools
import json
import resource
import weakref
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as UvicornHttpToolsProtocol

# Connections when ORACLE_MNIST_CONNECTIONS is not set: far more than a CPU classifier serves at once, and at
# most half the open-file limit, which leaves the rest for the model, logs and uploads spooled to disk.
DEFAULT_CONNECTIONS = 1000
# After a 431 the client may still be sending its head: the answer goes out, our side is shut for writing, and
# what arrives meanwhile is dropped unparsed for this long before the socket closes. Closing at once, with the
# client's data unread in our socket, sends a reset that can destroy the answer before the client reads it.
LINGER_SECONDS = 2.0


@dataclass(frozen=True)
class ServerLimits:
    head_timeout: float
    head_bytes: int
    connections: int


def default_connections() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return DEFAULT_CONNECTIONS
    return max(1, min(DEFAULT_CONNECTIONS, soft // 2))


@functools.cache
def limits_from_env() -> ServerLimits:
    """The bounds, from the environment once per process; a bad value raises OracleMnistError naming it."""
    from oracle_mnist.api import Settings  # the API's settings, read and checked the same way

    settings = Settings.from_env()
    return ServerLimits(
        head_timeout=settings.head_timeout,
        head_bytes=settings.head_bytes,
        connections=settings.connections or default_connections(),
    )


# Per server: the connections waiting for a request head (from their opening, or idle after an answer), oldest
# first; a dict keeps insertion order, so the longest waiter is found in O(1) however many there are.
_WAITING: weakref.WeakKeyDictionary[Any, dict[HttpToolsProtocol, None]] = weakref.WeakKeyDictionary()


class HttpToolsProtocol(UvicornHttpToolsProtocol):
    """uvicorn's httptools protocol with bounds on head time, head size and open connections (module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits_from_env()
        self._waiting = _WAITING.setdefault(self.server_state, {})
        self._head_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        # The parser is between messages or inside a head (not in a body): bytes that arrive now are head bytes.
        self._awaiting_head = True
        self._head_begun = False  # some of the current head has arrived
        self._head_bytes = 0  # bytes of the current head seen in earlier reads
        self._heads_completed = 0  # heads completed within the read being parsed
        self._answered = False  # refused: whatever still arrives is dropped unparsed

    # --- connection life -----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.connections and not self._evict_longest_waiter():
            self.transport.close()  # every other connection is mid-request: no room
            return
        self._waiting[self] = None
        self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # kept alive and idle: waiting for its next head
            self._waiting[self] = None

    # --- reads and parser callbacks ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return
        room = self.limits.head_bytes - self._head_bytes
        if self._awaiting_head and len(data) > room:
            # Only as much as the limit allows reaches the parser: a head still incomplete after it is too large.
            if room:
                self._parse(data[:room])
            if self._answered or self.transport.is_closing():
                return
            if self._awaiting_head and not self._heads_completed:
                self._refuse_head()
                return
            data = data[room:]
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        counted = self._awaiting_head
        self._heads_completed = 0
        super().data_received(data)
        if not self._awaiting_head or self.transport.is_closing():
            return
        if counted and not self._heads_completed:
            self._head_bytes += len(data)
        else:
            # This head began inside `data`, after the end of an earlier message (pipelined requests); where is
            # unknown, so this part of it is not counted: the bound stretches by at most one read (256 KiB).
            self._head_bytes = 0
        if self._head_bytes > self.limits.head_bytes:
            self._refuse_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True
        if self._head_timer is None:  # a later request on a kept-alive connection: its time starts now
            self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_timed_out)

    def on_headers_complete(self) -> None:
        self._stop_waiting()
        self._awaiting_head = self._head_begun = False
        self._head_bytes = 0
        self._heads_completed += 1
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_head = True

    # --- the bounds --------------------------------------------------------------------------------------------

    def _stop_waiting(self) -> None:
        self._waiting.pop(self, None)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _responding(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _evict_longest_waiter(self) -> bool:
        oldest = next(iter(self._waiting), None)
        if oldest is None:
            return False
        oldest._head_timed_out(
            f"request head not complete when the server reached its limit of {self.limits.connections} connections"
        )
        return True

    def _head_timed_out(self, detail: str | None = None) -> None:
        self._stop_waiting()
        if self.transport.is_closing():
            return
        if self._head_begun and not self._responding():
            self._answer(408, detail or f"request head did not arrive within {self.limits.head_timeout:g} s")
        else:  # nothing of a request came (or an answer is still going out): nobody to answer
            self.transport.close()

    def _refuse_head(self) -> None:
        self._stop_waiting()
        if self._responding():  # pipelined behind an unfinished answer: no place for another one
            self.transport.close()
            return
        detail = f"request head (request line and headers) over the limit of {self.limits.head_bytes} bytes"
        self._answer(431, detail, linger=True)

    def _answer(self, status: int, detail: str, linger: bool = False) -> None:
        """A JSON {"detail": ...} answer, like the app's errors, then the connection is closed."""
        self.logger.info("%s:%d - %d %s", *(self.client or ("?", 0)), status, detail)
        body = json.dumps({"detail": detail}).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self._answered = True
        if linger and self.transport.can_write_eof():
            self.transport.write_eof()
            self._linger_timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()


def serve(host: str, port: int, **uvicorn_options: Any) -> None:
    """`oracle_mnist.api:app` under uvicorn with `HttpToolsProtocol`; bad settings raise before it starts."""
    import uvicorn

    limits_from_env()
    uvicorn.run("oracle_mnist.api:app", host=host, port=port, http=HttpToolsProtocol, **uvicorn_options)
