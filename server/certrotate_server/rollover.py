"""Root CA key update (RFC 7030 4.1.3, RFC 4210 4.4): `ca rollover` and `ca retire-old`.

rollover: a new root (NewWithNew) and device CA, which issue from then on; the
cross-certificates NewWithOld and OldWithNew; TLS server certificates signed
by the new root and presented with NewWithOld, so a device trusting only the
old root still verifies the servers. The old root and device CA stay trusted
(previous-*) until retire-old, which refuses while a device holds no
certificate of the new device CA, unless forced.

Both build what they change in a staging directory, then move it into place
file by file, factory.json last; an interrupted command is finished by
running it again (the staging directory and its READY marker say where it was).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from . import pki
from .factory import Factory, FactoryError, make_dirs, write_tls_server_certs
from .store import Store, utcnow

READY = "READY"
ROLLOVER_STAGING = "rollover.staging"
RETIRE_STAGING = "retire.staging"
# What the transition adds, moved to retired/<generation>/ when it ends.
TRANSITION_FILES = ["previous-root.crt", "previous-root.key", "previous-device-ca.crt",
                    "previous-device-ca.key", "cross-new-with-old.crt", "cross-old-with-new.crt"]
MAX_LISTED = 10


def rollover(factory: Factory, root_key_file: Path | None = None) -> list[str]:
    """Start a transition to a new root; what was done, line by line."""
    staging = factory.path(ROLLOVER_STAGING)
    if not _commit_pending(staging):
        if factory.in_transition:
            raise FactoryError(f"a root CA rollover (generation {factory.generation}) is in progress; "
                               "end it with `certrotate-server ca retire-old` first")
        _stage_rollover(factory, staging, root_key_file)
    _commit(factory.dir, staging)
    new = Factory(factory.dir)
    return [f"new root CA {new.root_cert().subject.rfc4514_string()} (generation {new.generation}); "
            "devices are issued certificates of its device CA from now on",
            "/cacerts serves both roots and the cross-certificates; the servers present NewWithOld",
            "restart `serve` to apply; end the transition with `ca retire-old` once devices have rotated"]


def _stage_rollover(factory: Factory, staging: Path, root_key_file: Path | None) -> None:
    old_root = factory.root_cert()
    old_root_key = _old_root_key(factory, root_key_file)
    generation = factory.generation + 1
    _fresh_dir(staging)
    root_key = pki.new_key()
    root = pki.make_root_ca(factory.name, root_key, generation)
    device_ca_key = pki.new_key()
    device_ca = pki.make_device_ca(factory.name, device_ca_key, root, root_key, generation)
    new_with_old = pki.make_cross_cert(root, old_root, old_root_key)
    old_with_new = pki.make_cross_cert(old_root, root, root_key)
    for name in ("root", "device-ca"):  # the old ones, kept as they were
        for suffix in (".crt", ".key"):
            if factory.path(name + suffix).exists():
                _copy(factory.path(name + suffix), staging / f"previous-{name}{suffix}")
    pki.write_private(staging / "root.key", pki.key_pem(root_key))
    pki.write_public(staging / "root.crt", pki.cert_pem(root))
    pki.write_private(staging / "device-ca.key", pki.key_pem(device_ca_key))
    pki.write_public(staging / "device-ca.crt", pki.cert_pem(device_ca))
    pki.write_public(staging / "cross-new-with-old.crt", pki.cert_pem(new_with_old))
    pki.write_public(staging / "cross-old-with-new.crt", pki.cert_pem(old_with_new))
    write_tls_server_certs(staging, factory.name, factory.settings["hostnames"], root, root_key, [new_with_old])
    settings = dict(factory.settings, ca={"generation": generation, "transition": True, "rollover_at": utcnow()})
    _stage_settings(staging, settings)


def _old_root_key(factory: Factory, root_key_file: Path | None):
    path = root_key_file or factory.path("root.key")
    if not path.exists():
        raise FactoryError(f"the root CA's key is not in {factory.dir} (the root was imported): "
                           "pass it with --root-ca-key FILE; it signs the NewWithOld cross-certificate")
    key = pki.load_key(path)
    if pki.pubkey_der(key.public_key()) != pki.pubkey_der(factory.root_cert().public_key()):
        raise FactoryError(f"{path} is not the key of the factory's root CA ({factory.path('root.crt')})")
    return key


def devices_on_old_ca(factory: Factory) -> list[str]:
    """Devices none of whose certificates for their current key the current (new) device
    CA issued: retiring the old CA cuts them off. An announced key does not count until
    the gateway has seen it in use: a rotation abandoned before that keeps the old identity."""
    issuer = factory.device_ca()[0].subject.rfc4514_string()
    store = Store(factory.db_path)
    try:
        rows = store.query(
            "SELECT name FROM devices d WHERE NOT EXISTS (SELECT 1 FROM certificates c WHERE "
            "c.device = d.name AND c.issuer = ? AND c.pubkey = d.pubkey) ORDER BY name",
            (issuer,))
    finally:
        store.close()
    return [row["name"] for row in rows]


def retire_old(factory: Factory, force: bool = False) -> list[str]:
    """End the transition: only the new root and device CA are trusted; what was done."""
    staging = factory.path(RETIRE_STAGING)
    lines = []
    if not _commit_pending(staging):
        if not factory.in_transition:
            raise FactoryError("no root CA rollover is in progress; `certrotate-server ca rollover` starts one")
        stranded = devices_on_old_ca(factory)
        if stranded and not force:
            listed = ", ".join(stranded[:MAX_LISTED]) + (" ..." if len(stranded) > MAX_LISTED else "")
            raise FactoryError(
                f"{len(stranded)} device(s) hold no certificate of the new device CA yet: {listed}; "
                "wait until they have rotated (`certrotate-server devices config rotate-certs`), or pass "
                "--force, after which they can reach neither the gateway nor EST and must be registered anew")
        if stranded:
            lines.append(f"retired with --force: {len(stranded)} device(s) cut off: {', '.join(stranded)}")
        _stage_retirement(factory, staging)
    _commit(factory.dir, staging, remove=TRANSITION_FILES)
    lines += [f"the old root CA is retired (kept in retired/{factory.generation - 1}/, never served); "
              "/cacerts serves the new root alone", "restart `serve` to apply"]
    return lines


def _stage_retirement(factory: Factory, staging: Path) -> None:
    _fresh_dir(staging)
    retired = staging / "retired" / str(factory.generation - 1)
    make_dirs(retired, 0o700)
    for name in TRANSITION_FILES:
        if factory.path(name).exists():
            _copy(factory.path(name), retired / name)
    for role in ("gateway", "est"):  # the leaf alone: no NewWithOld any more
        leaf = pki.load_cert(factory.path(f"{role}.crt"))
        pki.write_public(staging / f"{role}.crt", pki.cert_pem(leaf))
    ca = dict(factory.settings["ca"], transition=False, retired_at=utcnow())
    ca.pop("rollover_at", None)
    _stage_settings(staging, dict(factory.settings, ca=ca))


def _stage_settings(staging: Path, settings: dict) -> None:
    pki.write_public(staging / "factory.json", (json.dumps(settings, indent=2) + "\n").encode())
    for path in staging.rglob("*"):
        if path.is_file():
            _fsync(path)
    fd = os.open(staging / READY, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fsync(fd)
    os.close(fd)
    _fsync(staging)


def _commit(directory: Path, staging: Path, remove: list[str] = ()) -> None:
    """Move every staged file into place (factory.json last), delete ``remove``, then drop
    the staging dir: until then READY is there, and running the command again finishes."""
    staged = sorted((p for p in staging.rglob("*") if p.is_file() and p.name != READY),
                    key=lambda p: p.name == "factory.json")
    for path in staged:
        target = directory / path.relative_to(staging)
        make_dirs(target.parent, 0o700, 0o700)
        os.replace(path, target)
        _fsync(target.parent)
    for name in remove:
        (directory / name).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    _fsync(directory)


def _commit_pending(staging: Path) -> bool:
    """Whether ``staging`` holds a complete set of files not all moved in yet. A READY
    left with nothing behind it (a cut as the directory was being dropped) is removed."""
    if not (staging / READY).exists():
        return False
    if any(p.is_file() and p.name != READY for p in staging.rglob("*")):
        return True
    shutil.rmtree(staging)
    return False


def _fresh_dir(path: Path) -> None:
    """An empty staging directory (what an attempt left before READY is discarded)."""
    shutil.rmtree(path, ignore_errors=True)
    make_dirs(path, 0o700)


def _copy(source: Path, target: Path) -> None:
    (pki.write_private if source.suffix == ".key" else pki.write_public)(target, source.read_bytes())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
