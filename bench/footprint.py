"""Agent footprint: wall, CPU and peak RSS of `certrotate check` when nothing
is due, beside the interpreter's floor (`python -c pass`), and the installed
size of the agent package."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from measure import run_child, summarize_runs
from rotation import REPO, run_agent

VENV_PYTHON = REPO / ".venv/bin/python"


def bench_check(registered_root: Path, warm_root: Path, repeats: int) -> dict:
    """`certrotate check` with nothing due, interleaved with the floors so all
    see the same machine load. Two devices: one exactly as `devices register`
    wrote it, and one whose state dir exists and holds the validity cache
    (after one check), the steady state of a device the layer installed.
    The floor that counts for the targets is the agent's own interpreter
    (the venv's python: same binary and site setup as the `certrotate`
    script); the system's /usr/bin/python3 is shown beside it."""
    (warm_root / "var/sota/certrotate").mkdir(mode=0o700, exist_ok=True)
    run_agent(warm_root, "check").check()  # fills the validity cache
    runs: dict[str, list] = {"check_as_registered": [], "check_nothing_due": [], "floor_python_c_pass": [],
                             "floor_system_python3_c_pass": []}
    for _ in range(repeats):
        runs["check_as_registered"].append(run_agent(registered_root, "check").check())
        runs["check_nothing_due"].append(run_agent(warm_root, "check").check())
        runs["floor_python_c_pass"].append(run_child([str(VENV_PYTHON), "-c", "pass"]).check())
        runs["floor_system_python3_c_pass"].append(run_child(["/usr/bin/python3", "-c", "pass"]).check())
    result = {name: summarize_runs(group) for name, group in runs.items()}
    check, floor = result["check_nothing_due"], result["floor_python_c_pass"]
    result["check_wall_vs_floor"] = check["wall_s"] / floor["wall_s"]
    result["check_rss_vs_floor"] = check["peak_rss_kib"] / floor["peak_rss_kib"]
    registered = result["check_as_registered"]
    result["check_as_registered_wall_vs_floor"] = registered["wall_s"] / floor["wall_s"]
    result["check_as_registered_rss_vs_floor"] = registered["peak_rss_kib"] / floor["peak_rss_kib"]
    return result


def installed_size() -> dict:
    """What a device carries for the agent itself: the package's .py files
    plus the `certrotate` console script, and the same with byte-compiled
    files added (compiled in a scratch copy, as a Yocto package ships them).
    Dependencies (cryptography, requests) are the distribution's, not counted."""
    package = REPO / "agent/certrotate"
    sources = sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)
    script = REPO / ".venv/bin/certrotate"
    source_bytes = sum(p.stat().st_size for p in sources) + script.stat().st_size
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "certrotate"
        shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run([str(VENV_PYTHON), "-m", "compileall", "-q", str(copy)], check=True)
        pyc_bytes = sum(p.stat().st_size for p in copy.rglob("*.pyc"))
    return {
        "package_py_files": len(sources),
        "package_py_bytes": sum(p.stat().st_size for p in sources),
        "console_script_bytes": script.stat().st_size,
        "installed_bytes": source_bytes,
        "installed_bytes_with_pyc": source_bytes + pyc_bytes,
    }
