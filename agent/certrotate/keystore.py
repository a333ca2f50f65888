"""Where the device's identity lives: the seam under the rotation steps.

A ``KeyStore`` holds the live key and certificate that sota.toml names and
makes the new ones. ``FileKeyStore`` keeps PEM files (import.tls_pkey_path,
tls_clientcert_path); ``tokenkeys.TokenKeyStore`` keeps them in a PKCS#11
token (p11.tls_pkey_id, tls_clientcert_id). The steps speak only to this
interface; what each store records of a rotation lives in the journal's
Rotation (file paths or token ids), never key material.

Identities for TLS are (certificate file, key file) pairs; a token's key
file holds a PKCS#11 URI that OpenSSL's pkcs11-provider opens.

Light at import time (``check`` reaches ``live_cert_file`` on its fast path):
cryptography is imported only by the functions that need it.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from . import config, fsutil
from .config import AgentConfig, Root, SotaConfig

if TYPE_CHECKING:  # the journal pulls in dataclasses, too slow for check's fast path
    from .journal import Journal, Rotation

FILE, PKCS11 = "file", "pkcs11"


class KeyStore:
    """One kind of identity storage; every method is idempotent (steps are re-run)."""

    kind = ""

    def __init__(self, root: Root, sota: SotaConfig, agent: AgentConfig, journal: Journal):
        self.root = root
        self.sota = sota
        self.agent = agent
        self.journal = journal

    def plan(self, rotation: Rotation, request: dict) -> None:
        """Record in ``rotation`` where its old and new identities live (before any write)."""
        raise NotImplementedError

    def check_old(self, rotation: Rotation) -> None:
        """Refuse a live identity a rotation cannot retire for good."""

    def make_new_key(self, rotation: Rotation, save):
        """The rotation's new private key, made unless an earlier run of step 1 made it;
        ``save()`` journals what the store recorded in ``rotation`` meanwhile."""
        raise NotImplementedError

    def new_key(self, rotation: Rotation):
        """The new private key step 1 made."""
        raise NotImplementedError

    def old_key(self, rotation: Rotation):
        raise NotImplementedError

    def old_certs(self, rotation: Rotation) -> list:
        raise NotImplementedError

    def identity(self, rotation: Rotation, which: str) -> tuple[Path, Path]:
        """(certificate, key) files for TLS as the "old", "staged" (issued, not yet
        installed) or "new" (installed) identity."""
        raise NotImplementedError

    def install(self, rotation: Rotation) -> None:
        """Put the staged certificate (and key) where the new identity lives."""
        raise NotImplementedError

    def point_at(self, rotation: Rotation, which: str) -> None:
        """Make sota.toml name the "old" or "new" identity."""
        raise NotImplementedError

    def retire(self, rotation: Rotation) -> None:
        """Remove the old identity once the gateway has confirmed the new one."""
        raise NotImplementedError

    def live_identity(self) -> tuple[Path, Path]:
        """(certificate, key) files of the identity sota.toml names now."""
        raise NotImplementedError

    def live_cert_file(self) -> Path:
        """A file holding the certificate sota.toml names now (for the renewal policy)."""
        return self.live_identity()[0]

    def work_dirs(self) -> set[Path]:
        """Directories this store writes files in (cleared of interrupted writes)."""
        return set()

    def describe(self) -> dict:
        """Where the live identity is, for ``status``."""
        raise NotImplementedError

    def names(self, rotation: Rotation) -> tuple[tuple, tuple, tuple]:
        """How sota.toml names the rotation's old identity, its new one, and the live one now."""
        raise NotImplementedError


class FileKeyStore(KeyStore):
    """PEM files in aktualizr-lite's storage; the new ones are pkey-<id>.pem / client-<id>.pem."""

    kind = FILE

    def plan(self, rotation: Rotation, request: dict) -> None:
        directory = PurePosixPath(self.sota.key_file).parent
        rotation.old_key_file = self.sota.key_file
        rotation.old_cert_file = self.sota.cert_file
        rotation.new_key_file = str(directory / f"pkey-{rotation.rotation_id}.pem")
        rotation.new_cert_file = str(directory / f"client-{rotation.rotation_id}.pem")

    def check_old(self, rotation: Rotation) -> None:
        # The old key must be the device's only copy (a second hard link would keep it after retire).
        fsutil.refuse_linked(self.root(rotation.old_key_file))

    def make_new_key(self, rotation: Rotation, save):
        from . import certs, pki

        key_path = self.journal.new_key_path(rotation.rotation_id)
        if not key_path.exists():
            fsutil.atomic_write(key_path, certs.key_pem(pki.new_key()), 0o600, point="est:new-key")
        return self.new_key(rotation)

    def new_key(self, rotation: Rotation):
        from . import certs

        return certs.load_key(self.journal.new_key_path(rotation.rotation_id))

    def old_key(self, rotation: Rotation):
        from . import certs

        return certs.load_key(self.root(rotation.old_key_file), rotation.old_key_file)

    def old_certs(self, rotation: Rotation) -> list:
        from . import certs

        return certs.load_certs(self.root(rotation.old_cert_file), rotation.old_cert_file)

    def identity(self, rotation: Rotation, which: str) -> tuple[Path, Path]:
        if which == "old":
            return self.root(rotation.old_cert_file), self.root(rotation.old_key_file)
        if which == "staged":
            rotation_id = rotation.rotation_id
            return self.journal.new_cert_path(rotation_id), self.journal.new_key_path(rotation_id)
        return self.root(rotation.new_cert_file), self.root(rotation.new_key_file)

    def install(self, rotation: Rotation) -> None:
        copies = [
            (self.journal.new_key_path(rotation.rotation_id), rotation.new_key_file, 0o600, "key"),
            (self.journal.new_cert_path(rotation.rotation_id), rotation.new_cert_file, 0o644, "cert"),
        ]
        for source, device_path, mode, what in copies:
            data = fsutil.read_secret(source)  # the agent's own files: a second link is foreign
            target = self.root(device_path)
            if not target.exists() or target.read_bytes() != data:
                fsutil.atomic_write(target, data, mode, point=f"finalize:{what}")

    def point_at(self, rotation: Rotation, which: str) -> None:
        if which == "old":
            config.point_tls_at(self.root, self.sota, rotation.old_key_file, rotation.old_cert_file,
                                point="confirm:revert-sota")
        else:
            config.point_tls_at(self.root, self.sota, rotation.new_key_file, rotation.new_cert_file,
                                point="finalize:sota")

    def retire(self, rotation: Rotation) -> None:
        """The old key file is overwritten with zeros, fsynced and unlinked. The old
        certificate is public: it is unlinked, even when another hard link shares it
        (refusing it would stop the rotation here on every run). An old key or
        certificate that is a symlink is unlinked itself; the file it points to is
        wiped with it only when that is the device's own file in aktualizr-lite's
        storage (storage.path, /var/sota): a file elsewhere is someone else's."""
        keep = {rotation.new_key_file, rotation.new_cert_file}
        storage = Path(os.path.realpath(self.root(self.sota.storage_path)))
        kept_files = {Path(os.path.realpath(self.root(device_path))) for device_path in keep}
        for device_path, what, delete in ((rotation.old_key_file, "old-key", fsutil.secure_delete),
                                          (rotation.old_cert_file, "old-cert", fsutil.delete_public)):
            if device_path not in keep:
                _retire_old(self.root(device_path), storage, kept_files, delete, point=f"retire:{what}")

    def live_identity(self) -> tuple[Path, Path]:
        return self.root(self.sota.cert_file), self.root(self.sota.key_file)

    def work_dirs(self) -> set[Path]:
        return {self.root(os.path.dirname(self.sota.key_file)), self.root(os.path.dirname(self.sota.cert_file))}

    def describe(self) -> dict:
        return {"file": self.sota.cert_file, "key_file": self.sota.key_file}

    def names(self, rotation: Rotation) -> tuple[tuple, tuple, tuple]:
        return ((rotation.old_key_file, rotation.old_cert_file), (rotation.new_key_file, rotation.new_cert_file),
                (self.sota.key_file, self.sota.cert_file))


def _retire_old(path: Path, storage: Path, kept_files: set[Path], delete, *, point: str) -> None:
    if not path.is_symlink():
        delete(path, point=point)
        return
    target = Path(os.path.realpath(path))
    # The target goes first: a crash in between leaves a dangling link, which a
    # resumed run unlinks; the other order would leave the old key behind for good.
    if target.is_relative_to(storage) and target not in kept_files and target.is_file():
        delete(target, point=point)
    os.unlink(path)
    fsutil.fsync_dir(path.parent)


def open_store(root: Root, sota: SotaConfig, agent: AgentConfig, journal: Journal) -> KeyStore:
    """The store sota.toml describes: a token when tls.pkey_source is "pkcs11"."""
    if sota.p11 is None:
        return FileKeyStore(root, sota, agent, journal)
    from .tokenkeys import TokenKeyStore

    return TokenKeyStore(root, sota, agent, journal)


def for_rotation(store: KeyStore, rotation: Rotation, installed: bool) -> None:
    """Refuse to resume a rotation when sota.toml names neither of its identities
    (the old one, or once ``installed`` may have begun, the new one): another tool
    changed the identity meanwhile (fioconfig's own rotation, an operator), and
    what the rotation would write or remove may be that identity."""
    if rotation.key_store != store.kind:
        raise config.ConfigError(
            f"rotation {rotation.rotation_id} was begun for a {rotation.key_store} identity, but "
            f"sota.toml now names a {store.kind} identity",
            hint="restore sota.toml as it was when the rotation began, or finish the rotation "
            "with that configuration",
        )
    old, new, live = store.names(rotation)
    if live != old and not (installed and live == new):
        raise config.ConfigError(
            f"rotation {rotation.rotation_id} began from {'/'.join(old)}, but sota.toml now names "
            f"{'/'.join(live)}: something else changed the device's identity meanwhile",
            hint="nothing was touched. If the device is online with what sota.toml names, move the "
            "rotation's journal (state.json in the state dir) aside: the next rotation starts from "
            "that identity",
        )
