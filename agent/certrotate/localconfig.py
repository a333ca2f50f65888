"""fioconfig's config maps: ``{name: {"Value", "OnChanged", "Unencrypted"}}``.

Values not marked Unencrypted hold base64 of a go-ecies ciphertext for the
device key. Re-encrypting a map for a new key is what steps 3 and 4 do, and
what the confirm step undoes when the gateway refuses the new certificate.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Iterable

from . import ecies


class ConfigFileError(Exception):
    def __init__(self, message: str, *, hint: str):
        super().__init__(message)
        self.hint = hint


def parse(data: bytes, origin: str) -> dict:
    try:
        config = json.loads(data)
    except ValueError as err:
        raise ConfigFileError(f"{origin} is not JSON: {err}", hint=f"check {origin}") from err
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise ConfigFileError(
            f"{origin} is not a fioconfig map of name -> {{Value, OnChanged, Unencrypted}}",
            hint=f"check {origin}",
        )
    return config


def dump(config: dict) -> bytes:
    return json.dumps(config, indent=2, sort_keys=True).encode() + b"\n"


def decrypt_value(entry: dict, key) -> bytes:
    """The plaintext of one encrypted entry; raises ecies.EciesError if ``key`` is not its key."""
    try:
        ciphertext = base64.b64decode(entry.get("Value", ""), validate=False)
    except (binascii.Error, TypeError) as err:
        raise ecies.EciesError(f"value is not base64: {err}") from err
    return ecies.decrypt(key, ciphertext)


def encrypted_for(config: dict, key) -> bool:
    """True when every encrypted value of ``config`` decrypts with ``key``."""
    try:
        for entry in config.values():
            if not entry.get("Unencrypted"):
                decrypt_value(entry, key)
    except ecies.EciesError:
        return False
    return True


def reencrypt(config: dict, readers: Iterable, public_key, origin: str) -> dict:
    """``config`` with every encrypted value decrypted by one of ``readers`` and
    encrypted again for ``public_key``; unencrypted entries are kept as they are."""
    readers = list(readers)
    result = {}
    for name, entry in config.items():
        entry = dict(entry)
        if not entry.get("Unencrypted"):
            plaintext = None
            for key in readers:
                try:
                    plaintext = decrypt_value(entry, key)
                    break
                except ecies.EciesError:
                    continue
            if plaintext is None:
                raise ConfigFileError(
                    f"{origin}: {name} decrypts with neither the old nor the new device key",
                    hint="the config was encrypted for another key; re-send it from the server "
                    "(fioctl devices config set) after the rotation",
                )
            entry["Value"] = base64.b64encode(ecies.encrypt(public_key, plaintext)).decode()
        result[name] = entry
    return result
