"""``python -m hwf_daemon``: run a daemon (the same options as ``hwf daemon``)."""

import sys

from .cli import main

sys.exit(main())
