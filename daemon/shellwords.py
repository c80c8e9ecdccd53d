"""Which commands can skip bash, and how to run them exactly as bash would.

Starting bash costs more than most short commands (1-2 ms here), and most
commands are one program with plain arguments: ``python train.py --lr
0.1``.  For those, ``bash -c CMD`` parses the words, finds the program on
``$PATH`` and execs it in place of itself (bash's one-shot exec), so the
program sees what ``direct()`` below builds, minus the shell:

* argv as bash splits it; argv[0] is the word as written;
* the environment bash exports: the task's, plus ``PWD`` (the physical
  cwd), ``SHLVL`` (bash's rules, net of its one-shot exec), ``OLDPWD``
  only if it names a directory, and ``_`` (the path bash executes).  The
  variables and values are bash's; their order is not (bash's is that of
  its hash table);
* the program bash would find: the first entry of ``$PATH`` that holds the
  word.  A direct run is planned only when that entry is a regular file
  the task's user may execute (by its mode bits); anything else, even a
  file that is there but not executable, goes to bash;
* what the exec itself does (no such file, permission, ``#!`` with a
  missing interpreter, a script without ``#!``) is bash's: the caller runs
  the same command under bash whenever the direct exec fails, which exits
  and speaks as bash does (127 "command not found", 126, ...).  A failed
  exec runs none of the program's code, so nothing happens twice.

Everything else goes to bash, conservatively: any character outside a
small set of plain ones (quotes, ``$``, backticks, ``\\``, ``|&;<>()``,
globs ``*?[]``, braces, ``~``, ``#``, ``!``, ``^``, tabs, newlines,
non-ASCII), an assignment (``=`` in the first word), a keyword, a builtin
(``cd``, ``export``, ``exit``, ``ulimit``, ``echo``, ...; but ``true`` /
``false`` with no arguments, which are the same programs), and an
environment that changes what bash does (``BASH_ENV``, exported
functions, ``SHELLOPTS``, ``EXECIGNORE``, ...) or a ``$PATH`` with
relative entries.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional, Union

if TYPE_CHECKING:
    from .accounts import TaskUser

# Words of these characters only; nothing bash expands, quotes, redirects,
# separates or comments.  "=" is literal except in the first word.
_PLAIN = re.compile(r"[A-Za-z0-9 _./:,+%@=-]+")

KEYWORDS = frozenset(
    "if then else elif fi case esac for select while until do done in function time coproc".split()
)
BUILTINS = frozenset(
    """. : [ alias bg bind break builtin caller cd command compgen complete compopt continue
    declare dirs disown echo enable eval exec exit export false fc fg getopts hash help history
    jobs kill let local logout mapfile popd printf pushd pwd read readarray readonly return set
    shift shopt source suspend test times trap true type typeset ulimit umask unalias unset wait""".split()
)
# Builtins whose program does exactly what the builtin does, with no arguments.
_SAME_PROGRAM = {"true": ("/usr/bin/true", "/bin/true"), "false": ("/usr/bin/false", "/bin/false")}

# Variables bash reads or replaces when it starts (it would source a file,
# import functions, trace, skip programs, or export another value: found by
# running ``bash -c env`` with each of bash's variables set to a junk value).
_BASH_VARIABLES = frozenset(
    """BASH BASHOPTS BASHPID BASH_ARGV0 BASH_COMMAND BASH_COMPAT BASH_ENV BASH_EXECUTION_STRING
    BASH_SUBSHELL BASH_VERSINFO BASH_VERSION BASH_XTRACEFD COMP_WORDBREAKS ENV EPOCHREALTIME
    EPOCHSECONDS EXECIGNORE HISTCMD IFS LINENO OPTERR OPTIND POSIXLY_CORRECT PPID PS1 PS2 PS4
    RANDOM SHELLOPTS SRANDOM""".split()
)
SHELL = "/bin/bash" if os.path.exists("/bin/bash") else (shutil.which("bash") or "/bin/sh")
_quiet_locales: dict[str, bool] = {}


def _bash_is_quiet_with(lc_all: str) -> bool:
    """bash warns on stderr when LC_ALL names a locale it cannot load; ask it
    once per value."""
    quiet = _quiet_locales.get(lc_all)
    if quiet is None:
        import subprocess

        try:
            done = subprocess.run([SHELL, "-c", ":"], env={"LC_ALL": lc_all}, stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=10)
            quiet = done.returncode == 0 and not done.stdout and not done.stderr
        except (OSError, subprocess.SubprocessError):
            quiet = False
        _quiet_locales[lc_all] = quiet
    return quiet


_keys_seen: dict[frozenset, bool] = {}  # a daemon's tasks share one set of names


def _bash_would_differ(env: Mapping[str, str]) -> bool:
    keys = frozenset(env)
    differ = _keys_seen.get(keys)
    if differ is None:
        differ = not _BASH_VARIABLES.isdisjoint(keys) or any(k.startswith("BASH") for k in keys)
        if len(_keys_seen) < 64:
            _keys_seen[keys] = differ
    if differ:
        return True
    lc_all = env.get("LC_ALL")
    return lc_all is not None and not _bash_is_quiet_with(lc_all)


@dataclass(frozen=True)
class Direct:
    """How to exec a command without bash: ``exe`` (relative: to the cwd)
    with ``argv`` in ``env``."""

    exe: str
    argv: list[str]
    env: dict[str, str]


def plain_words(cmd: str) -> Optional[list[str]]:
    """The words of ``cmd`` if it is one simple command bash would not expand, else None."""
    if not _PLAIN.fullmatch(cmd):
        return None
    words = cmd.split(" ")
    words = [w for w in words if w]
    if not words:
        return None
    first = words[0]
    if "=" in first or first in KEYWORDS:
        return None
    if first in BUILTINS and not (first in _SAME_PROGRAM and len(words) == 1):
        return None
    return words


def _may_search(st: os.stat_result, user: "TaskUser") -> bool:
    """Mode bits say ``user`` may execute (file) or search (dir) this; as
    tasks run with no supplementary groups, only the primary gid counts."""
    mode = st.st_mode
    if st.st_uid == user.uid:
        return bool(mode & stat.S_IXUSR)
    if st.st_gid == user.gid:
        return bool(mode & stat.S_IXGRP)
    return bool(mode & stat.S_IXOTH)


def _executable(path: str, user: Optional["TaskUser"]) -> Optional[bool]:
    """None if nothing is at ``path``; else whether it is a regular file
    the task's user may execute (the dirs on the way are left to the exec:
    if the user cannot pass them, the exec fails and bash runs instead)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return False
    if user is None:
        return os.access(path, os.X_OK)
    return _may_search(st, user)


def _find(word: str, env: Mapping[str, str], cwd: str, user: Optional["TaskUser"]) -> Optional[str]:
    """The path bash would exec for ``word`` (as bash builds it), or None: bash decides."""
    if word in _SAME_PROGRAM:
        for path in _SAME_PROGRAM[word]:
            if _executable(path, user):
                return path
        return None
    if "/" in word:
        full = word if word.startswith("/") else os.path.join(cwd, word)
        return word if _executable(full, user) else None
    path = env.get("PATH")
    if not path:
        return None
    for entry in path.split(":"):
        if not entry.startswith("/") or "~" in entry:
            return None  # bash's rules for these (cwd, tilde) are not worth copying
        candidate = entry + "/" + word  # bash's make_full_pathname, trailing "/" and all
        found = _executable(candidate, user)
        if found is None:
            continue
        return candidate if found else None
    return None


def _dir_visible(path: str, user: Optional["TaskUser"]) -> Optional[bool]:
    """Would ``stat(path)`` by ``user`` find a directory?  None: cannot tell."""
    if not path.startswith("/"):
        return None
    if user is None:
        return os.path.isdir(path)
    try:
        if not stat.S_ISDIR(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    parts = path.rstrip("/").split("/")
    for i in range(1, len(parts)):  # every ancestor must be searchable
        try:
            st = os.lstat("/".join(parts[:i]) or "/")
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            return None  # the walk goes elsewhere: not worth following
        if not _may_search(st, user):
            return False
    return True


def _shlvl(value: Optional[str]) -> Optional[str]:
    """The SHLVL bash's one-shot exec passes on; None if bash would warn."""
    if value is None:
        return "0"
    text = value.strip(" \t")
    if not re.fullmatch(r"[+-]?[0-9]{1,9}", text):
        return "0"
    level = max(int(text), 0)
    if level + 1 >= 1000:
        return None  # "shell level too high" on stderr: leave it to bash
    return str(level)


def direct(cmd: str, env: Mapping[str, str], cwd: Union[str, os.PathLike],
           user: Optional["TaskUser"] = None) -> Optional[Direct]:
    """How to run ``cmd`` without bash as ``user`` (None: this process's) in
    ``cwd`` with environment ``env``, or None when bash must run it."""
    words = plain_words(cmd)
    if words is None or os.path.basename(SHELL) != "bash":
        return None
    if _bash_would_differ(env):
        return None
    cwd = os.fspath(cwd)
    exe = _find(words[0], env, cwd, user)
    if exe is None:
        return None
    out = dict(env)
    # bash keeps an inherited PWD naming the cwd; a task's never does.
    pwd = env.get("PWD")
    if not (pwd and pwd.startswith("/") and _same_dir(pwd, cwd)):
        out["PWD"] = _physical(cwd)
    shlvl = _shlvl(env.get("SHLVL"))
    if shlvl is None:
        return None
    out["SHLVL"] = shlvl
    if "OLDPWD" in env:
        visible = _dir_visible(env["OLDPWD"], user)
        if visible is None:
            return None
        if not visible:
            del out["OLDPWD"]
    out["_"] = exe
    # A relative path is exec'd as written, from the cwd, as bash does: the
    # user needs no right to the cwd's ancestors for that.
    return Direct(exe=exe, argv=words, env=out)


@functools.lru_cache(maxsize=16)
def _real_dir(path: str) -> str:
    return os.path.realpath(path)


def _physical(cwd: str) -> str:
    """``getcwd()`` once in ``cwd``: its real path.  The parent's is kept
    (a daemon's task dirs share one), so a task dir costs one lstat."""
    parent, name = os.path.split(cwd)
    try:
        if name in ("", ".", "..") or not parent.startswith("/") or stat.S_ISLNK(os.lstat(cwd).st_mode):
            return os.path.realpath(cwd)
    except OSError:
        return os.path.realpath(cwd)
    return os.path.join(_real_dir(parent), name)


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.samestat(os.stat(a), os.stat(b))
    except OSError:
        return False
