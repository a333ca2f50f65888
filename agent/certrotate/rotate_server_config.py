"""Step 4: re-encrypt the device-specific config held by the server for the new key.

GET /config-device (204: none); if it already decrypts with the new key the
upload happened before a crash; otherwise PATCH /config with every value
re-encrypted and the new public key, which the locked gateway requires.
"""

from __future__ import annotations

from . import certs, localconfig
from .step import Context, Step, expect

REASON = "Rotating device client certificate"


class ServerConfigStep(Step):
    name = "Update device specific configuration on server with new key"
    key = "server_config"

    def run(self, ctx: Context) -> None:
        reply = ctx.gateway(ctx.server_identity(), "GET", "/config-device", point="server_config:get")
        if reply.status == 204:
            return
        expect(reply, range(200, 201), "GET /config-device")
        config = localconfig.parse(reply.body, "the server's device config")
        new_key = ctx.new_key()
        if config and localconfig.encrypted_for(config, new_key) and not localconfig.encrypted_for(
            config, ctx.old_key()
        ):
            return  # uploaded before a crash
        staged = localconfig.reencrypt(
            config, [ctx.old_key(), new_key], new_key.public_key(), "the server's device config"
        )
        body = {
            "reason": REASON,
            "files": [
                {
                    "name": name,
                    "value": entry.get("Value", ""),
                    "unencrypted": bool(entry.get("Unencrypted")),
                    "on-changed": entry.get("OnChanged") or [],
                }
                for name, entry in sorted(staged.items())
            ],
            "public-key": certs.public_pem(new_key),
        }
        reply = ctx.gateway(ctx.server_identity(), "PATCH", "/config", point="server_config:patch", json=body)
        expect(reply, range(200, 205), "PATCH /config (device config for the new key)")
