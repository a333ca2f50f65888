"""Backend throughput: EST re-enrollments and gateway requests per second with
a new TLS connection per request, the fleet run, and throughput against the
number of registered devices.

Devices are registered in bulk through the server's Python API (the same
Factory.issue_initial_device_cert and devices.add_device that
`certrotate-server devices register` uses), all rows in one SQLite
transaction, with the server stopped: one subprocess per device would
measure process start-up, not the backend."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7

from load import (TRANSPORT_ERRORS, DeviceFiles, Request, Sample, client_context, describe_failure,
                  https_request, process_cpu_s, run_clients, run_level, run_threads)


def bulk_register(factory_dir: Path, prefix: str, count: int, files_dir: Path | None) -> list[DeviceFiles]:
    """Register ``count`` devices named PREFIX-N; with ``files_dir``, write each
    one's key and certificate there for the load clients."""
    from certrotate_server import devices, pki
    from certrotate_server.factory import Factory
    from certrotate_server.store import Store

    factory = Factory(factory_dir)
    store = Store(factory.db_path)
    made: list[DeviceFiles] = []
    if files_dir:
        files_dir.mkdir(parents=True, exist_ok=True)
    try:
        with store.transaction() as conn:
            for i in range(count):
                name = f"{prefix}-{i}"
                key = pki.new_key()
                cert = factory.issue_initial_device_cert(name, key.public_key())
                devices.add_device(conn, name, cert, None, "bench")
                if files_dir:
                    made.append(write_identity(files_dir, name, key, cert))
    finally:
        store.close()
    return made


def write_identity(directory: Path, name: str, key, cert: x509.Certificate) -> DeviceFiles:
    """A device's key (0600) and certificate as files for ssl's load_cert_chain.
    Scratch files of the benchmark: not fsynced (thousands of fsyncs would
    time the disk, not the backend)."""
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return DeviceFiles(name, str(key_path), str(cert_path))


def renewal_csr(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bytes:
    """base64 DER of the CSR a device sends to simplereenroll: the current
    certificate's Subject and subjectAltName, digitalSignature + clientAuth."""
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(cert.subject)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        builder = builder.add_extension(san.value, critical=False)
    except x509.ExtensionNotFound:
        pass
    csr = builder.sign(key, hashes.SHA256())
    return base64.b64encode(csr.public_bytes(serialization.Encoding.DER))


def reenroll_requests(device: DeviceFiles, est_url: str, count: int) -> list[Request]:
    cert = x509.load_pem_x509_certificate(Path(device.cert_path).read_bytes())
    return [
        Request("POST", f"{est_url}/simplereenroll", renewal_csr(cert, ec.generate_private_key(ec.SECP256R1())),
                "application/pkcs10")
        for _ in range(count)
    ]


def client_processes(concurrency: int) -> int:
    """Client processes for a concurrency level: one per core at most, so the
    client never takes more than its share from the server; 1 for a single
    connection."""
    return 1 if concurrency == 1 else min(2, len(os.sched_getaffinity(0)))


def bench_levels(ca_path: str, est_url: str, gateway_url: str, devices: list[DeviceFiles], server_pid: int,
                 levels: list[int], duration_s: float) -> dict:
    """Re-enrollments/s and GET /device/s at each concurrency level; each
    concurrent task is its own device."""
    results: dict = {"est_simplereenroll": [], "gateway_get_device": []}
    for concurrency in levels:
        chosen = devices[:concurrency]
        est_jobs = [(d, reenroll_requests(d, est_url, 8)) for d in chosen]
        level = run_level(ca_path, est_jobs, duration_s, server_pid, client_processes(concurrency))
        results["est_simplereenroll"].append(level.summary())
        gateway_jobs = [(d, [Request("GET", f"{gateway_url}/device")]) for d in chosen]
        level = run_level(ca_path, gateway_jobs, duration_s, server_pid, client_processes(concurrency))
        results["gateway_get_device"].append(level.summary())
    return results


# The fleet run -----------------------------------------------------------------

def rotate_device(ca_path: str, device: DeviceFiles, est_url: str, gateway_url: str, scratch: Path) -> str:
    """One device's rotation as the backend sees it: CSR, simplereenroll,
    PATCH /device next_pubkey, then a request authenticated by the new
    certificate. Returns "" on success, else what failed."""
    old_context = client_context(ca_path, device)
    cert = x509.load_pem_x509_certificate(Path(device.cert_path).read_bytes())
    new_key = ec.generate_private_key(ec.SECP256R1())
    reply = https_request(
        old_context,
        Request("POST", f"{est_url}/simplereenroll", renewal_csr(cert, new_key), "application/pkcs10"),
    )
    if reply.status != 200:
        return "simplereenroll " + describe_failure(reply, None)
    new_certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(reply.body))
    new_pub = new_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    body = json.dumps({"next_pubkey": new_pub}).encode()
    reply = https_request(old_context, Request("PATCH", f"{gateway_url}/device", body, "application/json"))
    if reply.status != 200:
        return "PATCH /device " + describe_failure(reply, None)
    new_files = write_identity(scratch, device.name, new_key, new_certs[0])
    new_context = client_context(ca_path, new_files)
    os.unlink(new_files.key_path)
    os.unlink(new_files.cert_path)
    reply = https_request(new_context, Request("GET", f"{gateway_url}/device"))
    if reply.status != 200:
        return "GET /device with the new certificate " + describe_failure(reply, None)
    return ""


def _fleet_process(ca_path, devices, est_url, gateway_url, threads, scratch, ready, go, results) -> None:
    queue = list(reversed(devices))
    take = threading.Lock()
    samples: list[Sample] = []

    def worker():
        while True:
            with take:
                if not queue:
                    return
                device = queue.pop()
            start = time.perf_counter()
            try:
                failure = rotate_device(ca_path, device, est_url, gateway_url, scratch)
            except TRANSPORT_ERRORS as exc:
                failure = describe_failure(None, exc)
            samples.append(Sample(time.perf_counter() - start, not failure, failure))

    ready.release()
    go.wait()
    cpu_before = process_cpu_s()
    run_threads(worker, [()] * threads)
    results.put((samples, process_cpu_s() - cpu_before))


def fleet_run(ca_path: str, est_url: str, gateway_url: str, devices: list[DeviceFiles], server_pid: int,
              concurrency: int, scratch: Path) -> dict:
    """Every device rotates once, ``concurrency`` at a time, split over the
    client processes; total time and errors."""
    scratch.mkdir(parents=True, exist_ok=True)
    processes = client_processes(concurrency)
    shares = [(ca_path, devices[i::processes], est_url, gateway_url, concurrency // processes, scratch)
              for i in range(processes)]
    level = run_clients(_fleet_process, shares, concurrency, server_pid, 3600)
    summary = level.summary()
    summary["devices"] = summary.pop("requests")
    summary["rotations_per_s"] = summary.pop("per_s")
    summary["server_cpu_ms_per_device"] = summary.pop("server_cpu_ms_per_request", None)
    return summary
