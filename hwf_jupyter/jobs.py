"""``Hub.submit_job``: a Manager-API job (``type`` + ``settings``) from Python.

The job is compiled here, on the client, by the same ``hub_server.compilers``
the hub's HTTP API uses, so a bad setting fails in the cell that made it with
the same message an HTTP caller would get; the specs then go to the hub like
``dispatch``'s, and local Data files are uploaded by ``dispatch``'s code.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Union

import msgspec

from hub_server import protocol as p
from hub_server.compilers import CompileError, compile_job

from .dispatch import Submission, upload_data
from .task import Data, TaskError

if TYPE_CHECKING:
    from .hub import Hub

DataArg = Union[Data, str, "os.PathLike[str]"]


def as_data_list(data: Union[DataArg, Iterable[DataArg], None]) -> list[Data]:
    """``Data`` objects from paths or ``Data`` (one or several); names must be unique."""
    if data is None:
        return []
    items = [data] if isinstance(data, (Data, str, os.PathLike)) else list(data)
    out = [d if isinstance(d, Data) else Data(d) for d in items]
    seen: dict[str, Data] = {}
    for d in out:
        if d.filename in seen and seen[d.filename].path != d.path:
            raise TaskError(f"data: two files would be saved as {d.filename!r} "
                            f"({str(seen[d.filename].path)!r} and {str(d.path)!r})")
        seen[d.filename] = d
    for d in out:
        d.check()
    return out


async def submit_job(
    hub: "Hub",
    type: str,
    settings: Mapping[str, Any],
    *,
    parser: Optional[str] = None,
    priority: int = 0,
    session: Optional[str] = None,
    data: Union[DataArg, Iterable[DataArg], None] = None,
    job_id: Optional[str] = None,
    external_id: Optional[str] = None,
    stream: bool = False,
) -> Submission:
    """Compile, upload the job's Data files, submit; the task ids (a ``Submission``)."""
    files = as_data_list(data)
    # Compile before uploading: a bad setting should cost no transfer.
    placeholder = {d.filename: p.DataSpec(d.filename, "0" * 64, 0) for d in files}
    compile_job(type, settings, priority=priority, parser=parser, job_id=job_id,
                external_id=external_id, data=placeholder)
    blobs = await upload_data(hub, files)
    specs = compile_job(
        type, settings, priority=priority, parser=parser, job_id=job_id, external_id=external_id,
        data={d.filename: p.DataSpec(d.filename, *blobs[d.path]) for d in files},
    )
    if stream:
        specs = [msgspec.structs.replace(s, stream=True) for s in specs]
    session_id, ids = await hub._submit(specs, session)
    return Submission(ids, session_id, hub)


__all__ = ["CompileError", "as_data_list", "submit_job"]
