"""The floor for HWF's websocket traffic: a bare ``websockets`` server.

    python bench/rawws.py --ready-file F      # writes "127.0.0.1 PORT" to F when listening

Same library and options as the hub (``compression=None``, no size limit),
nothing else: no auth, no JSON, no disk, no hashing.  Per connection:

- a text frame ``echo ...`` is sent back as is (round-trip floor);
- ``expect N`` is answered ``ready``; then binary frames are counted and,
  once N bytes arrived, ``got N`` is sent (upload floor);
- ``get N CHUNK`` is answered with N bytes in binary frames of CHUNK bytes,
  then ``end`` (download floor).

``Client`` below is the matching client, used by trials.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

OPTIONS = dict(max_size=None, compression=None)


async def handler(ws) -> None:
    expect = 0
    got = 0
    block = b""
    async for msg in ws:
        if isinstance(msg, bytes):
            got += len(msg)
            if expect and got >= expect:
                await ws.send(f"got {got}")
                expect = got = 0
            continue
        if msg.startswith("echo"):
            await ws.send(msg)
        elif msg.startswith("expect "):
            expect, got = int(msg.split()[1]), 0
            await ws.send("ready")
        elif msg.startswith("get "):
            _, n, chunk = msg.split()
            n, chunk = int(n), int(chunk)
            if len(block) != chunk:
                block = os.urandom(chunk)
            sent = 0
            while sent < n:
                part = block if n - sent >= chunk else block[: n - sent]
                await ws.send(part)
                sent += len(part)
            await ws.send("end")


async def serve_until_signal(ready_file: str) -> None:
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    async with serve(handler, "127.0.0.1", 0, **OPTIONS) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        with open(ready_file + ".tmp", "w") as f:
            f.write(f"127.0.0.1 {port}\n")
        os.replace(ready_file + ".tmp", ready_file)
        await stop


class Client:
    """Timed operations against a running rawws server (asyncio, like HWF's client)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ws = None

    async def __aenter__(self) -> "Client":
        self.ws = await connect(self.url, proxy=None, open_timeout=30, **OPTIONS)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()

    async def echo_rtts(self, n: int, payload: str = "echo " + "x" * 100) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            await self.ws.send(payload)
            await self.ws.recv()
            out.append(time.perf_counter() - t)
        return out

    async def upload(self, data: bytes, chunk: int) -> float:
        """Seconds to send ``data`` in binary frames of ``chunk`` until the server confirms."""
        await self.ws.send(f"expect {len(data)}")
        assert await self.ws.recv() == "ready"
        view = memoryview(data)
        t = time.perf_counter()
        for i in range(0, len(data), chunk):
            await self.ws.send(view[i : i + chunk])
        reply = await self.ws.recv()
        elapsed = time.perf_counter() - t
        assert reply == f"got {len(data)}", reply
        return elapsed

    async def download(self, n: int, chunk: int) -> float:
        """Seconds to receive ``n`` bytes in binary frames of ``chunk``."""
        t = time.perf_counter()
        await self.ws.send(f"get {n} {chunk}")
        got = 0
        while True:
            msg = await self.ws.recv()
            if isinstance(msg, str):
                assert msg == "end", msg
                break
            got += len(msg)
        elapsed = time.perf_counter() - t
        assert got == n, (got, n)
        return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description="bare websocket echo/transfer server (benchmark floor)")
    ap.add_argument("--ready-file", required=True)
    asyncio.run(serve_until_signal(ap.parse_args().ready_file))


if __name__ == "__main__":
    main()
