"""ECIES as foundriesio/go-ecies does it, for fioconfig's encrypted config values.

Ciphertext = R (ephemeral public key, uncompressed point) || IV (16 bytes)
|| AES-CTR ciphertext || HMAC tag over IV || ciphertext. z = x-coordinate of
ECDH(R, device key); K = NIST SP 800-56 concatenation KDF (counter from 1,
then z, no other info); the first half of K is the AES key, the hash of the
second half the HMAC key. The curve picks the suite: P-256 (the device
keys' curve) AES-128 and SHA-256, P-384 AES-192 and SHA-384, P-521 AES-256
and SHA-512.
"""

from __future__ import annotations

import hmac
import os

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

IV_SIZE = 16

# curve name -> (AES key bytes, hash)
_SUITES = {
    "secp256r1": (16, hashes.SHA256),
    "secp384r1": (24, hashes.SHA384),
    "secp521r1": (32, hashes.SHA512),
}


class EciesError(Exception):
    """A ciphertext that cannot be decrypted with this key, or an unsupported key."""


def encrypt(public_key: ec.EllipticCurvePublicKey, plaintext: bytes) -> bytes:
    key_size, hash_type = _suite(public_key.curve)
    ephemeral = ec.generate_private_key(public_key.curve)
    aes_key, mac_key = _derive(ephemeral.exchange(ec.ECDH(), public_key), key_size, hash_type)
    iv = os.urandom(IV_SIZE)
    encryptor = Cipher(algorithms.AES(aes_key), modes.CTR(iv)).encryptor()
    body = iv + encryptor.update(plaintext) + encryptor.finalize()
    point = ephemeral.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return point + body + _tag(mac_key, body, hash_type)


def decrypt(private_key: ec.EllipticCurvePrivateKey, ciphertext: bytes) -> bytes:
    key_size, hash_type = _suite(private_key.curve)
    point_size = 1 + 2 * ((private_key.curve.key_size + 7) // 8)
    tag_size = hash_type.digest_size
    if len(ciphertext) < point_size + IV_SIZE + tag_size:
        raise EciesError(f"ciphertext of {len(ciphertext)} bytes is too short")
    if ciphertext[0] != 0x04:
        raise EciesError("ciphertext does not start with an uncompressed ephemeral public key")
    try:
        ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(
            private_key.curve, ciphertext[:point_size]
        )
    except ValueError as err:
        raise EciesError(f"the ephemeral public key is not on the curve ({err})") from err
    body, tag = ciphertext[point_size:-tag_size], ciphertext[-tag_size:]
    aes_key, mac_key = _derive(private_key.exchange(ec.ECDH(), ephemeral), key_size, hash_type)
    if not hmac.compare_digest(tag, _tag(mac_key, body, hash_type)):
        raise EciesError("message authentication failed: wrong key, or the ciphertext was altered")
    decryptor = Cipher(algorithms.AES(aes_key), modes.CTR(body[:IV_SIZE])).decryptor()
    return decryptor.update(body[IV_SIZE:]) + decryptor.finalize()


def _suite(curve: ec.EllipticCurve) -> tuple[int, type[hashes.HashAlgorithm]]:
    try:
        return _SUITES[curve.name]
    except KeyError:
        raise EciesError(f"go-ecies does not support curve {curve.name}") from None


def _derive(shared: bytes, key_size: int, hash_type) -> tuple[bytes, bytes]:
    """Concatenation KDF (counter || z), split into the AES key and the MAC key."""
    material = b""
    counter = 1
    while len(material) < 2 * key_size:
        digest = hashes.Hash(hash_type())
        digest.update(counter.to_bytes(4, "big") + shared)
        material += digest.finalize()
        counter += 1
    mac_digest = hashes.Hash(hash_type())
    mac_digest.update(material[key_size:2 * key_size])
    return material[:key_size], mac_digest.finalize()


def _tag(mac_key: bytes, body: bytes, hash_type) -> bytes:
    return hmac.new(mac_key, body, hash_type.name).digest()
