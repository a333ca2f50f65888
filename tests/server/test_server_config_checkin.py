"""GET /config as fioconfig's check-in uses it (internal/app.go): If-Modified-Since
is the modification time of the device's config.encrypted, which fioconfig sets
from the Date of the 200 that wrote it; 304 means "keep what you have"."""

import email.utils
import os
import sqlite3
import time

import pytest

pytestmark = pytest.mark.timeout(120)


class FioconfigCheckin:
    """The device side of one check-in, as fioconfig does it."""

    def __init__(self, backend, device, config_file):
        self.backend, self.device, self.file = backend, device, config_file

    def check_in(self):
        headers = {}
        if self.file.exists():
            # fi.ModTime().UTC().Format(time.RFC1123): Go prints the zone as "UTC".
            headers["If-Modified-Since"] = time.strftime("%a, %d %b %Y %H:%M:%S UTC",
                                                         time.gmtime(self.file.stat().st_mtime))
        reply = self.backend.gateway(self.device, "GET", "/config", headers=headers)
        if reply.status_code == 200:
            self.file.write_bytes(reply.content)
            date = email.utils.parsedate_to_datetime(reply.headers["Date"]).timestamp()
            os.utime(self.file, (date, date))
        return reply


@pytest.fixture
def checkin(backend, tmp_path):
    device = backend.register("dev-1", tmp_path / "dev-1", "--group", "lab")
    return FioconfigCheckin(backend, device, tmp_path / "config.encrypted")


def next_second():
    """Dates have whole seconds: past this one, a Date is later than any change made before."""
    time.sleep(1.02 - time.time() % 1)


def test_unchanged_config_is_304_and_any_change_is_200(backend, checkin):
    backend.cli("config", "set", "ntp=pool.example")
    next_second()
    first = checkin.check_in()
    assert first.status_code == 200 and "ntp" in first.json()

    again = checkin.check_in()
    assert again.status_code == 304, again.text
    assert again.content == b"" and "Content-Length" not in again.headers
    assert "Date" in again.headers

    # A change to each scope of the device's config is seen at the next check-in.
    for change in (["config", "set", "ntp=other.example"],
                   ["config", "set", "--group", "lab", "proxy=p.example"],
                   ["devices", "config", "set", "dev-1", "--unencrypted", "api=x"]):
        backend.cli(*change)
        next_second()
        changed = checkin.check_in()
        assert changed.status_code == 200, (change, changed.status_code)
        assert checkin.check_in().status_code == 304, change
    assert set(changed.json()) == {"ntp", "proxy", "api"}
    assert changed.json()["ntp"]["Value"] == "other.example"


def test_change_in_the_second_of_the_date_is_not_missed(backend, checkin):
    """A Date has whole seconds: a reply sent in the second of a change may predate
    it, so until that second is over the device downloads again rather than miss it."""
    next_second()
    assert checkin.check_in().status_code == 200
    backend.cli("config", "set", "ntp=pool.example")
    reply = checkin.check_in()
    assert reply.status_code == 200 and "ntp" in reply.json()


def test_another_group_or_device_does_not_invalidate(backend, checkin, tmp_path):
    backend.register("dev-2", tmp_path / "dev-2", "--group", "other")
    next_second()
    assert checkin.check_in().status_code == 200
    backend.cli("config", "set", "--group", "other", "proxy=p.example")
    backend.cli("devices", "config", "set", "dev-2", "--unencrypted", "api=x")
    assert checkin.check_in().status_code == 304


@pytest.mark.parametrize("since", ["not a date", "Thu, 01 Jan 2099 00:00:00 GMT", ""])
def test_malformed_or_future_if_modified_since_is_ignored(backend, checkin, since):
    backend.cli("config", "set", "ntp=pool.example")
    reply = backend.gateway(checkin.device, "GET", "/config", headers={"If-Modified-Since": since})
    assert reply.status_code == 200 and "ntp" in reply.json()


def test_rotation_upload_is_a_change(backend, checkin):
    """The rotation's PATCH /config (step 4) re-encrypts the device's files: a change."""
    next_second()
    assert checkin.check_in().status_code == 200
    assert checkin.check_in().status_code == 304
    files = [{"name": "api", "value": "x", "unencrypted": True, "on-changed": []}]
    assert backend.gateway(checkin.device, "PATCH", "/config", json={"reason": "r", "files": files}).status_code == 200
    assert checkin.check_in().status_code == 200


def test_database_from_before_the_change_table_is_seeded(backend, checkin):
    """A factory database created before config_changes existed is seeded from
    updated_at (whole seconds, so one second later) on upgrade: a file changed
    after the device's last Date is not missed, and 304s resume after that second."""
    backend.cli("config", "set", "ntp=pool.example")
    next_second()
    assert checkin.check_in().status_code == 200
    assert checkin.check_in().status_code == 304
    backend.stop()
    db = sqlite3.connect(backend.dir / "certrotate.db")
    with db:
        db.execute("DROP TABLE config_changes")
        db.execute("DELETE FROM schema_migrations WHERE version = 2")
        # Changed in the same second as the device's last Date: it may be newer.
        db.execute("UPDATE config_files SET updated_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now')")
    db.close()
    backend.start()
    assert checkin.check_in().status_code == 200
    deadline = time.monotonic() + 5
    while checkin.check_in().status_code != 304:
        assert time.monotonic() < deadline, "no 304 after the seeded change time passed"
        time.sleep(0.3)
