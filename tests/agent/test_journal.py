import json
import subprocess
import sys
from pathlib import Path

import pytest

from certrotate.journal import Journal, JournalError, LockHeld, Rotation, State

FIXTURES = Path(__file__).parent / "fixtures"


def test_save_load_roundtrip_is_private_and_keyless(tmp_path):
    journal = Journal(tmp_path / "state")
    journal.lock()
    state = State(current=Rotation("certs-1", "https://est", step=3, superseded=["certs-2"]))
    journal.save(state, point="t:save")
    assert journal.load() == state
    assert journal.path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    data = json.loads(journal.path.read_text())
    assert data["schema"] == 1 and data["current"]["rotation_id"] == "certs-1"
    assert "PRIVATE" not in journal.path.read_text()
    journal.unlock()


def test_missing_state_is_empty(tmp_path):
    assert Journal(tmp_path).load() == State()


def test_state_v1_fixture_loads(tmp_path):
    (tmp_path / "state.json").write_bytes((FIXTURES / "state-v1.json").read_bytes())
    state = Journal(tmp_path).load()
    assert state.current.rotation_id == "certs-1700000000"
    assert state.current.step == 5
    assert state.completed_ids() == {"certs-1690000000"}


def test_newer_schema_is_refused_with_a_hint(tmp_path):
    (tmp_path / "state.json").write_text('{"schema": 99, "current": null}')
    with pytest.raises(JournalError) as err:
        Journal(tmp_path).load()
    assert "newer agent" in err.value.hint


def test_schema_no_version_wrote_is_refused_with_a_hint(tmp_path):
    (tmp_path / "state.json").write_text('{"schema": 0, "current": null}')
    with pytest.raises(JournalError, match="schema 0, which no certrotate version wrote") as err:
        Journal(tmp_path).load()
    assert "move it aside" in err.value.hint


def test_corrupt_state_is_reported(tmp_path):
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(JournalError, match="corrupt"):
        Journal(tmp_path).load()


def test_second_agent_cannot_take_the_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from certrotate.journal import Journal; "
         f"j = Journal({str(tmp_path)!r}); j.lock(); print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockHeld):
            Journal(tmp_path).lock()
    finally:
        holder.stdin.close()
        holder.wait(10)
    journal = Journal(tmp_path)
    journal.lock()  # released when the holder exits
    journal.unlock()


def test_lock_waits_for_the_holder_to_release_it(tmp_path):
    holder = Journal(tmp_path)
    holder.lock()
    now = [0.0]

    def sleep(seconds):  # the holder finishes while the waiter sleeps
        now[0] += seconds
        holder.unlock()

    waiter = Journal(tmp_path)
    waiter.lock(wait=5.0, clock=lambda: now[0], sleep=sleep)
    assert 0 < now[0] <= 5.0
    with pytest.raises(LockHeld):
        Journal(tmp_path).lock(wait=1.0, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))


def test_completed_keeps_only_recent(tmp_path):
    journal = Journal(tmp_path)
    state = State(completed=[{"rotation_id": f"c-{i}", "success": True, "finished": i} for i in range(30)])
    journal.save(state, point="t:save")
    loaded = journal.load()
    assert len(loaded.completed) == 20 and loaded.last_completed()["rotation_id"] == "c-29"
