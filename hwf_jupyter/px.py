"""``%%hwf_px``: run a cell's Python code on daemons, like ipyparallel's ``%%px``.

The cell is sent as source text with a small runner function (pickled by
value, so daemons need nothing of HWF's client importable): the runner
executes the cell in a fresh namespace and returns the value of its last
expression, as IPython would (a trailing ``;`` hides it).  Names the cell
uses that the notebook defines (data, helper functions) travel with it as
arguments, so a large array goes once through the blob store.  Each target
shows its stdout, stderr and ``Out:`` under the cell, tagged with the
daemon's name; a remote error shows its traceback with the cell's lines.
"""

from __future__ import annotations

import ast
import builtins
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import cloudpickle

CELL_FILE = "<hwf_px cell>"
_RUNNER_FILE = "<hwf_px runner>"

_RUNNER_SOURCE = '''
def hwf_px_run(__hwf_source, __hwf_filename, **names):
    import ast, linecache
    # Register the source so the remote traceback shows the cell's lines.
    linecache.cache[__hwf_filename] = (len(__hwf_source), None, __hwf_source.splitlines(True), __hwf_filename)
    tree = ast.parse(__hwf_source, __hwf_filename, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr) and not __hwf_source.rstrip().endswith(";"):
        last = ast.Expression(tree.body.pop().value)
    ns = {"__name__": "__main__"}
    ns.update(names)
    exec(compile(tree, __hwf_filename, "exec"), ns)
    return None if last is None else eval(compile(last, __hwf_filename, "eval"), ns)
'''


def runner() -> Callable[..., Any]:
    """The function each target runs: made from source in a module that does
    not exist, so cloudpickle sends it by value."""
    namespace: dict[str, Any] = {"__name__": "hwf_px"}
    exec(compile(_RUNNER_SOURCE, _RUNNER_FILE, "exec"), namespace)
    return namespace["hwf_px_run"]


# IPython's own names in a user namespace: never sent.
_SKIP = {"In", "Out", "get_ipython", "exit", "quit", "open"}
_HISTORY = re.compile(r"^_(i{1,3}|i?\d+|ih|oh|dh|)$|^__+$")


def cell_names(source: str, user_ns: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The notebook's values the cell reads, and the names left behind
    because they do not pickle (an open connection, a lock...)."""
    tree = ast.parse(source, CELL_FILE, "exec")  # a SyntaxError shows here, before anything is sent
    wanted = sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)})
    found: dict[str, Any] = {}
    skipped: list[str] = []
    for name in wanted:
        if name in _SKIP or _HISTORY.match(name) or name not in user_ns:
            continue
        value = user_ns[name]
        if hasattr(builtins, name) and getattr(builtins, name) is value:
            continue
        try:
            cloudpickle.dumps(value)
        except Exception:
            skipped.append(name)
            continue
        found[name] = value
    return found, skipped


@dataclass
class TargetOutput:
    """What one target produced, for display."""

    tag: str
    stdout: str = ""
    stderr: str = ""
    value: Any = None
    has_value: bool = False
    error: Optional[str] = None  # "Type: message" and the remote traceback


def _strip_runner_frames(tb: str) -> str:
    """Drop the runner's own frames from a remote traceback: the user wants the cell's."""
    out, skip_code = [], False
    for line in tb.splitlines():
        if skip_code:
            skip_code = False
            if line.startswith("    ") and not line.lstrip().startswith("File "):
                continue
        if line.lstrip().startswith(f'File "{_RUNNER_FILE}"'):
            skip_code = True
            continue
        out.append(line)
    return "\n".join(out)


def describe_error(exc: BaseException) -> str:
    """An exception from ``result()`` as text: the remote traceback when there is one."""
    cause = exc.__cause__
    text = getattr(cause, "text", None)
    if text:
        return _strip_runner_frames(text).rstrip()
    return f"{type(exc).__name__}: {exc}"


def render(outputs: list[TargetOutput], pretty: Callable[[Any], str] = repr) -> tuple[str, str]:
    """(stdout text, stderr text) of all targets, each line tagged ``[target]``."""
    out: list[str] = []
    err: list[str] = []
    for t in outputs:
        tag = f"[{t.tag}]"
        out.extend(f"{tag} {line}" for line in t.stdout.splitlines())
        err.extend(f"{tag} {line}" for line in t.stderr.splitlines())
        if t.error is not None:
            err.extend(f"{tag} {line}" for line in t.error.splitlines())
        elif t.has_value and t.value is not None:
            shown = pretty(t.value).splitlines() or [""]
            out.append(f"{tag} Out: {shown[0]}")
            out.extend(f"{' ' * len(tag)}      {line}" for line in shown[1:])
    return "".join(line + "\n" for line in out), "".join(line + "\n" for line in err)
