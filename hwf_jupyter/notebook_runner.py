"""Execute a notebook headlessly in a real kernel (nbclient), keeping widget state.

Used by ``make demo``, ``hwf run-notebook`` and the tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import nbformat
from nbclient import NotebookClient


def executed_path(path: Path) -> Path:
    return path.with_name(path.stem + ".executed.ipynb")


def execute_notebook(
    path: Union[str, os.PathLike],
    out: Optional[Union[str, os.PathLike]] = None,
    *,
    timeout: int = 600,
    cwd: Optional[Union[str, os.PathLike]] = None,
    widgets: bool = True,
) -> tuple[Path, nbformat.NotebookNode]:
    """Run every cell (stopping at the first error) and write the executed copy.

    ``widgets=True`` runs the kernel with live widgets on (HWF_NONINTERACTIVE=0)
    so the executed copy keeps their final state, as a browser would show it.
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
    client.execute(env=env)
    dest = Path(out) if out else executed_path(path)
    nbformat.write(nb, dest)
    return dest, nb


def widget_states(nb: nbformat.NotebookNode) -> dict[str, dict]:
    """model id -> state of every widget stored in an executed notebook."""
    stored = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    return {mid: m.get("state", {}) for mid, m in stored.get("state", {}).items()}
