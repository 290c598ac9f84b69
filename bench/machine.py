"""The machine a benchmark ran on, and process memory probes (current and peak resident set size).

`machine_record()` is what `bench/results.json` stores under `machine`: CPU model and flags that matter
for the kernels (AVX-512, bf16, AMX), logical and physical cores, RAM, library versions, the thread
counts torch and faiss use, the date and the load average (the machine may be shared, so a high load
at start explains slow absolutes; ratios are measured side by side and suffer less).

Whether the machine *was* shared during a run is judged from CPU time, not the load average at start
(which still counts a job that ended a minute earlier): `CpuSnapshot` records the busy CPU seconds of
the whole machine and of this process with its finished children, and `other_cpu_share` is the part
of the machine's capacity over the run that other processes used.

Peak RSS: Linux keeps a per-process high-water mark (`VmHWM` in /proc/self/status) that writing `5`
to /proc/self/clear_refs resets (Linux >= 4.0), so one process can measure the peak of each phase.
Where that is unavailable, the peak since process start (`ru_maxrss`) is reported and flagged.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import resource
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import psutil

_PACKAGES = ("torch", "faiss-cpu", "transformers", "sentence-transformers", "numpy", "peft", "accelerate")
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "fma")


def cpu_model() -> str:
    """The `model name` line of /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The kernel-relevant flags of the first CPU (AVX-512, bf16 dot products, AMX tiles)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in _FLAGS if f in have]
    except OSError:
        pass
    return []


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_record() -> dict:
    """Everything a reader needs to judge absolute numbers (see the module docstring)."""
    import faiss
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (None, None, None)
    mem = psutil.virtual_memory()
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gb": round(mem.total / 2**30, 1),
        "ram_available_gb_at_start": round(mem.available / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in _PACKAGES},
        "torch_threads": torch.get_num_threads(),
        "thread_env": {k: os.environ[k] for k in _THREAD_ENV if k in os.environ},
        "niceness": os.nice(0) if hasattr(os, "nice") else None,
        "faiss_threads": faiss.omp_get_max_threads(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "load_average_at_start": [round(x, 2) if x is not None else None for x in load],
    }


def machine_label(m: dict) -> str:
    """A one-line name of the machine of `machine_record()`: CPU, kernel flags, cores, RAM, torch."""
    flags = ", ".join(m.get("cpu_flags") or []) or "no listed flags"
    return (
        f"{m.get('cpu_model')} ({flags}), {m.get('logical_cores')} logical cores, {m.get('ram_gb')} GB RAM, "
        f"torch {(m.get('versions') or {}).get('torch')}"
    )


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


@dataclass(frozen=True)
class CpuSnapshot:
    """Busy CPU seconds of the machine and of this process tree at one wall-clock instant."""

    wall: float
    machine_busy: float
    own: float

    @classmethod
    def take(cls) -> CpuSnapshot:
        t = psutil.cpu_times()
        busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
        # guest time is already counted in user/nice on Linux
        busy -= getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
        c = psutil.Process().cpu_times()
        own = c.user + c.system + c.children_user + c.children_system
        return cls(wall=time.monotonic(), machine_busy=busy, own=own)


def other_cpu_share(start: CpuSnapshot, end: CpuSnapshot, cores: int | None = None) -> float | None:
    """Fraction of the machine's CPU capacity between the snapshots used by processes other than ours.

    0 on an idle machine, about 0.5 when another single-threaded job held one of two cores throughout.
    Children count as ours once they have been waited for (bench sections run as waited subprocesses).
    """
    cores = cores or os.cpu_count() or 1
    capacity = (end.wall - start.wall) * cores
    if capacity <= 0:
        return None
    other = (end.machine_busy - start.machine_busy) - (end.own - start.own)
    return round(min(max(other / capacity, 0.0), 1.0), 3)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since the last `reset_peak_rss()` (or since process start)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    # ru_maxrss is in kB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc `malloc_trim`), so that the RSS
    baseline of the next measurement does not include memory an earlier one freed but the allocator kept."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """Context manager: peak and baseline RSS of a block (`peak_mb`, `before_mb`, `exact` = reset worked)."""

    def __enter__(self) -> PeakRSS:
        self.before = rss_bytes()
        self.exact = reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        self.peak = max(peak_rss_bytes(), rss_bytes())

    def as_dict(self) -> dict:
        return {
            "rss_before_mb": round(self.before / 2**20, 1),
            "peak_rss_mb": round(self.peak / 2**20, 1),
            "peak_over_before_mb": round((self.peak - self.before) / 2**20, 1),
            "peak_is_per_phase": self.exact,
        }
