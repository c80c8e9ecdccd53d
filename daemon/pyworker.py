"""A warm Python worker: one interpreter per daemon slot, serving many calls.

Starting an interpreter (and importing cloudpickle, numpy, the user's
modules) costs far more than a trivial function call, so a slot keeps one
worker process and sends it call after call.  The daemon starts it through
its spawner as the slot's user (pyworkers.py), as ``python -I pyworker.py``
(or ``-I -c <this source>`` when the slot's user cannot read this file):
only the standard library is imported here; cloudpickle comes from the
site dirs the daemon sends in its first frame.

Channels: fd 0 is a unix socket to the daemon (frames of a 4-byte
big-endian length and a JSON object; the worker moves it to another fd and
puts /dev/null on 0); fds 1 and 2 are pipes the daemon reads as the call's
stdout and stderr.  Every byte a call writes is in those pipes before its
reply is sent, so the daemon reads the pipes dry when the reply comes and
has all of the call's output, in order, with no marker in the stream.

    daemon -> worker   {"op": "init", "paths": [site dirs]}
    worker -> daemon   {"op": "ready", "python": "3.11", "pid": N, "error": null | text}
    daemon -> worker   {"op": "call", "id": N, "cwd", "env", "python", "pickled" | "pickled_file" | "ref",
                        "arg", "grid": bool, "inline_max", "track_ram"}
    worker -> daemon   {"op": "done", "id": N, "ok": bool, "describe", "value": {PyValue fields},
                        "error": text | null, "wall", "cpu", "peak_ram"}

The worker trusts the daemon (it is the daemon's child, talking over a
private socket); the daemon does not trust the worker: it runs the user's
code, so its replies are parsed as untrusted JSON (pyworkers.py).

A pickled call names the client's Python (major.minor): another version is
refused before anything is unpickled, with both versions in the message.
Arguments sent as their own files (``hwf-arg-<sha256>``, in the task dir)
are found by persistent id.  A value whose pickle is larger than
``inline_max`` is written to ``hwf-value.pkl`` in the task dir, which the
daemon returns as an artifact.  Peak RAM is the worker's own high-water
mark during the call: Linux resets ``VmHWM`` when "5" is written to
``/proc/self/clear_refs``.
"""

import base64
import importlib
import inspect
import io
import json
import os
import pickle
import re
import reprlib
import resource
import site
import socket
import struct
import sys
import time
import traceback
import types

HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 30
VALUE_FILE = "hwf-value.pkl"
ARG_PREFIX = "hwf-arg-"
INLINE_MAX = 64 * 1024
MAX_TRACEBACK = 64 * 1024
MAX_REPR = 200
MAX_ERROR = 2000
GRID_OUTPUT_MAX = 16 * 2**20
_SHA = re.compile(r"^[0-9a-f]{64}$")
_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
THIS_FILE = globals().get("__file__", "<string>")  # "<string>": run as python -c
PYTHON = "%d.%d" % sys.version_info[:2]

_repr = reprlib.Repr()
_repr.maxstring = MAX_REPR
_repr.maxother = MAX_REPR


class CallRefused(Exception):
    """The call cannot be run here (wrong Python, missing argument file, bad ref)."""


# ------------------------------------------------------------------ loading


class _Unpickler(pickle.Unpickler):
    """Resolves persistent ids to the argument files in the current dir."""

    def persistent_load(self, pid):
        return load_argument(pid)


def argument_file(pid):
    """The file name of a persistent id: the sha256, bare or as ``hwf-arg-<sha>``
    (bytes, or a tuple whose last item is one of those)."""
    if isinstance(pid, tuple) and pid:
        pid = pid[-1]
    if isinstance(pid, bytes):
        pid = pid.decode("ascii", "replace")
    if isinstance(pid, str) and pid.startswith(ARG_PREFIX):
        pid = pid[len(ARG_PREFIX):]
    if not isinstance(pid, str) or not _SHA.match(pid):
        raise pickle.UnpicklingError("unknown persistent id %r: expected the sha256 of an hwf-arg file" % (pid,))
    return ARG_PREFIX + pid


def load_argument(pid):
    name = argument_file(pid)
    try:
        f = open(name, "rb")
    except FileNotFoundError:
        raise CallRefused("the argument file %s is missing from the task's files" % name) from None
    with f:
        return _Unpickler(f).load()


def unpickle(data):
    return _Unpickler(io.BytesIO(data)).load()


def check_python(wanted):
    """Refuse a pickle made by another Python before unpickling it."""
    if wanted != PYTHON:
        raise CallRefused(
            "this task's function was pickled by Python %s, but this daemon's Python worker runs Python %s: "
            "a pickle does not travel between Python versions. Run the client on Python %s, or send the task "
            "to a daemon whose runtimes include python%s (hardware runtime='python%s')"
            % (wanted, PYTHON, PYTHON, wanted, wanted))


def import_ref(ref):
    """``"package.module:function"`` -> the function (attribute paths allowed)."""
    if not isinstance(ref, str) or not _REF.match(ref):
        raise CallRefused("ref %r is not 'module:function'" % (ref,))
    module_name, _, attr = ref.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise CallRefused("%s is not callable" % ref)
    return obj


def _describe(fn, args, kwargs):
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    inner = "..." if (args or kwargs) else ""
    return "python: %s(%s)" % (name, inner)


def _grid_args(fn, event, context):
    """A lambda handler takes (event, context); a plain function may take (event)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return (event, context)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params):
        return (event, context)
    return (event,)


def load_call(req):
    """(function, args, kwargs, description) of a call request."""
    ref = req.get("ref")
    if ref is not None:
        fn = import_ref(ref)
        if req.get("grid"):
            event = json.loads(req.get("arg") or "null")
            context = types.SimpleNamespace(aws_request_id=os.environ.get("HWF_TASK_ID", ""), function_name=ref)
            return fn, _grid_args(fn, event, context), {}, "python: %s(event)" % ref
        arg = req.get("arg")
        return fn, (() if arg is None else (arg,)), {}, "python: %s(%s)" % (ref, "" if arg is None else "data")
    check_python(req.get("python"))
    if req.get("pickled") is not None:
        data = base64.b64decode(req["pickled"])
    elif req.get("pickled_file"):
        with open(req["pickled_file"], "rb") as f:
            data = f.read()
    else:
        raise CallRefused("the call has neither a pickle nor a ref")
    call = unpickle(data)
    if not (isinstance(call, tuple) and len(call) == 3 and callable(call[0])):
        raise CallRefused("the pickle does not hold (function, args, kwargs)")
    fn, args, kwargs = call
    return fn, tuple(args), dict(kwargs), _describe(fn, args, kwargs)


# ------------------------------------------------------------------ values


def _cloudpickle():
    import cloudpickle  # from the daemon's site dirs

    return cloudpickle


def safe_repr(obj):
    try:
        return _repr.repr(obj)[:MAX_REPR]
    except Exception as exc:  # a broken __repr__
        return "<%s (repr failed: %s)>" % (type(obj).__name__, type(exc).__name__)


def encode_value(result, inline_max=INLINE_MAX, folder="."):
    """The PyValue fields of a return value: inline when small, else in ``folder``/VALUE_FILE."""
    data = _cloudpickle().dumps(result)
    out = {"size": len(data), "repr": safe_repr(result)}
    if len(data) <= inline_max:
        out["pickled"] = base64.b64encode(data).decode("ascii")
    else:
        fd = os.open(os.path.join(folder, VALUE_FILE), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        out["artifact"] = VALUE_FILE
    return out


def _user_traceback(exc):
    """The exception's traceback without this module's frames (the user's code only)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == THIS_FILE:
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    if len(text) > MAX_TRACEBACK:
        half = MAX_TRACEBACK // 2
        text = text[:half] + "\n[... %d characters of traceback cut ...]\n" % (len(text) - 2 * half) + text[-half:]
    return text


def encode_error(exc, inline_max=INLINE_MAX):
    out = {"error_type": type(exc).__name__[:256], "traceback": _user_traceback(exc), "repr": safe_repr(exc)}
    try:
        data = _cloudpickle().dumps(exc)
    except Exception:  # an exception that does not pickle: its type and text still go
        return out
    if len(data) <= inline_max:
        out["pickled"] = base64.b64encode(data).decode("ascii")
        out["size"] = len(data)
    return out


def grid_output(result):
    """What a grid handler's return becomes: the task's output text (the lambda's)."""
    if isinstance(result, bytes):
        text = result.decode("utf-8", "replace")
    elif isinstance(result, str):
        text = result
    else:
        text = json.dumps(result, default=str)
    return text[:GRID_OUTPUT_MAX]


# ------------------------------------------------------------------ measuring


_clear_refs = None  # an fd opened before the worker made itself non-dumpable (see undumpable)


def _reset_peak():
    try:
        if _clear_refs is not None:
            os.write(_clear_refs, b"5")
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
    except OSError:
        pass


def undumpable():
    """Forbid ptrace and /proc/PID/mem to every other process of the uid
    (PR_SET_DUMPABLE 0): a worker stays warm between tasks, and what one
    call leaves in its memory is no other process's to read or write, a
    shell task of the same slot uid included.  /proc/self then belongs to
    root, so clear_refs (peak RAM) is opened before."""
    global _clear_refs
    try:
        _clear_refs = os.open("/proc/self/clear_refs", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        _clear_refs = None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        return "prctl(PR_SET_DUMPABLE, 0) failed: %s" % os.strerror(ctypes.get_errno())
    return None


def _peak_rss():
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu():
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


# ------------------------------------------------------------------ serving


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def serve(req):
    """Run one call request in this process; the reply dict.  Never raises
    (but for BaseExceptions that end the worker: os._exit, a signal)."""
    reply = _serve(req)
    if reply.get("error") and len(reply["error"]) > 2 * MAX_ERROR:  # an exception's text can be huge
        reply["error"] = reply["error"][:2 * MAX_ERROR] + " [...]"
    return reply


def _serve(req):
    reply = {"op": "done", "id": req.get("id"), "ok": False, "describe": "python: ?", "value": None,
             "error": None, "wall": 0.0, "cpu": 0.0, "peak_ram": None}
    added_path = None
    stdout = sys.stdout
    try:
        os.chdir(req.get("cwd") or ".")
        folder = os.getcwd()
        env = req.get("env")
        if isinstance(env, dict):
            os.environ.clear()
            os.environ.update(env)
        sys.path.insert(0, folder)  # the task's own modules (Data files) import first
        added_path = folder
        inline_max = int(req.get("inline_max", INLINE_MAX))
        try:
            fn, args, kwargs, reply["describe"] = load_call(req)
        except CallRefused as exc:
            reply["error"] = str(exc)
            return reply
        except BaseException as exc:  # unpickling or importing ran the user's code, or failed
            reply["error"] = "could not load the call: %s: %s" % (type(exc).__name__, exc)
            if isinstance(exc, ImportError) and req.get("ref") is None:
                reply["error"] += (" (a function from an importable module is pickled by reference: that module "
                                   "must be importable on the daemon too, or be pickled by value with "
                                   "cloudpickle.register_pickle_by_value)")
            reply["value"] = encode_error(exc, inline_max)
            return reply
        if req.get("grid"):
            sys.stdout = sys.stderr  # a handler's prints are its log; its return is the output
        track_ram = bool(req.get("track_ram"))
        if track_ram:
            _reset_peak()
        cpu0 = _cpu()
        t0 = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            reply["wall"] = time.perf_counter() - t0
            reply["cpu"] = _cpu() - cpu0
            reply["value"] = encode_error(exc, inline_max)
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            reply["error"] = "%s raised %s" % (reply["describe"], last[:MAX_ERROR])
        else:
            reply["wall"] = time.perf_counter() - t0
            reply["cpu"] = _cpu() - cpu0
            sys.stdout = stdout
            if req.get("grid"):
                stdout.write(grid_output(result))
            try:
                reply["value"] = encode_value(result, inline_max, folder)
                reply["ok"] = True
            except Exception as exc:
                reply["error"] = "%s returned a value that could not be pickled: %s: %s" % (
                    reply["describe"], type(exc).__name__, exc)
                reply["value"] = {"repr": safe_repr(result), "error_type": type(exc).__name__,
                                  "traceback": _user_traceback(exc)}
        if track_ram:
            reply["peak_ram"] = _peak_rss()
        return reply
    except Exception as exc:  # our own machinery failed (a bad cwd, a full disk)
        reply["error"] = "the Python worker failed: %s: %s" % (type(exc).__name__, exc)
        return reply
    finally:
        sys.stdout = stdout
        _flush()
        if added_path is not None:
            if added_path in sys.path:
                sys.path.remove(added_path)
            _forget_modules_in(added_path)
        try:
            os.chdir("/")
        except OSError:
            pass


def _forget_modules_in(folder):
    """Modules imported from a task's dir go with it: the next task may ship its own."""
    prefix = os.path.join(folder, "")
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if isinstance(f, str) and f.startswith(prefix):
            del sys.modules[name]


def add_site_dirs(paths):
    """Make the daemon's packages importable, ahead of this Python's own site dirs."""
    before = list(sys.path)
    for p in paths:
        if isinstance(p, str) and os.path.isdir(p):
            site.addsitedir(p)
    added = [p for p in sys.path if p not in before]
    rest = [p for p in sys.path if p in before]
    at = next((i for i, p in enumerate(rest) if "site-packages" in p or "dist-packages" in p), len(rest))
    sys.path[:] = rest[:at] + added + rest[at:]


# ------------------------------------------------------------------ the channel


def recv_frame(sock):
    head = _recv_exactly(sock, HEADER.size)
    if head is None:
        return None
    (size,) = HEADER.unpack(head)
    if size > MAX_FRAME:
        raise ValueError("frame of %d bytes" % size)
    body = _recv_exactly(sock, size)
    if body is None:
        return None
    return json.loads(body)


def _recv_exactly(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def send_frame(sock, obj):
    data = json.dumps(obj).encode("utf-8")
    sock.sendall(HEADER.pack(len(data)) + data)


def main():
    refused = undumpable()  # first: nothing of a call may be in memory before
    chan = os.dup(0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sock = socket.socket(fileno=chan)
    try:
        sys.stdout.reconfigure(line_buffering=True)  # live output, line by line
    except Exception:
        pass
    init = recv_frame(sock)
    if init is None:
        return 0
    add_site_dirs(init.get("paths") or [])
    error = refused
    try:
        _cloudpickle()
    except ImportError as exc:
        error = "cloudpickle cannot be imported by %s (Python %s): %s; install it for that Python or start " \
                "the daemon with --python PATH" % (sys.executable, PYTHON, exc)
    os.chdir("/")
    send_frame(sock, {"op": "ready", "python": PYTHON, "pid": os.getpid(), "error": error})
    while True:
        req = recv_frame(sock)
        if req is None:  # the daemon closed the channel: time to go
            return 0
        send_frame(sock, serve(req))


if __name__ == "__main__":
    sys.exit(main())
