"""Functions MECA-style offload tests call by reference ("meca_tasks:work"):
on the daemons' Python path, as a real deployment installs its task code."""

import time


def work(data: str) -> str:
    name, delay = data.split(":")
    time.sleep(float(delay))
    return f"done-{name}"


def boom(data: str) -> str:
    raise ValueError(f"bad input {data!r}")
