"""The HWF hub: schedules tasks from clients onto daemons (``python -m hub_server``)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hwf")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
