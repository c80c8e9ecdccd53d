"""``dispatch``: send tasks to a hub (seed 000's coroutine, with its options)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

import msgspec

from hub_server import protocol as p
from hub_server.blobs import file_sha256

from ._ioloop import on_io_loop, sync_twin
from .frames import short_id
from .results import HardwarePool, ResultList
from .task import Data, Task, TaskError, as_task_list, check_frames, check_parser

if TYPE_CHECKING:
    from .hub import Hub


class Submission(list):
    """The task ids of one dispatch (a list of str) and their ``session_id``."""

    def __init__(self, task_ids: Iterable[str], session_id: str, hub: "Hub") -> None:
        super().__init__(task_ids)
        self.session_id = session_id
        self.hub = hub
        self.submitted = time.time()
        # Status counts from the last results() call, with when they came: the
        # HTML card shows them (a repr never asks the hub).
        self.counts: Optional[dict[str, int]] = None
        self.counts_at: Optional[float] = None

    def _remember(self, results: ResultList) -> ResultList:
        self.counts, self.counts_at = results.by_status(), time.time()
        return results

    async def results(self, wait: bool = True, timeout: Optional[float] = None) -> ResultList:
        return self._remember(await self.hub.get_result(list(self), wait=wait, timeout=timeout))

    def results_sync(self, wait: bool = True, timeout: Optional[float] = None) -> ResultList:
        return self._remember(self.hub.get_result_sync(list(self), wait=wait, timeout=timeout))

    def __repr__(self) -> str:
        return f"<Submission {len(self)} task(s) in session {self.session_id}>"

    def _repr_html_(self) -> str:
        """A Dask-like card: session, task count, last known status counts, status page."""
        from . import cards

        now = time.time()
        if self.counts is None:
            status = f"<i>submitted {cards.esc(cards.fmt_age(now - self.submitted))}; "\
                     f"<code>sub.results_sync(wait=False)</code> fetches the status</i>"
        else:
            status = f"{cards.status_counts_html(self.counts)} " \
                     f"<i>({cards.esc(cards.fmt_age(now - (self.counts_at or now)))})</i>"
        rows = [("session", cards.code(self.session_id)), ("tasks", cards.esc(len(self))),
                ("status", status), ("hub", cards.code(self.hub.url))]
        ids = ", ".join(cards.code(short_id(t)) for t in list(self)[:5]) + (" …" if len(self) > 5 else "")
        if ids:
            rows.append(("task ids", ids))
        return cards.card("HWF Submission", rows, status_url=self.hub.status_url)


def expand(
    tasks: Union[Task, Iterable[Task]], *, repeat: int = 1, across: Optional[HardwarePool] = None
) -> list[Task]:
    """The concrete task list: ``repeat`` copies, each pinned across a pool."""
    items = as_task_list(tasks)
    if not isinstance(repeat, int) or repeat < 1:
        raise TaskError(f"repeat must be a whole number >= 1, got {repeat!r}")
    if across is not None:
        if not isinstance(across, HardwarePool):
            raise TaskError("across= takes a HardwarePool (from hub.get_hardware_pool())")
        if len(across) == 0:
            raise TaskError("across= got an empty HardwarePool: no machine matched")
        items = [t.pinned_to(m.name) for t in items for m in across]
    return [t for t in items for _ in range(repeat)]


@on_io_loop
async def dispatch(
    task_or_tasks: Union[Task, Iterable[Task]],
    hub: "Hub",
    *,
    repeat: int = 1,
    priority: int = 0,
    across: Optional[HardwarePool] = None,
    session: Optional[str] = None,
    max_retries: int = 3,
    timeout: Optional[float] = None,
    credits: Union[int, tuple[int, int], None] = None,
    stream: bool = False,
    parser: Optional[str] = None,
    frames: Optional[tuple[int, int]] = None,
) -> Submission:
    """Upload the tasks' Data files (once each) and queue the tasks on the hub.

    ``stream=True`` makes daemons send stdout/stderr live to watchers.
    ``credits``: what each task's credit slot pays the machine that runs it:
    ``N`` fixed, or ``(min, max)`` to clamp its CPU-seconds into; default:
    its CPU-seconds rounded up, at least 1.
    ``parser`` ("frames", "percent", "hwf-progress") makes daemons read each
    task's progress from its output, and ``frames=(start, end)`` gives the
    frame range a "frames" percent is counted in; both override the Task's own.
    """
    credit_spec = credit_spec_of(credits)
    progress = progress_fields(parser, frames)
    if timeout is not None and timeout <= 0:
        raise TaskError(f"timeout must be > 0 seconds, got {timeout!r}")
    if not isinstance(max_retries, int) or max_retries < 0:
        raise TaskError(f"max_retries must be a whole number >= 0, got {max_retries!r}")
    items = expand(task_or_tasks, repeat=repeat, across=across)
    paths = await upload_data(hub, [d for t in items for d in t.data_files()])
    specs = [
        t.spec(paths, priority=priority, max_retries=max_retries, timeout=timeout, stream=stream)
        for t in items
    ]
    if credit_spec is not None:
        specs = [msgspec.structs.replace(s, credits=credit_spec) for s in specs]
    if progress:
        specs = [msgspec.structs.replace(s, **progress) for s in specs]
    session_id, ids = await hub._submit(specs, session)
    return Submission(ids, session_id, hub)


dispatch_sync = sync_twin(dispatch)


async def upload_data(hub: "Hub", files: Iterable[Data]) -> dict[Path, tuple[str, int]]:
    """Hash each local file once and upload those the hub lacks: ``{path: (sha256, size)}``."""
    paths: dict[Path, tuple[str, int]] = {}
    for d in files:
        if d.path not in paths:
            d.check()
            sha = await asyncio.to_thread(file_sha256, d.path)
            paths[d.path] = (sha, d.path.stat().st_size)
    await hub._upload_missing(paths)
    return paths


def credit_spec_of(credits: Union[int, tuple[int, int], None]) -> Optional[p.CreditSpec]:
    """``N`` or ``(min, max)`` as the protocol's CreditSpec; a clear error otherwise."""
    if credits is None:
        return None
    if isinstance(credits, bool):
        raise TaskError(f"credits must be a whole number or a (min, max) pair, got {credits!r}")
    if isinstance(credits, int):
        if credits < 0:
            raise TaskError(f"credits must be >= 0, got {credits}")
        return p.CreditSpec(credits=credits)
    if (isinstance(credits, (tuple, list)) and len(credits) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in credits)):
        lo, hi = credits
        if lo < 0 or hi < lo:
            raise TaskError(f"credits=(min, max) needs 0 <= min <= max, got {tuple(credits)!r}")
        return p.CreditSpec(min=lo, max=hi)
    raise TaskError(f"credits must be a whole number or a (min, max) pair, got {credits!r}")


def progress_fields(parser: Optional[str], frames: Optional[tuple[int, int]]) -> dict[str, Any]:
    """dispatch's ``parser=``/``frames=`` as TaskSpec fields to set (only those given)."""
    fields: dict[str, Any] = {}
    if parser is not None:
        fields["parser"] = check_parser(parser)
    if frames is not None:
        if not isinstance(frames, (tuple, list)) or len(frames) != 2:
            raise TaskError(f"frames must be a (start, end) pair, got {frames!r}")
        fields["frame_start"], fields["frame_end"] = check_frames(*frames)
    return fields
