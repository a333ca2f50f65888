"""Step 1: a new key and a certificate for it, by EST simple re-enrollment.

The key is generated once by the key store (a 0600 file in the state dir, or a
pair in the token whose public key the journal records); the issued
certificate is checked (pki.check_issued) before it is written to the state
dir, so a resumed rotation reuses both and never asks the EST server twice for
the same rotation once it has a good answer.
"""

from __future__ import annotations

import datetime
import logging

from . import certs, config, fsutil, pki
from .est import EstClient, EstError
from .step import Context, Step

log = logging.getLogger("certrotate")


class EstStep(Step):
    name = "Generate new certificate"
    key = "est"

    def run(self, ctx: Context) -> None:
        rotation = ctx.rotation
        ctx.keys.check_old(rotation)  # before any new identity is asked for
        key = ctx.keys.make_new_key(rotation, lambda: ctx.save(point="est:new-key-journaled"))
        cert_path = ctx.journal.new_cert_path(rotation.rotation_id)
        if cert_path.exists():
            issued_chain = certs.load_certs(cert_path)
            if pki.spki_der(issued_chain[0].public_key()) == pki.spki_der(key.public_key()):
                log.info("est: certificate already issued for this rotation")
                return
        old_chain = ctx.old_certs()
        current = old_chain[0]
        client = EstClient(
            rotation.est_server,
            str(ctx.ca_file()),
            tuple(map(str, ctx.old_identity())),
            label=ctx.agent.est_label,
            sleep=ctx.sleep,
            clock=ctx.clock,
            max_wait=ctx.agent.est_max_wait,
            run=ctx.deadline,
            reply_within=ctx.agent.request_deadline,
        )
        issued = client.simplereenroll(pki.build_csr(key, current))
        anchors = certs.load_certs(ctx.ca_file(), ctx.sota.ca_file)
        # The issuing CA may be an intermediate that neither the reply nor
        # client.pem carries; /cacerts and est.ca_bundle may name it (checked, not trusted).
        known_cas = issued + old_chain[1:] + _ca_bundle(ctx) + _cacerts(client)
        now = datetime.datetime.fromtimestamp(ctx.clock(), datetime.timezone.utc)
        accepted = pki.check_issued(issued, key, current, anchors, known_cas, now)
        leaf = accepted.leaf
        if not accepted.chain_checked:
            log.warning(
                "est: the chain of the issued certificate could not be checked on the device: no "
                "certificate of its CA %r in the EST reply, client.pem, /cacerts or est.ca_bundle; "
                "accepted because it names the current certificate's issuer and authority key; "
                "the gateway decides at confirm, and the old identity is kept until it accepts",
                leaf.issuer.rfc4514_string(),
            )
        if accepted.san_left_out:
            log.warning("est: the EST server left out the current certificate's subjectAltName "
                        "(as foundriesio/estserver does); the new certificate has none")
        chain = [leaf] + _intermediates(issued, leaf, anchors)
        if len(chain) == 1:
            chain += old_chain[1:]  # the EST reply carried only the leaf: keep the known chain
        fsutil.atomic_write(cert_path, certs.certs_pem(chain), 0o644, point="est:new-cert")


def _cacerts(client: EstClient) -> list:
    """The EST server's /cacerts, or nothing when it cannot be had: they only help find the issuer."""
    try:
        return client.cacerts()
    except EstError as err:
        log.warning("est: /cacerts failed, checking the issued certificate without it: %s", err)
        return []


def _ca_bundle(ctx: Context) -> list:
    """The CA certificates of est.ca_bundle (none when unset)."""
    bundle = ctx.agent.est_ca_bundle
    if not bundle:
        return []
    try:
        return certs.load_certs(ctx.root(bundle), bundle)
    except certs.KeyFileError as err:
        raise certs.KeyFileError(
            f"est.ca_bundle: {err}", hint=f"fix or remove est.ca_bundle in {config.CERTROTATE_TOML}"
        ) from err


def _intermediates(issued, leaf, anchors) -> list:
    """The CA certificates of the EST reply that are neither the leaf nor a trust anchor."""
    return [cert for cert in issued if cert != leaf and cert not in anchors]
