"""Execute a notebook headlessly in a real kernel (nbclient), keeping widget state.

Used by ``make demo``, ``hwf run-notebook`` and the tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import nbformat
from nbclient import NotebookClient

from . import localfarm


def executed_path(path: Path) -> Path:
    return path.with_name(path.stem + ".executed.ipynb")


def execute_notebook(
    path: Union[str, os.PathLike],
    out: Optional[Union[str, os.PathLike]] = None,
    *,
    timeout: int = 600,
    cwd: Optional[Union[str, os.PathLike]] = None,
    widgets: bool = True,
    keep_local_farm: bool = False,
) -> tuple[Path, nbformat.NotebookNode]:
    """Run every cell (stopping at the first error) and write the executed copy.

    ``widgets=True`` runs the kernel with live widgets on (HWF_NONINTERACTIVE=0)
    so the executed copy keeps their final state, as a browser would show it.
    A local farm (``%hwf_local``) the run started is stopped after it, unless
    ``keep_local_farm``; one that already ran is left alone.
    """
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        store_widget_state=True,
        resources={"metadata": {"path": str(cwd or path.parent)}},
    )
    env = dict(os.environ, HWF_NONINTERACTIVE="0" if widgets else "1")
    farm_before = _local_farm_running()
    try:
        client.execute(env=env)
    finally:
        if not keep_local_farm and not farm_before:
            # A farm this headless run's %hwf_local started has no one to re-attach to it.
            localfarm.stop_farm(localfarm.default_root())
    dest = Path(out) if out else executed_path(path)
    nbformat.write(nb, dest)
    return dest, nb


def _local_farm_running() -> bool:
    record = localfarm.read_record(localfarm.default_root())
    return record is not None and localfarm.is_farm_process(record.hub_pid, record.root)


def widget_states(nb: nbformat.NotebookNode) -> dict[str, dict]:
    """model id -> state of every widget stored in an executed notebook."""
    stored = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    return {mid: m.get("state", {}) for mid, m in stored.get("state", {}).items()}
