"""certrotate benchmarks (`make bench`): rotation speed, agent footprint,
backend throughput and how cost grows, all on loopback with real TLS against
a real `certrotate-server`, baselines measured in the same run.

    .venv/bin/python bench/run.py            # full run: bench/results.json, docs/benchmarks.md
    .venv/bin/python bench/run.py --quick    # short run: bench/results-quick.json only
    .venv/bin/python bench/run.py --only rotation,footprint   # bench/results-partial.json only

Figures are printed and written; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO / "tests"))  # backend: the harness that runs a real server

from backend import Backend  # noqa: E402

import footprint  # noqa: E402
import growth  # noqa: E402
import report  # noqa: E402
import rotation  # noqa: E402
import throughput  # noqa: E402
from measure import code_version, contention, machine  # noqa: E402
from steps import PointClock  # noqa: E402

SECTIONS = ("rotation", "footprint", "growth_config", "backend", "fleet", "growth_registered")


@dataclasses.dataclass(frozen=True)
class Plan:
    rotation_repeats: int
    check_repeats: int
    level_seconds: float
    levels: tuple[int, ...]
    fleet_devices: int
    fleet_concurrency: int
    config_values: tuple[int, ...]
    config_repeats: int
    registered: tuple[int, ...]
    registered_concurrency: int


FULL = Plan(rotation_repeats=7, check_repeats=15, level_seconds=5, levels=(1, 8, 64), fleet_devices=10_000,
            fleet_concurrency=64, config_values=(1, 100, 1000), config_repeats=3, registered=(1_000, 100_000),
            registered_concurrency=8)
QUICK = Plan(rotation_repeats=3, check_repeats=5, level_seconds=2, levels=(1, 8, 64), fleet_devices=500,
             fleet_concurrency=64, config_values=(1, 100, 1000), config_repeats=1, registered=(1_000, 10_000),
             registered_concurrency=8)

LOAD_DEVICES = 64  # one identity per concurrent client task, at the highest level


def server_pid(backend: Backend) -> int:
    return backend.proc.pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, shorter levels, 500-device fleet")
    parser.add_argument("--only", help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument("--results", type=Path, help="JSON output (default bench/results.json; "
                                                      "results-quick.json with --quick, "
                                                      "results-partial.json with --only)")
    parser.add_argument("--doc", type=Path, help="Markdown file whose figures section to rewrite "
                                                  "(default docs/benchmarks.md on a full run of every section)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (factory, devices, logs)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    sections = SECTIONS if not args.only else tuple(s.strip() for s in args.only.split(","))
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    partial = args.quick or args.only
    results_path = args.results or BENCH_DIR / (
        "results-quick.json" if args.quick else "results-partial.json" if args.only else "results.json")
    doc = args.doc or (None if partial else REPO / "docs/benchmarks.md")

    work = Path(tempfile.mkdtemp(prefix="certrotate-bench-"))
    started = time.perf_counter()
    results: dict = {
        "started_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "quick": args.quick,
        "plan": dataclasses.asdict(plan),
        "machine": machine(),
        "code": code_version(REPO),
        "contention_at_start": contention(),
    }
    try:
        run_sections(plan, sections, work, results)
    finally:
        results["duration_s"] = time.perf_counter() - started
        results["contention_at_end"] = contention()
        results_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        figures = report.markdown(results)
        print("\n" + figures)
        print(f"results: {results_path}")
        if doc is not None:
            report.update_doc(doc, figures)
            print(f"figures section of {doc} rewritten")
        if args.keep:
            print(f"scratch kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def run_sections(plan: Plan, sections: tuple[str, ...], work: Path, results: dict) -> None:
    backend = Backend(work / "factory")
    files = work / "load-devices"
    load_devices = throughput.bulk_register(backend.dir, "load", LOAD_DEVICES, files)
    first_registered = plan.registered[0]
    throughput.bulk_register(backend.dir, "filler-a", first_registered - LOAD_DEVICES, None)
    registered = first_registered
    backend.start()
    clock = PointClock(work)
    try:
        if "rotation" in sections:
            say(f"rotation: {plan.rotation_repeats} rotations and as many openssl + curl re-enrollments")
            results["rotation"] = rotation.bench_rotation(backend, work, plan.rotation_repeats, clock)
        if "footprint" in sections:
            say(f"footprint: `certrotate check` x{plan.check_repeats} beside `python -c pass`")
            results["footprint"] = footprint.bench_check(
                backend.register("bench-check-registered", work / "bench-check-registered"),
                backend.register("bench-check", work / "bench-check"), plan.check_repeats)
            results["footprint"]["installed_size"] = footprint.installed_size()
        if "growth_config" in sections:
            say(f"growth: rotation with {', '.join(map(str, plan.config_values))} encrypted config values")
            results["growth_config"] = [
                growth.rotation_with_config_values(backend, work, n, plan.config_repeats, clock)
                for n in plan.config_values
            ]
        if "backend" in sections or "growth_registered" in sections:
            levels = plan.levels if "backend" in sections else (plan.registered_concurrency,)
            say(f"backend: concurrency {', '.join(map(str, levels))}, {plan.level_seconds:g} s each, "
                f"{registered} devices registered")
            backend_results = throughput.bench_levels(
                str(backend.root_ca), backend.est_url, backend.gateway_url, load_devices, server_pid(backend),
                list(levels), plan.level_seconds)
            backend_results.update(duration_s=plan.level_seconds, registered_devices=registered)
            if "backend" in sections:
                results["backend"] = backend_results
            growth_rows = [growth.registered_row(registered, None, backend_results, plan.registered_concurrency)]
        if "fleet" in sections:
            say(f"fleet: registering {plan.fleet_devices} devices")
            backend.stop()
            fleet_devices = throughput.bulk_register(backend.dir, "fleet", plan.fleet_devices, work / "fleet-devices")
            registered += plan.fleet_devices
            backend.start()
            say(f"fleet: {plan.fleet_devices} devices rotating, {plan.fleet_concurrency} at a time")
            results["fleet"] = throughput.fleet_run(
                str(backend.root_ca), backend.est_url, backend.gateway_url, fleet_devices, server_pid(backend),
                plan.fleet_concurrency, work / "fleet-scratch")
            results["fleet"]["registered_devices"] = registered
        if "growth_registered" in sections:
            for target in plan.registered[1:]:
                say(f"growth: registering up to {target} devices")
                backend.stop()
                begin = time.perf_counter()
                throughput.bulk_register(backend.dir, f"filler-{target}", target - registered, None)
                registration_s = time.perf_counter() - begin
                added = target - registered
                registered = target
                backend.start()
                say(f"growth: concurrency {plan.registered_concurrency} with {registered} devices registered")
                level = throughput.bench_levels(
                    str(backend.root_ca), backend.est_url, backend.gateway_url, load_devices,
                    server_pid(backend), [plan.registered_concurrency], plan.level_seconds)
                row = growth.registered_row(registered, registration_s, level, plan.registered_concurrency)
                row["registration_added"] = added
                growth_rows.append(row)
            results["growth_registered"] = growth_rows
    finally:
        clock.close()
        backend.stop()


if __name__ == "__main__":
    sys.exit(main())
