#!/usr/bin/env python3
"""Measure the agent: `certrotate check` with nothing due, and a full rotation on loopback.

Prints figures; asserts nothing (targets are judged by people, not timed tests):
  check:    wall time and peak RSS vs `python3 -c pass` (target <= 3x, <= 2x)
  rotation: wall time of `certrotate rotate` against the reference backend on
            127.0.0.1, systemctl replaced by a recording stub (restart excluded)

    .venv/bin/python agent/tools/measure.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests/integration")]

from agentdevice import agent_command, fake_systemctl  # noqa: E402
from backend import Backend  # noqa: E402
from pki import TestPki, write_device_tree  # noqa: E402


def run_measured(command: list[str], env: dict | None = None) -> tuple[float, int, int]:
    """(wall seconds, peak RSS in KiB, exit status) of one child process.

    Run under /usr/bin/time: the rusage of a child forked from this (large)
    process would count the parent's pages it briefly shared before exec.
    """
    with tempfile.NamedTemporaryFile("r") as report:
        start = time.perf_counter()
        result = subprocess.run(["/usr/bin/time", "-o", report.name, "-f", "%M", *command],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        wall = time.perf_counter() - start
        return wall, int(report.read().split()[-1]), result.returncode


def median_of(command, runs, env=None):
    samples = [run_measured(command, env) for _ in range(runs)]
    if any(code != 0 for _, _, code in samples):
        raise SystemExit(f"{' '.join(command)} failed")
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def measure_check(runs: int, work: Path) -> None:
    device = write_device_tree(work / "check-device", TestPki())
    check = [*agent_command(), "--root", str(device.root), "check"]
    # As on a device: byte-compiled modules (the first run writes them) and a
    # warm validity cache (the first run fills it).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    run_measured(check, env)
    base_wall, base_rss = median_of([sys.executable, "-c", "pass"], runs, env)
    wall, rss = median_of(check, runs, env)
    print(f"python -c pass:           {base_wall * 1000:7.1f} ms  {base_rss / 1024:6.1f} MiB  (median of {runs})")
    print(f"certrotate check (idle):  {wall * 1000:7.1f} ms  {rss / 1024:6.1f} MiB  (median of {runs})")
    print(f"ratio:                    {wall / base_wall:7.2f} x wall  {rss / base_rss:5.2f} x RSS"
          "  (targets: <= 3x wall, <= 2x RSS)")


def measure_rotation(runs: int, work: Path) -> None:
    backend = Backend(work / "factory")
    backend.start()
    try:
        bin_dir = work / "bin"
        fake_systemctl(bin_dir)
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
        walls = []
        for number in range(runs):
            device = backend.register(f"bench-{number}", work / f"bench-{number}")
            backend.cli("devices", "config", "set", f"bench-{number}", "secret=value")
            wall, _, code = run_measured([*agent_command(), "--root", str(device), "rotate"], env)
            if code != 0:
                raise SystemExit(f"rotation {number} failed with exit {code}")
            walls.append(wall)
        print(f"rotation on loopback:     {statistics.median(walls) * 1000:7.1f} ms median, "
              f"{min(walls) * 1000:.1f}-{max(walls) * 1000:.1f} ms over {runs} runs "
              "(whole process: start, 9 steps, event delivery; restart stubbed)")
    finally:
        backend.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        measure_check(args.runs, Path(work))
        measure_rotation(max(3, args.runs // 3), Path(work))


if __name__ == "__main__":
    main()
