"""Device gateway: mutual TLS, device = client certificate Subject CN."""

from __future__ import annotations

from . import devices
from .devices import DeviceError
from .httpbase import BaseHandler, HttpError


class GatewayHandler(BaseHandler):
    max_body = 1024 * 1024

    def route(self, method: str, path: str):
        store = self.server.app.store
        cert = self.peer_cert()
        if cert is None:  # CERT_REQUIRED makes this unreachable unless misconfigured
            raise HttpError(401, "client certificate required")
        try:
            name = devices.authenticate(store, cert)
            self.identity = name
            handler = {
                ("GET", "/device"): self.get_device,
                ("PATCH", "/device"): self.patch_device,
                ("GET", "/config"): self.get_config,
                ("GET", "/config-device"): self.get_config_device,
                ("PATCH", "/config"): self.patch_config,
                ("POST", "/events"): self.post_events,
            }.get((method, path.rstrip("/") or "/"))
            if handler is None:
                raise HttpError(404, f"no gateway endpoint {method} {path}")
            handler(store, name)
        except DeviceError as err:
            raise HttpError(err.status, err.message) from None

    def get_device(self, store, name):
        self.send_json(200, devices.device_json(devices.get_device(store, name)))

    def patch_device(self, store, name):
        body = self.read_json()
        if not isinstance(body, dict) or "next_pubkey" not in body:
            raise HttpError(400, 'body must be {"next_pubkey": "<PEM public key>"}')
        self.send_json(200, devices.announce_next_key(store, name, body["next_pubkey"]))

    def get_config(self, store, name):
        self.send_json(200, devices.merged_config(store, name))

    def get_config_device(self, store, name):
        config = devices.device_config(store, name)
        if not config:
            self.send(204)
        else:
            self.send_json(200, config)

    def patch_config(self, store, name):
        count = devices.device_config_upload(store, name, self.read_json())
        self.send_json(200, {"files": count})

    def post_events(self, store, name):
        count = devices.store_device_events(store, name, self.read_json())
        self.send_json(200, {"stored": count})
