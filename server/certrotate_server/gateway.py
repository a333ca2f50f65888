"""Device gateway: mutual TLS, device = client certificate Subject CN."""

from __future__ import annotations

import email.utils
import time

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
        """fioconfig's check-in: it sends back as If-Modified-Since the Date of the
        200 that gave it its config, so Date is taken before the config is read
        (a change while the reply is built is newer than that Date)."""
        served_at = time.time()
        date = {"Date": email.utils.formatdate(served_at, usegmt=True)}
        since = self._if_modified_since(served_at)
        row = devices.get_device(store, name)
        if since is not None and devices.config_changed_at(store, row) < since:
            self.send(304, headers=date)
        else:
            self.send_json(200, devices.merged_config(store, row), date)

    def _if_modified_since(self, now: float) -> float | None:
        """The If-Modified-Since time, or None when absent, malformed or in the future (RFC 9110 13.1.3)."""
        value = self.headers.get("If-Modified-Since")
        try:
            since = email.utils.parsedate_to_datetime(value).timestamp() if value else None
        except (TypeError, ValueError):
            return None
        return since if since is not None and since <= now else None

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
