"""NVIDIA GPU detection and sampling, for hardware reports and ``track_gpu``.

Two sources, tried in order: NVML through ``pynvml`` (package
``nvidia-ml-py``, optional: imported only when needed) and the
``nvidia-smi`` command line tool.  A machine with neither, or whose driver
does not answer, simply has no GPUs: every function here then returns an
empty list or ``None`` and never raises.

Sampling is machine-wide: it sees every process's use of the GPUs, not only
the task's, because per-process GPU accounting is off on most drivers.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
from typing import Any, Optional

log = logging.getLogger(__name__)

MIB = 2**20
_SMI_TIMEOUT = 10.0
_LIST_QUERY = "index,name,memory.total"
_USAGE_QUERY = "index,utilization.gpu,memory.used"

# A GPU sample: (utilisation %, memory used in bytes), either None if unknown.
Sample = tuple[Optional[float], Optional[int]]


# ------------------------------------------------------------------ parsing


def _number(field: str) -> Optional[float]:
    """``"24576"``, ``"24576 MiB"`` or ``"35 %"`` -> float; ``"[N/A]"`` -> None."""
    text = field.strip()
    for unit in ("MiB", "%"):
        if text.endswith(unit):
            text = text[: -len(unit)].strip()
    try:
        return float(text)
    except ValueError:
        return None


def parse_gpu_list_csv(text: str) -> list[dict[str, Any]]:
    """Parse ``nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits``.

    Pure, so it is testable without a GPU.  Memory is reported in MiB and
    returned in bytes.  A name may itself contain commas: the first field is
    the index and the last the memory, everything between is the name.
    """
    gpus = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 3 or not fields[0]:
            continue
        index = _number(fields[0])
        if index is None:  # a header line or an error message
            continue
        mem = _number(fields[-1])
        gpus.append(
            {
                "name": ", ".join(fields[1:-1]),
                "memory": int(mem * MIB) if mem is not None else 0,
                "index": int(index),
            }
        )
    return gpus


def parse_gpu_usage_csv(text: str) -> list[Sample]:
    """Parse ``nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader,nounits``.

    One (utilisation %, memory used in bytes) per GPU; ``[N/A]`` or
    ``[Not Supported]`` values become None.
    """
    samples: list[Sample] = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3 or _number(fields[0]) is None:
            continue
        util = _number(fields[1])
        mem = _number(fields[2])
        samples.append((util, int(mem * MIB) if mem is not None else None))
    return samples


# ------------------------------------------------------------------ sources

_nvml_lock = threading.Lock()
_nvml_module: Any = None
_nvml_tried = False


def _nvml() -> Any:
    """The initialised ``pynvml`` module, or None when NVML is unusable here."""
    global _nvml_module, _nvml_tried
    with _nvml_lock:
        if not _nvml_tried:
            _nvml_tried = True
            try:
                import pynvml  # type: ignore[import-not-found]

                pynvml.nvmlInit()
                _nvml_module = pynvml
            except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, ...
                log.debug("NVML unavailable: %s", exc)
        return _nvml_module


def _run_smi(query: str) -> Optional[str]:
    """Output of one ``nvidia-smi`` query, or None if it is missing or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=_SMI_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("nvidia-smi failed: %s", exc)
        return None
    if done.returncode != 0:
        log.debug("nvidia-smi exited with %s: %s", done.returncode, done.stderr.strip())
        return None
    return done.stdout


def _nvml_list(nvml: Any) -> list[dict[str, Any]]:
    gpus = []
    for i in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        name = nvml.nvmlDeviceGetName(handle)
        if isinstance(name, bytes):  # older nvidia-ml-py versions
            name = name.decode("utf-8", "replace")
        mem = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
        gpus.append({"name": str(name), "memory": mem, "index": i})
    return gpus


def _nvml_usage(nvml: Any) -> list[Sample]:
    samples: list[Sample] = []
    for i in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        try:
            util: Optional[float] = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # NVMLError_NotSupported on some boards
            util = None
        try:
            mem: Optional[int] = int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
        except Exception:
            mem = None
        samples.append((util, mem))
    return samples


def list_gpus() -> list[dict[str, Any]]:
    """This machine's GPUs as ``{"name", "memory" (bytes), "index"}``; [] if none."""
    nvml = _nvml()
    if nvml is not None:
        try:
            return _nvml_list(nvml)
        except Exception as exc:
            log.debug("NVML listing failed: %s", exc)
    text = _run_smi(_LIST_QUERY)
    return parse_gpu_list_csv(text) if text else []


def sample_gpus() -> list[Sample]:
    """Current (utilisation %, memory used bytes) of each GPU; [] if none."""
    nvml = _nvml()
    if nvml is not None:
        try:
            return _nvml_usage(nvml)
        except Exception as exc:
            log.debug("NVML sampling failed: %s", exc)
    text = _run_smi(_USAGE_QUERY)
    return parse_gpu_usage_csv(text) if text else []


# ------------------------------------------------------------------ sampler


class GpuSampler:
    """Peak GPU utilisation and memory while something runs, from a thread.

    ``start()`` then ``stop()`` (or ``with GpuSampler() as s:``).  Both may
    block for one ``nvidia-smi`` call, so async code should run them with
    ``asyncio.to_thread``.  Results: ``max_util`` (highest % of any GPU) and
    ``max_mem`` (highest total bytes used over all GPUs), both None when the
    machine has no GPU (``available`` is then False) or nothing was measured.
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.available = False
        self.max_util: Optional[float] = None
        self.max_mem: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "GpuSampler":
        """Look for GPUs and, if there are any, begin sampling them."""
        self.available = bool(list_gpus())
        if self.available:
            self._record()
            self._thread = threading.Thread(
                target=self._loop, name="hwf-gpu-sampler", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> Sample:
        """Stop sampling (taking one last sample); return (max_util, max_mem)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._record()
        return self.max_util, self.max_mem

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._record()

    def _record(self) -> None:
        try:
            samples = sample_gpus()
        except Exception as exc:  # never let sampling break the task
            log.debug("GPU sample failed: %s", exc)
            return
        utils = [u for u, _ in samples if u is not None]
        mems = [m for _, m in samples if m is not None]
        if utils:
            self.max_util = max(utils + ([self.max_util] if self.max_util is not None else []))
        if mems:
            total = sum(mems)
            self.max_mem = total if self.max_mem is None else max(self.max_mem, total)

    def __enter__(self) -> "GpuSampler":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
