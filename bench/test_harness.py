"""Checks of the measuring harness itself (no timing is asserted):
`.venv/bin/python -m pytest -q bench/test_harness.py`."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import percentile, run_child  # noqa: E402
from report import FIGURES_BEGIN, FIGURES_END, update_doc  # noqa: E402
from steps import PointClock, breakdown, step_of  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def test_points_written_by_a_real_agent_process_arrive_in_order(tmp_path):
    """The agent's own crashpoints module writes into the FIFO; every point
    arrives, in order, stamped from the child's start to just after its exit."""
    clock = PointClock(tmp_path)
    try:
        script = ("from certrotate import crashpoints\n"
                  "for name in ['journal:start', 'est:new-key', 'event:est', 'lock:patch-device:send']:\n"
                  "    crashpoints.reach(name)\n")
        env = dict(os.environ, CERTROTATE_TRACE_POINTS=str(clock.path))
        run = run_child([sys.executable, "-c", script], env=env).check()
        points = []
        deadline = time.monotonic() + 5
        while len(points) < 4 and time.monotonic() < deadline:  # the reader thread may lag under load
            points += clock.take()
    finally:
        clock.close()
    assert [name for _, name in points] == ["journal:start", "est:new-key", "event:est", "lock:patch-device:send"]
    stamps = [stamp for stamp, _ in points]
    assert stamps == sorted(stamps)
    assert run.started <= stamps[0] and stamps[-1] <= run.started + run.wall_s + 1.0
    assert not clock.path.exists()


def test_bookkeeping_points_count_for_their_step():
    assert step_of("journal:est") == "est"
    assert step_of("event:lock") == "lock"
    assert step_of("journal:start") == "started"
    assert step_of("est:simplereenroll:send") == "est"
    assert step_of("events:delivered") == "events"


def test_breakdown_gives_each_interval_to_the_step_of_the_point_that_ends_it():
    points = [(1.0, "journal:start"), (1.5, "est:new-key"), (2.5, "event:est"), (3.0, "lock:patch-device:reply")]
    phases = breakdown(0.25, points, 3.5)
    assert phases == {"startup": 0.75, "est": 1.5, "lock": 0.5, "exit": 0.5}
    assert sum(phases.values()) == pytest.approx(3.5 - 0.25)


def test_peak_rss_is_the_commands_own_not_the_forking_parents(tmp_path):
    """A child forked from this (large) interpreter keeps its high-water mark
    across exec; run_child must report the small command's own peak."""
    ballast = bytearray(200 * 1024 * 1024)  # make this process's RSS large
    ballast[::4096] = b"x" * len(ballast[::4096])
    small = run_child(["/bin/true"]).check()
    big = run_child([sys.executable, "-c", "b = bytearray(64 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096])"])
    assert small.peak_rss_kib < 50 * 1024
    assert big.check().peak_rss_kib > 64 * 1024
    del ballast


def test_percentile_nearest_rank():
    values = sorted(float(v) for v in range(1, 101))
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.9) == 90.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([7.0], 0.99) == 7.0


def test_update_doc_rewrites_only_the_figures_section(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nprose before\n\n{FIGURES_BEGIN}\nold figures\n{FIGURES_END}\n\nprose after\n")
    update_doc(doc, "| new | figures |\n")
    text = doc.read_text()
    assert "old figures" not in text and "| new | figures |" in text
    assert text.startswith("# Benchmarks\n\nprose before\n") and text.endswith("prose after\n")
