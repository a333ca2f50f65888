"""Mutual TLS with a token-held key through Python's own ssl module.

OpenSSL 3's pkcs11-provider (0.4 or newer) decodes a PEM file that holds a
PKCS#11 URI as a private key, so ``SSLContext.load_cert_chain(cert, uri_pem)``
works unchanged and requests stays the HTTP stack. The provider is loaded into
the process's default OpenSSL library context from a configuration the agent
writes into memory (memfd): the PIN is never on disk, on a command line, in
the environment or in any child process (memfds are close-on-exec).

Loaded once per process, before the first TLS context with a token key.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import os
import ssl
import threading
from urllib.parse import quote

from .pkcs11 import TokenError

PEM_LABEL = "PKCS#11 PROVIDER URI"
# pkcs11-provider's own description string; its decoder refuses any other.
_URI_FILE_DESCRIPTION = b"PKCS#11 Provider URI v1.0"
_VISIBLE_STRING, _UTF8_STRING, _SEQUENCE = 0x1A, 0x0C, 0x30

_loaded: set[str] = set()
_lock = threading.Lock()
_pin_fds: list[int] = []  # kept open: the provider may read its PIN file at each login

# "default" stays active beside pkcs11: once a provider is loaded explicitly,
# OpenSSL no longer falls back to it by itself. no-deinit: at exit the provider
# must not finalise the token module, which the agent's own binding shares.
# cache-keys off: the provider would copy keys into session objects, which the
# agent's searches of the token would then meet beside the token's own.
_CONFIG = """openssl_conf = certrotate_conf
[certrotate_conf]
providers = certrotate_providers
[certrotate_providers]
default = certrotate_default
pkcs11 = certrotate_pkcs11
[certrotate_default]
activate = 1
[certrotate_pkcs11]
pkcs11-module-path = {module}
pkcs11-module-token-pin = file:/proc/self/fd/{pin_fd}
pkcs11-module-quirks = no-deinit
pkcs11-module-load-behavior = early
pkcs11-module-cache-keys = false
activate = 1
"""


def private_key_uri(token_label: str, key_id: bytes) -> str:
    """The RFC 7512 URI of the private key ``key_id`` in the token ``token_label``."""
    return (f"pkcs11:token={quote(token_label, safe='')};"
            f"id={''.join(f'%{byte:02x}' for byte in key_id)};type=private")


def uri_pem(uri: str) -> bytes:
    """pkcs11-provider's PEM form of ``uri``: SEQUENCE { VisibleString desc, UTF8String uri }."""
    from .pki import der

    body = der(_SEQUENCE, der(_VISIBLE_STRING, _URI_FILE_DESCRIPTION), der(_UTF8_STRING, uri.encode()))
    return (f"-----BEGIN {PEM_LABEL}-----\n".encode() + base64.encodebytes(body)
            + f"-----END {PEM_LABEL}-----\n".encode())


def _libcrypto() -> ctypes.CDLL:
    """The libcrypto the ssl module uses (already mapped: dlopen returns it)."""
    for name in ("libcrypto.so.3", ctypes.util.find_library("crypto")):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    raise TokenError(f"cannot find OpenSSL's libcrypto ({ssl.OPENSSL_VERSION})",
                     hint="certrotate needs OpenSSL 3 for token-held keys")


def load(module: str, pin: str) -> None:
    """Load pkcs11-provider for ``module`` into this process's OpenSSL, once."""
    with _lock:
        if module in _loaded:
            return
        if ssl.OPENSSL_VERSION_INFO < (3, 0):
            raise TokenError(f"Python's ssl module uses {ssl.OPENSSL_VERSION}",
                             hint="token-held keys need OpenSSL 3 and pkcs11-provider 0.4 or newer")
        if any(c in module for c in "\n\r$\"'#"):
            raise TokenError(f"p11.module {module!r} has characters OpenSSL's configuration cannot hold",
                             hint="install the PKCS#11 module under a plain path")
        libcrypto = _libcrypto()
        pin_fd = os.memfd_create("certrotate-pin")  # close-on-exec, as memfds are by default
        loaded = False
        try:
            os.write(pin_fd, pin.encode())
            config_fd = os.memfd_create("certrotate-openssl")
            try:
                os.write(config_fd, _CONFIG.format(module=module, pin_fd=pin_fd).encode())
                libcrypto.OSSL_LIB_CTX_load_config.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
                libcrypto.OSSL_LIB_CTX_load_config.restype = ctypes.c_int
                loaded = (libcrypto.OSSL_LIB_CTX_load_config(None, f"/proc/self/fd/{config_fd}".encode()) == 1
                          and _provider_available(libcrypto))
            finally:
                os.close(config_fd)
        finally:
            if not loaded:
                os.close(pin_fd)
        if not loaded:
            raise TokenError(
                "OpenSSL could not load pkcs11-provider",
                hint="install pkcs11-provider 0.4 or newer (Debian bookworm: bookworm-backports; "
                "Yocto: meta-certrotate with CERTROTATE_PKCS11 enabled)",
            )
        _pin_fds.append(pin_fd)
        _loaded.add(module)


def _provider_available(libcrypto: ctypes.CDLL) -> bool:
    libcrypto.OSSL_PROVIDER_available.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    libcrypto.OSSL_PROVIDER_available.restype = ctypes.c_int
    return libcrypto.OSSL_PROVIDER_available(None, b"pkcs11") == 1
