"""How busy this machine is right now, for the hub's heartbeat.

The hub shows it next to each machine so users can see why their work waits
or runs slowly; it is a cheap snapshot, not a measurement over time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import psutil

from hub_server.protocol import Load


def sample_load(path: Union[str, Path] = ".") -> Load:
    """Load averages, CPU/RAM use and the fill level of the disk holding ``path``.

    ``cpu_percent`` is the average since the previous call (psutil keeps the
    reference point), so the first call of a process reports 0.0.
    """
    try:
        load_avg = tuple(float(x) for x in os.getloadavg())
    except (AttributeError, OSError):  # Windows has no load average
        load_avg = (0.0, 0.0, 0.0)
    try:
        disk = float(psutil.disk_usage(str(path)).percent)
    except OSError:
        disk = 0.0
    return Load(
        load_avg=load_avg,  # type: ignore[arg-type]
        cpu_percent=float(psutil.cpu_percent(interval=None)),
        mem_percent=float(psutil.virtual_memory().percent),
        disk_percent=disk,
    )
