"""The HWF wire protocol: every message hub, daemons and clients exchange.

One module, imported by all three sides, with no I/O in it (the sans-I/O
style of the ``websockets`` library): it only turns bytes into typed
messages and back, and checks them.

Text frames carry one JSON object each, tagged by ``type``.  Requests carry
an ``id`` that the reply echoes.  File bytes travel in binary frames: a
4-byte big-endian transfer id (the ``id`` of the ``blob_put`` / ``blob_get``
request they belong to) followed by up to ``Limits.chunk_bytes`` of payload.
"""

from __future__ import annotations

import json
import re
import struct
from typing import Annotated, Any, Literal, Optional, Union

import msgspec
from msgspec import Meta

# The newest protocol this code speaks, and the oldest peer it still serves.
# 2: ``assignments`` (many tasks per message) and ``tasks_done`` (many results).
# A peer says the newest it speaks in ``hello``; the hub answers with the
# version both use in ``welcome``.
PROTOCOL_VERSION = 2
MIN_PROTOCOL_VERSION = 1
DEFAULT_PORT = 8765
DEFAULT_HTTP_PORT = 8766

ROLES = ("client", "daemon", "admin")

TaskStatus = Literal[
    "queued", "assigned", "running", "retrying", "finished", "failed", "cancelled"
]
TERMINAL_STATES = frozenset({"finished", "failed", "cancelled"})


class ProtocolError(ValueError):
    """A frame that is not a valid HWF message; the text names the problem."""


class Limits(msgspec.Struct, frozen=True):
    """Every limit the hub enforces; sent to peers in ``welcome``."""

    max_message_bytes: int = 16 * 2**20
    chunk_bytes: int = 1 * 2**20
    max_file_bytes: int = 1 * 2**30
    max_queued_tasks: int = 200_000
    # Unfinished tasks one user may have at once: one user cannot fill the farm.
    max_queued_per_user: int = 50_000
    max_tasks_per_submit: int = 20_000
    max_output_bytes: int = 64 * 2**10
    max_results_per_request: int = 5_000
    # Blob uploads open at once on one connection, per user (a daemon token's
    # owner counts as one), of all clients, and of all daemons (their own pool:
    # a client flood never refuses a finished task's artifact).
    max_uploads_per_connection: int = 4
    max_uploads: int = 256
    max_uploads_per_user: int = 16
    max_daemon_uploads: int = 64
    # Every blob stored on the hub together (Data files and artifacts), and
    # the bytes of blobs one user uploaded or whose tasks produced.
    max_blob_store_bytes: int = 100 * 2**30
    max_blob_bytes_per_user: int = 10 * 2**30
    # Bytes queued for one slow reader: above the first, live output to it is
    # dropped (with a marker); above the second it is disconnected.
    send_queue_bytes: int = 8 * 2**20
    send_queue_hard_bytes: int = 64 * 2**20
    # get_results(wait=True) requests and watches one user may keep open at
    # once (all its connections together), and the task ids they hold in all.
    max_waiters_per_user: int = 1_000
    max_watches_per_user: int = 1_000
    max_waited_ids_per_user: int = 200_000


# ------------------------------------------------------------ bounded values
#
# Every number and string a peer sends has a range; msgspec refuses a value
# outside it while decoding, with an error naming the field.

Priority = Annotated[int, Meta(ge=-1_000_000, le=1_000_000)]
Retries = Annotated[int, Meta(ge=0, le=100)]
Seconds = Annotated[float, Meta(gt=0, le=30 * 86400)]
Bytes = Annotated[int, Meta(ge=0, le=2**50)]
Count = Annotated[int, Meta(ge=0, le=2**31 - 1)]
RequestId = Annotated[int, Meta(ge=0, le=2**32 - 1)]  # also a binary frame's 4-byte transfer id
Name = Annotated[str, Meta(max_length=256)]
Text = Annotated[str, Meta(max_length=4096)]
Id = Annotated[str, Meta(max_length=128)]
Sha256 = Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]
# What a daemon measures and reports (untrusted: credits are computed from
# it).  Finite and non-negative; the caps only refuse nonsense (1e300, an
# infinity, NaN): the hub bounds CPU-seconds by the attempt's own wall time
# x the machine's cores before it pays credits (ledger.py).
Timestamp = Annotated[float, Meta(ge=0.0, le=1e11)]  # seconds since the epoch
Measured = Annotated[float, Meta(ge=0.0, le=1e12)]  # seconds: a duration, CPU or GPU time
# Percents are shown, never paid: generous caps (a command of a few ms can
# show thousands of % from one clock tick of CPU), only finite and >= 0.
CpuPercent = Annotated[float, Meta(ge=0.0, le=1e9)]  # 100 per busy core
GpuPercent = Annotated[float, Meta(ge=0.0, le=1e9)]
# A task's hardware requirement: flat values only (no nesting to recurse into).
HardwareValue = Union[str, int, float, bool, None, list[Name]]
Requirements = Annotated[dict[Name, HardwareValue], Meta(max_length=32)]


class GpuInfo(msgspec.Struct):
    name: Name = ""
    memory: Optional[Bytes] = None
    index: Optional[Count] = None


class MachineHardware(msgspec.Struct):
    """What a daemon reports about its machine, typed: a daemon is untrusted
    input, and the scheduler compares these values on every pass."""

    os: Name = ""
    distro: Name = ""
    os_version: Name = ""
    arch: Name = ""
    cpu: Name = ""
    cores: Annotated[int, Meta(ge=1, le=1_000_000)] = 1
    physical_cores: Annotated[int, Meta(ge=1, le=1_000_000)] = 1
    ram: Annotated[int, Meta(ge=0, le=2**60)] = 0
    gpus: Annotated[list[GpuInfo], Meta(max_length=256)] = []
    hostname: Name = ""
    python: Name = ""
    # What the daemon can run: "shell", "python3.11" (its warm workers' major.minor),
    # "docker" / "podman" when an engine answers.  A task's `runtime` requirement
    # matches only daemons listing it.
    runtimes: Annotated[list[Name], Meta(max_length=16)] = []


# ---------------------------------------------------------------- task specs


class DataSpec(msgspec.Struct, frozen=True):
    """An input file, already in the hub's blob store, saved as ``filename``."""

    filename: Text
    sha256: Sha256
    size: Bytes


class PyCall(msgspec.Struct, frozen=True):
    """A Python call run by a warm worker interpreter on the daemon (a stage
    with ``call`` set has no ``cmds``).

    Either ``pickled`` (cloudpickle of ``(fn, args, kwargs)``), inline as
    base64 when small or in ``pickled_file`` (a Data file of the stage) when
    not; arguments too large to inline travel as their own Data files named
    ``hwf-arg-<sha256>`` and the pickle refers to them by persistent id (the
    sha256), so one big argument is uploaded once for any number of tasks.
    Or ``ref`` = ``"module:function"``, imported on the daemon and called with
    ``arg`` (MECA's and HTC-Grid's python runtime; nothing is unpickled).
    ``python`` is the client's major.minor: a worker of another version
    refuses the call with a clear error instead of unpickling it.
    """

    python: Name
    pickled: Optional[str] = None  # base64
    pickled_file: Optional[Text] = None
    ref: Optional[Text] = None
    arg: Optional[str] = None


class ContainerCall(msgspec.Struct, frozen=True):
    """MECA's container task: run ``image`` with ``engine`` the way MECA's
    executor does (the container serves HTTP; ``data`` is POSTed to it and the
    reply body is the result)."""

    engine: Literal["docker", "podman"]
    image: Text
    data: str = ""
    port: Annotated[int, Meta(ge=1, le=65535)] = 8080
    path: Text = "/"
    gpus: Annotated[int, Meta(ge=0, le=64)] = 0


class StageSpec(msgspec.Struct, frozen=True):
    name: Name
    cmds: list[str]
    data: list[DataSpec] = []
    track_time: bool = True
    track_ram: bool = False
    track_cpu: bool = False
    track_gpu: bool = False
    comment: Text = ""
    call: Optional[PyCall] = None
    container: Optional[ContainerCall] = None
    stdin: Optional[Annotated[str, Meta(max_length=16 * 2**20)]] = None  # given to each command (MECA runtime="shell")


CreditAmount = Annotated[int, Meta(ge=0, le=10**12)]
CounterName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")]
# Counters are numbers summed on claim (CreditPiggy sends integers; the hub's
# own cpu_seconds / wall_seconds / gpu_seconds are float seconds).  Never
# negative: a tally sums everyone's slots, and one user's negative count
# would take from a machine's total.
CounterValue = Union[Annotated[int, Meta(ge=0, le=10**15)], Annotated[float, Meta(ge=0.0, le=1e15)]]
Counters = Annotated[dict[CounterName, CounterValue], Meta(max_length=64)]
MetaValues = Annotated[dict[CounterName, Text], Meta(max_length=64)]
SlotReason = Annotated[str, Meta(max_length=64)]


class CreditSpec(msgspec.Struct, frozen=True):
    """Fixed ``credits``, or a ``min``/``max`` range (fixed wins when both are given)."""

    credits: Optional[CreditAmount] = None
    min: Optional[CreditAmount] = None
    max: Optional[CreditAmount] = None


# Progress parsers (daemon/parsers.py): what turns a command's output lines into progress.
PARSERS = ("frames", "percent", "hwf-progress")
ParserName = Literal["frames", "percent", "hwf-progress"]
FrameNumber = Annotated[int, Meta(ge=-(10**9), le=10**9)]
Percent = Annotated[float, Meta(ge=0.0, le=100.0)]
EnvName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
TaskEnv = Annotated[dict[EnvName, Annotated[str, Meta(max_length=4096)]], Meta(max_length=64)]
ExternalId = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$")]


class TaskSpec(msgspec.Struct, frozen=True):
    """What a client submits: the task as the daemon will run it."""

    stages: list[StageSpec]
    artifacts: list[Text] = []
    hardware: Requirements = {}
    priority: Priority = 0
    max_retries: Retries = 3
    timeout: Optional[Seconds] = None
    label: Text = ""
    stream: bool = False  # send stdout/stderr live to watchers (costs messages)
    # The task's credit slot: fixed credits, or a (min, max) range the hub
    # clamps the measured CPU-seconds into; None = CPU-seconds rounded up, >= 1.
    credits: Optional[CreditSpec] = None
    # Progress: the daemon runs this parser over the commands' output lines
    # and reports ``progress`` (a render's frames: frame_start..frame_end).
    parser: Optional[ParserName] = None
    frame_start: Optional[FrameNumber] = None
    frame_end: Optional[FrameNumber] = None
    # The Manager HTTP API's ids: the job a task came from, and the caller's
    # own id for the task (a brender server's task_id); unique per user.
    job_id: Optional[ExternalId] = None
    external_id: Optional[ExternalId] = None
    # Extra environment variables for the task's commands (taskenv.py says
    # which names are allowed; the hub checks them at submit).
    env: TaskEnv = {}


# ------------------------------------------------------------ task outcomes


ExitCode = Annotated[int, Meta(ge=-(2**31), le=2**31)]


class CommandOutcome(msgspec.Struct):
    cmd: str
    exit_code: Optional[ExitCode]
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration: Optional[Measured] = None
    cpu_time: Optional[Measured] = None
    peak_ram: Optional[Bytes] = None


class StageOutcome(msgspec.Struct):
    name: str
    status: Literal["finished", "failed", "skipped"]
    started: Optional[Timestamp] = None
    duration: Optional[Measured] = None
    peak_ram: Optional[Bytes] = None
    cpu_percent: Optional[CpuPercent] = None
    cpu_time: Optional[Measured] = None
    gpu_util: Optional[GpuPercent] = None
    gpu_mem: Optional[Bytes] = None
    comment: str = ""
    note: str = ""
    commands: list[CommandOutcome] = []


class ArtifactInfo(msgspec.Struct):
    pattern: Text
    name: Optional[Text] = None
    sha256: Optional[Sha256] = None
    size: Optional[Bytes] = None
    error: Optional[Text] = None


class PyValue(msgspec.Struct):
    """What a Python call returned or raised.

    ``pickled`` (base64 cloudpickle) when small, else the value is the
    artifact named ``artifact``; ``repr`` is short, for tables.  When the call
    raised: ``error_type``, the remote ``traceback`` text, and the exception
    itself pickled when it pickles.
    """

    pickled: Optional[str] = None
    artifact: Optional[Text] = None
    size: Optional[Bytes] = None
    repr: Text = ""
    error_type: Optional[Name] = None
    traceback: Optional[str] = None


class TaskOutcome(msgspec.Struct):
    """What a daemon reports when an attempt ends.  ``lost``: the attempt
    died of something not the task's own (its worker process crashed); the
    hub retries it like an attempt lost with its daemon."""

    status: Literal["finished", "failed", "lost"]
    exit_code: Optional[ExitCode] = None
    error: Optional[str] = None
    reason: Optional[str] = None
    started: Optional[Timestamp] = None
    finished: Optional[Timestamp] = None
    stages: list[StageOutcome] = []
    artifacts: list[ArtifactInfo] = []
    # Always measured (rusage is free), for credits: CPU of every command and
    # its reaped descendants; GPU-seconds where a GPU stage was tracked.
    cpu_seconds: Optional[Measured] = None
    gpu_seconds: Optional[Measured] = None
    value: Optional[PyValue] = None  # a Python call's return value (or exception)


class AttemptInfo(msgspec.Struct):
    attempt: int
    machine: str
    state: str
    assigned: Optional[float] = None
    started: Optional[float] = None
    ended: Optional[float] = None
    reason: Optional[str] = None


class TaskRecord(msgspec.Struct):
    """The hub's view of one task, as clients receive it."""

    task_id: str
    session_id: str
    status: TaskStatus
    priority: int = 0
    label: str = ""
    hardware: dict[str, Any] = {}
    submitted: Optional[float] = None
    queued: Optional[float] = None
    started: Optional[float] = None
    finished: Optional[float] = None
    machine: Optional[str] = None
    machine_hardware: Optional[dict[str, Any]] = None
    exit_code: Optional[int] = None
    error: Optional[str] = None
    reason: Optional[str] = None
    wait_reason: Optional[str] = None
    attempts: list[AttemptInfo] = []
    stages: list[StageOutcome] = []
    artifacts: list[ArtifactInfo] = []
    credits: Optional[int] = None  # claimed credits of the task's slot; None until claimed
    value: Optional[PyValue] = None
    user: str = ""
    # Progress reported by the task's parser (None: no parser, or no line yet).
    parser: Optional[str] = None
    progress: Optional[float] = None  # percent, 0-100
    frame_start: Optional[int] = None
    frame_end: Optional[int] = None
    frame_current: Optional[int] = None
    job_id: Optional[str] = None
    external_id: Optional[str] = None
    hidden: bool = False


class TaskBrief(msgspec.Struct):
    """A task's state in a watch snapshot."""

    task_id: str
    status: TaskStatus
    machine: Optional[str] = None
    error: Optional[str] = None
    n_stages: int = 0
    stages: list[StageOutcome] = []
    submitted: Optional[float] = None
    progress: Optional[float] = None
    frame_current: Optional[int] = None


# A load average above this is a broken or lying daemon (the busiest real
# machines report a few thousand); bounded so the pool and page show sane numbers.
LoadAverage = Annotated[float, Meta(ge=0.0, le=1_000_000.0)]


class Load(msgspec.Struct):
    """A daemon's live load (heartbeats): typed and bounded like any daemon input."""

    load_avg: tuple[LoadAverage, LoadAverage, LoadAverage] = (0.0, 0.0, 0.0)
    cpu_percent: Percent = 0.0
    mem_percent: Percent = 0.0
    disk_percent: Percent = 0.0


class MachineInfo(msgspec.Struct):
    machine_id: str
    name: str
    state: Literal["online", "offline", "draining"]
    hardware: dict[str, Any]
    slots: int
    running: int = 0
    tags: list[str] = []
    load: Optional[Load] = None
    first_seen: Optional[float] = None
    last_seen: Optional[float] = None
    owner: str = ""
    credits: int = 0  # claimed credits earned on this machine (paid and pending)
    # Admin switch (set_machine): a disabled machine gets no new tasks.
    enabled: bool = True
    # The running tasks the asker may see (its own; all for an admin).
    current_tasks: list[str] = []
    ip_address: Optional[str] = None  # as the hub saw the daemon's connection


# ----------------------------------------------------------------- messages


class _Msg(msgspec.Struct, tag_field="type"):
    """Unknown fields (from a newer peer) are ignored; known ones are checked strictly."""


class Hello(_Msg, tag="hello"):
    version: int
    agent: str = ""


class Welcome(_Msg, tag="welcome"):
    version: int
    role: str
    hub_id: str
    limits: Limits
    time: float
    http_port: Optional[int] = None  # the Manager API and status page (None: off)


class Error(_Msg, tag="error"):
    """A request (or a frame) was refused; ``message`` says why."""

    id: Optional[int]
    code: str
    message: str


class Ok(_Msg, tag="ok"):
    id: int


# client -> hub


class Submit(_Msg, tag="submit"):
    """``key`` (client-chosen, unique) makes a resent submit return the
    original reply instead of queueing the tasks twice."""

    id: RequestId
    tasks: list[TaskSpec]
    session_id: Optional[Id] = None
    key: Optional[Id] = None


class Submitted(_Msg, tag="submitted"):
    id: int
    session_id: str
    task_ids: list[str]


class GetResults(_Msg, tag="get_results"):
    id: RequestId
    task_ids: list[Id]
    wait: bool = False
    timeout: Optional[Annotated[float, Meta(ge=0, le=30 * 86400)]] = None


class Results(_Msg, tag="results"):
    id: int
    tasks: list[TaskRecord]
    timed_out: bool = False


class GetPool(_Msg, tag="get_pool"):
    id: RequestId
    hardware: Annotated[list[Requirements], Meta(max_length=1000)] = []
    include_offline: bool = False


class Pool(_Msg, tag="pool"):
    id: int
    machines: list[MachineInfo]


class BlobsMissing(_Msg, tag="blobs_missing"):
    id: RequestId
    sha256: Annotated[list[Sha256], Meta(max_length=10_000)]


class BlobsMissingReply(_Msg, tag="blobs_missing_reply"):
    id: int
    missing: list[str]


class BlobPut(_Msg, tag="blob_put"):
    """Announces ``size`` bytes in binary frames tagged with this ``id``."""

    id: RequestId
    sha256: Sha256
    size: Bytes


class BlobGc(_Msg, tag="blob_gc"):
    """Admin: delete the blobs nothing refers to any more (blobgc.py says what refers)."""

    id: RequestId
    dry_run: bool = False


class BlobGcReport(_Msg, tag="blob_gc_report"):
    """What a garbage collection deleted (or, on a dry run, would delete), and what stays."""

    id: int
    dry_run: bool
    deleted: int
    deleted_bytes: int
    kept: int
    kept_bytes: int


class BlobGet(_Msg, tag="blob_get"):
    id: RequestId
    sha256: Sha256


class BlobData(_Msg, tag="blob_data"):
    """Reply to ``blob_get``: ``size`` bytes follow in binary frames."""

    id: int
    sha256: str
    size: int


class Watch(_Msg, tag="watch"):
    """Subscribe to live events of tasks (or of a whole session, also of
    tasks added to it later).  Replied with ``watching``; events then
    arrive as ``task_event`` / ``output`` carrying ``watch=id``."""

    id: RequestId
    task_ids: list[Id] = []
    session_id: Optional[Id] = None
    output: bool = False


class Watching(_Msg, tag="watching"):
    id: int
    tasks: list[TaskBrief]


class Unwatch(_Msg, tag="unwatch"):
    id: RequestId
    watch: RequestId


class TaskEvent(_Msg, tag="task_event"):
    watch: int
    task_id: str
    status: TaskStatus
    time: float
    machine: Optional[str] = None
    error: Optional[str] = None
    stage_index: Optional[int] = None
    stage: Optional[StageOutcome] = None
    progress: Optional[float] = None  # a progress event: status stays "running"
    frame_current: Optional[int] = None
    n_stages: Optional[int] = None  # on a task's first event (a session watch learns it here)


class Output(_Msg, tag="output"):
    """Live stdout/stderr text: daemon -> hub (watch=None), hub -> watchers."""

    task_id: Id
    attempt: Count
    stream: Literal["stdout", "stderr"]
    text: str
    watch: Optional[int] = None


class GetSession(_Msg, tag="get_session"):
    id: RequestId
    session_id: Id


class SessionInfo(_Msg, tag="session_info"):
    id: int
    session_id: str
    created: float
    task_ids: list[str]
    counts: dict[str, int]


class Cancel(_Msg, tag="cancel"):
    """Cancel tasks (by id) or every unfinished task of a session."""

    id: RequestId
    task_ids: list[Id] = []
    session_id: Optional[Id] = None


class Cancelled(_Msg, tag="cancelled"):
    """``by_state`` counts the cancelled tasks by the state they were in:
    queued, retrying (queued again after a lost daemon), assigned, running."""

    id: int
    task_ids: list[str]
    by_state: dict[str, int]


class ListTasks(_Msg, tag="list_tasks"):
    """Tasks by filter, newest first (a client: its own; an admin: anyone's,
    or ``user``'s); hidden ones (``update_task hidden``) only when asked."""

    id: RequestId
    status: Annotated[list[TaskStatus], Meta(max_length=16)] = []
    session_id: Optional[Id] = None
    user: Optional[Name] = None
    machine: Optional[Name] = None
    job_id: Optional[ExternalId] = None
    external_id: Optional[ExternalId] = None
    offset: Annotated[int, Meta(ge=0, le=10**9)] = 0
    limit: Annotated[int, Meta(ge=1, le=1000)] = 100
    include_hidden: bool = False
    # Small fields only: no stages, outputs, artifacts or values are loaded
    # (the status page's snapshot, however big the tasks' results are).
    brief: bool = False


class TaskList(_Msg, tag="task_list"):
    id: int
    tasks: list[TaskRecord]
    total: int  # matching tasks in all (for paging)


class ListSessions(_Msg, tag="list_sessions"):
    """Newest sessions with task counts by status (a client: its own; an admin: anyone's)."""

    id: RequestId
    limit: Annotated[int, Meta(ge=1, le=1000)] = 50


class SessionSummary(msgspec.Struct):
    session_id: str
    created: float
    user: str
    counts: dict[str, int]


class SessionList(_Msg, tag="session_list"):
    id: int
    sessions: list[SessionSummary]


class UpdateTask(_Msg, tag="update_task"):
    """Change a task: ``priority`` while it is queued (error ``not_queued``
    otherwise), ``hidden`` (left out of list_tasks).  Acked with ``ok``."""

    id: RequestId
    task_id: Id
    priority: Optional[Priority] = None
    hidden: Optional[bool] = None


class SetMachine(_Msg, tag="set_machine"):
    """Admin only: ``disabled`` (no new tasks; running ones finish),
    ``drain`` (the same, shown as draining), ``enabled``.  Acked with ``ok``."""

    id: RequestId
    machine_id: Name
    status: Literal["enabled", "disabled", "drain"]


class PutJobFile(_Msg, tag="put_job_file"):
    """Remember ``sha256`` (a blob this user uploaded) as the file of job ``job_id``."""

    id: RequestId
    job_id: ExternalId
    sha256: Sha256


class GetJobFile(_Msg, tag="get_job_file"):
    id: RequestId
    job_id: ExternalId


class JobFile(_Msg, tag="job_file"):
    id: int
    job_id: str
    sha256: Optional[str] = None  # None: no file for that job (of this user)


# daemon <-> hub


class Register(_Msg, tag="register"):
    id: RequestId
    name: Name
    hardware: MachineHardware
    slots: Annotated[int, Meta(ge=1, le=1024)]
    tags: Annotated[list[Name], Meta(max_length=64)] = []
    running: Annotated[list[tuple[Id, Count]], Meta(max_length=4096)] = []
    instance: Id = ""  # new for every daemon process start


class Registered(_Msg, tag="registered"):
    id: int
    machine_id: str
    heartbeat_interval: float


class Heartbeat(_Msg, tag="heartbeat"):
    load: Load
    running: int = 0


class Assign(_Msg, tag="assign"):
    task_id: str
    attempt: int
    spec: TaskSpec
    # Opaque per-user key (a keyed hash, not the name): a daemon's warm Python
    # worker serves the tasks of one key only, so no user inherits another's
    # interpreter state.
    user_key: Id = ""


class Assignments(_Msg, tag="assignments"):
    """Hub -> daemon (protocol 2): several assignments in one message."""

    items: list[Assign]


class Draining(_Msg, tag="draining"):
    """Daemon -> hub: finishing its running tasks, take no new ones."""


class CancelTask(_Msg, tag="cancel_task"):
    """Hub -> daemon: kill this attempt's processes; report it as usual."""

    task_id: str
    attempt: int


class TaskStarted(_Msg, tag="task_started"):
    task_id: Id
    attempt: Count
    time: Timestamp


class StageDone(_Msg, tag="stage_done"):
    task_id: Id
    attempt: Count
    index: Count
    stage: StageOutcome


class Progress(_Msg, tag="progress"):
    """Daemon -> hub: what the task's parser read in its output (the latest only)."""

    task_id: Id
    attempt: Count
    percent: Optional[Percent] = None
    frame_current: Optional[FrameNumber] = None


class TaskDone(_Msg, tag="task_done"):
    """Acked with ``ok``; a daemon resends it until acked."""

    id: RequestId
    task_id: Id
    attempt: Count
    outcome: TaskOutcome


class TasksDone(_Msg, tag="tasks_done"):
    """Daemon -> hub (protocol 2): several results, acked with one ``ok``."""

    id: RequestId
    done: Annotated[list[TaskDone], Meta(max_length=10_000)]


# credits (CreditPiggy's slots) -- client/admin -> hub
#
# Credits come only from work done.  A task's slot (its id is the task id)
# is settled by the hub alone, from the result of the attempt it assigned:
# no request may alloc, claim, discard, count or meta it (``task_slot``).
# A user's own slots (CreditPiggy job managers) are named per user: user-b's
# "job-17" and user-a's "job-17" are two slots.  A client may alloc, claim,
# discard and set counters/meta on its own; another user's slot, and another
# user's task id, answer exactly as a never-used name.  An admin addresses a
# user's slot as ``USER/NAME`` (a bare name is the admin's own).  Daemon
# tokens may not send any credit write (``forbidden``); only admin may link.
# Each request is acked with ``ok`` or answered with ``error`` (codes:
# ``unknown_slot``, ``slot_exists``, ``task_slot``, ``slot_not_allocated``
# (claimed/discarded/expired; the text says which), ``bad_credits``,
# ``forbidden``).


class CreditAlloc(_Msg, tag="credit_alloc"):
    id: RequestId
    slot: Id
    credits: Optional[CreditAmount] = None
    min: Optional[CreditAmount] = None
    max: Optional[CreditAmount] = None
    expire: Optional[Seconds] = None  # default 24 h


class CreditDiscard(_Msg, tag="credit_discard"):
    id: RequestId
    slot: Id
    reason: Optional[SlotReason] = None


class CreditClaim(_Msg, tag="credit_claim"):
    """``machine`` is any string (CreditPiggy's machines need not be HWF daemons)."""

    id: RequestId
    slot: Id
    machine: Id
    credits: Optional[CreditAmount] = None


class CreditClaimed(_Msg, tag="credit_claimed"):
    id: int
    slot: str
    credits: int
    owner: Optional[str] = None  # None: pending until the machine is linked


class CreditCounters(_Msg, tag="credit_counters"):
    id: RequestId
    slot: Id
    counters: Counters


class CreditMeta(_Msg, tag="credit_meta"):
    id: RequestId
    slot: Id
    meta: MetaValues


class CreditLink(_Msg, tag="credit_link"):
    """Admin: link a machine to a user; its pending credits are paid to them."""

    id: RequestId
    machine: Id
    user: Name


class CreditLinked(_Msg, tag="credit_linked"):
    id: int
    machine: str
    user: str
    paid_credits: int  # pending credits paid out by this link
    paid_slots: int


CreditGroup = Literal["machine", "owner", "user", "session"]


class GetCreditTally(_Msg, tag="get_credit_tally"):
    """Totals over claimed slots; a client sees only slots of its own tasks/allocations."""

    id: RequestId
    by: CreditGroup = "machine"


class CreditTallyRow(msgspec.Struct):
    key: Optional[str]  # machine id / owner / user / session id (None: no owner yet)
    credits: int = 0
    slots: int = 0  # claimed slots
    pending: int = 0  # credits not yet paid to an owner (machine not linked)
    counters: dict[str, float] = {}  # tasks, cpu_seconds, wall_seconds, gpu_seconds, custom


class CreditTally(_Msg, tag="credit_tally"):
    id: int
    by: str
    rows: list[CreditTallyRow]


class GetCreditSlots(_Msg, tag="get_credit_slots"):
    id: RequestId
    state: Optional[Literal["allocated", "claimed", "discarded", "expired"]] = None
    session_id: Optional[Id] = None
    machine: Optional[Id] = None
    slots: list[Id] = []
    limit: Annotated[int, Meta(ge=1, le=100_000)] = 10_000


class CreditSlotInfo(msgspec.Struct):
    slot: str
    state: Literal["allocated", "claimed", "discarded", "expired"]
    user: str
    session_id: Optional[str] = None
    task_id: Optional[str] = None
    credits: Optional[int] = None  # fixed at alloc, or the claimed amount
    min: Optional[int] = None
    max: Optional[int] = None
    machine: Optional[str] = None
    owner: Optional[str] = None
    reason: Optional[str] = None  # discard reason
    allocated: Optional[float] = None
    expires: Optional[float] = None
    ended: Optional[float] = None  # claimed / discarded / expired at
    counters: dict[str, float] = {}
    meta: dict[str, str] = {}


class CreditSlots(_Msg, tag="credit_slots"):
    id: int
    slots: list[CreditSlotInfo]


Message = Union[
    Hello,
    Welcome,
    Error,
    Ok,
    Submit,
    Submitted,
    GetResults,
    Results,
    GetPool,
    Pool,
    BlobsMissing,
    BlobsMissingReply,
    BlobPut,
    BlobGet,
    BlobData,
    BlobGc,
    BlobGcReport,
    Register,
    Registered,
    Heartbeat,
    Assign,
    Assignments,
    TaskStarted,
    StageDone,
    TaskDone,
    TasksDone,
    Watch,
    Watching,
    Unwatch,
    TaskEvent,
    Output,
    GetSession,
    SessionInfo,
    Cancel,
    Cancelled,
    CancelTask,
    Draining,
    CreditAlloc,
    CreditDiscard,
    CreditClaim,
    CreditClaimed,
    CreditCounters,
    CreditMeta,
    CreditLink,
    CreditLinked,
    GetCreditTally,
    CreditTally,
    GetCreditSlots,
    CreditSlots,
    ListTasks,
    TaskList,
    ListSessions,
    SessionList,
    UpdateTask,
    SetMachine,
    PutJobFile,
    GetJobFile,
    JobFile,
    Progress,
]

# What each role may send to the hub.  Daemons only read credits: a
# machine's credits come from the results it reports, settled by the hub.
CREDIT_WRITES = (CreditAlloc, CreditClaim, CreditDiscard, CreditCounters, CreditMeta)
CREDIT_READS = (GetCreditTally, GetCreditSlots)
CREDIT_REQUESTS = CREDIT_WRITES + CREDIT_READS
CLIENT_REQUESTS = (
    Submit, GetResults, GetPool, BlobsMissing, BlobPut, BlobGet, Watch, Unwatch, GetSession, Cancel,
    ListTasks, ListSessions, UpdateTask, PutJobFile, GetJobFile, *CREDIT_REQUESTS,
)
DAEMON_REQUESTS = (
    Register,
    Heartbeat,
    TaskStarted,
    StageDone,
    TaskDone,
    TasksDone,
    Output,
    Progress,
    Draining,
    BlobsMissing,
    BlobPut,
    BlobGet,
    *CREDIT_READS,
)
ALLOWED = {
    "client": CLIENT_REQUESTS,
    "daemon": DAEMON_REQUESTS,
    "admin": tuple(dict.fromkeys(CLIENT_REQUESTS + DAEMON_REQUESTS + (CreditLink, SetMachine, BlobGc))),
}

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Message)
_TYPES = {cls.__struct_config__.tag for cls in Message.__args__}  # type: ignore[attr-defined]
_CHUNK_HEADER = struct.Struct(">I")
_ID_PREFIX = re.compile(r'\s*\{\s*"type"\s*:\s*"[a-z_]{1,40}"\s*,\s*"id"\s*:\s*([0-9]{1,10})\s*[,}]')


def encode(msg: _Msg) -> bytes:
    """Serialise a message to the bytes of one text frame."""
    return _encoder.encode(msg)


def decode(data: Union[str, bytes]) -> Message:
    """Parse one text frame; raise ProtocolError that names what is wrong."""
    try:
        return _decoder.decode(data)
    except RecursionError:
        raise ProtocolError("invalid message: JSON nested too deeply") from None
    except msgspec.ValidationError as exc:
        text = str(exc)
        if "Invalid value" in text and "type" in text:
            kind = _peek_type(data)
            if kind is not None and kind not in _TYPES:
                raise ProtocolError(f"unknown message type {kind!r}") from None
        raise ProtocolError(f"invalid message: {text}") from None
    except msgspec.DecodeError as exc:
        problem = _nonfinite_problem(data)
        raise ProtocolError(problem or f"malformed JSON: {exc}") from None


def _nonfinite_problem(data: Union[str, bytes]) -> Optional[str]:
    """JSON has no NaN or Infinity, but Python's ``json`` writes them: name the
    field that holds one (the slow parser runs only for a frame already refused)."""
    try:
        obj = json.loads(data)
        msgspec.convert(obj, Message)
    except msgspec.ValidationError as exc:
        return f"invalid message: {exc}"
    except (ValueError, RecursionError):
        return None
    return None


class _ResultKey(msgspec.Struct):
    task_id: Id
    attempt: Count


class _Results(msgspec.Struct):
    type: str
    task_id: Optional[Id] = None
    attempt: Optional[Count] = None
    done: Annotated[list[_ResultKey], Meta(max_length=10_000)] = []


def refused_results(data: Union[str, bytes]) -> list[tuple[str, int]]:
    """The (task id, attempt) pairs a ``task_done`` / ``tasks_done`` frame that
    failed to decode was about, read leniently; [] for any other frame.  A
    result the hub refuses must still end its attempt, or the task would wait
    for a result that never decodes."""
    try:
        obj = msgspec.convert(json.loads(data), _Results)
    except (ValueError, RecursionError, msgspec.ValidationError):
        return []
    if obj.type == "task_done" and obj.task_id is not None and obj.attempt is not None:
        return [(obj.task_id, obj.attempt)]
    if obj.type == "tasks_done":
        return [(d.task_id, d.attempt) for d in obj.done]
    return []


def forbidden_text(role: str, msg: _Msg) -> str:
    """Why a peer of ``role`` may not send ``msg`` (the ``forbidden`` error's text)."""
    text = f"a {role} may not send {msg.__struct_config__.tag!r}"
    if role == "daemon" and isinstance(msg, CREDIT_WRITES):
        text += (": a daemon token cannot allocate, claim, discard, count or meta credit slots; "
                 "a machine earns credits only from the results of tasks the hub assigned it")
    return text


def _peek_type(data: Union[str, bytes]) -> Optional[str]:
    try:
        obj = msgspec.json.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return None
    kind = obj.get("type") if isinstance(obj, dict) else None
    return kind if isinstance(kind, str) else None


def request_id(data: Union[str, bytes]) -> Optional[int]:
    """Best-effort ``id`` of a frame that failed to decode, for the error reply."""
    try:
        obj = msgspec.json.decode(data)
    except RecursionError:  # too deep to parse: peers put type and id first
        head = data[:200] if isinstance(data, str) else data[:200].decode("utf-8", "replace")
        m = _ID_PREFIX.match(head)
        return int(m.group(1)) if m else None
    except msgspec.DecodeError:
        return None
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, int) else None


def encode_chunk(transfer_id: int, payload: bytes) -> bytes:
    """One binary frame of a file transfer."""
    return _CHUNK_HEADER.pack(transfer_id) + payload


def decode_chunk(frame: bytes) -> tuple[int, memoryview]:
    """Split a binary frame into (transfer id, payload)."""
    if len(frame) < _CHUNK_HEADER.size:
        raise ProtocolError("binary frame shorter than its 4-byte transfer id")
    (tid,) = _CHUNK_HEADER.unpack_from(frame)
    return tid, memoryview(frame)[_CHUNK_HEADER.size :]


def to_builtins(obj: Any) -> Any:
    """Structs to plain dicts/lists (for storage and DataFrames)."""
    return msgspec.to_builtins(obj)


def convert(obj: Any, typ: type) -> Any:
    """Plain dicts/lists back into typed Structs, strictly."""
    return msgspec.convert(obj, typ)
