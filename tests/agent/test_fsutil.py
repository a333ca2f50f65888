import os

import pytest

from certrotate import certs, crashpoints, fsutil, pki


@pytest.fixture
def trace(tmp_path, monkeypatch):
    path = tmp_path / "trace"
    monkeypatch.setattr(crashpoints, "_trace", str(path))
    return path


def test_atomic_write_replaces_content_with_mode_and_reaches_point(tmp_path, trace):
    target = tmp_path / "state.json"
    target.write_text("old")
    os.chmod(target, 0o644)
    fsutil.atomic_write(target, b"new", 0o600, point="test:write")
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name != "trace"] == ["state.json"]
    assert trace.read_text() == "test:write\n"


def test_atomic_write_mode_ignores_umask(tmp_path):
    old = os.umask(0o077)
    try:
        fsutil.atomic_write(tmp_path / "cert.pem", b"x", 0o644, point="test:cert")
    finally:
        os.umask(old)
    assert (tmp_path / "cert.pem").stat().st_mode & 0o777 == 0o644


def test_secure_delete_zeroes_the_data_before_unlinking(tmp_path, trace):
    key = tmp_path / "pkey.pem"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----secret")
    still_open = os.open(key, os.O_RDONLY)  # sees the same inode after the unlink
    try:
        assert fsutil.secure_delete(key, point="test:delete") is True
        assert not key.exists()
        assert os.pread(still_open, 100, 0) == bytes(len(b"-----BEGIN PRIVATE KEY-----secret"))
    finally:
        os.close(still_open)
    assert fsutil.secure_delete(key) is False
    assert trace.read_text() == "test:delete\n"


def test_remove_stale_temps_only_removes_temps(tmp_path):
    (tmp_path / ("pkey.pem" + fsutil.TEMP_SUFFIX)).write_bytes(b"half written")
    (tmp_path / "pkey.pem").write_bytes(b"keep")
    removed = fsutil.remove_stale_temps(tmp_path)
    assert [p.name for p in removed] == ["pkey.pem" + fsutil.TEMP_SUFFIX]
    assert [p.name for p in tmp_path.iterdir()] == ["pkey.pem"]
    assert fsutil.remove_stale_temps(tmp_path / "missing") == []


def test_ensure_private_dir_tightens(tmp_path):
    directory = tmp_path / "state"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    fsutil.ensure_private_dir(directory)
    assert directory.stat().st_mode & 0o777 == 0o700


def test_atomic_write_can_keep_the_replaced_files_mtime(tmp_path):
    target = tmp_path / "config.encrypted"
    target.write_text("old")
    os.utime(target, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    fsutil.atomic_write(target, b"new", 0o600, point="test:config", keep_mtime=True)
    assert target.read_bytes() == b"new"
    assert target.stat().st_mtime_ns == 1_700_000_000_123_456_789
    fsutil.atomic_write(tmp_path / "absent", b"x", 0o600, point="test:new", keep_mtime=True)
    assert (tmp_path / "absent").read_bytes() == b"x"


PRECIOUS = b"root:$6$precious:19000:0:99999:7:::\n"


@pytest.fixture
def precious(tmp_path):
    """A file someone else owns, on the same filesystem as the agent's directories."""
    path = tmp_path / "etc-shadow"
    path.write_bytes(PRECIOUS)
    os.chmod(path, 0o640)
    return path


@pytest.mark.bad_input("hard-linked temp name")
def test_stale_temp_cleanup_unlinks_a_hard_link_without_wiping_what_it_shares(tmp_path, precious):
    state = tmp_path / "state"
    state.mkdir()
    temp = state / ("state.json" + fsutil.TEMP_SUFFIX)
    os.link(precious, temp)
    assert fsutil.remove_stale_temps(state) == [temp]
    assert not temp.exists()
    assert precious.read_bytes() == PRECIOUS
    assert os.stat(precious).st_nlink == 1


@pytest.mark.bad_input("symlinked temp name")
def test_stale_temp_cleanup_removes_a_symlink_not_its_target(tmp_path, precious):
    state = tmp_path / "state"
    state.mkdir()
    temp = state / ("pkey.pem" + fsutil.TEMP_SUFFIX)
    temp.symlink_to(precious)
    assert fsutil.remove_stale_temps(state) == [temp]
    assert not os.path.lexists(temp)
    assert precious.read_bytes() == PRECIOUS


@pytest.mark.bad_input("pre-placed temp name")
@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_atomic_write_replaces_a_pre_placed_temp_name_instead_of_writing_through_it(
        tmp_path, precious, link):
    state = tmp_path / "state"
    state.mkdir()
    target = state / "state.json"
    temp = state / ("state.json" + fsutil.TEMP_SUFFIX)
    os.link(precious, temp) if link == "hard" else temp.symlink_to(precious)
    fsutil.atomic_write(target, b'{"schema": 1}\n', 0o600, point="test:write")
    assert precious.read_bytes() == PRECIOUS
    assert os.stat(precious).st_mode & 0o777 == 0o640
    assert target.read_bytes() == b'{"schema": 1}\n'
    assert os.stat(target).st_ino != os.stat(precious).st_ino
    assert not os.path.lexists(temp)


@pytest.mark.bad_input("hard-linked key")
def test_a_key_with_another_hard_link_is_neither_read_nor_wiped(tmp_path):
    key = tmp_path / "pkey.pem"
    key.write_bytes(certs.key_pem(pki.new_key()))
    copy = tmp_path / "kept-copy.pem"
    os.link(key, copy)
    with pytest.raises(fsutil.LinkedFileError, match=r"pkey.pem has 2 hard links") as refused:
        certs.load_key(key)
    assert "samefile" in refused.value.hint
    with pytest.raises(fsutil.LinkedFileError, match=r"pkey.pem has 2 hard links"):
        fsutil.secure_delete(key)
    assert key.read_bytes() == copy.read_bytes() != bytes(len(copy.read_bytes()))
