"""A connection to the hub, as daemons and clients hold one.

Wraps one websocket: matches replies to requests by ``id``, turns ``error``
replies into ``RemoteError``, streams blobs up and down in binary frames, and
hands every other message (pushes such as ``assign``) to ``on_message``.
Reconnecting is the owner's job: a Link is one connection's lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import ssl as _ssl
from pathlib import Path
from typing import Any, Awaitable, BinaryIO, Callable, Optional, Union

import websockets
from websockets.asyncio.client import ClientConnection, connect

from . import protocol as p
from .blobs import fileobj_sha256


class HubError(Exception):
    """Base of the errors a hub connection raises."""


class ConnectError(HubError, ConnectionError):
    """The hub could not be reached or refused the handshake."""


class AccessRefused(ConnectError):
    """The hub refused the token (missing, unknown or revoked): retrying will not help."""


class RemoteError(HubError):
    """The hub answered a request with an ``error`` message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class LinkClosed(HubError, ConnectionError):
    """The connection dropped while a request was in flight."""


def normalize_url(address: str) -> str:
    """``host``, ``host:port`` or ``ws://host:port`` -> a ws:// URL;
    ``unix:/abs/path.sock`` or ``unix:///abs/path.sock`` -> ``unix:/abs/path.sock``."""
    address = address.strip()
    if address.startswith("unix:"):
        return "unix:" + unix_path(address)
    if "://" not in address:
        address = "ws://" + address
    scheme, rest = address.split("://", 1)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"hub address must be ws://, wss:// or unix:/path, got {address!r}")
    hostport = rest.split("/", 1)[0]
    if ":" not in hostport.rsplit("]", 1)[-1]:
        rest = hostport + f":{p.DEFAULT_PORT}" + rest[len(hostport):]
    return f"{scheme}://{rest}"


def unix_path(url: str) -> str:
    """The socket path of a ``unix:/abs/path`` or ``unix:///abs/path`` URL."""
    rest = url[len("unix:"):]
    path = rest[2:] if rest.startswith("///") else rest
    if not path.startswith("/") or path.startswith("//"):
        raise ValueError(f"hub address {url!r}: expected unix:/absolute/path.sock or unix:///absolute/path.sock")
    return path


SSLArg = Union[None, str, os.PathLike, _ssl.SSLContext]


def client_tls(url: str, ssl: SSLArg) -> Optional[_ssl.SSLContext]:
    """The TLS context for ``url``: None for ws://; for wss:// the given
    context, or one trusting the given CA file, or the system's CAs."""
    if not url.startswith("wss://"):
        if ssl is not None:
            raise ValueError(f"ssl= is given but {url} is not a wss:// address")
        return None
    if isinstance(ssl, _ssl.SSLContext):
        return ssl
    ctx = _ssl.create_default_context(cafile=os.fspath(ssl) if ssl is not None else None)
    ctx.minimum_version = _ssl.TLSVersion.TLSv1_2
    return ctx


class _Sink:
    """Receives one blob's binary frames into a file, checking its hash."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.tmp = dest.with_name(dest.name + ".part")
        self.file: Any = None
        self.size: Optional[int] = None
        self.sha256 = ""
        self.hash = hashlib.sha256()
        self.received = 0
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    def start(self, info: p.BlobData) -> None:
        self.size, self.sha256 = info.size, info.sha256
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.tmp, "wb")
        if info.size == 0:
            self._finish()

    def write(self, payload: memoryview) -> None:
        if self.file is None or self.size is None:
            return
        self.file.write(payload)
        self.hash.update(payload)
        self.received += len(payload)
        if self.received >= self.size:
            self._finish()

    def _finish(self) -> None:
        self.file.close()
        if self.received != self.size or self.hash.hexdigest() != self.sha256:
            os.unlink(self.tmp)
            self.fail(HubError(f"download of {self.sha256[:12]}… was corrupt"))
            return
        os.replace(self.tmp, self.dest)
        if not self.done.done():
            self.done.set_result(self.received)

    def fail(self, exc: BaseException) -> None:
        if self.file is not None and not self.file.closed:
            self.file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)
        if not self.done.done():
            self.done.set_exception(exc)


class Link:
    def __init__(
        self,
        url: str,
        token: Optional[str],
        *,
        agent: str = "hwf",
        on_message: Optional[Callable[[Any], Optional[Awaitable[None]]]] = None,
        ssl: SSLArg = None,
    ) -> None:
        self.url = normalize_url(url)
        self.tls = client_tls(self.url, ssl)
        self.token = token
        self.agent = agent
        self.on_message = on_message
        self.ws: Optional[ClientConnection] = None
        self.welcome: Optional[p.Welcome] = None
        self.limits = p.Limits()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._sinks: dict[int, _Sink] = {}
        self._reader: Optional[asyncio.Task] = None
        self.closed: Optional[asyncio.Future] = None

    def next_id(self) -> int:
        return next(self._ids)

    async def connect(self, timeout: float = 10.0) -> p.Welcome:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        where: dict[str, Any] = {"uri": self.url}
        if self.url.startswith("unix:"):  # the hub's --unix socket: same handshake, no TLS
            where = {"uri": "ws://localhost/", "unix": True, "path": unix_path(self.url)}
        try:
            self.ws = await connect(
                **where,
                additional_headers=headers,
                open_timeout=timeout,
                max_size=None,  # the hub enforces limits; replies may be large
                compression=None,
                proxy=None,
                ping_interval=20,
                ping_timeout=60,
                ssl=self.tls,
            )
        except websockets.InvalidStatus as exc:
            status = exc.response.status_code
            body = (exc.response.body or b"").decode(errors="replace").strip()
            if status in (401, 403):
                raise AccessRefused(f"hub at {self.url} refused the connection: {body or status}") from None
            raise ConnectError(f"hub at {self.url} answered HTTP {status}: {body}") from None
        except _ssl.SSLError as exc:
            raise ConnectError(f"TLS with hub at {self.url} failed: {exc}") from None
        except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake) as exc:
            raise ConnectError(f"cannot reach hub at {self.url}: {exc or type(exc).__name__}") from None
        await self.ws.send(p.encode(p.Hello(version=p.PROTOCOL_VERSION, agent=self.agent)), text=True)
        try:
            first = p.decode(await asyncio.wait_for(self.ws.recv(), timeout))
        except (websockets.ConnectionClosed, asyncio.TimeoutError) as exc:
            raise ConnectError(f"hub at {self.url} closed the connection during hello: {exc}") from None
        if isinstance(first, p.Error):
            await self.ws.close()
            raise ConnectError(f"hub at {self.url} refused hello: {first.message}")
        if not isinstance(first, p.Welcome):
            raise ConnectError(f"hub at {self.url} sent {type(first).__name__} instead of welcome")
        self.welcome = first
        self.limits = first.limits
        self.closed = asyncio.get_running_loop().create_future()
        self._reader = asyncio.ensure_future(self._read())
        return first

    @property
    def is_open(self) -> bool:
        return self.closed is not None and not self.closed.done()

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader

    async def _read(self) -> None:
        assert self.ws is not None
        reason: BaseException = LinkClosed(f"connection to {self.url} closed")
        try:
            async for frame in self.ws:
                if isinstance(frame, bytes):
                    self._on_chunk(frame)
                else:
                    await self._on_text(frame)
        except websockets.ConnectionClosed as exc:
            reason = LinkClosed(f"connection to {self.url} lost: {exc}")
        except Exception as exc:  # keep the reason for waiters
            reason = LinkClosed(f"connection to {self.url} failed: {exc!r}")
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(reason)
            self._pending.clear()
            for sink in self._sinks.values():
                sink.fail(reason)
            self._sinks.clear()
            if self.closed is not None and not self.closed.done():
                self.closed.set_result(reason)

    async def _on_text(self, frame: str) -> None:
        msg = p.decode(frame)
        rid = getattr(msg, "id", None)
        if isinstance(msg, p.BlobData) and rid in self._sinks:
            self._sinks[rid].start(msg)
        if rid is not None and rid in self._pending:
            fut = self._pending.pop(rid)
            if not fut.done():
                if isinstance(msg, p.Error):
                    fut.set_exception(RemoteError(msg.code, msg.message))
                else:
                    fut.set_result(msg)
            if isinstance(msg, p.Error) and rid in self._sinks:
                self._sinks.pop(rid).fail(RemoteError(msg.code, msg.message))
            return
        if isinstance(msg, p.Error) and rid in self._sinks:
            self._sinks.pop(rid).fail(RemoteError(msg.code, msg.message))
            return
        if self.on_message is not None:
            res = self.on_message(msg)
            if res is not None:
                await res

    def _on_chunk(self, frame: bytes) -> None:
        tid, payload = p.decode_chunk(frame)
        sink = self._sinks.get(tid)
        if sink is not None:
            sink.write(payload)
            if sink.done.done():
                self._sinks.pop(tid, None)

    # -- requests -----------------------------------------------------------

    async def send(self, msg: Any) -> None:
        if self.ws is None or not self.is_open:
            raise LinkClosed(f"not connected to {self.url}")
        try:
            await self.ws.send(p.encode(msg), text=True)
        except websockets.ConnectionClosed as exc:
            raise LinkClosed(f"connection to {self.url} lost: {exc}") from None

    async def request(self, msg: Any, timeout: Optional[float] = None) -> Any:
        """Send a request (``msg.id`` set) and return its reply."""
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg.id] = fut
        try:
            await self.send(msg)
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(msg.id, None)

    async def missing_blobs(self, hashes: list[str]) -> set[str]:
        if not hashes:
            return set()
        reply = await self.request(p.BlobsMissing(id=self.next_id(), sha256=hashes))
        return set(reply.missing)

    async def upload(
        self, source: Union[Path, str, BinaryIO], sha256: Optional[str] = None, *, name: Optional[str] = None
    ) -> tuple[str, int]:
        """Send a file into the hub's blob store; returns (sha256, size).

        ``source`` is a path, or a binary file object open for reading, sent
        from its start: a daemon uploads artifacts from files it opened
        safely, never by re-opening a path its task could redirect.
        ``name`` names the file in errors (default: the path or ``f.name``).
        """
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                return await self.upload(f, sha256, name=name or str(source))
        f = source
        label = name or str(getattr(f, "name", "file"))
        size = os.fstat(f.fileno()).st_size
        if sha256 is None:
            sha256 = await asyncio.to_thread(fileobj_sha256, f)
        if size > self.limits.max_file_bytes:
            raise RemoteError(
                "too_large",
                f"{label} is {size} bytes, above the hub's max_file_bytes={self.limits.max_file_bytes}",
            )
        rid = self.next_id()
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self.send(p.BlobPut(id=rid, sha256=sha256, size=size))
            chunk = self.limits.chunk_bytes
            f.seek(0)
            while not fut.done():
                block = f.read(chunk)
                if not block:
                    break
                assert self.ws is not None
                try:
                    await self.ws.send(p.encode_chunk(rid, block))
                except websockets.ConnectionClosed as exc:
                    raise LinkClosed(f"connection to {self.url} lost: {exc}") from None
            await fut
        finally:
            self._pending.pop(rid, None)
        return sha256, size

    async def download(self, sha256: str, dest: Path | str) -> int:
        """Fetch a blob into ``dest`` (written atomically); returns its size."""
        rid = self.next_id()
        sink = _Sink(Path(dest))
        self._sinks[rid] = sink
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self.send(p.BlobGet(id=rid, sha256=sha256))
            await fut  # BlobData or a RemoteError
            return await sink.done
        finally:
            self._pending.pop(rid, None)
            self._sinks.pop(rid, None)
