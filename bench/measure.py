"""Measuring primitives: child processes with their own resource usage,
order statistics, and a description of the machine the figures come from."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ChildRun:
    """One finished child process: what it cost and what it said."""

    argv: list[str]
    returncode: int
    started: float  # time.perf_counter() just before the spawn
    wall_s: float
    cpu_s: float  # user + system of this child alone
    peak_rss_kib: int  # peak resident set of the command alone, KiB
    stdout: str
    stderr: str

    def check(self) -> "ChildRun":
        if self.returncode != 0:
            raise RuntimeError(
                f"{' '.join(self.argv)} exited {self.returncode}:\n{self.stderr.strip()[-2000:]}"
            )
        return self


GNU_TIME = "/usr/bin/time"


def run_child(argv: list[str], *, env: dict | None = None, cwd: Path | None = None) -> ChildRun:
    """Run ``argv`` to completion and measure it alone.

    CPU time comes from os.wait4 (this child and what it reaped). Peak RSS
    cannot: a child forked from this large Python process starts with its
    high-water mark, which survives exec. So the command runs under GNU time,
    a small process whose own child's ru_maxrss is the command's true peak."""
    if not os.access(GNU_TIME, os.X_OK):
        raise RuntimeError(f"{GNU_TIME} is missing: install the Debian package `time` (peak RSS needs it)")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as rss:
        start = time.perf_counter()
        proc = subprocess.Popen([GNU_TIME, "-f", "%M", "-o", rss.name, *argv], stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        report = rss.read().split()
        return ChildRun(
            argv=list(argv),
            returncode=proc.returncode,
            started=start,
            wall_s=wall,
            cpu_s=usage.ru_utime + usage.ru_stime,
            # GNU time writes "Command exited with non-zero status N" before the figure.
            peak_rss_kib=int(report[-1]) if report else 0,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
        )


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    rank = max(1, round(fraction * len(sorted_values) + 0.5 - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize_runs(runs: list[ChildRun]) -> dict:
    """Medians of wall, CPU and peak RSS over repeated runs of one command."""
    return {
        "runs": len(runs),
        "wall_s": median([r.wall_s for r in runs]),
        "cpu_s": median([r.cpu_s for r in runs]),
        "peak_rss_kib": int(median([r.peak_rss_kib for r in runs])),
        "wall_s_min": min(r.wall_s for r in runs),
        "wall_s_max": max(r.wall_s for r in runs),
    }


def cpu_seconds_of(pid: int) -> float:
    """User + system CPU seconds a running process (all its threads) has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def contention() -> str:
    """How busy the machine is with other work, which the figures share the
    cores with: the load averages, and the share of the last 60 s in which
    some task waited for a CPU or for I/O (Linux pressure stall information)."""
    text = "load " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    for resource_name in ("cpu", "io"):
        try:
            some = Path(f"/proc/pressure/{resource_name}").read_text().splitlines()[0]
        except OSError:
            continue
        avg60 = dict(field.split("=") for field in some.split()[1:])["avg60"]
        text += f", {resource_name} pressure {avg60} %"
    return text


def code_version(repo: Path) -> str:
    """The commit measured, with "+changes" when the work tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--", "agent", "server") else "")


def machine() -> dict:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    openssl = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip()
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_mib": mem_kib // 1024,
        "python": sys.version.split()[0],
        "kernel": platform.release(),
        "openssl": openssl,
    }
