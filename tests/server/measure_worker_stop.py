"""How promptly `serve --workers 3` stops on SIGTERM after serving traffic.

    .venv/bin/python tests/server/measure_worker_stop.py [--cycles 40]

Each cycle starts a real server (tests/backend.py) in a temp dir, sends 12
gateway requests on fresh connections, waits 0.5 s, counts the server threads
the kernel shows blocked in accept() (a listener stuck there never sees
shutdown), then sends SIGTERM. Prints how many cycles had stuck listeners and
the stop times; asserts nothing. Run it on an idle machine: load hides the race.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend import Backend  # noqa: E402


def threads_in_accept(pid: int) -> int:
    pids = [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    return sum(Path(f"/proc/{p}/task/{t}/wchan").read_text() == "inet_csk_accept"
               for p in pids for t in os.listdir(f"/proc/{p}/task"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=40)
    args = parser.parse_args()
    stuck_cycles, hung, stop_times = 0, 0, []
    for _ in range(args.cycles):
        with tempfile.TemporaryDirectory() as tmp:
            backend = Backend(Path(tmp) / "factory").start(workers=3)
            device = backend.register("d", Path(tmp) / "device")
            for _ in range(12):
                backend.gateway(device, "GET", "/device").raise_for_status()
            time.sleep(0.5)
            stuck_cycles += threads_in_accept(backend.proc.pid) > 0
            started = time.monotonic()
            try:
                backend.stop()
                stop_times.append(time.monotonic() - started)
            except AssertionError:  # Backend.stop killed it after 15 s
                hung += 1
    stop_times.sort()
    print(f"{args.cycles} cycles: {stuck_cycles} with a listener blocked in accept(), "
          f"{hung} did not stop within 15 s")
    if stop_times:
        print(f"stop on SIGTERM: median {stop_times[len(stop_times) // 2] * 1000:.0f} ms, "
              f"max {stop_times[-1] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
