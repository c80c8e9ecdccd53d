"""Python calls as task stages, and their values back: pickling with no I/O.

The client sends ``(fn, args, kwargs)`` cloudpickled in a ``PyCall`` stage;
the daemon's warm worker (``hwf_daemon/pyworker.py``) unpickles and calls
it, and answers with a ``PyValue``.  This module builds the first and reads
the second; sockets and futures live in ``functions.py``.

Sizes decide the route, so one message never carries a huge task:

* the call's pickle goes inline (base64) up to ``INLINE_MAX`` (64 KiB),
  else as a Data file of the stage (``hwf-call.pkl``);
* any top-level argument (or the function itself) whose own pickle exceeds
  ``ARG_MAX`` (1 MiB) is pickled separately into a Data file
  ``hwf-arg-<sha256>`` and the call refers to it by persistent id.  Data
  files go through the hub's content-addressed blob store, so a 50 MB array
  used by 100 tasks is uploaded (and stored, and fetched per daemon) once.

A pickle only loads in the Python (major.minor) that made it, so each call
names the client's version, and ``hub.submit`` requires the daemon runtime
``python<major.minor>``: a function task never reaches a daemon whose worker
would misread it.

Trust: unpickling runs code.  ``result()`` unpickles what the daemon sent
back, exactly as Dask and ipyparallel clients trust their workers; the
DataFrame's ``value`` column uses :func:`load_scalar`, which refuses
anything but plain scalars, so merely tabulating results runs nothing.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import io
import linecache
import os
import pickle
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import cloudpickle

from hub_server import protocol as p

INLINE_MAX = 64 * 2**10
ARG_MAX = 1 * 2**20
ARG_PREFIX = "hwf-arg-"
CALL_FILE = "hwf-call.pkl"
VALUE_FILE = "hwf-value.pkl"
SCALAR_STR_MAX = 1000  # longer strings are not "small scalars" for a DataFrame column
PYTHON = "%d.%d" % sys.version_info[:2]
RUNTIME = "python" + PYTHON

_PROTOCOL = 5  # out-of-band-capable; every Python HWF supports (3.10+) reads it


class TaskFailed(RuntimeError):
    """A function task ended without a value or a remote exception: it failed
    on the daemon side (timeout, refused call, lost too often, worker error).
    ``task_id``, ``status`` and ``reason`` say which and why."""

    def __init__(self, message: str, *, task_id: Optional[str] = None, status: str = "failed",
                 reason: Optional[str] = None) -> None:
        super().__init__(message)
        self.task_id, self.status, self.reason = task_id, status, reason


class RemoteTraceback(Exception):
    """The traceback of an exception raised on a daemon; attached as the
    ``__cause__`` of the exception ``result()`` re-raises, so Python prints
    the remote frames above the local ones (like concurrent.futures)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text.rstrip()}\n"""'


class RemoteException(Exception):
    """A remote exception that could not be rebuilt here (it did not pickle,
    or its class is not importable on this side); its type name and text
    are kept."""

    def __init__(self, error_type: str, text: str) -> None:
        super().__init__(f"{error_type}: {text}" if text else error_type)
        self.error_type = error_type


# ------------------------------------------------------------------ encoding


@dataclass
class EncodedCall:
    """One call, ready to go in a stage: inline pickle or a Data file, plus
    the argument files it refers to (``{filename: sha256}``)."""

    pickled: Optional[str] = None  # base64, when small
    call_sha: Optional[str] = None  # else the call's pickle is this blob, as CALL_FILE
    call_size: int = 0
    arg_files: dict[str, str] = field(default_factory=dict)

    def data_specs(self, sizes: Mapping[str, int]) -> list[p.DataSpec]:
        specs = [p.DataSpec(name, sha, sizes[sha]) for name, sha in sorted(self.arg_files.items())]
        if self.call_sha is not None:
            specs.append(p.DataSpec(CALL_FILE, self.call_sha, self.call_size))
        return specs

    def py_call(self) -> p.PyCall:
        return p.PyCall(python=PYTHON, pickled=self.pickled, pickled_file=None if self.pickled else CALL_FILE)


def _code_reduce_keeping_filename(code: types.CodeType) -> Any:
    """cloudpickle's reduction of a code object, with its real file name:
    cloudpickle >= 3.1.3 writes ``<dynamic-code>`` instead, and a remote
    traceback then names no file and shows no source line here."""
    ctor, args = cloudpickle.cloudpickle._code_reduce(code)
    return ctor, tuple(code.co_filename if a == "<dynamic-code>" and isinstance(a, str) else a for a in args)


class _Pickler(cloudpickle.Pickler):
    """cloudpickle's pickler, keeping code objects' file names."""

    dispatch_table = collections.ChainMap({types.CodeType: _code_reduce_keeping_filename},
                                          cloudpickle.Pickler.dispatch_table)

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=_PROTOCOL)


def dumps(obj: Any) -> bytes:
    """``cloudpickle.dumps`` as HWF sends calls (file names kept for tracebacks)."""
    buf = io.BytesIO()
    _Pickler(buf).dump(obj)
    return buf.getvalue()


class _RefPickler(_Pickler):
    """Writes the objects in ``refs`` (by identity) as persistent ids."""

    def __init__(self, file: io.BytesIO, refs: Mapping[int, str]) -> None:
        super().__init__(file)
        self.refs = refs
        self.used: set[str] = set()

    def persistent_id(self, obj: Any) -> Optional[str]:  # noqa: D102 (pickle's hook)
        pid = self.refs.get(id(obj))
        if pid is not None:
            self.used.add(pid)
        return pid


def _is_small_atom(obj: Any) -> bool:
    return obj is None or isinstance(obj, (bool, int, float, complex)) or (
        isinstance(obj, (str, bytes)) and len(obj) < 1024)


_INSTALLED_ROOTS: Optional[tuple[str, ...]] = None
_BY_VALUE: set[str] = set()
_OWN_PACKAGES = ("hwf_jupyter", "hub_server", "hwf_daemon", "daemon")


def _installed_roots() -> tuple[str, ...]:
    global _INSTALLED_ROOTS
    if _INSTALLED_ROOTS is None:
        import site
        import sysconfig

        roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
        roots.update(sysconfig.get_paths().get(k, "") for k in ("stdlib", "platstdlib", "purelib", "platlib"))
        try:
            roots.update(site.getsitepackages())
            roots.add(site.getusersitepackages())
        except AttributeError:  # some embedded interpreters
            pass
        _INSTALLED_ROOTS = tuple(os.path.realpath(r) + os.sep for r in roots if r)
    return _INSTALLED_ROOTS


def send_local_module_by_value(fn: Any) -> None:
    """Functions of a module that lives only here (a script or module next to
    the notebook, not an installed package) are sent with their code:
    daemons could not import that module.  Installed packages are sent by
    name, as cloudpickle does, and must be installed on the daemons too."""
    name = getattr(fn, "__module__", None)
    if not name or name in _BY_VALUE or name == "__main__" or name.split(".")[0] in _OWN_PACKAGES:
        return
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if module is None or not path:
        return
    real = os.path.realpath(path)
    if real.startswith(_installed_roots()):
        return
    try:
        cloudpickle.register_pickle_by_value(module)
    except ValueError:  # not importable under its name: cloudpickle sends it by value anyway
        pass
    _BY_VALUE.add(name)


class CallEncoder:
    """Pickles calls for one submission (``submit`` or a whole ``map``).

    Objects found too large to inline are remembered by identity for the
    encoder's lifetime, so an array passed to every call of a map is
    pickled and hashed once; ``blobs`` holds the bytes still to upload.
    Raises ``TypeError`` naming what would not pickle.
    """

    def __init__(self, *, inline_max: int = INLINE_MAX, arg_max: int = ARG_MAX) -> None:
        self.inline_max, self.arg_max = inline_max, arg_max
        self.blobs: dict[str, bytes] = {}  # sha256 -> bytes, to upload before submitting
        self.sizes: dict[str, int] = {}  # sha256 -> size, of every blob this encoder made
        self._refs: dict[int, str] = {}  # id(obj) -> persistent id
        self._keep: list[Any] = []  # keeps those objects alive, so their ids stay theirs
        self._small: set[int] = set()  # ids already measured and found small

    def _blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if sha not in self.sizes:
            self.blobs[sha] = data
            self.sizes[sha] = len(data)
        return sha

    def _dumps(self, call: tuple) -> tuple[bytes, set[str]]:
        if not self._refs:
            return dumps(call), set()
        buf = io.BytesIO()
        pickler = _RefPickler(buf, self._refs)
        pickler.dump(call)
        return buf.getvalue(), pickler.used

    def _measure(self, obj: Any, what: str) -> None:
        """Pickle one top-level object alone; too large -> its own argument file."""
        if id(obj) in self._refs or id(obj) in self._small or _is_small_atom(obj):
            return
        data = _dumps_checked(obj, what)
        if len(data) <= self.arg_max:
            self._small.add(id(obj))
            self._keep.append(obj)
            return
        self._refs[id(obj)] = ARG_PREFIX + self._blob(data)
        self._keep.append(obj)

    def encode(self, fn: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]) -> EncodedCall:
        send_local_module_by_value(fn)
        call = (fn, tuple(args), dict(kwargs))
        data, used = self._dumps_call(call)
        if len(data) > self.arg_max:
            # Something in it is big: find which top-level objects, and send those apart.
            self._measure(fn, _name(fn))
            for i, a in enumerate(args):
                self._measure(a, f"argument {i} of {_name(fn)}")
            for k, v in kwargs.items():
                self._measure(v, f"argument {k}= of {_name(fn)}")
            data, used = self._dumps_call(call)
        out = EncodedCall(arg_files={pid: pid[len(ARG_PREFIX):] for pid in used})
        if len(data) <= self.inline_max:
            out.pickled = base64.b64encode(data).decode("ascii")
        else:
            out.call_sha, out.call_size = self._blob(data), len(data)
        return out

    def _dumps_call(self, call: tuple) -> tuple[bytes, set[str]]:
        try:
            return self._dumps(call)
        except Exception as exc:
            raise TypeError(f"cannot send {_name(call[0])} to the farm: it (or an argument) does not pickle: "
                            f"{type(exc).__name__}: {exc}") from exc


def _dumps_checked(obj: Any, what: str) -> bytes:
    try:
        return dumps(obj)
    except Exception as exc:
        raise TypeError(f"cannot send {what} to the farm: it does not pickle: {type(exc).__name__}: {exc}") from exc


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def describe(fn: Any) -> str:
    """A task label for a function: ``module.qualname`` (short, for tables)."""
    module = getattr(fn, "__module__", None)
    name = _name(fn)
    label = f"{module}.{name}" if module and module not in ("__main__", "builtins") else name
    return label[:200]


# ------------------------------------------------------------------ decoding


def load_value(data: bytes) -> Any:
    """Unpickle a value the daemon sent (runs code: see the module docstring)."""
    return pickle.loads(data)


class _ScalarUnpickler(pickle.Unpickler):
    """Loads plain scalars and NumPy scalars only; any other class is refused."""

    _ALLOWED = {("builtins", "complex"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not a plain scalar")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("a value with a persistent id is not a plain scalar")


_NO_SCALAR = object()


def load_scalar(pickled_b64: Optional[str]) -> Any:
    """The value if it is a small scalar (number, short str, bool, None),
    else ``NO_SCALAR``; loads nothing but those (safe on untrusted input)."""
    if pickled_b64 is None or len(pickled_b64) > 4 * SCALAR_STR_MAX:
        return _NO_SCALAR
    try:
        value = _ScalarUnpickler(io.BytesIO(base64.b64decode(pickled_b64))).load()
    except Exception:
        return _NO_SCALAR
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, complex)):
        return value
    if isinstance(value, str) and len(value) <= SCALAR_STR_MAX:
        return value
    return _NO_SCALAR


NO_SCALAR = _NO_SCALAR

_FRAME = re.compile(r'^(\s*)File "([^"]+)", line (\d+)')


def with_local_source(tb_text: str) -> str:
    """Fill in source lines the daemon could not show.

    A function defined in a notebook cell or a local script has no source
    file on the daemon, so its remote frames come without their code line;
    this side usually has it (IPython registers cells in ``linecache``).
    """
    lines = tb_text.splitlines()
    out: list[str] = []
    for i, line in enumerate(lines):
        out.append(line)
        m = _FRAME.match(line)
        if not m:
            continue
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        has_code = nxt.startswith(m.group(1) + "    ") and not _FRAME.match(nxt)
        if has_code:
            continue
        code = linecache.getline(m.group(2), int(m.group(3))).strip()
        if code:
            out.append(f"{m.group(1)}    {code}")
    return "\n".join(out) + ("\n" if tb_text.endswith("\n") else "")


def remote_exception(value: p.PyValue) -> BaseException:
    """The exception a remote call raised, with its remote traceback as ``__cause__``."""
    exc: Optional[BaseException] = None
    if value.pickled is not None:
        try:
            loaded = load_value(base64.b64decode(value.pickled))
            if isinstance(loaded, BaseException):
                exc = loaded
        except Exception:
            exc = None
    if exc is None:
        text = value.repr
        error_type = value.error_type or "Exception"
        exc = RemoteException(error_type, text)
    if value.traceback:
        exc.__cause__ = RemoteTraceback(with_local_source(value.traceback))
    return exc


def is_error(value: Optional[p.PyValue]) -> bool:
    return value is not None and value.error_type is not None
