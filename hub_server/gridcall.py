"""HTC-Grid tasks whose handler the farm names (sans-I/O, shared by hub and daemon).

HTC-Grid deploys its lambda with the compute plane, so a seed client
config names no handler: ``GridConnector.send`` then submits each task
dict as a stage calling ``@grid`` (``PyCall(ref="@grid", arg=<JSON>)``).
The farm supplies the handler: a daemon's own ``--grid-handler``
(it then lists the ``grid`` runtime), else the hub's ``--grid-handler``,
which the hub writes into the assignment of a daemon without one.
A handler is ``module:function`` (called through the Python runtime with
the task dict, and a lambda context when it takes two arguments; its
return value is the task's output) or a shell command (the task dict as
JSON on stdin; its stdout is the output).  ``@grid:module:function`` is a
call with the grid convention and a named handler (a client config's
``handler``).
"""

from __future__ import annotations

import re
from typing import Optional

import msgspec

from .protocol import PyCall, StageSpec, TaskSpec

GRID_REF = "@grid"
_MODULE_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_module_ref(text: str) -> bool:
    """``"package.module:function"`` (else a handler is a shell command)."""
    return bool(_MODULE_REF.match(text))


def is_grid_call(stage: StageSpec) -> bool:
    ref = stage.call.ref if stage.call is not None else None
    return ref is not None and (ref == GRID_REF or ref.startswith(GRID_REF + ":"))


def needs_handler(stage: StageSpec) -> bool:
    """A grid call that leaves the handler to the farm."""
    return stage.call is not None and stage.call.ref == GRID_REF


def check_ref(ref: str) -> Optional[str]:
    """Why a PyCall ``ref`` is not valid, or None."""
    if ref == GRID_REF:
        return None
    if ref.startswith(GRID_REF + ":"):
        ref = ref[len(GRID_REF) + 1:]
    if not is_module_ref(ref):
        return f"ref {ref[:100]!r} is not 'module:function'"
    return None


def check_handler(handler: str) -> Optional[str]:
    """Why a ``--grid-handler`` is not usable, or None."""
    if not handler or not handler.strip():
        return "a grid handler is 'module:function' or a shell command, not empty"
    if "\0" in handler or "\n" in handler:
        return "a grid handler must be one line"
    return None


def with_handler(stage: StageSpec, handler: str) -> StageSpec:
    """The stage with the farm's ``handler`` in place of ``@grid``."""
    if not needs_handler(stage):
        return stage
    assert stage.call is not None
    handler = handler.strip()
    if is_module_ref(handler):
        call = PyCall(python=stage.call.python, ref=f"{GRID_REF}:{handler}", arg=stage.call.arg)
        return msgspec.structs.replace(stage, call=call)
    return msgspec.structs.replace(stage, call=None, cmds=[handler], stdin=stage.call.arg or "null")


def spec_with_handler(spec: TaskSpec, handler: str) -> TaskSpec:
    if not any(needs_handler(s) for s in spec.stages):
        return spec
    return msgspec.structs.replace(spec, stages=[with_handler(s, handler) for s in spec.stages])


def handler_runtime(handler: Optional[str]) -> Optional[str]:
    """The runtime a daemon needs to run ``@grid`` tasks with the hub's handler
    (None: any daemon can; ``grid``: only one with its own handler)."""
    if not handler:
        return "grid"
    return "python" if is_module_ref(handler.strip()) else None
