"""Drive a real IPython kernel over ZeroMQ (jupyter_client), as a front-end would."""

from __future__ import annotations

import json
import os
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from jupyter_client.manager import KernelManager


@dataclass
class CellRun:
    msg_id: str
    status: str = ""
    outputs: list[dict] = field(default_factory=list)  # iopub content with msg_type
    error: Optional[dict] = None
    reply: dict = field(default_factory=dict)
    started: float = 0.0
    ended: float = 0.0

    @property
    def stdout(self) -> str:
        return "".join(o["text"] for o in self.outputs if o["msg_type"] == "stream" and o["name"] == "stdout")

    @property
    def stderr(self) -> str:
        return "".join(o["text"] for o in self.outputs if o["msg_type"] == "stream" and o["name"] == "stderr")

    def data(self, mime: str = "text/plain") -> list[str]:
        return [o["data"][mime] for o in self.outputs
                if o["msg_type"] in ("display_data", "execute_result") and mime in o.get("data", {})]

    def json(self) -> Any:
        """The last stdout line, parsed as JSON (cells print their findings)."""
        return json.loads(self.stdout.strip().splitlines()[-1])


class Kernel:
    """``local_dir``: its ``%hwf_local`` farm's dir ($HWF_LOCAL_DIR; default
    CWD/hwf-local, one per kernel); ``close()`` stops that farm, since it
    outlives the kernel by design."""

    def __init__(self, cwd: str, env: Optional[dict] = None, local_dir: Optional[str] = None) -> None:
        self.local_dir = local_dir or f"{cwd}/hwf-local"
        env = dict(env if env is not None else os.environ, HWF_LOCAL_DIR=self.local_dir)
        self.km = KernelManager(kernel_name="python3", transport="ipc")
        self.km.connection_file = f"{cwd}/kernel-{id(self)}.json"
        self.km.ip = f"{cwd}/kernel-ipc"
        self.km.start_kernel(cwd=cwd, env=env)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.stray: list[dict] = []  # iopub messages of cells already finished

    def restart(self, now: bool = False) -> None:
        """Restart the kernel as a front-end's "Restart kernel" does (``now``: kill it)."""
        self.km.restart_kernel(now=now)
        self.kc.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 120.0, allow_error: bool = False) -> CellRun:
        run = CellRun(self.kc.execute(code, allow_stdin=False), started=time.monotonic())
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"cell did not finish in {timeout}s: {code[:80]!r}") from None
            content = dict(msg["content"], msg_type=msg["msg_type"], time=time.monotonic())
            if msg["parent_header"].get("msg_id") != run.msg_id:
                self.stray.append(dict(content, parent=msg["parent_header"].get("msg_id")))
                continue
            if msg["msg_type"] == "status" and content["execution_state"] == "idle":
                break
            if msg["msg_type"] == "error":
                run.error = content
            if msg["msg_type"] in ("stream", "display_data", "update_display_data", "execute_result", "error",
                                   "comm_msg", "comm_open"):
                run.outputs.append(content)
        reply = self.kc.get_shell_msg(timeout=10)
        run.status = reply["content"]["status"]
        run.reply = reply["content"]
        if run.status == "error" and run.error is None:
            run.error = reply["content"]
        run.ended = time.monotonic()
        if run.status != "ok" and not allow_error:
            err = run.error or {}
            raise AssertionError(f"cell failed: {err.get('ename')}: {err.get('evalue')}\n{code}")
        return run

    def drain(self, seconds: float) -> list[dict]:
        """Collect iopub messages for a while (output routed to older cells)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                msg = self.kc.get_iopub_msg(timeout=0.05)
            except queue.Empty:
                continue
            self.stray.append(dict(msg["content"], msg_type=msg["msg_type"], time=time.monotonic(),
                                   parent=msg["parent_header"].get("msg_id")))
        return self.stray

    def close(self) -> None:
        from hwf_jupyter import localfarm

        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)
        localfarm.stop_farm(Path(self.local_dir))
