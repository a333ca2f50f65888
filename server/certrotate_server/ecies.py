"""go-ecies (FoundriesFactory's config encryption), P-256.

Ciphertext = R (uncompressed ephemeral public point, 65 bytes) || IV (16)
|| AES-128-CTR(ciphertext) || HMAC-SHA256 tag (32) over IV || ciphertext.
K = SHA-256(00000001 || z) (NIST SP 800-56 concat KDF, one block, no shared
info); AES key = K[:16]; MAC key = SHA-256(K[16:]).
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

POINT_LEN = 65
IV_LEN = 16
TAG_LEN = 32


class EciesError(Exception):
    """The ciphertext is malformed or was not encrypted to this key."""


def _keys(shared_x: bytes) -> tuple[bytes, bytes]:
    k = hashlib.sha256(b"\x00\x00\x00\x01" + shared_x).digest()
    return k[:16], hashlib.sha256(k[16:]).digest()


def _ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    ctx = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return ctx.update(data) + ctx.finalize()


def encrypt(public_key: ec.EllipticCurvePublicKey, message: bytes) -> bytes:
    if not isinstance(public_key.curve, ec.SECP256R1):
        raise EciesError("only P-256 device keys are supported")
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    aes_key, mac_key = _keys(ephemeral.exchange(ec.ECDH(), public_key))
    iv = os.urandom(IV_LEN)
    body = iv + _ctr(aes_key, iv, message)
    point = ephemeral.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return point + body + hmac.new(mac_key, body, hashlib.sha256).digest()


def decrypt(private_key: ec.EllipticCurvePrivateKey, ciphertext: bytes) -> bytes:
    if len(ciphertext) < POINT_LEN + IV_LEN + TAG_LEN or ciphertext[0] != 4:
        raise EciesError("ciphertext too short or not starting with an uncompressed point")
    try:
        ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ciphertext[:POINT_LEN])
    except ValueError as err:
        raise EciesError(f"bad ephemeral point: {err}") from None
    aes_key, mac_key = _keys(private_key.exchange(ec.ECDH(), ephemeral))
    body, tag = ciphertext[POINT_LEN:-TAG_LEN], ciphertext[-TAG_LEN:]
    if not hmac.compare_digest(hmac.new(mac_key, body, hashlib.sha256).digest(), tag):
        raise EciesError("authentication tag mismatch: wrong key or corrupted ciphertext")
    return _ctr(aes_key, body[:IV_LEN], body[IV_LEN:])
