"""HWF: describe compute work in a notebook, run it on a hub of daemons.

    from hwf_jupyter import Hub, Task, Stage, Data, Artifacts, dispatch, LocalCluster
"""

from hub_server import __version__
from hub_server.compilers import CompileError
from hub_server.link import ConnectError, HubError, RemoteError

from .cluster import LocalCluster
from .dispatch import Submission, dispatch, dispatch_sync
from .futures import PyFuture
from .hub import Hub, Session, Watcher
from .results import (
    Artifact,
    CommandResult,
    HardwarePool,
    Machine,
    ResultList,
    StageResult,
    TaskResult,
)
from .pycall import RemoteException, RemoteTraceback, TaskFailed
from .task import Artifacts, Data, Stage, Task, TaskError

__all__ = [
    "Artifact",
    "Artifacts",
    "CommandResult",
    "CompileError",
    "ConnectError",
    "Data",
    "HardwarePool",
    "Hub",
    "HubError",
    "LocalCluster",
    "Machine",
    "PyFuture",
    "RemoteError",
    "RemoteException",
    "RemoteTraceback",
    "ResultList",
    "Stage",
    "StageResult",
    "Session",
    "Submission",
    "Watcher",
    "Task",
    "TaskError",
    "TaskFailed",
    "TaskResult",
    "dispatch",
    "dispatch_sync",
]


def load_ipython_extension(ipython):  # %load_ext hwf_jupyter
    from .magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython):
    from .magics import unload_ipython_extension as unload

    unload(ipython)
