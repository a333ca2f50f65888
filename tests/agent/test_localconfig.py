import base64
import json

import pytest

from certrotate import certs, ecies, localconfig
from pki import TestPki, cert_pem, key_pem, new_key


def encrypted_map(key, values, plain=None):
    config = {name: {"Value": base64.b64encode(ecies.encrypt(key.public_key(), v.encode())).decode(),
                     "OnChanged": ["/usr/bin/true"], "Unencrypted": False} for name, v in values.items()}
    for name, value in (plain or {}).items():
        config[name] = {"Value": value, "OnChanged": [], "Unencrypted": True}
    return config


def plaintexts(config, key):
    return {name: localconfig.decrypt_value(entry, key).decode()
            for name, entry in config.items() if not entry["Unencrypted"]}


def test_reencrypt_moves_every_encrypted_value_to_the_new_key():
    old, new = new_key(), new_key()
    config = encrypted_map(old, {"a": "1", "b": "2"}, plain={"c": "visible"})
    moved = localconfig.reencrypt(config, [old, new], new.public_key(), "test")
    assert plaintexts(moved, new) == {"a": "1", "b": "2"}
    assert moved["c"] == config["c"] and moved["a"]["OnChanged"] == ["/usr/bin/true"]
    assert localconfig.encrypted_for(moved, new) and not localconfig.encrypted_for(moved, old)
    # Half-moved (a crash in between) still completes: each value is read by whichever key opens it.
    mixed = {"a": moved["a"], "b": config["b"]}
    assert plaintexts(localconfig.reencrypt(mixed, [old, new], new.public_key(), "t"), new) == {"a": "1", "b": "2"}


def test_value_for_another_key_is_a_clear_error():
    config = encrypted_map(new_key(), {"a": "1"})
    with pytest.raises(localconfig.ConfigFileError, match="a decrypts with neither") as err:
        localconfig.reencrypt(config, [new_key()], new_key().public_key(), "config.encrypted")
    assert "re-send" in err.value.hint


@pytest.mark.parametrize("data", [b"not json", b"[1, 2]", b'{"a": "b"}'])
def test_parse_rejects_what_is_not_a_fioconfig_map(data):
    with pytest.raises(localconfig.ConfigFileError):
        localconfig.parse(data, "config.encrypted")


def test_dump_parse_roundtrip():
    config = encrypted_map(new_key(), {"x": "y"})
    assert localconfig.parse(localconfig.dump(config), "t") == config
    assert json.loads(localconfig.dump(config)) == config


def test_certs_chain_and_key_files(tmp_path):
    pki = TestPki()
    identity = pki.device()
    chain = tmp_path / "client.pem"
    chain.write_bytes(pki.device_chain_pem(identity))
    loaded = certs.load_certs(chain)
    assert loaded == [identity.cert, pki.device_ca.cert]
    assert certs.certs_pem(loaded) == pki.device_chain_pem(identity)
    key_file = tmp_path / "pkey.pem"
    key_file.write_bytes(key_pem(identity.key))
    assert certs.key_pem(certs.load_key(key_file)) == key_pem(identity.key)
    key_file.write_bytes(cert_pem(identity.cert))
    with pytest.raises(certs.KeyFileError) as err:
        certs.load_key(key_file)
    assert "BEGIN" not in str(err.value)  # never echoes the file's content
    with pytest.raises(certs.KeyFileError, match="is missing"):
        certs.load_certs(tmp_path / "missing.pem")
