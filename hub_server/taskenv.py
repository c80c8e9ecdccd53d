"""A task's own environment variables (``TaskSpec.env``): names and limits.

Clients use it to give each copy of a sweep its parameters (``HWF_INDEX``,
``HWF_PARAM_<NAME>``) without rewriting commands.  The hub refuses a bad
map at submit (``env_problem``) and the daemon adds the map to the task's
environment *before* its own ``HWF_TASK_ID``/``HWF_ATTEMPT``, so a task
cannot pose as another attempt.  Values only reach the task's own
processes, which could ``export`` the same themselves.
"""

from __future__ import annotations

import re
from typing import Any, Optional

MAX_VARS = 64
MAX_NAME = 64
MAX_VALUE = 4096
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Set by the daemon for every task, or secrets: not the client's to choose.
RESERVED = frozenset({"HWF_TASK_ID", "HWF_ATTEMPT", "HWF_TOKEN"})


def env_problem(env: Any) -> Optional[str]:
    """What is wrong with ``env`` (as text naming the variable), or None."""
    if not isinstance(env, dict):
        return f"env must be a mapping of names to strings, got {type(env).__name__}"
    if len(env) > MAX_VARS:
        return f"env has {len(env)} variables; at most {MAX_VARS}"
    for name, value in env.items():
        if not isinstance(name, str) or not NAME_RE.match(name) or len(name) > MAX_NAME:
            return (f"env name {str(name)[:80]!r} must be letters, digits and _ "
                    f"(not starting with a digit), at most {MAX_NAME} characters")
        if name in RESERVED:
            return f"env name {name!r} is reserved (set by the daemon)"
        if not isinstance(value, str):
            return f"env {name}: value must be a string, got {type(value).__name__}"
        if "\x00" in value:
            return f"env {name}: value contains a NUL character"
        if len(value) > MAX_VALUE:
            return f"env {name}: value is {len(value)} characters; at most {MAX_VALUE}"
    return None
