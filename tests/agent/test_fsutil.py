import os

import pytest

from certrotate import crashpoints, fsutil


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
    other_name = tmp_path / "hardlink"
    os.link(key, other_name)  # sees the same inode after the unlink
    assert fsutil.secure_delete(key, point="test:delete") is True
    assert not key.exists()
    assert other_name.read_bytes() == bytes(len(b"-----BEGIN PRIVATE KEY-----secret"))
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
