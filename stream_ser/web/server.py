"""The aiohttp server of `stream-ser run --http`: the dashboard and the WebSocket API.

    GET /            the dashboard (stream_ser/web/static/index.html)
    GET /static/...  its files
    GET /healthz     "ok" while serving
    WS  /v1/events   every published message of every stream (or of one): history, then live
    WS  /v1/stream   binary PCM in (one new stream per connection), that stream's messages out

docs/websocket.md is the protocol for clients. Each connection's audio goes through a
PushSource (its bounded queue and overflow rule) into a stream started on the running runtime;
its messages come back through a ResultHub subscription (its bounded queue and overflow rule),
so a client that reads slowly loses windows, then is closed; it never holds up the model or
other streams. A client that disconnects mid-utterance ends its stream: the pipeline still
publishes that utterance's final result once, to every other sink (MQTT, stdout, the hub).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket as socket_module
from collections.abc import AsyncIterator, Coroutine
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import WSMessage, WSMsgType, web

from stream_ser.arrivals import RuntimeClosed, StreamIdInUse
from stream_ser.errors import AudioInputError, ConfigError
from stream_ser.hub import ResultHub, Subscription
from stream_ser.messages import encode
from stream_ser.push import PushSource
from stream_ser.source import SourceStats
from stream_ser.web.options import HttpSettings, is_loopback, parse_address
from stream_ser.web.protocol import (
    Close,
    EventsParams,
    Refusal,
    StreamParams,
    authorized,
    events_params,
    is_end,
    read_token,
    same_origin,
    stream_params,
)

if TYPE_CHECKING:
    from stream_ser.app import Runtime
    from stream_ser.pipeline import StreamPipeline

log = logging.getLogger(__name__)

HEARTBEAT_S = 20.0  # ping; a peer that does not answer within it is disconnected
IDLE_TIMEOUT_S = 60.0  # a /v1/stream connection that sends nothing for this long is closed
FLUSH_TIMEOUT_S = 30.0  # after a stream ended: time for its client to read the last results
SHUTDOWN_S = 5.0  # at exit: time for connections to close before they are cut
MAX_REASON_BYTES = 123  # a close frame's reason, by RFC 6455
# the kernel's send buffer of a WebSocket (it grows to megabytes by default): a client that
# reads slowly is noticed after about this much, and holds no more of the server's memory
SEND_BUFFER_BYTES = 64 * 1024


def static_dir() -> Path:
    """The dashboard's files, installed with the package."""
    return Path(str(files("stream_ser.web") / "static"))


def _reason(text: str) -> bytes:
    """A close reason cut to the length a close frame allows (whole UTF-8 characters)."""
    data = text.encode()
    if len(data) <= MAX_REASON_BYTES:
        return data
    return data[: MAX_REASON_BYTES - 3].decode(errors="ignore").encode() + b"..."


class _Socket(web.WebSocketResponse):
    """aiohttp's WebSocket, whose close for an oversized message says why (aiohttp's has no
    reason)."""

    def __init__(self, max_frame_bytes: int, client: str) -> None:
        super().__init__(max_msg_size=max_frame_bytes, heartbeat=HEARTBEAT_S)
        self.max_frame_bytes = max_frame_bytes
        self.client = client  # the peer's address: connections are counted per client

    async def close(self, *, code: int = 1000, message: bytes = b"", drain: bool = True) -> bool:
        """Close; a TOO_BIG close gets its reason."""
        if code == Close.TOO_BIG and not message:
            message = _reason(f"message too large: more than {self.max_frame_bytes} bytes")
        return await super().close(code=code, message=message, drain=drain)


@dataclass
class WebStats:
    """What the server refused, for the status counters."""

    ws_refused_limit: int = 0  # connections beyond --http-max-connections[-per-client]
    ws_refused_token: int = 0  # missing or wrong token (or a cross-origin page)
    ws_bad_input: int = 0  # streams closed for bad parameters or audio


class WebServer:
    """The routes and their handlers, over one runtime and its hub."""

    def __init__(
        self,
        runtime: Runtime,
        hub: ResultHub,
        settings: HttpSettings,
        token: str | None = None,
        static: Path | None = None,
    ) -> None:
        self.runtime = runtime
        self.hub = hub
        self.settings = settings
        self.token = token
        self.static = static if static is not None else static_dir()
        self.stats = WebStats()
        self.idle_timeout_s = IDLE_TIMEOUT_S
        self.stopping = False
        self._sockets: set[_Socket] = set()
        self._no_sockets = asyncio.Event()  # set while no connection is open
        self._no_sockets.set()
        self._sources: set[PushSource] = set()
        self._subscriptions: set[Subscription] = set()

    def application(self) -> web.Application:
        """The aiohttp application with every route."""
        app = web.Application()
        app.router.add_get("/", self.index)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/v1/events", self.events)
        app.router.add_get("/v1/stream", self.stream)
        if self.static.is_dir():
            app.router.add_static("/static", self.static)
        return app

    def counters(self) -> dict[str, int]:
        """Open connections and refusals, for the status counters."""
        return {"ws_connections": len(self._sockets)} | asdict(self.stats)

    def begin_shutdown(self) -> None:
        """No new connections or streams; the streams of open connections end now."""
        self.stopping = True
        for source in list(self._sources):
            source.end()

    async def close_all(self) -> None:
        """End every subscription and wait (briefly) for the connections to close."""
        self.begin_shutdown()
        for subscription in list(self._subscriptions):
            subscription.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_S):
                await self._no_sockets.wait()

    # ------------------------------------------------------------------ plain HTTP

    async def index(self, request: web.Request) -> web.StreamResponse:
        """The dashboard page."""
        page = self.static / "index.html"
        if not page.is_file():
            raise web.HTTPNotFound(text="the dashboard files are not installed")
        return web.FileResponse(page)

    async def healthz(self, request: web.Request) -> web.Response:
        """Plain "ok" while serving; 503 while shutting down."""
        if self.stopping:
            return web.Response(status=503, text="shutting down")
        return web.Response(text="ok")

    # ------------------------------------------------------------------ WebSockets

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Every published message (or one stream's): the retained history, then live."""
        socket, admitted = await self._open(request)
        if not admitted:
            return socket
        try:
            outcome = await self._follow(socket, events_params(request.query))
        except Refusal as refusal:
            self.stats.ws_bad_input += 1
            outcome = refusal.code, refusal.reason
        finally:
            self._release(socket)
        if outcome is not None:
            await _close(socket, *outcome)
        return socket

    async def _follow(self, socket: _Socket, params: EventsParams) -> tuple[int, str] | None:
        """Send the subscription's messages until it or the client ends: the close code and
        reason to send, or None when the client went away."""
        async with self.hub.subscribe(params.stream_id, params.history) as subscription:
            self._subscriptions.add(subscription)
            listening = asyncio.create_task(_discard_incoming(socket), name="ws-events-in")
            sending = asyncio.create_task(self._send_all(socket, subscription))
            await asyncio.wait({listening, sending}, return_when=asyncio.FIRST_COMPLETED)
            outcome = sending.result() if sending.done() else None
            for task in (listening, sending):
                task.cancel()
            await asyncio.gather(listening, sending, return_exceptions=True)
            self._subscriptions.discard(subscription)
        return outcome

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """One new stream: binary PCM in, its messages out."""
        socket, admitted = await self._open(request)
        if not admitted:
            return socket
        try:
            outcome = await self._ingest(socket, stream_params(request.query))
        except Refusal as refusal:
            self.stats.ws_bad_input += 1
            outcome = refusal.code, refusal.reason
        except Exception:  # the top of this connection's task: the others go on
            log.exception("a WebSocket stream failed")
            outcome = Close.INTERNAL, "internal error (see the server's log)"
        finally:
            self._release(socket)
        await _close(socket, *outcome)
        return socket

    async def _open(self, request: web.Request) -> tuple[_Socket, bool]:
        """Accept the WebSocket and check the token and the limits: the socket, and False
        (the socket closed with the reason) if it is refused."""
        socket = _Socket(self.settings.max_frame_bytes, request.remote or "")
        if not socket.can_prepare(request).ok:
            raise web.HTTPBadRequest(text="expected a WebSocket upgrade")
        await socket.prepare(request)
        _limit_send_buffer(request)
        try:
            self._admit(request)
        except Refusal as refusal:
            log.info("refused a WebSocket on %s: %s", request.path, refusal.reason)
            await _close(socket, refusal.code, refusal.reason)
            return socket, False
        self._sockets.add(socket)
        self._no_sockets.clear()
        return socket, True

    def _release(self, socket: _Socket) -> None:
        self._sockets.discard(socket)
        if not self._sockets:
            self._no_sockets.set()

    def _admit(self, request: web.Request) -> None:
        if self.stopping:
            raise Refusal(Close.GOING_AWAY, "the server is shutting down")
        header = request.headers.get("Authorization")
        if not authorized(self.token, header, request.query.get("token")):
            self.stats.ws_refused_token += 1
            raise Refusal(Close.POLICY, "missing or wrong token")
        if self.token is None and not same_origin(request.headers.get("Origin"), request.host):
            self.stats.ws_refused_token += 1
            raise Refusal(Close.POLICY, "a page of another origin: allowed only with a token")
        if len(self._sockets) >= self.settings.max_connections:
            self.stats.ws_refused_limit += 1
            raise Refusal(
                Close.TRY_AGAIN_LATER,
                f"too many connections: {len(self._sockets)} open (--http-max-connections)",
            )
        client = request.remote or ""
        if (mine := sum(s.client == client for s in self._sockets)) >= (
            self.settings.max_connections_per_client
        ):
            self.stats.ws_refused_limit += 1
            raise Refusal(
                Close.TRY_AGAIN_LATER,
                f"too many connections from {client}: {mine} open "
                "(--http-max-connections-per-client)",
            )

    async def _ingest(self, socket: _Socket, params: StreamParams) -> tuple[int, str]:
        """Run one client's stream to its end; the close code and reason for its socket."""
        stats = SourceStats()
        source = PushSource(params.rate, params.channels, params.sample_format, stats,
                            self.settings.max_queued_s)  # fmt: skip
        subscription = self.hub.subscribe(params.stream_id)  # before the stream starts
        pipeline = self._start(params, source, subscription)
        self._sources.add(source)
        sending = asyncio.create_task(self._send_all(socket, subscription))
        try:
            try:
                refused = await _until_finished(
                    _receive_audio(socket, source, params.mode == "lossless", self.idle_timeout_s),
                    pipeline,
                )
            finally:
                source.end()  # also when the client vanished: the last utterance is flushed
                self._sources.discard(source)
            await pipeline.finished.wait()
            _log_end(params.stream_id, pipeline, subscription)
            subscription.close()  # what is queued is still sent
            sent = await _flushed(sending)
        finally:
            sending.cancel()
        if refused is not None:
            self.stats.ws_bad_input += 1
            return refused
        return sent or (Close.NORMAL, "")

    def _start(
        self, params: StreamParams, source: PushSource, subscription: Subscription
    ) -> StreamPipeline:
        """The client's stream, started on the runtime; Refusal if it cannot be."""
        refusals = {StreamIdInUse: Close.STREAM_ID_IN_USE, ConfigError: Close.BAD_PARAMETERS,
                    RuntimeClosed: Close.GOING_AWAY}  # fmt: skip
        lossless = params.mode == "lossless"
        try:
            pipeline = self.runtime.start(params.stream_id, source.chunks(), source.stats, lossless)
        except (StreamIdInUse, ConfigError, RuntimeClosed) as err:
            subscription.close()
            raise Refusal(refusals[type(err)], str(err)) from err
        pipeline.more_counters = lambda: {"ws_messages_dropped": subscription.dropped}
        log.info("stream %s from a WebSocket client: %d Hz, %d channel(s), %s, %s",
                 params.stream_id, params.rate, params.channels, params.sample_format,
                 params.mode)  # fmt: skip
        return pipeline

    async def _send_all(
        self, socket: _Socket, subscription: Subscription
    ) -> tuple[int, str] | None:
        """Send the subscription's messages until it ends; the close code and reason then
        (None: the client is gone). A subscription closed for slowness closes the socket."""
        try:
            async for message in subscription:
                await socket.send_str(encode(message).decode())
        except ConnectionError:
            subscription.close()
            return None
        if subscription.close_reason is not None:
            outcome = Close.TOO_SLOW, subscription.close_reason
            await _close(socket, *outcome)  # also ends the receiving side
            return outcome
        if self.stopping:
            return Close.GOING_AWAY, "the server is shutting down"
        return Close.NORMAL, "end of stream"


async def _receive_audio(
    socket: _Socket, source: PushSource, lossless: bool, idle_timeout_s: float
) -> tuple[int, str] | None:
    """Push the client's audio until it ends the stream or goes; a close code and reason
    for bad input (None: ended or gone)."""
    while not source.ended:
        try:
            message = await socket.receive(timeout=idle_timeout_s)
        except TimeoutError:
            return Close.IDLE, f"no message for {idle_timeout_s:g} s"
        if message.type != WSMsgType.BINARY:
            return _not_audio(message)
        if source.ended:  # the server began shutting down meanwhile
            break
        try:
            if lossless:
                await source.put(message.data)
            else:
                source.push(message.data)
        except AudioInputError as err:
            return Close.UNSUPPORTED_DATA, str(err)
    return None


def _not_audio(message: WSMessage) -> tuple[int, str] | None:
    """The end frame or a close (None), or another text frame (refused)."""
    if message.type == WSMsgType.TEXT and not is_end(message.data):
        return Close.UNSUPPORTED_DATA, 'the only text frame understood is {"type": "end"}'
    return None  # {"type": "end"}; or closed by the client, by aiohttp (too large) or lost


async def _until_finished(
    receiving: Coroutine[Any, Any, tuple[int, str] | None], pipeline: StreamPipeline
) -> tuple[int, str] | None:
    """What receiving returns, or None if the stream ends first (the server is stopping)."""
    task = asyncio.create_task(receiving, name=f"ws-receive-{pipeline.stream_id}")
    finished = asyncio.create_task(pipeline.finished.wait())
    try:
        await asyncio.wait({task, finished}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        finished.cancel()
        await asyncio.gather(task, finished, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()


async def _flushed(sending: asyncio.Task[tuple[int, str] | None]) -> tuple[int, str] | None:
    """The sender's outcome once it has sent what was queued (TOO_SLOW if that takes long)."""
    try:
        async with asyncio.timeout(FLUSH_TIMEOUT_S):
            return await sending
    except TimeoutError:
        return Close.TOO_SLOW, "the last results were not read in time"


def _log_end(stream_id: str, pipeline: StreamPipeline, subscription: Subscription) -> None:
    counters, stats = pipeline.counters, pipeline.source_stats
    log.info("stream %s ended: %d utterance(s), %d window(s), %d audio block(s) dropped, "
             "%d message(s) the client did not read in time", stream_id, counters.utterances,
             counters.windows, stats.blocks_dropped, subscription.dropped)  # fmt: skip


def _limit_send_buffer(request: web.Request) -> None:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_SNDBUF, SEND_BUFFER_BYTES)


async def _discard_incoming(socket: _Socket) -> None:
    """Read (and ignore) what a /v1/events client sends, until it closes."""
    async for _message in socket:
        pass


async def _close(socket: web.WebSocketResponse, code: int, reason: str) -> None:
    with contextlib.suppress(ConnectionError):
        await socket.close(code=code, message=_reason(reason))


@contextlib.asynccontextmanager
async def serve(
    settings: HttpSettings, runtime: Runtime, hub: ResultHub, stop: asyncio.Event,
    static: Path | None = None,
) -> AsyncIterator[WebServer]:  # fmt: skip
    """Serve until the block ends; at `stop`, take no new streams (the runtime's arrivals
    close) and end the open ones."""
    assert settings.address is not None
    host, port = parse_address(settings.address)
    token = read_token(settings.token, settings.token_file)
    server = WebServer(runtime, hub, settings, token, static)
    hub.more_counters.append(server.counters)
    # no access log: a query's ?token= would be written to it
    runner = web.AppRunner(server.application(), access_log=None, shutdown_timeout=SHUTDOWN_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as err:
            raise ConfigError(f"--http {settings.address}: cannot listen there ({err})") from err
        _announce(runner, host, token)
        watcher = asyncio.create_task(_stop_at(stop, server, runtime), name="http-stop")
        try:
            yield server
        finally:
            watcher.cancel()
            runtime.arrivals.close()
            await server.close_all()
    finally:
        await runner.cleanup()


def _announce(runner: web.AppRunner, host: str, token: str | None) -> None:
    for address in runner.addresses:
        log.info("serving the dashboard and the WebSocket API on http://%s:%d/",
                 *address[:2])  # fmt: skip
    if not is_loopback(host) and token is None:
        log.warning("--http %s is reachable from other machines and has no token: anyone there "
                    "can stream audio and read results (see docs/security.md)", host)  # fmt: skip


async def _stop_at(stop: asyncio.Event, server: WebServer, runtime: Runtime) -> None:
    await stop.wait()
    server.begin_shutdown()
    runtime.arrivals.close()
