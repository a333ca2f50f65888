"""A device whose identity lives in a PKCS#11 token (SoftHSM2 inside the guest)
rotates under systemd, with a power cut during the token writes.

The token is made on the host as lmp-device-register makes it (tests/softhsm.py)
and laid into the guest's /var/lib/softhsm/tokens, where the guest's SoftHSM2
(the same 2.6.1 as the host's) keeps its objects. The aktualizr-lite stand-in
uses the token as aktualizr-lite does (curl with libp11's engine). The cut comes
while the agent pauses just after importing the new certificate into the token,
before sota.toml names it: after the reboot the device is online on its old ids,
and the next run finishes the rotation.
"""

from __future__ import annotations

import base64
import shutil
import tarfile
import tomllib

import pytest

import qemu_image as image
from qemu_checks import RENEWAL_DUE_AT_ONCE
from qemu_timing import stage
from softhsm import SoftHsm, gateway_get, parse_objects, register_token_device

pytestmark = pytest.mark.timeout(1500)

NAME = "dev-token"
CUT_AT = "finalize:p11-cert"
GUEST_TOKENS = "/var/lib/softhsm/tokens"


@pytest.fixture
def not_image_mode(image_mode):
    if image_mode:
        pytest.skip("image mode: the token device is laid into a disk built from the test image's base tree "
                    "(SoftHSM2, pkcs11-provider and libp11 are in it); an LmP image built without "
                    "CERTROTATE_PKCS11 has none of them")


def p11_ids(guest) -> tuple[str, str]:
    p11 = guest.sota()["p11"]
    return p11["tls_pkey_id"], p11["tls_clientcert_id"]


def wait_online(guest, cert_id: str, since: float | None = None) -> None:
    guest.wait_standin_ok(f"pkcs11:token=aktualizr;id=%{cert_id};type=cert", since=since, timeout=180)


def guest_objects(guest) -> list[tuple[str, str]]:
    """(kind, id) of every object in the guest's token, by pkcs11-tool in the guest."""
    return [(kind, ident) for kind, ident, _ in parse_objects(guest.ssh("export P=$(sed -n 's/^pass = \"\\(.*\\)\"/\\1/p' /var/sota/sota.toml) && "
                        "pkcs11-tool --module /usr/lib/softhsm/libsofthsm2.so --token-label aktualizr "
                        "--login --pin env:P --list-objects").stdout)]


def token_from_guest(guest, workdir) -> SoftHsm:
    """A copy of the guest's token on the host (for the host's TLS checks)."""
    copy = SoftHsm(workdir)
    shutil.rmtree(copy.tokens)
    archive = workdir / "tokens.tar"
    archive.write_bytes(base64.b64decode(guest.ssh(f"tar -C {GUEST_TOKENS} -cf - . | base64 -w0").stdout))
    copy.tokens.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(copy.tokens)
    return copy


def test_token_identity_rotates_under_systemd_through_a_power_cut(make_guest, module_backend, scratch,
                                                                   not_image_mode):
    hsm = SoftHsm(scratch / "hsm")

    def register(name, out, *args):
        return register_token_device(module_backend, hsm, name, out, *args)

    def prepare(tree):
        with (tree / "etc/certrotate/certrotate.toml").open("a") as file:
            file.write(RENEWAL_DUE_AT_ONCE)
        tokens = tree / GUEST_TOKENS.lstrip("/")
        tokens.parent.mkdir(parents=True)
        shutil.copytree(hsm.tokens, tokens)

    guest = make_guest(NAME, module_backend, prepare, register=register)
    guest.boot("first boot")
    guest.ssh("systemctl stop certrotate.timer")  # the test starts the agent itself
    wait_online(guest, "03")

    guest.pause_agent_at(CUT_AT)
    guest.power_cut()

    guest.boot(f"after a cut at {CUT_AT}")
    guest.ssh("systemctl stop certrotate.timer")
    status = guest.status()
    assert status["rotation"] and status["rotation"]["step"] == 5, status  # finalize, resumable
    assert p11_ids(guest) == ("01", "03")
    wait_online(guest, "03")  # still online on the old identity

    guest.set_agent_environment()
    with stage(f"{NAME}: rotation converges"):
        since = guest.guest_time()
        result = guest.run_certrotate_service()
    assert result.returncode == 0, guest.journal()
    assert guest.status()["rotation"] is None
    assert p11_ids(guest) == ("07", "09")
    assert guest_objects(guest) == [("Certificate", "09"), ("Private Key", "07"), ("Public Key", "07")]
    wait_online(guest, "09", since=since)  # aktualizr-lite restarted on the new identity

    # From the host: the gateway accepts the guest's new identity and refuses the
    # first one (still in the token the host registered).
    now = token_from_guest(guest, scratch / "guest-token")
    assert gateway_get(module_backend, now, "07", now.cert_file("09"))[0] == "HTTP/1.1 200 OK"
    assert gateway_get(module_backend, hsm, "01", hsm.cert_file("03"))[0].startswith("HTTP/1.1 403")
    assert "87654321" not in guest.journal()
    sota = tomllib.loads(guest.vm.read("/var/sota/sota.toml"))
    assert sota["tls"]["pkey_source"] == "pkcs11"

    guest.shutdown()
    check = image.fsck(guest.vm.disk)
    assert check.returncode == 0, f"root filesystem not clean:\n{check.stdout}{check.stderr}"
