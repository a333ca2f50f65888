"""The device's identity in a PKCS#11 token, as lmp-device-register puts it there.

sota.toml's [p11] names the module, the PIN (``pass``), the token ``label``
and the CKA_IDs of the live key pair (``tls_pkey_id``, label "tls") and
certificate (``tls_clientcert_id``, label "client"). A rotation alternates
between two ids of each (fioconfig's defaults: keys 01 and 07, certificates
03 and 09; the handler's PKEYIDS and CERTIDS may name others): the new id is
the listed one that is not live.

Order of token writes, each a crash point, each found again by a resumed run:
  est      stale key objects at the new key id removed (never the live key),
           the pair generated there, its public key journaled; a resumed run
           reuses the pair whose public key the journal names, and regenerates
           only while step 1 is unfinished;
  finalize stale certificates at the new cert id removed, the issued one
           imported, then sota.toml's two ids switched;
  retire   the old private key, public key and certificate destroyed.
The old objects are destroyed, not kept for the next alternation: keeping them
would keep the old key, and the next rotation clears the id before using it.

Certificates and keys are handed to TLS as files in ``<state_dir>/p11``: the
certificate exported from the token, and the key as a PKCS#11 URI (public:
neither holds a secret) that pkcs11-provider opens inside the token.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from . import config, crashpoints, fsutil, pkcs11, tlsprovider
from .keystore import PKCS11, KeyStore
from .pkcs11 import (CKA_CERTIFICATE_TYPE, CKA_CLASS, CKA_DERIVE, CKA_EC_PARAMS, CKA_EC_POINT,
                     CKA_EXTRACTABLE, CKA_ID, CKA_ISSUER, CKA_KEY_TYPE, CKA_LABEL, CKA_PRIVATE,
                     CKA_SENSITIVE, CKA_SERIAL_NUMBER, CKA_SIGN, CKA_SUBJECT, CKA_TOKEN, CKA_VALUE,
                     CKA_VERIFY, CKC_X_509, CKK_EC, CKO_CERTIFICATE, CKO_PRIVATE_KEY, CKO_PUBLIC_KEY,
                     TokenError)

KEY_IDS = ("01", "07")  # fioconfig's PKEYIDS
CERT_IDS = ("03", "09")  # fioconfig's CERTIDS
KEY_LABEL = b"tls"
CERT_LABEL = b"client"
_P256 = bytes.fromhex("06082a8648ce3d030107")  # the OID of prime256v1, as CKA_EC_PARAMS
_IDENTITY_DIR = "p11"
_PIN_REFUSED = "pin-refused.json"
_NO_DERIVE = (0x68, 0x70, 0x71)  # KEY_FUNCTION_NOT_PERMITTED, MECHANISM_INVALID, MECHANISM_PARAM_INVALID
_NOT_STORED = (0x05, 0x06, 0x30, 0x31)  # GENERAL_ERROR, FUNCTION_FAILED, DEVICE_ERROR, DEVICE_MEMORY


def check_ids(ids: list[str], what: str, origin: str) -> tuple[str, ...]:
    """Two distinct ids, each "01" to "09" (config.P11Config says why)."""
    ids = [i.strip() for i in ids]
    if len(ids) != 2 or len(set(ids)) != 2 or not all(config.P11_ID.fullmatch(i) for i in ids):
        raise config.ConfigError(
            f"{origin}: {what} must be two different ids from 01 to 09, not {','.join(ids)!r}",
            hint=f"write e.g. {what}=01,07 (fioconfig's default) or leave it out",
        )
    return tuple(ids)


class TokenKey:
    """A private key that never leaves the token, with the methods of cryptography's
    EC private keys that the rotation uses (sign for the CSR, exchange for go-ecies)."""

    def __init__(self, store: "TokenKeyStore", key_id: bytes, public_point: bytes):
        self._store = store
        self.key_id = key_id
        self._point = public_point

    def public_key(self):
        from cryptography.hazmat.primitives.asymmetric import ec

        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), self._point)

    @property
    def curve(self):
        return self.public_key().curve

    def sign(self, data: bytes, signature_algorithm) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

        session = self._store.session()
        raw = session.sign_ecdsa(self._store.private_handle(session, self.key_id),
                                 hashlib.sha256(data).digest())
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))

    def exchange(self, algorithm, peer_public_key) -> bytes:
        from cryptography.hazmat.primitives import serialization

        session = self._store.session()
        peer = peer_public_key.public_bytes(serialization.Encoding.X962,
                                            serialization.PublicFormat.UncompressedPoint)
        try:
            return session.ecdh(self._store.private_handle(session, self.key_id), peer, 32)
        except TokenError as err:
            if err.code not in _NO_DERIVE:
                raise
            raise TokenError(
                f"the token cannot do ECDH with key {self.key_id.hex()} ({err}), which decrypting "
                "the device's encrypted config needs",
                hint="update the token's PKCS#11 module (tpm2-pkcs11 needs 1.9.1 or newer for "
                "ECDH) and run certrotate rotate again; the rotation resumes at this step. A "
                "device without encrypted config values rotates without ECDH",
                code=err.code,
            ) from err


class TokenKeyStore(KeyStore):
    kind = PKCS11

    def __init__(self, *args):
        super().__init__(*args)
        self.p11 = self.sota.p11
        self._session: pkcs11.Session | None = None
        self._logged_in = False

    # --- the token ---

    def session(self, *, login: bool = True) -> pkcs11.Session:
        """The run's session, logged in unless only public objects are read (``check``
        reads the certificate without the PIN). One per run: PKCS#11 logs in a process."""
        if self._session is None:
            self._session = pkcs11.Module.load(self.p11.module).open(self.p11.label)
        if login and not self._logged_in:
            self._login()
        return self._session

    def _login(self) -> None:
        """Log in, but never twice with a PIN the token refused: tokens lock after a
        few wrong PINs (a TPM's dictionary-attack lockout, a smart card's counter), and
        the timer runs often. A refused PIN is remembered by the fingerprint of the
        file that sets p11.pass (never the PIN itself) until that file changes."""
        pin_file = self.root(self.sota.origins["p11.pass"])
        marker = self._identity_dir() / _PIN_REFUSED
        current = json.dumps(fsutil.fingerprint(pin_file), sort_keys=True).encode()
        if marker.exists() and marker.read_bytes() == current:
            raise TokenError(
                f"the token refused the PIN that {self.sota.origins['p11.pass']} sets (p11.pass) "
                "on an earlier run; certrotate does not try it again, lest the token lock",
                hint=f"fix p11.pass in {self.sota.origins['p11.pass']}; certrotate tries again "
                "once that file has changed",
            )
        try:
            self._session.login(self.p11.pin)
        except TokenError as err:
            if err.code == pkcs11.CKR_PIN_INCORRECT:
                fsutil.atomic_write(marker, current, 0o600, point="p11:pin-refused")
            raise
        if marker.exists():
            fsutil.delete_public(marker)
        self._logged_in = True

    def _find(self, session, object_class: int, object_id: bytes) -> list[int]:
        # Token objects only: pkcs11-provider may copy keys into session objects.
        return session.find({CKA_CLASS: object_class, CKA_ID: object_id, CKA_TOKEN: True})

    def _one(self, session, object_class: int, object_id: bytes, what: str) -> int:
        found = self._find(session, object_class, object_id)
        if len(found) != 1:
            raise TokenError(
                f"the token holds {len(found)} {what} with id {object_id.hex()}, not one",
                hint="check the token's objects (pkcs11-tool --list-objects) against sota.toml's p11 ids",
            )
        return found[0]

    def private_handle(self, session, key_id: bytes) -> int:
        return self._one(session, CKO_PRIVATE_KEY, key_id, "private keys")

    def _public_point(self, session, key_id: bytes) -> bytes | None:
        """The uncompressed EC point of the public key at ``key_id``, or None."""
        found = self._find(session, CKO_PUBLIC_KEY, key_id)
        if len(found) != 1:
            return None
        return _unwrap_point(session.attribute(found[0], CKA_EC_POINT))

    def _cert_der(self, session, cert_id: bytes) -> bytes:
        return session.attribute(self._one(session, CKO_CERTIFICATE, cert_id, "certificates"), CKA_VALUE)

    def _key(self, key_id: bytes) -> TokenKey:
        session = self.session()
        point = self._public_point(session, key_id)
        if point is None:
            raise TokenError(f"the token has no single public key with id {key_id.hex()}",
                             hint="check the token's objects (pkcs11-tool --list-objects)")
        return TokenKey(self, key_id, point)

    # --- files for TLS ---

    def _identity_dir(self) -> Path:
        directory = self.journal.dir / _IDENTITY_DIR
        fsutil.ensure_private_dir(self.journal.dir)
        directory.mkdir(mode=0o700, exist_ok=True)
        return directory

    def _write_if_changed(self, path: Path, data: bytes, point: str) -> Path:
        if not path.exists() or path.read_bytes() != data:
            fsutil.atomic_write(path, data, 0o644, point=point)
        return path

    def _cert_file(self, cert_id: bytes) -> Path:
        """The certificate at ``cert_id``, exported from the token into a file."""
        der = self._cert_der(self.session(login=False), cert_id)
        pem = _pem("CERTIFICATE", der)
        return self._write_if_changed(self._identity_dir() / f"cert-{cert_id.hex()}.pem", pem,
                                      point=f"p11:cert-file-{cert_id.hex()}")

    def _key_file(self, key_id: bytes) -> Path:
        # The agent logs in first (guarded against a refused PIN); the provider then
        # finds the process logged in and never tries the PIN itself.
        self.session()
        tlsprovider.load(self.p11.module, self.p11.pin)
        uri = tlsprovider.private_key_uri(self.p11.label, key_id)
        return self._write_if_changed(self._identity_dir() / f"key-{key_id.hex()}.pem",
                                      tlsprovider.uri_pem(uri), point=f"p11:key-file-{key_id.hex()}")

    # --- the KeyStore interface ---

    def plan(self, rotation, request: dict) -> None:
        key_ids = request.get("key_ids") or KEY_IDS
        cert_ids = request.get("cert_ids") or CERT_IDS
        live_key, live_cert = self.p11.key_id.hex(), self.p11.cert_id.hex()
        # The live public key, read without the PIN: whatever later writes or destroys
        # is compared against it, never against what an id holds at that time.
        point = self._public_point(self.session(login=False), self.p11.key_id)
        if point is None:
            raise TokenError(
                f"the token holds no single public key at sota.toml's p11.tls_pkey_id {live_key}",
                hint="a rotation needs the live key's public key object beside it (as "
                "lmp-device-register stores it); check the token's objects (pkcs11-tool --list-objects)",
            )
        rotation.key_store = PKCS11
        rotation.old_key_id, rotation.old_cert_id = live_key, live_cert
        rotation.old_public_key = _point_pem(point)
        rotation.new_key_id = next(i for i in key_ids if i != live_key)
        rotation.new_cert_id = next(i for i in cert_ids if i != live_cert)

    def check_old(self, rotation) -> None:
        """The live identity is whole: one private key, its public key, and a
        certificate for that key, at the ids sota.toml names."""
        from cryptography import x509

        session = self.session()
        old_key, old_cert = bytes.fromhex(rotation.old_key_id), bytes.fromhex(rotation.old_cert_id)
        self.private_handle(session, old_key)
        point = self._public_point(session, old_key)
        cert = x509.load_der_x509_certificate(self._cert_der(session, old_cert))
        if point is None or _point_pem(point) != rotation.old_public_key or \
                _spki_pem(cert) != rotation.old_public_key:
            raise TokenError(
                f"the token's live identity (key {rotation.old_key_id}, certificate "
                f"{rotation.old_cert_id}) changed since rotation {rotation.rotation_id} began, or its "
                "certificate is not for its key",
                hint="check the token's objects (pkcs11-tool --list-objects) and sota.toml's p11 ids; "
                "nothing was written to the token",
            )

    def _generated(self, rotation) -> TokenKey | None:
        """The pair this rotation generated, if the token still holds it."""
        new_id = bytes.fromhex(rotation.new_key_id)
        point = self._public_point(self.session(), new_id)
        if rotation.new_public_key and point is not None and _point_pem(point) == rotation.new_public_key:
            return TokenKey(self, new_id, point)
        return None

    def make_new_key(self, rotation, save) -> TokenKey:
        key = self._generated(rotation)
        if key is not None:
            return key
        # Whatever is at the new id is stale: a pair generated before a crash that the
        # journal never recorded, or a leftover of another rotation.
        new_id = bytes.fromhex(rotation.new_key_id)
        session = self.session()
        self._clear(session, rotation, new_id, (CKO_PRIVATE_KEY, CKO_PUBLIC_KEY), "est:p11-stale-key")
        with _storing(f"the new key pair at id {rotation.new_key_id}"):
            session.generate_key_pair(*_key_templates(new_id, KEY_LABEL))
        _written("est:p11-new-key")
        point = self._public_point(session, new_id)
        rotation.new_public_key = _point_pem(point)
        save()
        return TokenKey(self, new_id, point)

    def new_key(self, rotation) -> TokenKey:
        key = self._generated(rotation)
        if key is None:
            raise TokenError(
                f"the key rotation {rotation.rotation_id} generated at id {rotation.new_key_id} "
                "is not in the token",
                hint=f"the new certificate is unusable without it. If sota.toml's p11 ids name "
                f"{rotation.new_key_id}/{rotation.new_cert_id}, point them back at "
                f"{rotation.old_key_id}/{rotation.old_cert_id} first; then move the rotation's "
                "journal (state.json) aside and rotate again",
            )
        return key

    def _clear(self, session, rotation, object_id: bytes, classes, point: str) -> None:
        """Destroy every object of ``classes`` at ``object_id``; never at an id sota.toml
        names, never the live key's public half or a certificate for it (a copy of the
        live identity is refused, not destroyed), never a private key beside them."""
        from cryptography import x509

        live_id = self.p11.cert_id if CKO_CERTIFICATE in classes else self.p11.key_id
        if object_id == live_id or not rotation.old_public_key:
            raise TokenError(f"id {object_id.hex()} is the live identity's (sota.toml's p11 ids)",
                             hint="check sota.toml's p11 ids and the rotation's (certrotate status)")
        copy_of_live = self._public_point(session, object_id)
        copy_of_live = copy_of_live is not None and _point_pem(copy_of_live) == rotation.old_public_key
        for object_class in classes:
            for number, handle in enumerate(self._find(session, object_class, object_id)):
                if object_class == CKO_CERTIFICATE:
                    cert = x509.load_der_x509_certificate(session.attribute(handle, CKA_VALUE))
                    live = _spki_pem(cert) == rotation.old_public_key
                else:
                    live = copy_of_live
                if live:
                    raise TokenError(
                        f"id {object_id.hex()}, where the new identity goes, holds the live "
                        "key or certificate",
                        hint="the token holds the live identity under two ids: remove the copy "
                        "sota.toml does not name, or give the rotation other ids (PKEYIDS, CERTIDS)",
                    )
                session.destroy(handle)
                _written(f"{point}-{object_class}-{number}")

    def old_key(self, rotation) -> TokenKey:
        return self._key(bytes.fromhex(rotation.old_key_id))

    def old_certs(self, rotation) -> list:
        from . import certs

        path = self._cert_file(bytes.fromhex(rotation.old_cert_id))
        return certs.load_certs(path, f"the token's certificate {rotation.old_cert_id}")

    def identity(self, rotation, which: str) -> tuple[Path, Path]:
        if which == "old":
            return (self._cert_file(bytes.fromhex(rotation.old_cert_id)),
                    self._key_file(bytes.fromhex(rotation.old_key_id)))
        if which == "staged":
            return (self.journal.new_cert_path(rotation.rotation_id),
                    self._key_file(bytes.fromhex(rotation.new_key_id)))
        return (self._cert_file(bytes.fromhex(rotation.new_cert_id)),
                self._key_file(bytes.fromhex(rotation.new_key_id)))

    def install(self, rotation) -> None:
        from cryptography.hazmat.primitives import serialization

        from . import certs, pki

        cert_id = bytes.fromhex(rotation.new_cert_id)
        leaf = certs.load_certs(self.journal.new_cert_path(rotation.rotation_id))[0]
        self.new_key(rotation)  # sota.toml is about to name it: it must be in the token
        if _spki_pem(leaf) != rotation.new_public_key:
            raise TokenError(f"the issued certificate is not for the key at id {rotation.new_key_id}",
                             hint="move the rotation's journal (state.json) aside and rotate again")
        der = leaf.public_bytes(serialization.Encoding.DER)
        session = self.session()
        present = [h for h in self._find(session, CKO_CERTIFICATE, cert_id)
                   if session.attribute(h, CKA_VALUE) == der]
        if present:
            return
        self._clear(session, rotation, cert_id, (CKO_CERTIFICATE,), "finalize:p11-stale-cert")
        parts = pki.tbs_parts(leaf)
        with _storing(f"the new certificate at id {rotation.new_cert_id}"):
            session.create({
                CKA_CLASS: CKO_CERTIFICATE, CKA_CERTIFICATE_TYPE: CKC_X_509, CKA_TOKEN: True,
                CKA_PRIVATE: False, CKA_LABEL: CERT_LABEL, CKA_ID: cert_id,
                CKA_SUBJECT: parts.subject, CKA_ISSUER: parts.issuer,
                CKA_SERIAL_NUMBER: parts.serial, CKA_VALUE: der,
            })
        _written("finalize:p11-cert")

    def point_at(self, rotation, which: str) -> None:
        if which == "old":
            config.point_p11_at(self.root, self.sota, bytes.fromhex(rotation.old_key_id),
                                bytes.fromhex(rotation.old_cert_id), point="confirm:revert-sota")
        else:
            config.point_p11_at(self.root, self.sota, bytes.fromhex(rotation.new_key_id),
                                bytes.fromhex(rotation.new_cert_id), point="finalize:sota")

    def retire(self, rotation) -> None:
        from cryptography import x509

        self.new_key(rotation)  # the new pair must be there before the old one goes
        session = self.session()
        old_key, old_cert = bytes.fromhex(rotation.old_key_id), bytes.fromhex(rotation.old_cert_id)
        # Only what this rotation found live: objects put at the old ids since are someone else's.
        point = self._public_point(session, old_key)
        certificates = [x509.load_der_x509_certificate(session.attribute(h, CKA_VALUE))
                        for h in self._find(session, CKO_CERTIFICATE, old_cert)]
        if (point is not None and _point_pem(point) != rotation.old_public_key) or \
                any(_spki_pem(cert) != rotation.old_public_key for cert in certificates):
            raise TokenError(
                f"ids {rotation.old_key_id}/{rotation.old_cert_id} hold objects of another key than the "
                "one this rotation replaced: they are left alone",
                hint="check the token's objects (pkcs11-tool --list-objects); the rotation is done "
                "otherwise: remove the old objects by hand, then run certrotate rotate to close it",
            )
        # Private first: a crash after it leaves only public objects behind.
        for object_class, object_id, what in ((CKO_PRIVATE_KEY, old_key, "old-key"),
                                              (CKO_PUBLIC_KEY, old_key, "old-public-key"),
                                              (CKO_CERTIFICATE, old_cert, "old-cert")):
            for number, handle in enumerate(self._find(session, object_class, object_id)):
                session.destroy(handle)
                _written(f"retire:p11-{what}-{number}")
        for path in (self._identity_dir() / f"cert-{old_cert.hex()}.pem",
                     self._identity_dir() / f"key-{old_key.hex()}.pem"):
            fsutil.delete_public(path, point=f"retire:{path.stem}")

    def live_identity(self) -> tuple[Path, Path]:
        return self._cert_file(self.p11.cert_id), self._key_file(self.p11.key_id)

    def live_cert_file(self) -> Path:
        return self._cert_file(self.p11.cert_id)

    def work_dirs(self) -> set[Path]:
        return {self.journal.dir / _IDENTITY_DIR}

    def describe(self) -> dict:
        return {"file": f"pkcs11:token={self.p11.label};id=%{self.p11.cert_id.hex()};type=cert",
                "key_file": f"pkcs11:token={self.p11.label};id=%{self.p11.key_id.hex()};type=private"}

    def names(self, rotation) -> tuple[tuple, tuple, tuple]:
        return ((rotation.old_key_id, rotation.old_cert_id), (rotation.new_key_id, rotation.new_cert_id),
                (self.p11.key_id.hex(), self.p11.cert_id.hex()))


def _written(point: str) -> None:
    """After a token write: make it durable before anything records it. A token
    that keeps its objects in files (SoftHSM2) may leave them in the page cache,
    which a power cut loses; sync() costs little on a device's quiet disk."""
    os.sync()
    crashpoints.reach(point)


@contextlib.contextmanager
def _storing(what: str):
    """A failed write to the token, said as such: a full token answers CKR_DEVICE_MEMORY,
    or (SoftHSM on a full filesystem) only CKR_FUNCTION_FAILED."""
    try:
        yield
    except TokenError as err:
        if err.code in _NOT_STORED:
            raise TokenError(
                f"the token could not store {what}: {err}",
                hint="the token may be full: see what it holds (pkcs11-tool --list-objects) and "
                "remove objects sota.toml does not name, or free the storage of a software token; "
                "then run certrotate rotate again, the rotation resumes at this step and the "
                "device keeps its current identity meanwhile",
                code=err.code,
            ) from err
        raise


def _key_templates(key_id: bytes, label: bytes) -> tuple[dict, dict]:
    """The new pair's attributes, as fioconfig's crypto11 makes them: sign for TLS,
    derive for go-ecies; the private half sensitive and never extractable. CKA_PRIVATE
    is said outright (crypto11 leaves it to the token's default, TRUE on every token seen)."""
    common = {CKA_TOKEN: True, CKA_ID: key_id, CKA_LABEL: label, CKA_KEY_TYPE: CKK_EC, CKA_DERIVE: True}
    public = {**common, CKA_CLASS: CKO_PUBLIC_KEY, CKA_EC_PARAMS: _P256, CKA_VERIFY: True}
    private = {**common, CKA_CLASS: CKO_PRIVATE_KEY, CKA_PRIVATE: True, CKA_SENSITIVE: True,
               CKA_EXTRACTABLE: False, CKA_SIGN: True}
    return public, private


def _unwrap_point(value: bytes) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING around the point (some modules give it bare)."""
    if value[:1] == b"\x04" and len(value) in (65, 97, 133):
        return value
    if value[:1] == b"\x04" and len(value) > 2:
        header = 2 if value[1] < 0x80 else 2 + (value[1] & 0x7F)
        return value[header:]
    return value


def _spki_pem(cert) -> str:
    from . import certs

    return certs.public_key_pem(cert.public_key())


def _point_pem(point: bytes) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec

    from . import certs

    return certs.public_key_pem(ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point))


def _pem(label: str, der: bytes) -> bytes:
    """PEM by hand: ``check``'s fast path exports the certificate without importing cryptography."""
    import base64

    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return b"".join([f"-----BEGIN {label}-----\n".encode(), *(line + b"\n" for line in lines),
                     f"-----END {label}-----\n".encode()])
