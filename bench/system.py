"""What the harness reads from the machine: versions, CPU time, memory of a process.

Everything comes from ``/proc`` and the tools' ``--version``; nothing is changed.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CpuClock",
    "broker_pid",
    "children_cpu",
    "load_average",
    "machine_busy",
    "machine_info",
    "postgres_cpu",
    "process_cpu",
    "rss_kib",
    "self_cpu",
]

_TICKS = os.sysconf("SC_CLK_TCK")


def _first_line(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_mib() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


def machine_info() -> dict[str, object]:
    """nproc, CPU, RAM, kernel and tool versions (the broker's comes from the broker)."""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "ram_mib": _mem_total_mib(),
        "kernel": platform.release(),
        "os": platform.platform(terse=True),
        "python": sys.version.split()[0],
        "node": _first_line(["node", "--version"]),
        "postgres": _first_line(["psql", "--version"]),
        "load_average_at_start": load_average(),
        "code": _code_version(),
    }


def _code_version() -> dict[str, object]:
    """The commit measured, and how many files of the package differ from it."""
    root = Path(__file__).resolve().parents[1]
    commit = _first_line(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    changed = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--", "proca_sync"],
        capture_output=True, text=True, check=False,
    ).stdout.splitlines() if shutil.which("git") else []  # fmt: skip
    return {"commit": commit, "uncommitted_package_files": len(changed)}


def load_average() -> list[float]:
    with contextlib.suppress(OSError, ValueError):
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    return []


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy since boot (all CPUs, ``/proc/stat``)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return 0.0
    ticks = [int(x) for x in fields[:8]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / _TICKS


def process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a running process (``/proc/PID/stat``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def postgres_cpu() -> float:
    """CPU seconds of the local PostgreSQL: every ``postgres`` process, plus what the
    postmaster collected from backends that already exited (its ``cutime``/``cstime``)."""
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().strip() == "postgres":
                text = (entry / "stat").read_text()
                stats[int(entry.name)] = text.rsplit(")", 1)[1].split()
    total = 0
    for fields in stats.values():
        total += int(fields[11]) + int(fields[12])
        if int(fields[1]) not in stats:  # the postmaster: its parent is not postgres
            total += int(fields[13]) + int(fields[14])
    return total / _TICKS


def broker_pid() -> int | None:
    """The local RabbitMQ (``beam.smp``) if it runs on this machine."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().strip() == "beam.smp":
                return int(entry.name)
    return None


def children_cpu() -> float:
    """CPU seconds of every child process waited for so far (``RUSAGE_CHILDREN``)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in KiB of a running process, from ``/proc/PID/status``."""
    rss = hwm = None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    except (OSError, ValueError):
        return None
    if rss is None or hwm is None:
        return None
    return rss, hwm


@dataclass
class CpuClock:
    """CPU seconds spent during a block by the children, this process and the broker, and
    by everything else on the machine (``foreign``: other people's jobs disturb a run)."""

    children: float = 0.0
    harness: float = 0.0
    broker: float | None = None
    postgres: float = 0.0
    foreign: float = 0.0

    def __post_init__(self) -> None:
        self._pid = broker_pid()

    def start(self) -> None:
        self._children = children_cpu()
        self._self = self_cpu()
        self._broker = process_cpu(self._pid) if self._pid else None
        self._busy = machine_busy()
        self._postgres = postgres_cpu()

    def stop(self) -> None:
        self.children = children_cpu() - self._children
        self.harness = self_cpu() - self._self
        now = process_cpu(self._pid) if self._pid else None
        self.broker = None if now is None or self._broker is None else now - self._broker
        self.postgres = postgres_cpu() - self._postgres
        ours = self.children + self.harness + (self.broker or 0.0) + self.postgres
        self.foreign = max(0.0, machine_busy() - self._busy - ours)
