"""go-ecies compatibility: every published P-256 vector decrypts; encrypt round-trips."""

import json
import string
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from certrotate_server import ecies

VECTORS = Path(__file__).resolve().parents[3] / "shared/vectors/go-ecies/encrypt-decrypt.json"
DIGITS = string.digits + string.ascii_lowercase + string.ascii_uppercase


def base62(text: str) -> int:
    value = 0
    for ch in text:
        value = value * 62 + DIGITS.index(ch)
    return value


def p256_vectors():
    if not VECTORS.exists():
        pytest.skip(f"go-ecies test vectors not found at {VECTORS}")
    return [v for v in json.loads(VECTORS.read_text()).values() if v["Curve"] == "P-256"]


def test_decrypts_every_p256_vector():
    vectors = p256_vectors()
    assert len(vectors) == 20
    for v in vectors:
        key = ec.derive_private_key(base62(v["Private"]["PD"]), ec.SECP256R1())
        assert key.public_key().public_numbers().x == base62(v["Private"]["PX"])
        assert ecies.decrypt(key, bytes.fromhex(v["Message"]["Enc"])) == bytes.fromhex(v["Message"]["Dec"])


def test_encrypt_round_trip_and_tamper():
    key = ec.generate_private_key(ec.SECP256R1())
    ciphertext = ecies.encrypt(key.public_key(), b"secret config")
    assert len(ciphertext) == 65 + 16 + len(b"secret config") + 32
    assert ecies.decrypt(key, ciphertext) == b"secret config"
    tampered = bytearray(ciphertext)
    tampered[70] ^= 1
    with pytest.raises(ecies.EciesError, match="tag mismatch"):
        ecies.decrypt(key, bytes(tampered))
    with pytest.raises(ecies.EciesError, match="tag mismatch"):
        ecies.decrypt(ec.generate_private_key(ec.SECP256R1()), ciphertext)
