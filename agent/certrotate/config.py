"""The device's configuration: sota.toml (as aktualizr-lite merges it) and certrotate.toml.

Paths inside the files are device paths (absolute, as on the device); a
``Root`` maps them under ``--root DIR`` so tests and the demo can drive a
whole device tree in a temporary directory. Light on purpose: ``check`` imports
this on its fast path, so no cryptography and no requests here.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path, PurePosixPath

from . import fsutil

SOTA_DIRS = ("/usr/lib/sota/conf.d", None, "/etc/sota/conf.d")  # None: /var/sota/sota.toml
SOTA_TOML = "/var/sota/sota.toml"
CERTROTATE_TOML = "/etc/certrotate/certrotate.toml"
TLS_KEY = "tls_pkey_path"
TLS_CERT = "tls_clientcert_path"
P11_KEY_ID = "tls_pkey_id"
P11_CERT_ID = "tls_clientcert_id"
P11_DEFAULT_LABEL = "aktualizr"  # lmp-device-register's and aktualizr's default token label
P11_ID = re.compile(r"0[1-9]")
# Seconds one run may work under the lock, by default and at most: certrotate.service's
# TimeoutStartSec sits above it (tests/layer checks), so it can be shortened, not lengthened.
RUN_DEADLINE_MAX = 1200.0
_HTTPS_URL = re.compile(r"^https://[^/?#\s]+", re.IGNORECASE)


class ConfigError(Exception):
    """A missing or malformed configuration file (exit code 2)."""

    def __init__(self, message: str, *, hint: str):
        super().__init__(message)
        self.hint = hint


class Root:
    """Maps device paths under a root directory (``/`` on a real device)."""

    def __init__(self, root: str | os.PathLike = "/"):
        self.dir = Path(root)

    def __call__(self, device_path: str | PurePosixPath) -> Path:
        relative = str(device_path).lstrip("/")
        return self.dir / relative if relative else self.dir


# Plain classes, not dataclasses: importing dataclasses pulls in inspect,
# which alone costs ``check`` a good share of its start-up time.
class P11Config:
    """sota.toml's [p11]: the token holding the device's key and certificate.

    ``key_id`` and ``cert_id`` are the CKA_ID bytes. aktualizr puts the id
    string after a '%' in a PKCS#11 URI (hex) while fioconfig takes each digit
    as a byte and drops leading zero bytes (sotatoml.IdToBytes): the two agree
    only for "01" to "09", so nothing else is accepted.
    """

    def __init__(self, module: str, pin: str, label: str, key_id: bytes, cert_id: bytes):
        # bytes([n]).hex() gives back the digits sota.toml holds: "0n".
        self.module = module
        self.pin = pin
        self.label = label
        self.key_id = key_id
        self.cert_id = cert_id

    def __repr__(self) -> str:  # never the PIN
        return (f"P11Config(module={self.module!r}, label={self.label!r}, "
                f"key_id={self.key_id.hex()}, cert_id={self.cert_id.hex()})")


class SotaConfig:
    """The merged sota.toml settings the agent needs, with their origins.

    Paths are absolute device paths; ``origins`` maps a dotted key
    ("import.tls_pkey_path") to the device file that set its effective value.
    ``p11`` is set when the key and certificate live in a PKCS#11 token
    (``tls.pkey_source = "pkcs11"``); ``key_file`` and ``cert_file`` are then empty.
    """

    def __init__(self, gateway_url: str, ca_file: str, key_file: str, cert_file: str,
                 storage_path: str, origins: dict[str, str], p11: P11Config | None = None):
        self.gateway_url = gateway_url
        self.ca_file = ca_file
        self.key_file = key_file
        self.cert_file = cert_file
        self.storage_path = storage_path
        self.origins = origins
        self.p11 = p11


class AgentConfig:
    """/etc/certrotate/certrotate.toml with defaults (docs/contracts.md)."""

    def __init__(self):
        self.est_server: str | None = None
        self.est_label = ""
        self.est_ca_bundle = ""  # device path of extra CA certificates to find the issuing CA
        self.est_max_wait = 900.0  # seconds a run waits out an enrollment the server holds pending (202)
        self.request_deadline = 60.0  # seconds for the whole reply to one request
        self.run_deadline = RUN_DEADLINE_MAX
        self.lifetime_fraction = 0.667
        self.max_age_days = 365.0
        self.restart = ["aktualizr-lite.service", "fioconfig.service"]
        self.state_dir = "/var/sota/certrotate"
        self.config_dir = "/var/sota"

    def __eq__(self, other) -> bool:
        return isinstance(other, AgentConfig) and vars(self) == vars(other)


def check_est_url(url: str, source: str) -> str:
    """``url`` if it is https with a host: the CSR must not travel in plain text."""
    if not _HTTPS_URL.match(url):
        raise ConfigError(
            f"{source}: EST server URL {url!r} is not https",
            hint="use an https:// URL (e.g. https://est.example.org/.well-known/est): certrotate "
            "sends the CSR and fetches the certificate over TLS only",
        )
    return url


def sota_files(root: Root) -> list[str]:
    """The sota.toml files aktualizr-lite reads, in order (later wins), as device paths."""
    files = []
    for directory in SOTA_DIRS:
        if directory is None:
            if root(SOTA_TOML).is_file():
                files.append(SOTA_TOML)
            continue
        host_dir = root(directory)
        if host_dir.is_dir():
            files += sorted(
                f"{directory}/{p.name}" for p in host_dir.iterdir() if p.name.endswith(".toml")
            )
    return files


def _load_toml(root: Root, device_path: str) -> dict:
    try:
        with open(root(device_path), "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as err:
        raise ConfigError(
            f"{device_path} is missing", hint="provision the device (lmp-device-register) first"
        ) from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"{device_path} is not valid TOML: {err}", hint=f"fix the syntax of {device_path}"
        ) from err


def _flatten(table: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_sota(root: Root) -> SotaConfig:
    """Merge sota.toml key by key as aktualizr-lite does."""
    files = sota_files(root)
    if not files:
        raise ConfigError(
            f"no sota.toml found ({SOTA_TOML} nor conf.d)",
            hint="provision the device (lmp-device-register) first",
        )
    merged: dict[str, object] = {}
    origins: dict[str, str] = {}
    for device_file in files:
        for key, value in _flatten(_load_toml(root, device_file)).items():
            merged[key] = value
            origins[key] = device_file

    def get(key: str, default: str | None = None) -> str:
        value = merged.get(key, default)
        if value is None:
            raise ConfigError(
                f"sota.toml sets no {key} (read {', '.join(files)})",
                hint=f"set {key} in {SOTA_TOML}",
            )
        if not isinstance(value, str):
            raise ConfigError(
                f"{key} in {origins.get(key)} is not a string",
                hint=f"write {key} as a quoted string",
            )
        return value

    base_path = get("import.base_path", "/var/sota")

    def import_path(key: str) -> str:
        path = get(key)
        return str(PurePosixPath(base_path) / path) if not path.startswith("/") else path

    key_source = get("tls.pkey_source", "file")
    sources = {key_source, get("tls.cert_source", key_source)}
    if sources - {"file", "pkcs11"} or len(sources) != 1:
        raise ConfigError(
            f"sota.toml: tls.pkey_source and tls.cert_source are {', '.join(sorted(sources))}",
            hint='certrotate rotates a key and certificate kept together: set both to "file" or '
            'both to "pkcs11"',
        )
    p11 = None
    if sources == {"pkcs11"}:
        def p11_id(key: str) -> bytes:
            value = get(f"p11.{key}")
            if not P11_ID.fullmatch(value):
                raise ConfigError(
                    f"p11.{key} in {origins.get(f'p11.{key}')} is {value!r}, not one of \"01\" to \"09\"",
                    hint=f'write it as lmp-device-register does, e.g. {key} = "01": aktualizr and '
                    "fioconfig read other ids as different objects",
                )
            return bytes.fromhex(value)

        p11 = P11Config(get("p11.module"), get("p11.pass"), get("p11.label", P11_DEFAULT_LABEL),
                        p11_id(P11_KEY_ID), p11_id(P11_CERT_ID))
    return SotaConfig(
        gateway_url=get("tls.server").rstrip("/"),
        ca_file=import_path("import.tls_cacert_path"),
        key_file="" if p11 else import_path(f"import.{TLS_KEY}"),
        cert_file="" if p11 else import_path(f"import.{TLS_CERT}"),
        storage_path=get("storage.path", "/var/sota/"),
        origins=origins,
        p11=p11,
    )


def load_agent(root: Root) -> AgentConfig:
    """Read certrotate.toml; a missing file means all defaults."""
    config = AgentConfig()
    if not root(CERTROTATE_TOML).is_file():
        return config
    data = _load_toml(root, CERTROTATE_TOML)

    def pick(section: str, key: str, kind, current):
        value = data.get(section, {}).get(key, current)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(
                f"{CERTROTATE_TOML}: {section}.{key} must be a {kind.__name__}, not {value!r}",
                hint=f"fix {section}.{key} in {CERTROTATE_TOML}",
            )
        return value

    for section in data:
        if not isinstance(data[section], dict):
            raise ConfigError(
                f"{CERTROTATE_TOML}: {section} must be a table",
                hint=f"write [{section}] as a section header",
            )
    est_server = pick("est", "server", str, "")
    config.est_server = check_est_url(est_server, f"{CERTROTATE_TOML}: est.server") if est_server else None
    config.est_label = pick("est", "label", str, config.est_label)
    config.est_ca_bundle = pick("est", "ca_bundle", str, config.est_ca_bundle)
    config.est_max_wait = pick("est", "max_wait", float, config.est_max_wait)
    config.request_deadline = pick("deadlines", "request", float, config.request_deadline)
    config.run_deadline = pick("deadlines", "run", float, config.run_deadline)
    for name, value, most in (("est.max_wait", config.est_max_wait, None),
                              ("deadlines.request", config.request_deadline, None),
                              ("deadlines.run", config.run_deadline, RUN_DEADLINE_MAX)):
        if not value > 0 or (most is not None and value > most):
            bound = f"more than 0 and at most {most:g}" if most else "more than 0"
            raise ConfigError(
                f"{CERTROTATE_TOML}: {name} must be {bound} seconds, not {value:g}",
                hint=f"fix {name} in {CERTROTATE_TOML}, or remove it for the default",
            )
    config.lifetime_fraction = pick("renewal", "lifetime_fraction", float, config.lifetime_fraction)
    if not 0 < config.lifetime_fraction <= 1:
        raise ConfigError(
            f"{CERTROTATE_TOML}: renewal.lifetime_fraction must be in (0, 1], not {config.lifetime_fraction}",
            hint="use e.g. 0.667 to renew when two thirds of the validity has elapsed",
        )
    config.max_age_days = pick("renewal", "max_age_days", float, config.max_age_days)
    if not config.max_age_days > 0:
        raise ConfigError(
            f"{CERTROTATE_TOML}: renewal.max_age_days must be more than 0, not {config.max_age_days:g}",
            hint="use e.g. 365 to renew certificates older than a year",
        )
    config.restart = pick("services", "restart", list, config.restart)
    if not all(isinstance(unit, str) for unit in config.restart):
        raise ConfigError(
            f"{CERTROTATE_TOML}: services.restart must be a list of unit names",
            hint='write e.g. restart = ["aktualizr-lite.service"]',
        )
    config.state_dir = pick("storage", "state_dir", str, config.state_dir)
    config.config_dir = pick("storage", "config_dir", str, config.config_dir)
    return config


_TABLE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\- ]+?)\s*\]\s*(#.*)?$")


def _rewrite_key(text: str, table: str, key: str, value: str) -> str | None:
    """``text`` with ``table.key``'s string value replaced, every other byte kept.

    Recognises both ``[table]`` + ``key = "..."`` and a dotted ``table.key = "..."``
    outside any table; returns None when the key is not there.
    """
    lines = text.splitlines(keepends=True)
    current = ""
    assignment = re.compile(
        r"^(?P<lead>\s*)(?P<name>[A-Za-z0-9_.\-]+?)(?P<eq>\s*=\s*)"
        r"(?P<value>\"(?:[^\"\\]|\\.)*\"|'[^']*')(?P<rest>.*?)(?P<eol>\r?\n?)$"
    )
    found = None
    for index, line in enumerate(lines):
        header = _TABLE.match(line)
        if header and not line.lstrip().startswith("[["):
            current = header.group(1).replace(" ", "")
            continue
        match = assignment.match(line)
        if not match:
            continue
        name = match.group("name")
        full = f"{current}.{name}" if current else name
        if full == f"{table}.{key}":
            found = (index, match)
    if found is None:
        return None
    index, match = found
    lines[index] = (
        match.group("lead") + match.group("name") + match.group("eq")
        + json.dumps(value) + match.group("rest") + match.group("eol")
    )
    return "".join(lines)


def point_tls_at(root: Root, sota: SotaConfig, key_file: str, cert_file: str, *, point: str) -> None:
    """Make import.tls_pkey_path / tls_clientcert_path name these files."""
    _set_strings(root, sota, "import", {TLS_KEY: key_file, TLS_CERT: cert_file}, point=point)
    sota.key_file, sota.cert_file = key_file, cert_file


def point_p11_at(root: Root, sota: SotaConfig, key_id: bytes, cert_id: bytes, *, point: str) -> None:
    """Make p11.tls_pkey_id / tls_clientcert_id name these token objects."""
    _set_strings(root, sota, "p11", {P11_KEY_ID: key_id.hex(), P11_CERT_ID: cert_id.hex()}, point=point)
    sota.p11.key_id, sota.p11.cert_id = key_id, cert_id


def _set_strings(root: Root, sota: SotaConfig, table: str, wanted: dict[str, str], *, point: str) -> None:
    """Set ``table.key`` to each string of ``wanted``.

    Each line is edited in place in the file that defines the effective value
    (atomic rewrite, every other byte kept); a file already right is left alone.
    """
    by_file: dict[str, dict[str, str]] = {}
    for key, value in wanted.items():
        origin = sota.origins.get(f"{table}.{key}")
        if origin is None:
            raise ConfigError(
                f"no sota.toml file sets {table}.{key}",
                hint=f"set {table}.{key} in {SOTA_TOML}",
            )
        by_file.setdefault(origin, {})[key] = value
    for number, (device_file, changes) in enumerate(sorted(by_file.items())):
        path = root(device_file)
        original = path.read_bytes()
        text = original.decode("utf-8")
        for key, value in changes.items():
            rewritten = _rewrite_key(text, table, key, value)
            if rewritten is None:
                raise ConfigError(
                    f"{device_file} sets {table}.{key} in a form certrotate cannot edit",
                    hint=f'write it as a plain line: {key} = "..." under [{table}]',
                )
            text = rewritten
        if text.encode("utf-8") != original:
            mode = path.stat().st_mode & 0o7777
            fsutil.atomic_write(path, text.encode("utf-8"), mode, point=f"{point}-{number}")
