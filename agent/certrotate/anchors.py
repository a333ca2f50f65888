"""The device's trust anchors follow the factory's root CA key update (RFC 7030 4.1.3).

The anchor file is sota.toml's ``import.tls_cacert_path`` (aktualizr-lite and
fioconfig verify the gateway against it). At most daily, ``check`` asks the
EST server's /cacerts whether it changed (If-None-Match on the ETag it gave).
What it serves is taken as news, never as trust:

- a root CA the device does not trust yet is added only when a cross
  certificate in the same reply (RFC 4210 4.4's NewWithOld: its subject and
  key, issued by a root the device trusts and signed by that root's key)
  vouches for it; otherwise nothing changes and the update fails loudly;
- a trusted root the server no longer serves has been retired: it leaves the
  bundle, but only once the gateway's and the EST server's chains verify
  against what remains.

The file is replaced atomically; ``anchors.json`` in the state dir records the
new bundle's digest before the rename, so a power cut before the units that
read it are restarted is finished by the next run. Nothing here holds a secret.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from . import crashpoints, fsutil

log = logging.getLogger("certrotate")

STATE_FILE = "anchors.json"
CHECK_EVERY = 86400.0  # seconds between two /cacerts checks that went well


class AnchorError(Exception):
    """The trust anchors could not be brought up to date; the file is as it was."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str):
        super().__init__(message)
        self.hint = hint


def _load_state(state_dir: Path) -> dict:
    try:
        state = json.loads((Path(state_dir) / STATE_FILE).read_bytes())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def due(state_dir: Path, now: float) -> bool:
    """Whether /cacerts is to be asked now (light: reads one small file)."""
    state = _load_state(state_dir)
    checked_at = state.get("checked_at")
    if state.get("pending") or not isinstance(checked_at, (int, float)):
        return True
    # A clock set back (NTP correcting a wrong one) must not silence the check for years.
    return not checked_at <= now < checked_at + CHECK_EVERY


def update(ctx, est_server: str | None = None) -> str | None:
    """Bring the anchor file up to date with the /cacerts of ``est_server`` (default
    est.server); what was done (None: nothing, the file was up to date).

    ``ctx`` is a rotation Context with no rotation in progress, its lock held."""
    from .est import EstClient, EstError

    state_dir = ctx.journal.dir
    anchor_file = ctx.ca_file()
    state = _load_state(state_dir)
    current = _read(anchor_file, ctx.sota.ca_file)
    if state.get("pending"):
        if state["pending"] == _digest(current):
            # The ETag of that reply was not kept: the next check asks for the whole set.
            return _restart_and_record(ctx, state, current, None, "restarted the units left to restart")
        state["pending"] = None  # cut before the rename: the file is the old one

    est_server = est_server or ctx.agent.est_server
    if not est_server:
        raise AnchorError("no EST server configured: the trust anchors cannot be checked",
                          hint="set [est] server in /etc/certrotate/certrotate.toml")
    client = EstClient(est_server, str(anchor_file), label=ctx.agent.est_label,
                       sleep=ctx.sleep, clock=ctx.clock, run=ctx.deadline,
                       reply_within=ctx.agent.request_deadline)
    # The server's ETag speaks for the file only while the file is the one it was compared with.
    etag = state.get("etag") if state.get("bundle") == _digest(current) else None
    try:
        served, etag = client.cacerts_if_changed(etag)
    except EstError as err:
        raise AnchorError(f"trust anchors: {err.args[0]}", hint=_unreachable_hint(err, ctx)) from err
    if served is None:
        _record(state_dir, state, current, etag, ctx.clock())
        return None
    bundle, added, retired = plan(_certs(current, ctx.sota.ca_file), served, ctx.clock(), _own_issuer(ctx))
    if not added and not retired:
        _record(state_dir, state, current, etag, ctx.clock())
        return None
    if retired:
        for url in (ctx.sota.gateway_url, est_server):
            _check_server_verifies(url, bundle, ctx.agent.request_deadline)
    # Not the new ETag yet: cut before the rename, it would vouch for the old file.
    state["pending"] = _digest(bundle)
    _save(state_dir, state, point="anchors:pending")
    fsutil.atomic_write(anchor_file, bundle, 0o644, point="anchors:bundle")
    names = "; ".join([f"added {_name(c)}" for c in added] + [f"removed {_name(c)} (retired)" for c in retired])
    return _restart_and_record(ctx, state, bundle, etag, f"{ctx.sota.ca_file}: {names}")


def plan(trusted: list, served: list, now: float, issuers: tuple = ()) -> tuple[bytes, list, list]:
    """The new anchor file (PEM), the roots it adds and the roots it drops.

    ``trusted`` is the anchor file's certificates, ``served`` /cacerts'; ``issuers`` DER
    names that are never taken for a new root (the device CA's: see _vouched_for). AnchorError
    when a served root is vouched for by nothing the device trusts."""
    from . import certs

    roots = [cert for cert in trusted if _is_root(cert)]
    served_roots = [cert for cert in served if _is_root(cert)]
    if not served_roots:
        # foundriesio/estserver serves its -root-cert file as given: no root, no news.
        return certs.certs_pem(trusted), [], []
    trusted_ids = {_identity(cert) for cert in roots}
    crosses = [cert for cert in served if not _is_root(cert)]
    added = []
    for root in served_roots:
        if _identity(root) in trusted_ids:
            continue
        if not _vouched_for(root, crosses, [r for r in roots if _valid_at(r, now)], issuers, now):
            raise AnchorError(
                f"/cacerts offers a root CA the device does not trust, {_name(root)}, and no "
                "cross-certificate signed by a trusted root vouches for it: refused, the trust "
                "anchors are unchanged",
                hint="if the factory rolled its root CA over, its EST server must serve the "
                "NewWithOld cross-certificate (certrotate-server ca rollover does); otherwise "
                "the EST server or the path to it is not to be trusted",
            )
        added.append(root)
        trusted_ids.add(_identity(root))
    served_ids = {_identity(cert) for cert in served_roots}
    retired = [cert for cert in roots if _identity(cert) not in served_ids]
    kept = [cert for cert in trusted if cert not in retired]
    return certs.certs_pem(kept + added), added, retired


def _vouched_for(root, crosses: list, trusted_roots: list, issuers: tuple, now: float) -> bool:
    """Whether a cross-certificate carries ``root``'s subject and key, is valid now, was
    signed by a trusted root, and certifies a CA that may itself certify CAs, no less
    constrained than ``root``. An intermediate the trusted root certified (the device CA:
    pathLen 0, its key on the EST server) vouches for nothing: else whoever holds its key
    could mint a root with its name."""
    from . import pki

    if not _valid_at(root, now) or _subject(root) in issuers:
        return False
    for cross in crosses:
        parts = pki.tbs_parts(cross)
        if (parts.subject, parts.public_key) != _identity(root) or not pki.can_sign_certs(cross):
            continue
        if not _valid_at(cross, now) or not _no_broader(root, cross):
            continue
        if any(pki.tbs_parts(anchor).subject == parts.issuer and pki.signed_by(cross, anchor)
               for anchor in trusted_roots):
            return True
    return False


def _path_length(cert) -> int | None:
    from cryptography import x509

    return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length


def _no_broader(root, cross) -> bool:
    """The cross-certificate lets its subject certify CAs (pathLen absent or at least 1),
    and ``root`` claims no longer a path than it does."""
    allowed, claimed = _path_length(cross), _path_length(root)
    return allowed is None or (allowed >= 1 and claimed is not None and claimed <= allowed)


def _subject(cert) -> bytes:
    from . import pki

    return pki.tbs_parts(cert).subject


def _is_root(cert) -> bool:
    from . import pki

    parts = pki.tbs_parts(cert)
    return parts.subject == parts.issuer and pki.can_sign_certs(cert) and pki.signed_by(cert, cert)


def _identity(cert) -> tuple[bytes, bytes]:
    from . import pki

    parts = pki.tbs_parts(cert)
    return parts.subject, parts.public_key


def _valid_at(cert, now: float) -> bool:
    from . import pki

    not_before, not_after = pki.validity(cert)
    return not_before.timestamp() <= now <= not_after.timestamp()


def _name(cert) -> str:
    return repr(cert.subject.rfc4514_string())


def _check_server_verifies(url: str, bundle: bytes, timeout: float) -> None:
    """AnchorError unless ``url``'s TLS server chain verifies against ``bundle`` alone:
    a root is dropped only when nothing the device talks to still needs it."""
    import socket
    import ssl
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    tls = ssl.create_default_context(cadata=bundle.decode())
    # In TLS 1.3 the client has verified the server when its handshake ends, before the
    # server can refuse it for want of a client certificate: any other outcome proves nothing.
    tls.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        with socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout) as sock:
            with tls.wrap_socket(sock, server_hostname=parts.hostname):
                pass
    except ssl.SSLCertVerificationError as err:
        raise AnchorError(
            f"{url} does not yet verify without the root CA /cacerts no longer serves "
            f"({err.verify_message}): the old root stays trusted for now",
            hint="the factory retired its old root before its servers stopped presenting it; "
            "restart its `serve`; the next check tries again",
        ) from err
    except OSError as err:  # ssl.SSLError among them: a TLS 1.2 server cannot be probed so
        raise AnchorError(f"cannot check {url}'s chain without the retired root: {err}; it stays "
                          "trusted for now", hint="check the network and that the server speaks "
                          "TLS 1.3; the next check tries again") from err


def _own_issuer(ctx) -> tuple[bytes]:
    """The DER name of the CA that issued the device's live certificate."""
    from . import certs, pki

    return (pki.tbs_parts(certs.load_certs(ctx.keys.live_cert_file())[0]).issuer,)


def _restart_and_record(ctx, state: dict, bundle: bytes, etag: str | None, done: str) -> str:
    """Restart the units that read the anchor file, then clear ``pending``."""
    from .systemd import SystemdError

    units = ctx.systemd.active(ctx.agent.restart)
    try:
        ctx.systemd.restart(units)
    except SystemdError as err:
        raise AnchorError(f"the trust anchors changed but {err}", hint=err.hint) from err
    crashpoints.reach("anchors:restarted")
    state["pending"] = None
    _record(ctx.journal.dir, state, bundle, etag, ctx.clock())
    return f"{done}; restarted {', '.join(units) if units else 'no unit (none active)'}"


def _record(state_dir: Path, state: dict, bundle: bytes, etag: str | None, now: float) -> None:
    state.update(checked_at=now, bundle=_digest(bundle), etag=etag)
    _save(state_dir, state, point="anchors:checked")


def _save(state_dir: Path, state: dict, *, point: str) -> None:
    fsutil.atomic_write(Path(state_dir) / STATE_FILE, json.dumps(state).encode(), 0o600, point=point)


def _read(path: Path, origin: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise AnchorError(f"cannot read the trust anchor file {origin}: {err.strerror}",
                          hint="check [import] tls_cacert_path in sota.toml") from err


def _certs(data: bytes, origin: str) -> list:
    from . import certs

    try:
        return certs.parse_certs(data, origin)
    except certs.KeyFileError as err:
        raise AnchorError(str(err), hint=err.hint) from err


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _unreachable_hint(err, ctx) -> str:
    if "CERTIFICATE_VERIFY_FAILED" in str(err) or "certificate verify failed" in str(err):
        return (f"the EST server's certificate does not chain to a root in {ctx.sota.ca_file}: if the "
                "factory rolled its root CA over and retired the old one while this device was "
                "off, the device must be registered again (its identity is unchanged); "
                "otherwise check est.server")
    return err.hint
