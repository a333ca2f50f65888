"""200 devices rotating at once; SIGKILL of the server during a burst, then restart."""

import sqlite3
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from cryptography import x509
from cryptography.x509.oid import NameOID

from srvhelpers import certs_from_est, est_body, make_csr, new_key, pubkey_pem, renewal_csr, write_cert, write_key

PKCS10 = {"Content-Type": "application/pkcs10"}


class SimDevice:
    """A device made by EST simpleenroll (fast to create in bulk), with its files."""

    def __init__(self, backend, name, directory):
        self.backend, self.name, self.dir = backend, name, directory
        directory.mkdir()
        self.key = new_key()
        password = (backend.dir / "est-password").read_text().strip()
        csr = make_csr(self.key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        reply = backend.est("POST", "simpleenroll", data=est_body(csr), headers=PKCS10, auth=("bootstrap", password))
        assert reply.status_code == 200, reply.text
        [self.cert] = certs_from_est(reply.content)
        self.key_path = write_key(directory / "old.key", self.key)
        self.cert_path = write_cert(directory / "old.crt", self.cert)

    def reenroll(self):
        self.new_key = new_key()
        reply = self.backend.est("POST", "simplereenroll", key=self.key_path, cert=self.cert_path,
                                 data=est_body(renewal_csr(self.cert, self.new_key)), headers=PKCS10)
        assert reply.status_code == 200, reply.text
        [self.new_cert] = certs_from_est(reply.content)
        self.new_key_path = write_key(self.dir / "new.key", self.new_key)
        self.new_cert_path = write_cert(self.dir / "new.crt", self.new_cert)

    def announce(self):
        reply = self.gateway("PATCH", "/device", old=True, json={"next_pubkey": pubkey_pem(self.new_key)})
        assert reply.status_code == 200, reply.text

    def post_event(self, event_id):
        reply = self.gateway("POST", "/events", old=True, json=[{
            "id": event_id, "deviceTime": "2026-01-01T00:00:00Z",
            "eventType": {"id": "Lock device configuration on server", "version": 0},
            "event": {"correlationId": "certs-1", "success": True, "targetName": "t", "version": "1"}}])
        assert reply.status_code == 200, reply.text

    def confirm(self):
        reply = self.gateway("GET", "/device", old=False)
        assert reply.status_code == 200, reply.text
        assert reply.json()["pubkey"] == pubkey_pem(self.new_key)

    def gateway(self, method, path, old, **kwargs):
        key, cert = (self.key_path, self.cert_path) if old else (self.new_key_path, self.new_cert_path)
        return self.backend.gateway(None, method, path, key=key, cert=cert, **kwargs)


def db(backend):
    conn = sqlite3.connect(f"file:{backend.dir / 'certrotate.db'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    return conn


@pytest.mark.timeout(600)
def test_200_devices_rotate_at_once(backend, tmp_path):
    count = 200
    with ThreadPoolExecutor(16) as pool:
        fleet = list(pool.map(lambda i: SimDevice(backend, f"fleet-{i:03d}", tmp_path / f"d{i}"), range(count)))
    start = threading.Barrier(count)

    def rotate(device):
        start.wait()
        device.reenroll()
        device.announce()
        device.confirm()
        assert device.gateway("GET", "/device", old=True).status_code == 403

    with ThreadPoolExecutor(count) as pool:
        list(pool.map(rotate, fleet))  # re-raises the first failure

    conn = db(backend)
    assert conn.execute("SELECT COUNT(*) FROM devices WHERE next_pubkey IS NULL AND pubkey_changed_at IS NOT NULL"
                        ).fetchone()[0] == count
    assert conn.execute("SELECT COUNT(*) FROM factory_events WHERE type = 'DEVICE_PUBKEY_CHANGE'").fetchone()[0] == count
    assert conn.execute("SELECT COUNT(*) FROM deny_list").fetchone()[0] == count
    log = backend.log
    assert "Traceback" not in log and "database is locked" not in log and " 500 " not in log


@pytest.mark.timeout(600)
def test_sigkill_during_burst_loses_no_acknowledged_write(backend, tmp_path):
    count = 60
    with ThreadPoolExecutor(8) as pool:
        fleet = list(pool.map(lambda i: SimDevice(backend, f"crash-{i:02d}", tmp_path / f"d{i}"), range(count)))
    acked = {"cert": [], "announce": [], "event": [], "confirm": []}
    cut_off = []
    lock = threading.Lock()
    enough = threading.Event()
    killed = threading.Event()

    def ack(kind, value):
        with lock:
            acked[kind].append(value)
            if sum(map(len, acked.values())) >= 80:
                enough.set()

    def burst(device):
        try:
            device.reenroll()
            ack("cert", (device.name, format(device.new_cert.serial_number, "x")))
            device.announce()
            ack("announce", (device.name, pubkey_pem(device.new_key)))
            event_id = str(uuid.uuid4())
            device.post_event(event_id)
            ack("event", (device.name, event_id))
            device.confirm()
            ack("confirm", (device.name, pubkey_pem(device.new_key), device.cert))
        except (requests.RequestException, AssertionError):
            if not killed.is_set():
                raise  # a failure before the kill is a real one
            with lock:
                cut_off.append(device.name)

    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(burst, d) for d in fleet]
        assert enough.wait(300), "the burst did not get going"
        killed.set()
        backend.kill()
        for f in futures:
            f.result()
    assert cut_off, "the kill came after the burst ended: nothing was cut off mid-flight"

    backend.start()  # restarts clean on the same directory
    conn = db(backend)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for name, serial in acked["cert"]:
        assert conn.execute("SELECT 1 FROM certificates WHERE device = ? AND serial = ?", (name, serial)).fetchone()
    for name, key in acked["announce"]:
        row = conn.execute("SELECT pubkey, next_pubkey FROM devices WHERE name = ?", (name,)).fetchone()
        assert key in (row["pubkey"], row["next_pubkey"])
    for name, event_id in acked["event"]:
        assert conn.execute("SELECT 1 FROM device_events WHERE device = ? AND id = ?", (name, event_id)).fetchone()
    for name, key, old_cert in acked["confirm"]:
        assert conn.execute("SELECT pubkey FROM devices WHERE name = ?", (name,)).fetchone()[0] == key
        fp = old_cert.fingerprint(old_cert.signature_hash_algorithm).hex()
        assert conn.execute("SELECT 1 FROM deny_list WHERE fingerprint = ?", (fp,)).fetchone()
        assert conn.execute("SELECT 1 FROM factory_events WHERE device = ? AND type = 'DEVICE_PUBKEY_CHANGE'",
                            (name,)).fetchone()
    # The restarted server serves: a device cut off mid-rotation finishes its rotation.
    original = {d.name: pubkey_pem(d.key) for d in fleet}
    survivor = next(d for d in fleet if d.name in cut_off and conn.execute(
        "SELECT pubkey FROM devices WHERE name = ?", (d.name,)).fetchone()[0] == original[d.name])
    survivor.reenroll()
    survivor.announce()
    survivor.confirm()
