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


def test_state_v2_fixture_loads_as_a_token_rotation(tmp_path):
    (tmp_path / "state.json").write_bytes((FIXTURES / "state-v2.json").read_bytes())
    rotation = Journal(tmp_path).load().current
    assert (rotation.key_store, rotation.old_key_id, rotation.new_key_id, rotation.new_cert_id) == (
        "pkcs11", "01", "07", "09")
    assert rotation.step == 5 and rotation.new_public_key.startswith("-----BEGIN PUBLIC KEY-----")


def test_state_v3_fixture_of_a_future_agent_is_refused_with_a_hint(tmp_path):
    (tmp_path / "state.json").write_bytes((FIXTURES / "state-v3.json").read_bytes())
    with pytest.raises(JournalError, match="schema 3") as err:
        Journal(tmp_path).load()
    assert "newer agent" in err.value.hint


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


def test_a_file_rotation_is_written_as_schema_1_without_token_fields(tmp_path):
    """Agents before token support read it (and resumed it after an OTA rollback)."""
    journal = Journal(tmp_path)
    journal.save(State(current=Rotation("certs-1", "https://est", old_key_file="/var/sota/pkey.pem")), point="t")
    data = json.loads(journal.path.read_text())
    assert data["schema"] == 1
    assert not set(data["current"]) & {"key_store", "old_key_id", "new_key_id", "new_public_key"}
    assert journal.load().current.key_store == "file"
    assert older_agent(tmp_path / "older").Journal(tmp_path).load().current.old_key_file == "/var/sota/pkey.pem"


def test_a_token_rotation_is_schema_2_which_an_older_agent_refuses(tmp_path):
    journal = Journal(tmp_path)
    rotation = Rotation("certs-1", "https://est", key_store="pkcs11", old_key_id="01", old_cert_id="03",
                        new_key_id="07", new_cert_id="09", new_public_key="-----BEGIN PUBLIC KEY-----\n")
    journal.save(State(current=rotation), point="t")
    data = json.loads(journal.path.read_text())
    assert data["schema"] == 2 and data["current"]["new_key_id"] == "07"
    assert journal.load().current == rotation
    # The agent before token support (its journal module, from this repository's history)
    # refuses it with a hint instead of taking it for a file rotation.
    older = older_agent(tmp_path / "older")
    with pytest.raises(older.JournalError, match="schema 2; this agent knows up to 1"):
        older.Journal(tmp_path).load()


# The last release whose agent knew only journal schema 1.
SCHEMA_1_RELEASE = "de0428c"


def older_agent(directory: Path):
    """certrotate.journal as SCHEMA_1_RELEASE had it, importable on its own."""
    import importlib

    repo = Path(__file__).resolve().parents[2]
    package = directory / "certrotate_schema1"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for module in ("journal", "fsutil", "crashpoints"):
        try:
            shown = subprocess.run(["git", "-C", str(repo), "show",
                                    f"{SCHEMA_1_RELEASE}:agent/certrotate/{module}.py"], capture_output=True)
        except FileNotFoundError:
            pytest.skip(f"no git here to read {SCHEMA_1_RELEASE}'s journal module (an installed ptest?)")
        if shown.returncode != 0:
            pytest.skip(f"{repo} has no git history with {SCHEMA_1_RELEASE} (an installed ptest, a "
                        f"source tarball?): {shown.stderr.decode().strip()[:200]}")
        (package / f"{module}.py").write_bytes(shown.stdout)
    sys.path.insert(0, str(directory))
    try:
        return importlib.import_module("certrotate_schema1.journal")
    finally:
        sys.path.remove(str(directory))
