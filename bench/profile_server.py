"""Where the backend spends its time under load: py-spy samples a real
`certrotate-server serve` while load clients re-enroll (or GET /device) at a
fixed concurrency; prints the functions with the most samples.

    .venv/bin/python bench/profile_server.py [--endpoint est|gateway] [--gil] [--seconds 8]

py-spy is not a project dependency: install it where you like
(`pip install py-spy`) and pass --py-spy PATH if it is not on PATH. With
--gil only samples of the thread holding the GIL count: in a single-process
server that is what bounds throughput.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))

from backend import Backend  # noqa: E402
from children import spawn  # noqa: E402

import throughput  # noqa: E402
from load import Request, run_level  # noqa: E402


def frame_label(frame: str) -> str:
    """'func (path/to/module.py:123)' -> 'func (module.py)'."""
    name, _, where = frame.partition(" (")
    module = where.rsplit("/", 1)[-1].split(":", 1)[0]
    return f"{name} ({module})" if module else name


def aggregate(raw: Path) -> tuple[int, Counter, Counter]:
    """Total samples, inclusive samples per function, own samples per function."""
    inclusive, own, total = Counter(), Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = [frame_label(f) for f in stack.split(";") if f]
        for label in set(frames):
            inclusive[label] += count
        if frames:
            own[frames[-1]] += count
    return total, inclusive, own


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", choices=("est", "gateway"), default="est")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--gil", action="store_true", help="count only samples holding the GIL")
    parser.add_argument("--py-spy", default=shutil.which("py-spy"), help="path of the py-spy binary")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    if not args.py_spy:
        parser.error("py-spy not found: `pip install py-spy` somewhere and pass --py-spy PATH")

    with tempfile.TemporaryDirectory(prefix="certrotate-profile-") as scratch:
        work = Path(scratch)
        backend = Backend(work / "factory")
        devices = throughput.bulk_register(backend.dir, "load", args.concurrency, work / "devices")
        backend.start()
        try:
            if args.endpoint == "est":
                jobs = [(d, throughput.reenroll_requests(d, backend.est_url, 8)) for d in devices]
            else:
                jobs = [(d, [Request("GET", f"{backend.gateway_url}/device")]) for d in devices]
            raw = work / "samples.raw"
            spy = spawn(
                [args.py_spy, "record", "--pid", str(backend.proc.pid), "--duration", str(int(args.seconds)),
                 "--rate", "250", "--format", "raw", "--output", str(raw), "--nonblocking",
                 *(["--gil"] if args.gil else [])],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            time.sleep(0.5)  # py-spy attached before the load starts
            level = run_level(str(backend.root_ca), jobs, args.seconds, backend.proc.pid,
                              throughput.client_processes(args.concurrency))
            _, spy_err = spy.communicate(timeout=60)
            if not raw.exists():
                print(f"py-spy wrote no samples: {spy_err.decode().strip()}", file=sys.stderr)
                return 1
            total, inclusive, own = aggregate(raw)
        finally:
            backend.stop()
    summary = level.summary()
    print(f"{args.endpoint} at concurrency {args.concurrency}: {summary['per_s']} req/s, "
          f"server CPU {summary.get('server_cpu_ms_per_request')} ms/request, {total} samples"
          f"{' holding the GIL' if args.gil else ''}")
    print("\ninclusive (function and everything it calls):")
    for label, count in inclusive.most_common(args.top):
        print(f"  {count / total * 100:5.1f}%  {label}")
    print("\nown (the function itself):")
    for label, count in own.most_common(args.top):
        print(f"  {count / total * 100:5.1f}%  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
