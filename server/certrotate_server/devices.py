"""Device registry, config files, deny-list and events: the logic shared by the
gateway, the EST server and the operator CLI."""

from __future__ import annotations

import json
import re
import time

from cryptography import x509

from . import pki
from .store import Store, utcnow

FIO_ROTATE_CERTS = "fio-rotate-certs"
RENEW_HANDLER = "/usr/share/fioconfig/handlers/renew-client-cert"
# Used with fullmatch: `$` would also match before a trailing newline.
DEVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
CONFIG_NAME = re.compile(r"[A-Za-z0-9._-]{1,255}")
# Quotas, so that no device (or operator typo) can grow the database without
# bound. A scope's config, as served, stays far below the agent's 1 MiB reply
# limit even when factory, group and device files are merged.
CONFIG_FILES_PER_SCOPE = 64
CONFIG_BYTES_PER_SCOPE = 256 * 1024
EVENTS_KEPT_PER_DEVICE = 1000  # the oldest are dropped beyond this
EVENT_TEXT_LIMIT = 8 * 1024  # bytes of text one event may store


class DeviceError(Exception):
    """A refused operation; `status` is the HTTP status that reports it."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def check_device_name(name: str) -> str:
    if not DEVICE_NAME.fullmatch(name or ""):
        raise DeviceError(
            400,
            f"device name {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
        )
    return name


def get_device(store: Store, name: str):
    return store.query_one("SELECT * FROM devices WHERE name = ?", (name,))


def require_device(store: Store, name: str):
    row = get_device(store, name)
    if row is None:
        raise DeviceError(404, f"unknown device {name!r}; register it with `certrotate-server devices register`")
    return row


def record_certificate(conn, cert: x509.Certificate, device: str, issued_by: str) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO certificates (fingerprint, serial, device, pubkey, not_after, issued_at, "
        "issued_by, issuer) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            pki.fingerprint(cert),
            format(cert.serial_number, "x"),
            device,
            pki.pubkey_pem(cert.public_key()),
            cert.not_valid_after_utc.isoformat(),
            utcnow(),
            issued_by,
            cert.issuer.rfc4514_string(),
        ),
    )


def add_device(conn, name: str, cert: x509.Certificate, group: str | None, issued_by: str) -> None:
    conn.execute(
        "INSERT INTO devices (name, pubkey, group_name, created_at) VALUES (?, ?, ?, ?)",
        (name, pki.pubkey_pem(cert.public_key()), group, utcnow()),
    )
    record_certificate(conn, cert, name, issued_by)


def device_json(row) -> dict:
    return {
        "name": row["name"],
        "group": row["group_name"],
        "pubkey": row["pubkey"],
        "next_pubkey": row["next_pubkey"],
        "created-at": row["created_at"],
        "pubkey-changed-at": row["pubkey_changed_at"],
        "config-locked": row["next_pubkey"] is not None,
    }


def is_denied(store: Store, cert: x509.Certificate) -> bool:
    return store.query_one("SELECT 1 FROM deny_list WHERE fingerprint = ?", (pki.fingerprint(cert),)) is not None


def authenticate(store: Store, cert: x509.Certificate) -> str:
    """The device a gateway client certificate stands for, or DeviceError.

    The certificate is already verified against the device CA by the TLS
    handshake; here: deny-list first, then the key: the device's current key, or
    its announced next key, whose first use makes it current.
    """
    if is_denied(store, cert):
        raise DeviceError(403, "this certificate is deny-listed (it was replaced by a key rotation); use the device's current certificate")
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not cns:
        raise DeviceError(403, "client certificate has no Subject CN; the CN names the device")
    name = str(cns[0].value)
    row = get_device(store, name)
    if row is None:
        raise DeviceError(403, f"unknown device {name!r}: not registered with this factory")
    key = pki.pubkey_pem(cert.public_key())
    if key == row["pubkey"]:
        return name
    if key == row["next_pubkey"]:
        promote_next_key(store, name, cert)
        return name
    raise DeviceError(
        403,
        f"certificate key is not the current key of device {name!r} nor one it announced "
        "with PATCH /device {next_pubkey}; announce the key before using it",
    )


def promote_next_key(store: Store, name: str, cert: x509.Certificate) -> None:
    key = pki.pubkey_pem(cert.public_key())
    with store.transaction() as conn:
        row = conn.execute("SELECT * FROM devices WHERE name = ?", (name,)).fetchone()
        if row["pubkey"] == key:
            return  # a concurrent request of the same device got here first
        if row["next_pubkey"] != key:
            raise DeviceError(403, f"announced key of device {name!r} changed meanwhile; retry")
        old_key = row["pubkey"]
        now = utcnow()
        conn.execute(
            "UPDATE devices SET pubkey = ?, next_pubkey = NULL, pubkey_changed_at = ? WHERE name = ?",
            (key, now, name),
        )
        record_certificate(conn, cert, name, "gateway")
        # Every other certificate of the device, not only the old key's: one minted for
        # a spare key before the rotation must not outlive it.
        old = conn.execute(
            "SELECT fingerprint, serial FROM certificates WHERE device = ? AND pubkey != ?", (name, key)
        ).fetchall()
        for cert_row in old:
            conn.execute(
                "INSERT OR IGNORE INTO deny_list VALUES (?, ?, ?, ?, ?)",
                (cert_row["fingerprint"], cert_row["serial"], name, "key rotated", now),
            )
        store.add_factory_event(
            conn,
            "DEVICE_PUBKEY_CHANGE",
            name,
            {
                "device": name,
                "old-pubkey": old_key,
                "new-pubkey": key,
                "new-serial": format(cert.serial_number, "x"),
                "deny-listed-serials": [r["serial"] for r in old],
            },
        )


def parse_pubkey(value, field: str) -> str:
    """Canonical PEM of a public key sent as JSON field `field`."""
    if not isinstance(value, str):
        raise DeviceError(400, f'"{field}" must be a PEM public key string')
    try:
        return pki.normalize_pubkey_pem(value)
    except pki.PkiError as err:
        raise DeviceError(400, f"{field}: {err}") from None


def announce_next_key(store: Store, name: str, pubkey_text) -> dict:
    key = parse_pubkey(pubkey_text, "next_pubkey")
    with store.transaction() as conn:
        row = conn.execute("SELECT * FROM devices WHERE name = ?", (name,)).fetchone()
        if key == row["pubkey"]:
            raise DeviceError(400, "next_pubkey is the device's current key; announce the new key")
        conn.execute("UPDATE devices SET next_pubkey = ? WHERE name = ?", (key, name))
        row = conn.execute("SELECT * FROM devices WHERE name = ?", (name,)).fetchone()
    return device_json(row)


# Config files -------------------------------------------------------------
def parse_config_files(files) -> list[dict]:
    """Validate fioctl/fioconfig ConfigFileReq entries: name, value, unencrypted, on-changed."""
    if not isinstance(files, list) or not files:
        raise DeviceError(400, '"files" must be a non-empty list of {"name", "value", "unencrypted", "on-changed"}')
    parsed = []
    for entry in files:
        if not isinstance(entry, dict):
            raise DeviceError(400, "each entry of \"files\" must be an object")
        name = entry.get("name")
        value = entry.get("value")
        on_changed = entry.get("on-changed") or []
        unencrypted = entry.get("unencrypted", False)
        if not isinstance(name, str) or not CONFIG_NAME.fullmatch(name):
            raise DeviceError(400, f"config file name {name!r} is not allowed: use letters, digits, '.', '_' or '-'")
        if not isinstance(value, str):
            raise DeviceError(400, f"config file {name}: \"value\" must be a string")
        if not isinstance(unencrypted, bool):
            raise DeviceError(400, f"config file {name}: \"unencrypted\" must be true or false")
        if not isinstance(on_changed, list) or not all(isinstance(a, str) for a in on_changed):
            raise DeviceError(400, f"config file {name}: \"on-changed\" must be a list of strings")
        parsed.append({"name": name, "value": value, "unencrypted": unencrypted, "on-changed": on_changed})
    return parsed


def store_config_files(conn, scope: str, owner: str, files: list[dict], reason: str) -> None:
    now = utcnow()
    before = _config_usage(conn, scope, owner)
    for f in files:
        conn.execute(
            "INSERT OR REPLACE INTO config_files VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (scope, owner, f["name"], f["value"], int(f["unencrypted"]), json.dumps(f["on-changed"]), reason, now),
        )
    _check_config_quota(scope, owner, before, _config_usage(conn, scope, owner))
    # Never moves back, even if the server's clock does: a device then downloads once too often.
    conn.execute(
        "INSERT INTO config_changes VALUES (?, ?, ?) ON CONFLICT (scope, owner) "
        "DO UPDATE SET changed_at = MAX(changed_at, excluded.changed_at)",
        (scope, owner, time.time()),
    )


def _config_usage(conn, scope: str, owner: str) -> tuple[int, int]:
    """(files, bytes as served) of one scope's config."""
    rows = conn.execute("SELECT * FROM config_files WHERE scope = ? AND owner = ?", (scope, owner)).fetchall()
    return len(rows), len(json.dumps(_fioconfig_map(rows)))


def _check_config_quota(scope: str, owner: str, before: tuple[int, int], after: tuple[int, int]) -> None:
    """Refuse a change that grows a scope past a quota; one that does not grow it passes,
    so a scope already over (quotas came later) can still be rewritten, by a rotation too."""
    where = f"{scope} {owner!r}" if owner else scope
    (files_before, size_before), (files, size) = before, after
    if files > CONFIG_FILES_PER_SCOPE and files > files_before:
        raise DeviceError(413, f"the {where} config would hold {files} files, over its quota of "
                          f"{CONFIG_FILES_PER_SCOPE}; put several values in one file")
    if size > CONFIG_BYTES_PER_SCOPE and size > size_before:
        raise DeviceError(413, f"the {where} config would be {size} bytes, over its quota of "
                          f"{CONFIG_BYTES_PER_SCOPE}; keep large content out of config files")


def _config_scopes(row) -> list[tuple[str, str]]:
    """The (scope, owner) pairs whose files make up a device's config, weakest first."""
    scopes = [("factory", "")]
    if row["group_name"]:
        scopes.append(("group", row["group_name"]))
    return scopes + [("device", row["name"])]


def config_changed_at(store: Store, row) -> float:
    """Server time (seconds) of the last change to any file of the device's merged config; 0 if none."""
    scopes = _config_scopes(row)
    found = store.query_one(
        "SELECT MAX(changed_at) AS changed FROM config_changes WHERE "
        + " OR ".join(["(scope = ? AND owner = ?)"] * len(scopes)),
        [part for scope in scopes for part in scope],
    )
    return found["changed"] or 0.0


def _fioconfig_map(rows) -> dict:
    """fioconfig's wire shape: name -> {"Value", "OnChanged", "Unencrypted"}."""
    return {
        r["name"]: {"Value": r["value"], "OnChanged": json.loads(r["on_changed"]), "Unencrypted": bool(r["unencrypted"])}
        for r in rows
    }


def device_config(store: Store, name: str) -> dict:
    return _fioconfig_map(
        store.query("SELECT * FROM config_files WHERE scope = 'device' AND owner = ? ORDER BY name", (name,))
    )


def merged_config(store: Store, row) -> dict:
    """Factory files, overridden by the device's group files, overridden by its own."""
    merged = {}
    for scope, owner in _config_scopes(row):
        merged.update(
            _fioconfig_map(
                store.query(
                    "SELECT * FROM config_files WHERE scope = ? AND owner = ? ORDER BY name", (scope, owner)
                )
            )
        )
    return merged


def device_config_upload(store: Store, name: str, body) -> int:
    """PATCH /config from a device. While its config is locked by an announced key,
    only the rotation's own upload (carrying that key as "public-key") is accepted."""
    if not isinstance(body, dict):
        raise DeviceError(400, 'body must be {"reason", "files": [...], "public-key"?}')
    files = parse_config_files(body.get("files"))
    reason = body.get("reason") or ""
    if not isinstance(reason, str):
        raise DeviceError(400, '"reason" must be a string')
    public_key = body.get("public-key")
    if public_key is not None:
        public_key = parse_pubkey(public_key, "public-key")
    with store.transaction() as conn:
        row = conn.execute("SELECT * FROM devices WHERE name = ?", (name,)).fetchone()
        if row["next_pubkey"] is not None:
            if public_key != row["next_pubkey"]:
                raise DeviceError(
                    409,
                    "device configuration is locked by a certificate rotation in progress; "
                    "only the upload re-encrypted to the announced key is accepted",
                )
        elif public_key is not None and public_key != row["pubkey"]:
            raise DeviceError(409, "public-key is neither the device's announced nor its current key")
        store_config_files(conn, "device", name, files, reason)
    return len(files)


def operator_set_config(store: Store, scope: str, owner: str, files: list[dict], reason: str) -> None:
    """Operator change; refused for a device whose config is locked by a rotation."""
    with store.transaction() as conn:
        if scope == "device":
            row = conn.execute("SELECT next_pubkey FROM devices WHERE name = ?", (owner,)).fetchone()
            if row is None:
                raise DeviceError(404, f"unknown device {owner!r}")
            if row["next_pubkey"] is not None:
                raise DeviceError(
                    409,
                    f"device {owner!r} is rotating its key (config locked until it connects with the new "
                    "certificate); retry after the rotation completes",
                )
        store_config_files(conn, scope, owner, files, reason)


def rotate_certs_file(est_server: str, rotation_id: str) -> dict:
    """The fio-rotate-certs config file exactly as fioctl's RotateCertOptions.AsConfig builds it."""
    value = f"ESTSERVER={est_server}\nPKEYIDS=01,07\nCERTIDS=03,09\nROTATIONID={rotation_id}\n"
    return {"name": FIO_ROTATE_CERTS, "value": value, "unencrypted": True, "on-changed": [RENEW_HANDLER]}


# Events ---------------------------------------------------------------------
def store_device_events(store: Store, name: str, events) -> int:
    if not isinstance(events, list):
        raise DeviceError(400, "body must be a JSON array of events")
    if len(events) > EVENTS_KEPT_PER_DEVICE:
        raise DeviceError(413, f"{len(events)} events in one post, over the quota of {EVENTS_KEPT_PER_DEVICE} "
                          "kept per device; post them in smaller batches")
    rows = []
    for ev in events:
        if not isinstance(ev, dict):
            raise DeviceError(400, "each event must be an object")
        event_type = ev.get("eventType")
        detail = ev.get("event")
        if not isinstance(ev.get("id"), str) or not ev["id"]:
            raise DeviceError(400, 'event "id" must be a non-empty string (a UUID)')
        if not isinstance(event_type, dict) or not isinstance(event_type.get("id"), str):
            raise DeviceError(400, f'event {ev["id"]}: "eventType" must be {{"id": "<name>", "version": N}}')
        if not isinstance(detail, dict):
            raise DeviceError(400, f'event {ev["id"]}: "event" must be an object')
        success = detail.get("success")
        if success is not None and not isinstance(success, bool):
            raise DeviceError(400, f'event {ev["id"]}: "success" must be true, false or absent')
        version = event_type.get("version", 0)
        row = (
            name, ev["id"], str(detail.get("correlationId") or ""), event_type["id"],
            version if isinstance(version, int) else 0, str(ev.get("deviceTime") or ""),
            None if success is None else int(success), str(detail.get("targetName") or ""),
            str(detail.get("version") or ""), str(detail.get("details") or ""), utcnow(),
        )
        if sum(len(field.encode()) for field in row if isinstance(field, str)) > EVENT_TEXT_LIMIT:
            raise DeviceError(413, f"event {ev['id'][:64]!r} holds more than {EVENT_TEXT_LIMIT} bytes of text; "
                              "shorten its details")
        rows.append(row)
    with store.transaction() as conn:
        # Retried posts carry the same ids: stored once.
        conn.executemany("INSERT OR IGNORE INTO device_events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.execute(
            "DELETE FROM device_events WHERE device = ? AND rowid NOT IN "
            "(SELECT rowid FROM device_events WHERE device = ? ORDER BY rowid DESC LIMIT ?)",
            (name, name, EVENTS_KEPT_PER_DEVICE),
        )
    return len(rows)
