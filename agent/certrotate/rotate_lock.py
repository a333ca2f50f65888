"""Step 2: announce the new public key; the gateway locks the device's config
until it sees that key in use, and will accept a certificate for it."""

from __future__ import annotations

from . import certs
from .step import Context, Step, expect


class LockStep(Step):
    name = "Lock device configuration on server"
    key = "lock"

    def run(self, ctx: Context) -> None:
        if ctx.old_expired():
            # Announced by the EST server when it renewed the expired certificate: the
            # new certificate's first use makes its key the device's.
            reply = ctx.gateway(ctx.server_identity(), "GET", "/device", point="lock:use-new-key")
            expect(reply, range(200, 205), "GET /device as the new certificate (the old one has expired)")
            return
        body = {"next_pubkey": certs.public_pem(ctx.new_key())}
        reply = ctx.gateway(ctx.old_identity(), "PATCH", "/device", point="lock:patch-device", json=body)
        expect(reply, range(200, 205), "PATCH /device (announce the new key)")
