"""certrotate-server: factory init, serve, and the operator commands."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sqlite3
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from certrotate import ecies

from . import devices, pki, rollover
from .devices import DeviceError
from .factory import DEFAULT_FACTORY, DEFAULT_HOSTNAMES, Factory, FactoryError, init_factory, write_device_tree
from .httpbase import ConnectionLimits, HttpError, listen_address
from .store import Store

EXIT_USAGE = 2
EXIT_REFUSED = 1


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_REFUSED):
        super().__init__(message)
        self.code = code


def _factory(args) -> Factory:
    if not args.dir:
        raise CliError("no factory directory: pass --dir DIR (or set CERTROTATE_SERVER_DIR)", EXIT_USAGE)
    try:
        return Factory(Path(args.dir))
    except FactoryError as err:
        raise CliError(str(err), EXIT_USAGE) from None


def _store(args) -> tuple[Factory, Store]:
    factory = _factory(args)
    return factory, Store(factory.db_path)


def _table(header: list[str], rows: list[list]) -> str:
    """Columns separated by two spaces, header underlined by dashes (fioctl's tabby layout)."""
    lines = [header, ["-" * len(h) for h in header]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines
    )


# Commands ------------------------------------------------------------------
def cmd_init(args) -> int:
    try:
        factory = init_factory(
            Path(args.dir), name=args.name, hostnames=args.hostname or None,
            root_cert_file=args.root_ca_cert, root_key_file=args.root_ca_key,
            est_user=args.est_user, est_password=args.est_password, est_labels=args.est_label,
            manual_approval=args.manual_approval, retry_after=args.retry_after,
            b64_line_length=0 if args.b64_one_line else 64, validity_days=args.validity_days,
            max_body=args.max_body, allow_csr_san=args.allow_csr_san,
            expired_renewal_days=args.expired_renewal_days,
        )
    except (FactoryError, pki.PkiError) as err:
        raise CliError(str(err), EXIT_USAGE) from None
    Store(factory.db_path)
    print(f"factory {factory.name!r} created in {factory.dir}")
    if args.est_password is None:
        print(f"EST HTTP Basic user {args.est_user!r}; password in {factory.path('est-password')}")
    return 0


def cmd_serve(args) -> int:
    from .server import serve

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s [%(process)d] %(message)s")
    factory = _factory(args)
    try:
        gateway = listen_address(args.gateway_listen)
        est = listen_address(args.est_listen)
    except (ValueError, OSError) as err:
        raise CliError(str(err), EXIT_USAGE) from None
    if args.workers < 1:
        raise CliError("--workers must be at least 1", EXIT_USAGE)
    if min(args.max_connections, args.max_connections_per_address) < 1 or min(
            args.headers_deadline, args.body_deadline) <= 0:
        raise CliError("connection limits must be at least 1 and deadlines more than 0 s", EXIT_USAGE)
    limits = ConnectionLimits(args.max_connections, args.max_connections_per_address,
                              args.headers_deadline, args.body_deadline)
    return serve(factory, gateway, est, args.workers, limits)


def cmd_register(args) -> int:
    factory, store = _store(args)
    devices.check_device_name(args.name)
    endpoints = factory.endpoints() or {}
    gateway_url = args.gateway_url or endpoints.get("gateway")
    est_url = args.est_url or endpoints.get("est")
    if not gateway_url or not est_url:
        raise CliError(
            "no server URLs: start `certrotate-server serve` on this factory first, "
            "or pass --gateway-url and --est-url", EXIT_USAGE,
        )
    if devices.get_device(store, args.name) is not None:
        raise CliError(f"device {args.name!r} is already registered")
    existing_key = Path(args.out) / "var/sota/pkey.pem"
    if existing_key.exists() or (Path(args.out) / "var/sota/sota.toml").exists():
        raise CliError(f"{args.out} already holds a device; choose another --out")
    # With --csr the key lives where the device made it (a PKCS#11 token, as
    # lmp-device-register does it): only its certificate is issued and written.
    key = None if args.csr else pki.new_key()
    public_key = _csr_public_key(args.csr) if args.csr else key.public_key()
    cert = factory.issue_initial_device_cert(args.name, public_key, args.san or [])
    # The device's key exists only in its tree: written before the device is recorded,
    # so a recorded device always has its key somewhere.
    if args.est_label and args.est_label not in factory.est.labels:
        raise CliError(f"--est-label {args.est_label!r} is not one of this factory's labels "
                       f"({factory.est.labels or 'none'}; see init --est-label)", EXIT_USAGE)
    write_device_tree(factory, Path(args.out), gateway_url, est_url, key, cert,
                      hardware_id=args.hardware_id, label=args.est_label)
    try:
        with store.transaction() as conn:
            devices.add_device(conn, args.name, cert, args.group, "register")
    except sqlite3.IntegrityError:
        raise CliError(f"device {args.name!r} was registered meanwhile by another command; "
                       f"the tree written in {args.out} is not registered: delete it") from None
    print(f"device {args.name!r} registered; device tree in {args.out}")
    return 0


def _csr_public_key(path: Path):
    from .est import parse_csr

    try:
        return parse_csr(base64.b64encode(x509.load_pem_x509_csr(path.read_bytes()).public_bytes(
            serialization.Encoding.DER))).public_key()
    except (OSError, ValueError) as err:
        raise CliError(f"--csr {path}: not a readable PEM certificate request ({err})", EXIT_USAGE) from None
    except HttpError as err:
        raise CliError(f"--csr {path}: {err.message}", EXIT_USAGE) from None


def cmd_list(args) -> int:
    _, store = _store(args)
    rows = store.query("SELECT * FROM devices ORDER BY name")
    print(_table(
        ["NAME", "GROUP", "CREATED", "KEY CHANGED", "CONFIG LOCKED"],
        [[r["name"], r["group_name"] or "", r["created_at"], r["pubkey_changed_at"] or "",
          "yes" if r["next_pubkey"] else "no"] for r in rows],
    ))
    return 0


def cmd_show(args) -> int:
    _, store = _store(args)
    info = devices.device_json(devices.require_device(store, args.name))
    info["certificates"] = [
        {"serial": r["serial"], "fingerprint": r["fingerprint"], "not-after": r["not_after"],
         "issued-at": r["issued_at"], "issued-by": r["issued_by"],
         "current-key": r["pubkey"] == info["pubkey"],
         "deny-listed": store.query_one("SELECT 1 FROM deny_list WHERE fingerprint = ?", (r["fingerprint"],)) is not None}
        for r in store.query("SELECT * FROM certificates WHERE device = ? ORDER BY issued_at", (args.name,))
    ]
    info["config-files"] = sorted(devices.device_config(store, args.name))
    print(json.dumps(info, indent=2))
    return 0


def cmd_updates(args) -> int:
    """fioctl's `devices updates`: a table of update ids, or one line per event of one id."""
    _, store = _store(args)
    devices.require_device(store, args.name)
    if args.update_id is None:
        rows = store.query(
            """SELECT correlation_id, MIN(device_time) AS time,
                      MAX(version) AS version, MAX(target_name) AS target
               FROM device_events WHERE device = ? AND correlation_id != ''
               GROUP BY correlation_id ORDER BY time DESC""",
            (args.name,),
        )
        print(_table(["ID", "TIME", "VERSION", "TARGET"],
                     [[r["correlation_id"], r["time"], r["version"], r["target"]] for r in rows]))
        return 0
    events = store.query(
        "SELECT * FROM device_events WHERE device = ? AND correlation_id = ? ORDER BY device_time, received_at, rowid",
        (args.name, args.update_id),
    )
    if not events:
        raise CliError(f"device {args.name!r} has no update {args.update_id!r}; list them with `devices updates {args.name}`")
    for e in events:
        line = f"{e['device_time']} : {e['event_type']}({e['target_name']})"
        if e["success"] is not None:
            line += " -> Succeed" if e["success"] else " -> Failed!"
        print(line)
        if e["details"]:
            print(" Details:")
            print(" | " + e["details"].replace("\n", "\n | "))
    return 0


def _est_url(factory: Factory, given: str | None) -> str:
    url = given or (factory.endpoints() or {}).get("est")
    if not url:
        raise CliError("no EST server URL: pass --est-server URL or start `certrotate-server serve`", EXIT_USAGE)
    return url.rstrip("/")


def _rotate_certs(args, scope: str, owner: str) -> int:
    factory, store = _store(args)
    if scope == "device":
        devices.require_device(store, owner)
    rotation_id = f"certs-{int(time.time())}"
    config_file = devices.rotate_certs_file(_est_url(factory, args.est_server), rotation_id)
    devices.operator_set_config(store, scope, owner, [config_file], args.reason)
    print(f"{scope} {owner!r}: {devices.FIO_ROTATE_CERTS} stored, rotation id {rotation_id}")
    return 0


def cmd_device_rotate(args) -> int:
    return _rotate_certs(args, "device", args.name)


def cmd_group_rotate(args) -> int:
    return _rotate_certs(args, "group", args.group)


def _assignments(texts: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for text in texts:
        name, sep, value = text.partition("=")
        if not sep:
            raise CliError(f"{text!r} is not FILE=VALUE", EXIT_USAGE)
        pairs.append((name, value))
    return pairs


def cmd_config_set(args) -> int:
    _, store = _store(args)
    row = devices.require_device(store, args.name)
    public_key = load_pem_public_key(row["pubkey"].encode())
    files = []
    for name, value in _assignments(args.files):
        if not args.unencrypted:
            value = base64.b64encode(ecies.encrypt(public_key, value.encode())).decode()
        files.append({"name": name, "value": value, "unencrypted": args.unencrypted,
                      "on-changed": args.on_changed or []})
    devices.operator_set_config(store, "device", args.name, devices.parse_config_files(files), args.reason)
    print(f"device {args.name!r}: {', '.join(f['name'] for f in files)} stored")
    return 0


def cmd_shared_config_set(args) -> int:
    """Factory-wide or group files: shared by many devices, so stored unencrypted."""
    _, store = _store(args)
    files = [{"name": name, "value": value, "unencrypted": True, "on-changed": args.on_changed or []}
             for name, value in _assignments(args.files)]
    scope, owner = ("group", args.group) if args.group else ("factory", "")
    devices.operator_set_config(store, scope, owner, devices.parse_config_files(files), args.reason)
    print(f"{scope} {owner!r}: {', '.join(f['name'] for f in files)} stored")
    return 0


def cmd_deny_list(args) -> int:
    _, store = _store(args)
    rows = store.query("SELECT * FROM deny_list ORDER BY created_at, device")
    print(_table(["DEVICE", "SERIAL", "DENIED AT", "REASON", "SHA256"],
                 [[r["device"], r["serial"], r["created_at"], r["reason"], r["fingerprint"]] for r in rows]))
    return 0


def cmd_events(args) -> int:
    _, store = _store(args)
    last = 0
    while True:
        for r in store.query("SELECT * FROM factory_events WHERE seq > ? ORDER BY seq", (last,)):
            print(json.dumps({"seq": r["seq"], "type": r["type"], "device": r["device"],
                              "created-at": r["created_at"], "data": json.loads(r["payload"])}), flush=True)
            last = r["seq"]
        if not args.follow:
            return 0
        time.sleep(0.5)


def cmd_est_requests(args) -> int:
    _, store = _store(args)
    rows = store.query("SELECT rowid, * FROM enrollment_requests ORDER BY created_at")
    print(_table(["ID", "SUBJECT", "STATUS", "RECEIVED"],
                 [[r["rowid"], r["subject"], r["status"], r["created_at"]] for r in rows]))
    return 0


def cmd_est_expired_renewal(args) -> int:
    factory = _factory(args)
    if args.days < 0:
        raise CliError("--days must be 0 (never) or more", EXIT_USAGE)
    factory.set_est_setting("expired_renewal_days", args.days)
    print(f"expired certificates renew up to {args.days} days after notAfter; restart `serve` to apply")
    return 0


def cmd_est_approve(args) -> int:
    _, store = _store(args)
    with store.transaction() as conn:
        for request_id in args.ids:
            cur = conn.execute("UPDATE enrollment_requests SET status = 'approved' WHERE rowid = ?", (request_id,))
            if cur.rowcount == 0:
                raise CliError(f"no enrollment request {request_id}; see `certrotate-server est requests`")
    print(f"approved {len(args.ids)} request(s); the clients get their certificate on their next try")
    return 0


def cmd_ca_rollover(args) -> int:
    return _ca(rollover.rollover, _factory(args), args.root_ca_key)


def cmd_ca_retire_old(args) -> int:
    return _ca(rollover.retire_old, _factory(args), args.force)


def _ca(command, factory: Factory, option) -> int:
    try:
        lines = command(factory, option)
    except (FactoryError, pki.PkiError) as err:
        raise CliError(str(err)) from None
    print("\n".join(lines))
    return 0


def cmd_ca_show(args) -> int:
    factory = _factory(args)
    state = "in transition (`ca retire-old` ends it)" if factory.in_transition else "single root"
    print(f"generation {factory.generation}, {state}")
    names = ["root.crt", "device-ca.crt"]
    if factory.in_transition:
        names += ["previous-root.crt", "previous-device-ca.crt", "cross-new-with-old.crt", "cross-old-with-new.crt"]
    rows = []
    for name in names:
        cert = pki.load_cert(factory.path(name))
        rows.append([name, cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(),
                     cert.not_valid_after_utc.date().isoformat(), pki.fingerprint(cert)])
    print(_table(["FILE", "SUBJECT", "ISSUER", "NOT AFTER", "SHA-256"], rows))
    return 0


# Parser ----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default=os.environ.get("CERTROTATE_SERVER_DIR"),
                        help="factory directory (default: $CERTROTATE_SERVER_DIR)")
    parser = argparse.ArgumentParser(prog="certrotate-server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", parents=[common], help="create a factory PKI and settings in --dir")
    p.add_argument("--name", default=DEFAULT_FACTORY, help="factory name: the OU of device certificates")
    p.add_argument("--hostname", action="append",
                   help=f"TLS server name or IP (repeatable; default {' '.join(DEFAULT_HOSTNAMES)})")
    p.add_argument("--root-ca-cert", type=Path, help="import this root CA certificate (PEM) instead of creating one")
    p.add_argument("--root-ca-key", type=Path, help="its private key (PEM); needed to sign the device CA")
    p.add_argument("--est-user", default="bootstrap", help="EST HTTP Basic user for simpleenroll")
    p.add_argument("--est-password", help="EST HTTP Basic password (default: generated into DIR/est-password)")
    p.add_argument("--est-label", action="append", help="accept this RFC 7030 CA label (repeatable)")
    p.add_argument("--manual-approval", action="store_true", help="EST answers 202 until an operator approves")
    p.add_argument("--retry-after", type=int, default=30, help="Retry-After seconds of 202 replies (at least 1; default 30)")
    p.add_argument("--expired-renewal-days", type=int, default=90, metavar="DAYS",
                   help="days after notAfter during which an expired device certificate still renews "
                        "with simplereenroll (0: never; default 90; change later with `est expired-renewal`)")
    p.add_argument("--b64-one-line", action="store_true", help="base64 EST bodies on one line (not wrapped at 64)")
    p.add_argument("--validity-days", type=int, default=365, help="validity of EST-issued certificates")
    p.add_argument("--max-body", type=int, default=64 * 1024, help="largest EST request body in bytes")
    p.add_argument("--allow-csr-san", action="store_true",
                   help="simpleenroll issues a CSR's subjectAltName (default: such CSRs are refused)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("serve", parents=[common], help="run the EST server and the gateway")
    p.add_argument("--gateway-listen", default="127.0.0.1:8443", help="HOST:PORT (port 0 = any free port)")
    p.add_argument("--est-listen", default="127.0.0.1:8444", help="HOST:PORT (port 0 = any free port)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes sharing the listeners (e.g. one per CPU core; default 1)")
    limits = ConnectionLimits()
    p.add_argument("--max-connections", type=int, default=limits.max_connections,
                   help=f"open connections per process, both listeners together (default {limits.max_connections})")
    p.add_argument("--max-connections-per-address", type=int, default=limits.max_per_address,
                   help=f"open connections per client address and process (default {limits.max_per_address})")
    p.add_argument("--headers-deadline", type=float, default=limits.headers_deadline, metavar="SECONDS",
                   help="time for the TLS handshake or since the previous reply, until a request's headers "
                        f"are complete (default {limits.headers_deadline:g})")
    p.add_argument("--body-deadline", type=float, default=limits.body_deadline, metavar="SECONDS",
                   help=f"time from a request's headers to the end of its reply (default {limits.body_deadline:g})")
    p.set_defaults(func=cmd_serve)

    dev = sub.add_parser("devices", help="device operations").add_subparsers(dest="devices_command", required=True)
    p = dev.add_parser("register", parents=[common], help="issue a 20-year certificate and write a device tree")
    p.add_argument("name")
    p.add_argument("--out", required=True, type=Path, help="device root directory to write")
    p.add_argument("--group", help="device group")
    p.add_argument("--gateway-url", help="default: the running server's (endpoints.json)")
    p.add_argument("--est-url", help="default: the running server's (endpoints.json)")
    p.add_argument("--hardware-id", default="intel-corei7-64")
    p.add_argument("--est-label", default="", help="RFC 7030 CA label the device uses (certrotate.toml est.label)")
    p.add_argument("--san", action="append", metavar="DNS_NAME",
                   help="add this DNS name as subjectAltName (repeatable; FoundriesFactory's certificates have none)")
    p.add_argument("--csr", type=Path, metavar="FILE",
                   help="PEM CSR of a key the device keeps (a PKCS#11 token): issue the certificate for "
                   "its key; the tree gets no pkey.pem")
    p.set_defaults(func=cmd_register)
    p = dev.add_parser("list", parents=[common])
    p.set_defaults(func=cmd_list)
    p = dev.add_parser("show", parents=[common])
    p.add_argument("name")
    p.set_defaults(func=cmd_show)
    p = dev.add_parser("updates", parents=[common], help="update history (fioctl layout)")
    p.add_argument("name")
    p.add_argument("update_id", nargs="?")
    p.set_defaults(func=cmd_updates)
    devcfg = dev.add_parser("config").add_subparsers(dest="config_command", required=True)
    p = devcfg.add_parser("rotate-certs", parents=[common], help="ask the device to rotate its certificate")
    p.add_argument("name")
    p.add_argument("--reason", required=True)
    p.add_argument("--est-server", help="EST URL for the device (default: the running server's)")
    p.set_defaults(func=cmd_device_rotate)
    p = devcfg.add_parser("set", parents=[common], help="store device config files encrypted to its key")
    p.add_argument("name")
    p.add_argument("files", nargs="+", metavar="FILE=VALUE")
    p.add_argument("--reason", default="set by certrotate-server")
    p.add_argument("--unencrypted", action="store_true")
    p.add_argument("--on-changed", action="append", help="handler command (repeatable: argv)")
    p.set_defaults(func=cmd_config_set)

    cfg = sub.add_parser("config", help="group config").add_subparsers(dest="config_command", required=True)
    p = cfg.add_parser("rotate-certs", parents=[common], help="ask every device of a group to rotate")
    p.add_argument("--group", required=True)
    p.add_argument("--reason", required=True)
    p.add_argument("--est-server")
    p.set_defaults(func=cmd_group_rotate)

    p = cfg.add_parser("set", parents=[common], help="factory-wide (or --group) unencrypted config files")
    p.add_argument("files", nargs="+", metavar="FILE=VALUE")
    p.add_argument("--group", help="only this group's devices")
    p.add_argument("--reason", default="set by certrotate-server")
    p.add_argument("--on-changed", action="append", help="handler command (repeatable: argv)")
    p.set_defaults(func=cmd_shared_config_set)

    p = sub.add_parser("deny-list", parents=[common], help="certificates the gateway refuses")
    p.set_defaults(func=cmd_deny_list)
    p = sub.add_parser("events", parents=[common], help="the factory event queue (JSON lines)")
    p.add_argument("--follow", action="store_true")
    p.set_defaults(func=cmd_events)

    est = sub.add_parser("est", help="manual-approval queue, expired-certificate renewal window").add_subparsers(dest="est_command", required=True)
    p = est.add_parser("requests", parents=[common])
    p.set_defaults(func=cmd_est_requests)
    p = est.add_parser("approve", parents=[common])
    p.add_argument("ids", nargs="+", type=int)
    p.set_defaults(func=cmd_est_approve)
    p = est.add_parser("expired-renewal", parents=[common],
                       help="days after notAfter during which an expired device certificate still renews")
    p.add_argument("--days", type=int, required=True, help="0: never")
    p.set_defaults(func=cmd_est_expired_renewal)

    ca = sub.add_parser("ca", help="root CA key update (RFC 7030 4.1.3)").add_subparsers(dest="ca_command", required=True)
    p = ca.add_parser("rollover", parents=[common],
                      help="new root and device CA (issuing from now on), cross-certificates; both roots trusted")
    p.add_argument("--root-ca-key", type=Path, metavar="FILE",
                   help="the current root's key, when it was imported (init --root-ca-key): it signs NewWithOld")
    p.set_defaults(func=cmd_ca_rollover)
    p = ca.add_parser("retire-old", parents=[common], help="end the transition: the old root is no longer trusted")
    p.add_argument("--force", action="store_true",
                   help="even while devices hold no certificate of the new device CA (they are cut off)")
    p.set_defaults(func=cmd_ca_retire_old)
    p = ca.add_parser("show", parents=[common], help="the roots, device CAs and cross-certificates in use")
    p.set_defaults(func=cmd_ca_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as err:
        print(f"certrotate-server: {err}", file=sys.stderr)
        return err.code
    except DeviceError as err:
        print(f"certrotate-server: {err.message}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
