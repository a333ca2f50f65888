"""Step 2: announce the new public key; the gateway locks the device's config
until it sees that key in use, and will accept a certificate for it."""

from __future__ import annotations

from . import certs
from .step import Context, Step, expect


class LockStep(Step):
    name = "Lock device configuration on server"
    key = "lock"

    def run(self, ctx: Context) -> None:
        body = {"next_pubkey": certs.public_pem(ctx.new_key())}
        reply = ctx.gateway(ctx.old_identity(), "PATCH", "/device", point="lock:patch-device", json=body)
        expect(reply, range(200, 205), "PATCH /device (announce the new key)")
