"""Where a daemon's token comes from: a private file, stdin, or ``HWF_TOKEN``.

Never the command line: every local user can read any process's argv
(``ps``, ``/proc/PID/cmdline``), including the tasks the daemon runs.  A
token file must be private to its owner, as ssh demands of a private key:
a file others can read is refused rather than used, so the mistake is
fixed instead of silently shipped.
"""

from __future__ import annotations

import getpass
import os
import sys
from typing import Mapping, Optional, TextIO

from hub_server.privatefile import PrivateFileError, read_private_line

TOKEN_ENV = "HWF_TOKEN"

ON_COMMAND_LINE = (
    "--token is not accepted: a token on the command line is visible to every local user "
    "in `ps` (and to the tasks this daemon runs). Put it in a file only you can read "
    "(chmod 600 FILE) and pass --token-file FILE, or pass --token-file - and write it on "
    "stdin, or set HWF_TOKEN"
)


class TokenError(ValueError):
    """The token could not be read safely; the message says what to fix."""


def read_token_file(path: str, stdin: Optional[TextIO] = None) -> str:
    """The first line of ``path`` (``-``: of stdin); refuses a file others can read."""
    if path == "-":
        stream = stdin or sys.stdin
        if stream.isatty():  # typed by hand: do not echo it on the screen
            line = getpass.getpass("daemon token: ", stream=sys.stderr)
        else:
            line = stream.readline()
        token = line.strip()
        if not token:
            raise TokenError("--token-file -: no token on the first line of stdin")
        return token
    try:
        return read_private_line(path, "token file", "the daemon's token")
    except PrivateFileError as exc:
        raise TokenError(str(exc)) from None


def daemon_token(token_file: Optional[str], environ: Mapping[str, str] = os.environ,
                 stdin: Optional[TextIO] = None) -> Optional[str]:
    """The token from ``--token-file`` if given, else from ``HWF_TOKEN``, else None."""
    if token_file is not None:
        return read_token_file(token_file, stdin)
    return environ.get(TOKEN_ENV) or None
