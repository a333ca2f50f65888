"""Targets, the printed table, and the generated figures section of
docs/benchmarks.md."""

from __future__ import annotations

import re
from pathlib import Path

FIGURES_BEGIN = "<!-- figures:begin (written by bench/run.py; edit the text outside these markers) -->"
FIGURES_END = "<!-- figures:end -->"


def targets(results: dict) -> list[dict]:
    """Each target of issue 6 with the measured figure and whether it is met
    (targets of sections that did not run are left out). Beside wall-time
    figures, the CPU-time figure that other load on the machine disturbs
    less."""
    rows = []
    footprint = results.get("footprint")
    if footprint:
        floor = footprint["floor_python_c_pass"]
        for label, key, prefix in (("state dir present", "check_nothing_due", "check"),
                                   ("device as registered", "check_as_registered", "check_as_registered")):
            row = _row(f"`check` (nothing due, {label}) wall time vs `python -c pass`",
                       footprint[f"{prefix}_wall_vs_floor"], 3.0, "x", lower_is_better=True)
            row["measured"] += f" (CPU time {footprint[key]['cpu_s'] / floor['cpu_s']:.2f}x)"
            rows.append(row)
            rows.append(_row(f"`check` (nothing due, {label}) peak RSS vs `python -c pass`",
                             footprint[f"{prefix}_rss_vs_floor"], 2.0, "x", lower_is_better=True))
    rotation = results.get("rotation")
    if rotation:
        rotate = rotation["rotate"]
        row = _row("full rotation wall time (median)", rotate["wall_s"], 0.5, " s",
                   lower_is_better=True, strict=True)
        row["measured"] += (f" (fastest of {rotate['runs']}: {_fmt(rotate['wall_s_min'])} s; "
                            f"CPU {_fmt(rotate['cpu_s'])} s)")
        rows.append(row)
    backend = results.get("backend")
    if backend:
        best = max(backend["est_simplereenroll"], key=lambda level: level["per_s"])
        row = _row("EST re-enrollments/s (best concurrency level)", best["per_s"], 300, "/s", lower_is_better=False)
        cpu_ms = best.get("server_cpu_ms_per_request")
        if cpu_ms:
            row["measured"] += f" (server CPU {cpu_ms} ms each: {1000 / cpu_ms:.0f}/s per core it gets)"
        rows.append(row)
    fleet = results.get("fleet")
    if fleet:
        rows.append(_row(f"errors in the fleet run ({fleet['devices']} devices)", fleet["errors"], 0, "",
                         lower_is_better=True))
    return rows


def _row(name, value, limit, unit, *, lower_is_better, strict=False) -> dict:
    if lower_is_better:
        met = value < limit if strict else value <= limit
        wanted = f"{'<' if strict else '<='} {limit}{unit}"
    else:
        met = value >= limit
        wanted = f">= {limit}{unit}"
    return {"target": name, "wanted": wanted, "measured": _fmt(value) + unit, "met": met}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


# Crash point prefixes of the agent's steps (docs/contracts.md, "Rotation steps").
STEP_LABELS = {
    "startup": "process start to the first step (interpreter, imports, config, lock)",
    "started": "0 CertRotationStarted",
    "est": "1 Generate new certificate (key, CSR, simplereenroll, cacerts)",
    "lock": "2 Lock device configuration on server (PATCH /device)",
    "local_config": "3 Update local configuration with new key",
    "server_config": "4 Update device specific configuration on server",
    "finalize": "5 Finalize aktualizr configuration",
    "restart": "6 Restart services (no units configured)",
    "confirm": "7 Confirm new certificate with gateway",
    "retire": "8 Remove old key and certificate",
    "completed": "9 CertRotationCompleted",
    "events": "deliver the queued events (POST /events)",
    "exit": "last step to process exit",
}


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.1f} ms"


def _kib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def markdown(results: dict) -> str:
    """The figures as Markdown tables (also what the run prints)."""
    out: list[str] = []
    m = results["machine"]
    out.append(f"Run: {results['started_utc']} UTC, code {results.get('code', 'unknown')}, "
               f"{'quick' if results['quick'] else 'full'} run, "
               f"{results['duration_s']:.0f} s. Machine: {m['nproc']} CPUs ({m['cpu_model']}), "
               f"{m['memory_mib']} MiB, Python {m['python']}, {m['openssl']}, Linux {m['kernel']}. "
               f"Other work on the machine at start: {results['contention_at_start']}; "
               f"at end: {results.get('contention_at_end', '-')} (load averages over 1/5/15 min; "
               f"pressure: share of the last minute in which some task waited).")
    out.append("")
    out.append("### Targets")
    out.append("")
    out.append("| target | wanted | measured | met |")
    out.append("| --- | --- | --- | --- |")
    for row in targets(results):
        out.append(f"| {row['target']} | {row['wanted']} | {row['measured']} | {'yes' if row['met'] else '**no**'} |")
    rotation = results.get("rotation")
    if rotation:
        r, b = rotation["rotate"], rotation["baseline_openssl_curl"]
        out += ["", f"### Rotation ({r['runs']} runs each, medians)", "",
                "| what | wall | fastest run | CPU | peak RSS |", "| --- | --- | --- | --- | --- |",
                f"| `certrotate rotate` (restart excluded) | {_ms(r['wall_s'])} | {_ms(r['wall_s_min'])} | "
                f"{_ms(r['cpu_s'])} | {_kib(r['peak_rss_kib'])} |",
                *([f"| `certrotate rotate`, identity in a SoftHSM2 token | {_ms(rotation['rotate_token']['wall_s'])} | "
                   f"{_ms(rotation['rotate_token']['wall_s_min'])} | {_ms(rotation['rotate_token']['cpu_s'])} | "
                   f"{_kib(rotation['rotate_token']['peak_rss_kib'])} |",
                   f"| ratio token / file | {rotation['ratio_token_to_file']:.2f} | | | |"]
                  if "rotate_token" in rotation else []),
                f"| baseline: openssl + curl re-enrollment only | {_ms(b['wall_s'])} | {_ms(b['wall_s_min'])} | "
                f"{_ms(b['cpu_s'])} | {_kib(b['peak_rss_kib'])} |",
                f"| ratio rotate / baseline | {rotation['ratio_rotate_to_baseline']:.2f} | "
                f"{r['wall_s_min'] / b['wall_s_min']:.2f} | {r['cpu_s'] / b['cpu_s']:.2f} | |",
                "", "Per step of `certrotate rotate` (medians; each step includes its journal save and queued event):", "",
                "| phase | time |", "| --- | --- |"]
        steps = rotation["rotate_steps_s"]
        ordered = [n for n in STEP_LABELS if n in steps] + sorted(n for n in steps if n not in STEP_LABELS)
        out += [f"| {STEP_LABELS.get(name, name)} | {_ms(steps[name])} |" for name in ordered]
    footprint = results.get("footprint")
    if footprint:
        out += ["", f"### Agent footprint ({footprint['check_nothing_due']['runs']} runs each, medians)", "",
                "| command | wall | CPU | peak RSS |", "| --- | --- | --- | --- |"]
        for label, key in (("`certrotate check`, nothing due, state dir present", "check_nothing_due"),
                           ("`certrotate check`, nothing due, device exactly as registered",
                            "check_as_registered"),
                           ("`python -c pass` (venv, the floor)", "floor_python_c_pass"),
                           ("`/usr/bin/python3 -c pass`", "floor_system_python3_c_pass")):
            f = footprint[key]
            out.append(f"| {label} | {_ms(f['wall_s'])} | {_ms(f['cpu_s'])} | {_kib(f['peak_rss_kib'])} |")
        if rotation:
            r = rotation["rotate"]
            out.append(f"| `certrotate rotate` | {_ms(r['wall_s'])} | {_ms(r['cpu_s'])} | {_kib(r['peak_rss_kib'])} |")
        size = footprint["installed_size"]
        out += ["", f"Installed size of the agent: {size['installed_bytes'] / 1024:.1f} KiB "
                f"({size['package_py_files']} .py files and the console script), "
                f"{size['installed_bytes_with_pyc'] / 1024:.1f} KiB with byte-compiled files."]
    backend = results.get("backend")
    if backend:
        out += ["", f"### Backend, new TLS connection per request ({backend['duration_s']:g} s per level, "
                f"{backend['registered_devices']} devices registered)", "",
                "| endpoint | concurrency | client procs | req/s | p50 | p90 | p99 | errors | server CPU/req | client CPU s | server CPU s |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for endpoint, label in (("est_simplereenroll", "EST simplereenroll"), ("gateway_get_device", "gateway GET /device")):
            for lv in backend[endpoint]:
                out.append(f"| {label} | {lv['concurrency']} | {lv['client_processes']} | {lv['per_s']:.0f} | "
                           f"{lv.get('p50_ms', '-')} ms | {lv.get('p90_ms', '-')} ms | {lv.get('p99_ms', '-')} ms | "
                           f"{lv['errors']} | {lv.get('server_cpu_ms_per_request', '-')} ms | "
                           f"{lv['client_cpu_s']} | {lv['server_cpu_s']} |")
    fleet = results.get("fleet")
    if fleet:
        out += ["", "### Fleet run", "",
                f"{fleet['devices']} devices, each: new key, CSR, simplereenroll, PATCH /device next_pubkey, "
                f"GET /device with the new certificate; {fleet['concurrency']} at a time over "
                f"{fleet['client_processes']} client processes.", "",
                "| total time | rotations/s | errors | p50 | p90 | p99 | server CPU/device |",
                "| --- | --- | --- | --- | --- | --- | --- |",
                f"| {fleet['elapsed_s']:.1f} s | {fleet['rotations_per_s']:.0f} | {fleet['errors']} | "
                f"{fleet.get('p50_ms', '-')} ms | {fleet.get('p90_ms', '-')} ms | {fleet.get('p99_ms', '-')} ms | "
                f"{fleet.get('server_cpu_ms_per_device', '-')} ms |"]
        if fleet.get("first_errors"):
            out += ["", "First errors: " + "; ".join(f"`{e}`" for e in fleet["first_errors"])]
    growth = results.get("growth_config")
    if growth:
        out += ["", "### Rotation time vs encrypted config values (medians)", "",
                "| values (local config.encrypted and server device config each) | rotate wall | "
                "step 3 (local config) | step 4 (server config) |", "| --- | --- | --- | --- |"]
        for g in growth:
            out.append(f"| {g['values']} | {_ms(g['wall_s'])} | {_ms(g['local_config_s'])} | {_ms(g['server_config_s'])} |")
    registered = results.get("growth_registered")
    if registered:
        out += ["", f"### Backend throughput vs registered devices (concurrency {registered[0]['concurrency']})", "",
                "| registered devices | bulk registration | EST re-enrollments/s | EST p50 | gateway req/s | gateway p50 |",
                "| --- | --- | --- | --- | --- | --- |"]
        for g in registered:
            reg = (f"{g['registration_added']} devices in {g['registration_s']:.1f} s"
                   if g.get("registration_s") is not None else "-")
            out.append(f"| {g['registered']} | {reg} | {g['est']['per_s']:.0f} | {g['est'].get('p50_ms', '-')} ms | "
                       f"{g['gateway']['per_s']:.0f} | {g['gateway'].get('p50_ms', '-')} ms |")
    return "\n".join(out) + "\n"


def update_doc(doc: Path, figures: str) -> None:
    """Replace the generated section of docs/benchmarks.md, keeping the prose."""
    block = f"{FIGURES_BEGIN}\n\n{figures}\n{FIGURES_END}"
    text = doc.read_text() if doc.exists() else f"# Benchmarks\n\n{FIGURES_BEGIN}\n{FIGURES_END}\n"
    if FIGURES_BEGIN not in text:
        text = text.rstrip("\n") + f"\n\n## Figures\n\n{FIGURES_BEGIN}\n{FIGURES_END}\n"
    pattern = re.escape(FIGURES_BEGIN) + r".*?" + re.escape(FIGURES_END)
    doc.write_text(re.sub(pattern, lambda _: block, text, flags=re.S))
