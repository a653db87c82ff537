"""The HTTP layer under the routes: who may talk to the server, how long they may take, how it stops.

Owns: `Guard` (ASGI middleware: Host check, a 500 for a kiln bug, response counts with 499 for a client that
left), `read_json` (Content-Type, size, read timeouts, hang-ups, JSON syntax and depth) and `make_server`
(uvicorn with a deadline on each request head and a bounded graceful shutdown; a second signal stops at once).
Not: routes, auth, generation (app.py), the error body shape (protocol.py).

Why: without --api-key any web page can drive a server on localhost. A browser sends a cross-site POST with a
"simple" content type without asking first, so JSON must arrive as application/json; a page on a domain that
resolves to 127.0.0.1 (DNS rebinding) still sends its own name as Host, so only local and allowed names pass.
A client that sends nothing, or a trickle, is cut off after `read_timeout` seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable

import h11
from starlette.requests import ClientDisconnect, Request

from kiln.server import protocol as P

log = logging.getLogger("kiln.server")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
READ_TIMEOUT = 20.0  # seconds for a request head, and between two pieces of a body
SHUTDOWN_GRACE = 5.0  # seconds in-flight requests get after SIGTERM before their generations are cut
_BODY_DEADLINE = 6  # × read_timeout: the longest a whole body may take


# --- Host check and status counting ----------------------------------------------------------------------------
def allowed_hosts(host: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """Host values to accept for a server bound to `host`: local names, `host` itself and `extra`; anything ("*")
    when bound to every interface (0.0.0.0, ::) with no `extra` given."""
    extra = tuple(h.strip().lower() for h in extra if h.strip())
    if host in ("0.0.0.0", "::", "") and not extra:
        return ("*",)
    bound = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return tuple(dict.fromkeys((*LOCAL_HOSTS, bound.lower(), *extra)))


def _host_name(value: str) -> str:
    """The Host header without its port: "localhost:8080" -> "localhost", "[::1]:80" -> "[::1]"."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[:value.find("]") + 1] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """Pure ASGI middleware (streams pass through untouched): reject foreign Host values, then count the response.

    A stream whose client went away sets `scope["kiln.status"] = 499`, which is counted instead of its 200."""

    def __init__(self, app, metrics, hosts: tuple[str, ...], routes: frozenset[str]):
        self.app, self.metrics, self.routes = app, metrics, routes
        self.hosts = None if "*" in hosts else frozenset(hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [None]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            host = dict(scope.get("headers") or ()).get(b"host", b"").decode("latin-1")
            if self.hosts is not None and host and _host_name(host) not in self.hosts:
                err = P.APIError(400, f"Host {host!r} is not served here (a page on another site may be trying to "
                                      f"reach this server); start it with --allowed-hosts NAME to accept it",
                                 code="invalid_host")
                await _send_json(send_status, err.status, err.body(), {"connection": "close"})
                return
            await self.app(scope, receive, send_status)
        except Exception as e:  # a kiln bug: one log entry with its traceback, and a 500 that shows no internals
            body = internal_error(e, f"internal error on {scope.get('method')} {scope.get('path')}")
            if status[0] is not None:
                raise  # mid-response: nothing to say any more; uvicorn closes the connection
            await _send_json(send_status, 500, body, {})
        finally:  # unknown paths share one label: a scanner must not grow the metrics without bound
            path = scope.get("path", "")
            self.metrics.request_done(path if path in self.routes else "other",
                                      scope.get("kiln.status", status[0] or 500))


def internal_error(e: BaseException, what: str) -> dict:
    """Log a kiln bug with its traceback under a short reference; the error body carries the reference only."""
    ref = uuid.uuid4().hex[:8]
    log.error("%s [%s]", what, ref, exc_info=e)
    return P.error_body(500, f"internal server error (reference {ref} in the server log)", code="internal_error")


async def _send_json(send, status: int, body: dict, headers: dict) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


# --- Request bodies --------------------------------------------------------------------------------------------
async def read_json(request: Request, max_body: int, read_timeout: float):
    """The request's JSON body, or an APIError: 415 (not application/json), 413 (too large), 408 (too slow),
    499 (the client hung up), 400 (not JSON, or nested deeper than protocol.MAX_DEPTH)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise P.APIError(415, f"send the request body as JSON with the header 'Content-Type: application/json' (got "
                              f"{kind or 'none'!r})", code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body:
        raise _too_large(int(declared), max_body)
    data = await _read_body(request, max_body, read_timeout)
    return await asyncio.to_thread(_parse, bytes(data))  # a large body parses and is walked off the event loop


async def _read_body(request: Request, max_body: int, read_timeout: float) -> bytearray:
    data, stream = bytearray(), request.stream()
    deadline = time.monotonic() + _BODY_DEADLINE * read_timeout
    try:
        while True:
            wait = min(read_timeout, deadline - time.monotonic())
            try:
                async with asyncio.timeout(max(wait, 0)):
                    part = await anext(stream, None)
            except TimeoutError:
                raise P.APIError(408, f"the request body did not arrive in time (at most {read_timeout:g} s between "
                                      f"pieces, {_BODY_DEADLINE * read_timeout:g} s in all)", code="timeout",
                                 headers={"Connection": "close"}) from None
            if part is None:
                return data
            data += part
            if len(data) > max_body:
                raise _too_large(len(data), max_body)
    except ClientDisconnect:
        log.info("client closed %s during the request body", request.url.path)
        raise P.APIError(499, "the client closed the request", code="client_closed") from None
    finally:
        await stream.aclose()


def _parse(data: bytes):
    try:
        body = json.loads(data)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as e:  # includes bad UTF-8
        raise P.APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if P.too_deep(body):
        raise _too_deep()
    return body


def _too_deep() -> P.APIError:
    return P.APIError(400, f"the request body is nested more than {P.MAX_DEPTH} levels deep", code="invalid_json")


def _too_large(n: int, limit: int) -> P.APIError:
    return P.APIError(413, f"the request body is {n} bytes or more; the limit is {limit} bytes", code="too_large",
                      headers={"Connection": "close"})


# --- uvicorn: head deadline, bounded shutdown ------------------------------------------------------------------
def _protocol(read_timeout: float) -> type:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        """uvicorn's HTTP/1.1 protocol, plus: a request head must be complete `read_timeout` seconds after the
        connection opens, or after its first byte on a kept-alive connection (idle ones: timeout_keep_alive)."""
        _head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(read_timeout, self._head_late)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
            if waiting and self._head_timer is None:
                self._head_timer = self.loop.call_later(read_timeout, self._head_late)
            elif not waiting:
                self._stop_head_timer()

        def connection_lost(self, exc):
            self._stop_head_timer()
            super().connection_lost(exc)

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.debug("closing a connection that sent no complete request in %g s", read_timeout)
                self.transport.close()
    return Protocol


def make_server(app, host: str = "127.0.0.1", port: int = 8080, log_level: str = "warning",
                read_timeout: float = READ_TIMEOUT, shutdown_grace: float = SHUTDOWN_GRACE,
                on_drain: Callable[[], None] | None = None, on_cut: Callable[[], None] | None = None):
    """A uvicorn.Server for `app`. On SIGTERM / Ctrl-C: stop accepting, call `on_drain`, let requests in flight
    run for `shutdown_grace` seconds, then call `on_cut` (which should end them with a finish reason) and give
    them a few more seconds to say so; a second signal stops at once."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if self.should_exit:  # uvicorn forces only on a second SIGINT; a second SIGTERM means it too
                self.force_exit = True
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None):
            if on_drain:
                on_drain()
            cut = asyncio.get_running_loop().call_later(shutdown_grace, on_cut) if on_cut else None
            try:
                await super().shutdown(sockets)
            finally:
                if cut:
                    cut.cancel()

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=_protocol(read_timeout),
                            timeout_graceful_shutdown=math.ceil(shutdown_grace + 3))
    return Server(config)
