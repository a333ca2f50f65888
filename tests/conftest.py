"""Shared fixtures. `backend`: a started reference backend (tests/backend.py), one per
test; `module_backend`: one shared by a module's tests (each registers its own devices)."""

import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from backend import Backend  # noqa: E402


def _started(directory: Path):
    server = Backend(directory / "factory")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def backend(tmp_path):
    yield from _started(tmp_path)


@pytest.fixture(scope="module")
def module_backend(tmp_path_factory):
    yield from _started(tmp_path_factory.mktemp("module-backend"))


def _interrupt(signum, frame):
    """SIGTERM (a time limit's, forwarded by make) ends the run as Ctrl-C does:
    pytest still runs the fixtures' finalizers, which stop servers and guests."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


# The bad-input suite: every test marked `bad_input("<class>")`, across files.
# Its size is printed at the end of each run (issue 9 asks for the count).
def pytest_configure(config):
    signal.signal(signal.SIGTERM, _interrupt)
    config.addinivalue_line(
        "markers", "bad_input(kind): a hostile or malformed input met with a clear refusal; counted in the summary")


def pytest_terminal_summary(terminalreporter):
    outcomes: dict[str, int] = {}
    kinds: set[str] = set()
    for outcome, reports in terminalreporter.stats.items():
        for report in reports:
            kind = _bad_input_kind(report)
            # One report per case: the call's, or the setup's when it never got there.
            if kind is None or (report.when != "call" and report.outcome == "passed"):
                continue
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            kinds.add(kind)
    if outcomes:
        counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items()))
        terminalreporter.write_line(
            f"bad-input suite: {sum(outcomes.values())} cases in {len(kinds)} classes ({counts})")


def _bad_input_kind(report) -> str | None:
    for name, kind in getattr(report, "user_properties", []):
        if name == "bad_input":
            return kind
    return None


@pytest.fixture(autouse=True)
def _record_bad_input_kind(request):
    marker = request.node.get_closest_marker("bad_input")
    if marker is not None:
        request.node.user_properties.append(("bad_input", marker.args[0] if marker.args else request.node.name))
