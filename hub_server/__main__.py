"""``python -m hub_server``: run a hub (the same options as ``hwf hub``)."""

import sys

from .cli import main

sys.exit(main())
