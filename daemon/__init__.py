"""The HWF daemon: runs tasks assigned by the hub and reports how they went.

Its source folder is ``daemon/``; it installs as ``hwf_daemon`` so it never
collides with python-daemon, whose import name is ``daemon``.
"""

from hub_server import __version__

__all__ = ["__version__"]
