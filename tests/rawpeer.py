"""A bare protocol peer for attack tests: speaks HWF's wire protocol by hand.

Real websockets to a real hub; nothing here is the project's own client or
daemon code, so a test can send what those never would (a rogue daemon, a
client that stops reading, malformed frames).
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, Optional

from websockets.sync.client import connect

from hub_server import protocol as p

HW = {"os": "linux", "distro": "Rogue OS", "arch": "x86_64", "cpu": "rogue cpu", "cores": 2,
      "ram": 2**32, "gpus": []}


class RawPeer:
    def __init__(self, address: str, token: str, *, max_queue: int = 16, hello: bool = True,
                 ssl: Any = None, version: int = p.PROTOCOL_VERSION) -> None:
        self._cm = connect(address, additional_headers={"Authorization": f"Bearer {token}"},
                           proxy=None, max_size=None, compression=None, max_queue=max_queue,
                           open_timeout=10, ssl=ssl)
        self.ws = self._cm.__enter__()
        self.pushes: list[dict] = []
        self._ids = iter(range(1, 10**9))
        self.welcome: Optional[dict] = None
        if hello:
            self.send({"type": "hello", "version": version})
            self.welcome = self.recv()
            assert self.welcome["type"] == "welcome", self.welcome

    def next_id(self) -> int:
        return next(self._ids)

    def send(self, obj: Any) -> None:
        self.ws.send(obj if isinstance(obj, str) else json.dumps(obj))

    def recv(self, timeout: float = 10) -> dict:
        frame = self.ws.recv(timeout=timeout)
        if isinstance(frame, bytes):
            return {"type": "_chunk", "id": struct.unpack(">I", frame[:4])[0], "data": frame[4:]}
        return json.loads(frame)

    def request(self, obj: "dict | str", timeout: float = 10) -> dict:
        """Send a request (an id is added to a dict) and return its reply; pushes
        are kept.  A raw string is sent as is; its reply is the next reply or error."""
        if isinstance(obj, str):
            rid = None
        else:
            obj = dict(obj)
            rid = obj.setdefault("id", self.next_id())
        self.send(obj)
        while True:
            msg = self.recv(timeout)
            if msg["type"] != "_chunk" and (msg.get("id") == rid if rid is not None
                                            else msg["type"] == "error" or "id" in msg):
                return msg
            self.pushes.append(msg)

    def wait_push(self, kind: str, timeout: float = 30) -> dict:
        """The next pushed message of this type; an ``assignments`` batch counts
        as its ``assign`` items."""
        while True:
            for i, msg in enumerate(self.pushes):
                if msg["type"] == kind:
                    return self.pushes.pop(i)
            msg = self.recv(timeout)
            if msg["type"] == "assignments":
                self.pushes += [dict(item, type="assign") for item in msg["items"]]
            else:
                self.pushes.append(msg)

    def upload(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        rid = self.next_id()
        self.send({"type": "blob_put", "id": rid, "sha256": sha, "size": len(data)})
        self.ws.send(struct.pack(">I", rid) + data)
        while True:
            msg = self.recv()
            if msg.get("id") == rid:
                assert msg["type"] == "ok", msg
                return sha
            self.pushes.append(msg)

    def register(self, name: str, *, hardware: Optional[dict] = None, slots: int = 1,
                 tags: tuple[str, ...] = (), running: tuple = (), instance: str = "rogue") -> dict:
        return self.request({"type": "register", "name": name, "hardware": hardware or HW, "slots": slots,
                             "tags": list(tags), "running": [list(r) for r in running], "instance": instance})

    def close(self) -> None:
        self._cm.__exit__(None, None, None)

    def __enter__(self) -> "RawPeer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
