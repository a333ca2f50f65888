"""certrotate.ecies: go-ecies's published vectors, round trips, tampering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from certrotate import ecies

CHECKOUT = Path(__file__).resolve().parents[2]
VECTORS = CHECKOUT.parent / "shared" / "vectors" / "go-ecies" / "encrypt-decrypt.json"
CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}
BASE62 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def base62(text: str) -> int:
    """Go's big.Int Text(62) back to an integer."""
    value = 0
    for digit in text:
        value = value * 62 + BASE62.index(digit)
    return value


def load_vectors() -> list[tuple[str, dict]]:
    if not VECTORS.exists():
        return []
    return sorted(json.loads(VECTORS.read_text()).items())


VECTOR_LIST = load_vectors()


def vector_key(vector: dict) -> ec.EllipticCurvePrivateKey:
    private = vector["Private"]
    key = ec.derive_private_key(base62(private["PD"]), CURVES[vector["Curve"]]())
    numbers = key.public_key().public_numbers()
    assert (numbers.x, numbers.y) == (base62(private["PX"]), base62(private["PY"]))
    return key


def test_vector_file_holds_twenty_p256_vectors():
    if not VECTOR_LIST:
        pytest.skip(f"go-ecies vectors absent: {VECTORS} does not exist")
    assert sum(v["Curve"] == "P-256" for _, v in VECTOR_LIST) == 20


@pytest.mark.parametrize(
    "name,vector", VECTOR_LIST or [pytest.param("none", {}, marks=pytest.mark.skip(
        reason=f"go-ecies vectors absent: {VECTORS} does not exist"))]
)
def test_decrypts_go_ecies_vector(name, vector):
    key = vector_key(vector)
    plaintext = ecies.decrypt(key, bytes.fromhex(vector["Message"]["Enc"]))
    assert plaintext == bytes.fromhex(vector["Message"]["Dec"])


@pytest.mark.parametrize("curve", [ec.SECP256R1, ec.SECP384R1, ec.SECP521R1])
@pytest.mark.parametrize("plaintext", [b"", b"x", b"device config value\n" * 50])
def test_round_trip(curve, plaintext):
    key = ec.generate_private_key(curve())
    ciphertext = ecies.encrypt(key.public_key(), plaintext)
    assert ecies.decrypt(key, ciphertext) == plaintext
    assert ecies.encrypt(key.public_key(), plaintext) != ciphertext  # fresh R and IV


def test_p256_layout():
    key = ec.generate_private_key(ec.SECP256R1())
    ciphertext = ecies.encrypt(key.public_key(), b"12345")
    assert ciphertext[0] == 0x04
    assert len(ciphertext) == 65 + 16 + 5 + 32


@pytest.mark.parametrize("position", [65 + 3, 65 + 16 + 2, -1, -40])  # IV, body, tag
def test_tampering_is_rejected(position):
    key = ec.generate_private_key(ec.SECP256R1())
    ciphertext = bytearray(ecies.encrypt(key.public_key(), b"secret value " * 4))
    ciphertext[position] ^= 0x01
    with pytest.raises(ecies.EciesError, match="authentication failed"):
        ecies.decrypt(key, bytes(ciphertext))


def test_wrong_key_is_rejected():
    key = ec.generate_private_key(ec.SECP256R1())
    ciphertext = ecies.encrypt(key.public_key(), b"value")
    with pytest.raises(ecies.EciesError, match="wrong key"):
        ecies.decrypt(ec.generate_private_key(ec.SECP256R1()), ciphertext)


def test_damaged_ephemeral_key_is_rejected():
    key = ec.generate_private_key(ec.SECP256R1())
    ciphertext = bytearray(ecies.encrypt(key.public_key(), b"value"))
    ciphertext[10] ^= 0xFF
    with pytest.raises(ecies.EciesError, match="not on the curve"):
        ecies.decrypt(key, bytes(ciphertext))


@pytest.mark.parametrize("ciphertext", [b"", b"\x04" * 112, b"\x02" + b"\x00" * 200])
def test_malformed_ciphertext_is_rejected(ciphertext):
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ecies.EciesError):
        ecies.decrypt(key, ciphertext)


def test_unsupported_curve():
    key = ec.generate_private_key(ec.SECP256K1())
    with pytest.raises(ecies.EciesError, match="does not support curve secp256k1"):
        ecies.encrypt(key.public_key(), b"x")
