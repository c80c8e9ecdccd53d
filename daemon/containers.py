"""MECA container tasks: run the image the way MECA's executor does.

MECA's task containers serve HTTP on port 8080: the executor starts one,
POSTs the task's input (JSON) to ``/`` and the reply body is the result
(the app prints ``meca-init-done`` once it listens).  Here: ``<engine> run -d``
with the port published on 127.0.0.1 only, CPU/memory limits from the task's
hardware, no capabilities and no new privileges; POST when it answers; the
container is always removed (``rm -f``), also on cancel and timeout.

The daemon offers ``docker``/``podman`` only where ``<engine> version``
answers.  The command lines and the HTTP exchange are plain functions,
unit-tested without an engine; running an image needs a real one.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
import urllib.error
import urllib.request
from typing import Any, Optional, Sequence

from hub_server.protocol import CommandOutcome, ContainerCall, StageOutcome

# How long an image may take to pull and start answering; a task's own
# timeout (a cancel) still cuts it short.
START_TIMEOUT = 300.0
REPLY_MAX_BYTES = 16 * 2**20
_PORT = re.compile(r":(\d{1,5})\s*$", re.M)


class ContainerError(RuntimeError):
    """The container could not run or did not answer; the text says which."""


def run_argv(call: ContainerCall, name: str, *, cpus: Optional[float], memory_mb: Optional[int]) -> list[str]:
    """``<engine> run`` for one task: detached, loopback-only port, limits, no privileges."""
    argv = [call.engine, "run", "-d", "--name", name, "-p", f"127.0.0.1::{call.port}",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--pids-limit", "1024"]
    if cpus:
        argv += ["--cpus", f"{cpus:g}"]
    if memory_mb:
        argv += ["--memory", f"{int(memory_mb)}m"]
    if call.gpus:
        argv += ["--gpus", str(call.gpus)]
    return argv + ["--", call.image]


def resource_limits(hardware: dict[str, Any]) -> dict[str, Any]:
    """The task's ``cores``/``ram`` requirements as the container's limits (MECA's
    ``resource``: the executor limits a task to what it asked for)."""
    from hub_server import hardware as hw

    try:
        req = hw.normalize(hardware)
    except hw.HardwareError:
        req = {}
    ram = req.get("ram")
    return {"cpus": req.get("cores"), "memory_mb": int(ram // 2**20) if isinstance(ram, int) and ram else None}


def host_port(port_output: str) -> int:
    """The published port from ``<engine> port NAME 8080/tcp`` (first line wins)."""
    m = _PORT.search(port_output)
    if not m:
        raise ContainerError(f"cannot read the published port from {port_output.strip()[:200]!r}")
    return int(m.group(1))


def post_when_ready(port: int, data: str, path: str, deadline: float, *, poll: float = 0.2) -> str:
    """POST ``data`` to 127.0.0.1:port+path once the server answers; the reply body.
    Connection refusals (not up yet) are retried until ``deadline`` (monotonic)."""
    url = f"http://127.0.0.1:{port}{path if path.startswith('/') else '/' + path}"
    last: Optional[BaseException] = None
    while time.monotonic() < deadline:
        req = urllib.request.Request(url, data=data.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=max(0.1, deadline - time.monotonic())) as resp:
                return resp.read(REPLY_MAX_BYTES + 1)[:REPLY_MAX_BYTES].decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:  # the app answered with an error: that is its result
            body = exc.read(4096).decode("utf-8", "replace")
            raise ContainerError(f"the container answered HTTP {exc.code}: {body[:500]}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            last = exc
            time.sleep(poll)
    raise ContainerError(f"the container did not answer on port {port} in time ({last})")


async def _engine(argv: Sequence[str], timeout: float = 60.0) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        raise ContainerError(f"{argv[0]} {argv[1]} did not finish in {timeout:g}s") from None
    if proc.returncode != 0:
        raise ContainerError(f"{' '.join(argv[:2])} failed: {err.decode('utf-8', 'replace').strip()[:500]}")
    return out.decode("utf-8", "replace")


async def run_container_stage(name: str, call: ContainerCall, hardware: dict[str, Any],
                              cancel: Any) -> tuple[StageOutcome, Optional[str]]:
    """(stage outcome, error or None).  The container never outlives this call."""
    cname = f"hwf-{secrets.token_hex(6)}"
    t0 = time.perf_counter()
    cmd = CommandOutcome(cmd=f"{call.engine} run {call.image}", exit_code=None)
    outcome = StageOutcome(name=name, status="failed", commands=[cmd])
    limits = resource_limits(hardware)
    argv = run_argv(call, cname, **limits)
    error: Optional[str] = None
    try:
        await _engine(argv, timeout=START_TIMEOUT)
        port = host_port(await _engine([call.engine, "port", cname, f"{call.port}/tcp"]))
        work = asyncio.ensure_future(asyncio.to_thread(
            post_when_ready, port, call.data, call.path, time.monotonic() + START_TIMEOUT))
        stop = cancel.future() if hasattr(cancel, "future") else asyncio.ensure_future(cancel.wait())
        done, _ = await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            cmd.stdout, cmd.exit_code, outcome.status = work.result(), 0, "finished"
        else:
            error = "cancelled"
    except ContainerError as exc:
        error = str(exc)
    finally:
        try:
            await _engine([call.engine, "rm", "-f", cname])
        except ContainerError:
            pass  # never created, or already gone
    outcome.duration = time.perf_counter() - t0
    if error is not None:
        cmd.stderr = error
    return outcome, error
