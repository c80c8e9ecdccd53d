"""Job compilers: the Manager API's ``type`` turns ``settings`` into tasks.

A render-farm manager (seed 004) is posted a job as ``type`` (the compiler),
``settings`` (for it), ``priority`` and ``parser``.  The compiler is pure
data-in, specs-out, so the HTTP API (on the hub) and ``Hub.submit_job`` (on
the client) compile with the same code and refuse the same input with the
same message.

* ``shell``: one task of shell commands (or named stages of them).
* ``frames``: a frame range cut into chunks, one task per chunk; the command
  template's ``{frame_start}``, ``{frame_end}`` and ``{frame}`` are filled
  with integers only, so settings cannot smuggle shell syntax into a command
  (the template itself is the caller's own command, as with ``shell``).

Every refusal is a :class:`CompileError` whose text starts with the field it
is about (``settings.chunk_size: must be a whole number >= 1``).
"""

from __future__ import annotations

import math
import re
import string
from typing import Any, Callable, Mapping, Optional

import msgspec

from . import hardware as hw
from . import protocol as p
from .paths import unsafe_relative_path

# Explicit limits: a job is one Submit's worth of tasks, a command one script.
MAX_TASKS_PER_JOB = 10_000
MAX_FRAMES = 100_000
MAX_COMMANDS_PER_TASK = 1_000
MAX_COMMAND_CHARS = 100_000
MAX_STAGES = 100
MAX_ARTIFACTS = 1_000
MAX_LABEL_CHARS = 1_000  # the frame suffix still fits protocol's 4096

FRAME_FIELDS = ("frame_start", "frame_end", "frame")
# ``{frame:04d}`` pads; any wider spec could make a command of any size.
_FORMAT_SPEC_RE = re.compile(r"^0?[1-9]?d?$")
_EXTERNAL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$")
_PRIORITY_RANGE = (-1_000_000, 1_000_000)
_FRAME_RANGE = (-(10**9), 10**9)
_MAX_TIMEOUT = 30 * 86400


class CompileError(ValueError):
    """A job that cannot be compiled; ``field`` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


Compiler = Callable[..., list[p.TaskSpec]]


def compile_job(
    type: str,
    settings: Mapping[str, Any],
    *,
    priority: int = 0,
    parser: Optional[str] = None,
    job_id: Optional[str] = None,
    external_id: Optional[str] = None,
    data: Optional[Mapping[str, p.DataSpec]] = None,
) -> list[p.TaskSpec]:
    """The tasks of one job, ready to submit.

    ``data`` maps a file name to a file already in the hub's blob store;
    ``settings["data"]`` picks files from it by name (default: all of them),
    saved into each task's directory before its first command.
    """
    if not isinstance(type, str) or type not in COMPILERS:
        raise CompileError("type", f"unknown compiler {_short(type)}; known: {', '.join(sorted(COMPILERS))}")
    if not isinstance(settings, Mapping):
        raise CompileError("settings", f"must be an object, got {_kind(settings)}")
    common = {
        "priority": _int("priority", priority, *_PRIORITY_RANGE),
        "parser": _parser(parser),
        "job_id": _external_id("job_id", job_id),
    }
    ext = _external_id("external_id", external_id)
    files = _data_files(data)
    specs = COMPILERS[type](settings, common, files)
    if ext is not None:
        specs = _with_external_ids(specs, ext)
    return specs


# ------------------------------------------------------------------ shell


_SHELL_KEYS = ("commands", "stages", "data", "artifacts", "hardware", "label", "timeout", "max_retries")
_STAGE_KEYS = ("name", "commands", "data")


def compile_shell(settings: Mapping[str, Any], common: dict[str, Any],
                  files: Mapping[str, p.DataSpec]) -> list[p.TaskSpec]:
    """One task: ``commands`` (a list, or one bash script) or named ``stages``."""
    _known_keys(settings, _SHELL_KEYS)
    has_cmds, has_stages = "commands" in settings, "stages" in settings
    if has_cmds == has_stages:
        raise CompileError("settings.commands", "give either commands or stages (exactly one)")
    top_data = _pick_data("settings.data", settings.get("data"), files)
    if has_cmds:
        stages = [p.StageSpec(name="run", cmds=_commands("settings.commands", settings["commands"]),
                              data=top_data)]
    else:
        stages = _stages(settings["stages"], top_data, files)
    spec = p.TaskSpec(
        stages=stages,
        **_task_options(settings),
        label=_label(settings),
        **common,
    )
    return [spec]


def _stages(raw: Any, top_data: list[p.DataSpec], files: Mapping[str, p.DataSpec]) -> list[p.StageSpec]:
    if not isinstance(raw, list) or not raw:
        raise CompileError("settings.stages", "must be a non-empty list of {name, commands}")
    if len(raw) > MAX_STAGES:
        raise CompileError("settings.stages", f"{len(raw)} stages, above the limit of {MAX_STAGES}")
    out: list[p.StageSpec] = []
    seen: set[str] = set()
    for i, st in enumerate(raw):
        field = f"settings.stages[{i}]"
        if not isinstance(st, Mapping):
            raise CompileError(field, f"must be an object with name and commands, got {_kind(st)}")
        _known_keys(st, _STAGE_KEYS, field)
        name = st.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 256:
            raise CompileError(f"{field}.name", "must be a non-empty string of at most 256 characters")
        if name in seen:
            raise CompileError(f"{field}.name", f"repeated stage name {name!r}")
        seen.add(name)
        if "commands" not in st:
            raise CompileError(f"{field}.commands", "missing")
        cmds = _commands(f"{field}.commands", st["commands"])
        data = _pick_data(f"{field}.data", st["data"], files) if "data" in st else []
        if i == 0:
            data = top_data + [d for d in data if d not in top_data]
        out.append(p.StageSpec(name=name, cmds=cmds, data=data))
    return out


# ----------------------------------------------------------------- frames


_FRAMES_KEYS = ("frame_start", "frame_end", "chunk_size", "command", "data", "artifacts",
                "hardware", "label", "timeout", "max_retries")


def compile_frames(settings: Mapping[str, Any], common: dict[str, Any],
                   files: Mapping[str, p.DataSpec]) -> list[p.TaskSpec]:
    """One task per chunk of ``frame_start..frame_end`` (both included).

    ``command`` with ``{frame}`` runs once per frame of the chunk; without
    it, once per chunk (``{frame_start}``/``{frame_end}`` are the chunk's).
    """
    _known_keys(settings, _FRAMES_KEYS)
    for key in ("frame_start", "frame_end", "command"):
        if key not in settings:
            raise CompileError(f"settings.{key}", "missing")
    start = _int("settings.frame_start", settings["frame_start"], *_FRAME_RANGE)
    end = _int("settings.frame_end", settings["frame_end"], *_FRAME_RANGE)
    if end < start:
        raise CompileError("settings.frame_end", f"must be >= frame_start ({start}), got {end}")
    count = end - start + 1
    if count > MAX_FRAMES:
        raise CompileError("settings.frame_end", f"{count} frames, above the limit of {MAX_FRAMES}")
    chunk = settings.get("chunk_size")
    chunk = count if chunk is None else min(_int("settings.chunk_size", chunk, 1, 10**9), count)
    n_tasks = math.ceil(count / chunk)
    if n_tasks > MAX_TASKS_PER_JOB:
        raise CompileError("settings.chunk_size",
                           f"{count} frames in chunks of {chunk} make {n_tasks} tasks, above the "
                           f"limit of {MAX_TASKS_PER_JOB} per job; use chunks of at least "
                           f"{math.ceil(count / MAX_TASKS_PER_JOB)}")
    template = _template("settings.command", settings["command"])
    per_frame = "frame" in template.fields
    if per_frame and chunk > MAX_COMMANDS_PER_TASK:
        raise CompileError("settings.chunk_size",
                           f"{{frame}} runs one command per frame: chunks of {chunk} make more than "
                           f"{MAX_COMMANDS_PER_TASK} commands per task")
    data = _pick_data("settings.data", settings.get("data"), files)
    options = _task_options(settings)
    label = _label(settings)
    if common["parser"] is None:
        common = dict(common, parser="frames")
    specs: list[p.TaskSpec] = []
    for first in range(start, end + 1, chunk):
        last = min(first + chunk - 1, end)
        if per_frame:
            cmds = [template.fill(frame_start=first, frame_end=last, frame=f) for f in range(first, last + 1)]
        else:
            cmds = [template.fill(frame_start=first, frame_end=last)]
        specs.append(p.TaskSpec(
            stages=[p.StageSpec(name="render", cmds=cmds, data=data)],
            **options,
            label=f"{label} frames {first}-{last}".lstrip(),
            frame_start=first,
            frame_end=last,
            **common,
        ))
    return specs


class _Template:
    """A command template whose fields are frame numbers only."""

    def __init__(self, parts: list[tuple[str, Optional[str], str]]) -> None:
        self.parts = parts
        self.fields = {f for _, f, _ in parts if f is not None}

    def fill(self, **values: int) -> str:
        out = []
        for literal, field, spec in self.parts:
            out.append(literal)
            if field is not None:
                out.append(format(values[field], spec))
        cmd = "".join(out)
        if len(cmd) > MAX_COMMAND_CHARS:  # only a spec could grow it, and specs are bounded
            raise CompileError("settings.command", f"longer than {MAX_COMMAND_CHARS} characters")
        return cmd


def _template(field: str, raw: Any) -> _Template:
    if not isinstance(raw, str) or not raw.strip():
        raise CompileError(field, f"must be a non-empty string, got {_kind(raw)}")
    if len(raw) > MAX_COMMAND_CHARS:
        raise CompileError(field, f"{len(raw)} characters, above the limit of {MAX_COMMAND_CHARS}")
    try:
        parsed = list(string.Formatter().parse(raw))
    except ValueError as exc:  # a lone "{" or "}"
        raise CompileError(field, f"bad template ({exc}); write {{{{ and }}}} for literal braces") from None
    parts: list[tuple[str, Optional[str], str]] = []
    unknown: list[str] = []
    for literal, name, spec, conversion in parsed:
        if name is None:
            parts.append((literal, None, ""))
            continue
        if name not in FRAME_FIELDS:
            unknown.append("{" + name + "}")
            continue
        if conversion is not None:
            raise CompileError(field, f"{{{name}!{conversion}}}: conversions are not allowed")
        if not _FORMAT_SPEC_RE.match(spec or ""):
            raise CompileError(field, f"{{{name}:{spec}}}: only padding such as {{{name}:04d}} is allowed")
        parts.append((literal, name, spec or ""))
    if unknown:
        raise CompileError(field, f"unknown field(s) {', '.join(unknown)}; known: "
                           + ", ".join("{" + f + "}" for f in FRAME_FIELDS))
    return _Template(parts)


COMPILERS: dict[str, Compiler] = {"shell": compile_shell, "frames": compile_frames}


# ---------------------------------------------------------------- helpers


def _task_options(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings every compiler shares: artifacts, hardware, timeout, retries."""
    out: dict[str, Any] = {
        "artifacts": _artifacts(settings.get("artifacts")),
        "hardware": _hardware(settings.get("hardware")),
    }
    if settings.get("timeout") is not None:
        out["timeout"] = _timeout(settings["timeout"])
    if settings.get("max_retries") is not None:
        out["max_retries"] = _int("settings.max_retries", settings["max_retries"], 0, 100)
    return out


def _commands(field: str, raw: Any) -> list[str]:
    cmds = [raw] if isinstance(raw, str) else raw
    if not isinstance(cmds, list):
        raise CompileError(field, f"must be a list of strings or one script string, got {_kind(raw)}")
    if len(cmds) > MAX_COMMANDS_PER_TASK:
        raise CompileError(field, f"{len(cmds)} commands, above the limit of {MAX_COMMANDS_PER_TASK}")
    for i, c in enumerate(cmds):
        if not isinstance(c, str):
            raise CompileError(f"{field}[{i}]", f"must be a string, got {_kind(c)}")
        if len(c) > MAX_COMMAND_CHARS:
            raise CompileError(f"{field}[{i}]", f"{len(c)} characters, above the limit of {MAX_COMMAND_CHARS}")
    out = [c for c in cmds if c.strip()]
    if not out:
        raise CompileError(field, "no commands (empty)")
    return out


def _artifacts(raw: Any) -> list[str]:
    if raw is None:
        return []
    pats = [raw] if isinstance(raw, str) else raw
    if not isinstance(pats, list):
        raise CompileError("settings.artifacts", f"must be a list of file patterns, got {_kind(raw)}")
    if len(pats) > MAX_ARTIFACTS:
        raise CompileError("settings.artifacts", f"{len(pats)} patterns, above the limit of {MAX_ARTIFACTS}")
    for i, pat in enumerate(pats):
        if not isinstance(pat, str):
            raise CompileError(f"settings.artifacts[{i}]", f"must be a string, got {_kind(pat)}")
        problem = unsafe_relative_path(pat) if len(pat) <= 4096 else "is longer than 4096 characters"
        if problem:
            raise CompileError(f"settings.artifacts[{i}]", f"{_short(pat)} {problem}")
    return list(pats)


def _hardware(raw: Any) -> dict[str, Any]:
    try:
        return hw.normalize(raw)
    except hw.HardwareError as exc:
        raise CompileError("settings.hardware", str(exc)) from None


def _label(settings: Mapping[str, Any]) -> str:
    label = settings.get("label", "")
    if not isinstance(label, str) or len(label) > MAX_LABEL_CHARS:
        raise CompileError("settings.label", f"must be a string of at most {MAX_LABEL_CHARS} characters")
    return label


def _timeout(raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not 0 < raw <= _MAX_TIMEOUT:
        raise CompileError("settings.timeout", f"must be seconds > 0 and <= {_MAX_TIMEOUT}, got {_short(raw)}")
    return float(raw)


def _int(field: str, raw: Any, lo: int, hi: int) -> int:
    """A whole number in [lo, hi]; ``4.0`` is accepted (JSON has one number type), ``True`` is not."""
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise CompileError(field, f"must be a whole number, got {_short(raw)}")
    if raw < lo:
        raise CompileError(field, f"must be a whole number >= {lo}, got {raw}")
    if raw > hi:
        raise CompileError(field, f"must be a whole number <= {hi}, got {raw}")
    return raw


def _parser(raw: Any) -> Optional[str]:
    if raw is None or raw == "":
        return None
    if raw not in p.PARSERS:
        raise CompileError("parser", f"unknown parser {_short(raw)}; known: {', '.join(p.PARSERS)}")
    return raw


def _external_id(field: str, raw: Any) -> Optional[str]:
    if raw is None:
        return None
    if not isinstance(raw, str) or len(raw) > 128 or not _EXTERNAL_ID_RE.match(raw):
        raise CompileError(field, "must be 1-128 characters of letters, digits and ._:@- "
                           f"(starting with a letter or digit), got {_short(raw)}")
    return raw


def _data_files(data: Optional[Mapping[str, p.DataSpec]]) -> dict[str, p.DataSpec]:
    if data is None:
        return {}
    out: dict[str, p.DataSpec] = {}
    for name, spec in data.items():
        if not isinstance(spec, p.DataSpec) or spec.filename != name:
            raise CompileError("data", f"{_short(name)} must map to a DataSpec with that filename")
        problem = unsafe_relative_path(name)
        if problem:
            raise CompileError("data", f"{_short(name)} {problem}")
        out[name] = spec
    return out


def _pick_data(field: str, raw: Any, files: Mapping[str, p.DataSpec]) -> list[p.DataSpec]:
    """The named files (``None``: all of them), in the order given."""
    if raw is None:
        return list(files.values())
    names = [raw] if isinstance(raw, str) else raw
    if not isinstance(names, list):
        raise CompileError(field, f"must be a list of file names, got {_kind(raw)}")
    out: list[p.DataSpec] = []
    for i, name in enumerate(names):
        if not isinstance(name, str) or name not in files:
            known = ", ".join(sorted(files)) or "none were given"
            raise CompileError(f"{field}[{i}]", f"no data file named {_short(name)} (known: {known})")
        if files[name] not in out:
            out.append(files[name])
    return out


def _with_external_ids(specs: list[p.TaskSpec], ext: str) -> list[p.TaskSpec]:
    """One task keeps the caller's id; a chunked job's tasks get ``<id>:<first>-<last>``
    (the id is unique per user, so tasks of one job cannot share it)."""
    if len(specs) == 1:
        return [_replace(specs[0], external_id=ext)]
    out = []
    for s in specs:
        own = f"{ext}:{s.frame_start}-{s.frame_end}" if s.frame_start is not None else ext
        if len(own) > 128:
            raise CompileError("external_id", f"too long to name the job's {len(specs)} tasks")
        out.append(_replace(s, external_id=own))
    if len({s.external_id for s in out}) != len(out):
        raise CompileError("external_id", f"one id cannot name a job of {len(specs)} tasks")
    return out


def _replace(spec: p.TaskSpec, **changes: Any) -> p.TaskSpec:
    return msgspec.structs.replace(spec, **changes)


def _known_keys(settings: Mapping[str, Any], known: tuple[str, ...], field: str = "settings") -> None:
    for key in settings:
        if key not in known:
            raise CompileError(f"{field}.{str(key)[:40]}",
                               f"unknown setting; known: {', '.join(known)}")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."
