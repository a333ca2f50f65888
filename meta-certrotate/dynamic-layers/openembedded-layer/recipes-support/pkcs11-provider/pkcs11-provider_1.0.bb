SUMMARY = "OpenSSL 3 provider for keys held in PKCS#11 tokens"
DESCRIPTION = "pkcs11-provider lets OpenSSL 3 use keys and certificates that \
               a PKCS#11 token holds, through the token's PKCS#11 module. From \
               0.4 on it decodes PEM files holding a PKCS#11 URI, which \
               certrotate hands to Python's ssl module for mutual TLS with a \
               token-held key."
HOMEPAGE = "https://github.com/latchset/pkcs11-provider"
BUGTRACKER = "https://github.com/latchset/pkcs11-provider/issues"
SECTION = "libs"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://COPYING;md5=b53b787444a60266932bd270d1cf2d45"

# libcrypto and libssl 3.0.7 or newer are all meson.build requires. p11-kit is
# optional there and only sets the module for configurations that name none;
# certrotate always names its module (sota.toml's p11.module), so it is left
# out. Upstream's test programs are not built by default.
DEPENDS = "openssl"

SRC_URI = "git://github.com/latchset/pkcs11-provider.git;protocol=https;branch=main"
# Tag v1.0.
SRCREV = "8f6b94409d4872265076df310492da1e5f6abdf7"
S = "${WORKDIR}/git"

inherit meson pkgconfig

# meta-oe scarthgap has pkcs11-provider 0.3, which cannot decode PEM-wrapped
# URIs. This recipe is a provider only with CERTROTATE_PKCS11 = "1", set in
# global configuration (local.conf, distro): this recipe reads it as well as
# certrotate's. Off, it is skipped (base.bbclass's SKIP_RECIPE, weak so that a
# SKIP_RECIPE of the configuration's own wins), so the layer changes nothing
# for pkcs11-provider and meta-oe's recipe stays the one built. On, this
# layer's priority (6, above meta-oe's 5) makes it the provider. Neither
# DEFAULT_PREFERENCE = "-1" nor a PREFERRED_VERSION set from the layer when on
# would do: BitBake weighs DEFAULT_PREFERENCE only among recipes of the same
# layer priority, so with the variable off this 1.0 would still be chosen over
# meta-oe's 0.3.
SKIP_RECIPE[pkcs11-provider] ?= "${@'' if d.getVar('CERTROTATE_PKCS11') == '1' else 'meta-certrotate provides pkcs11-provider 1.0 only with CERTROTATE_PKCS11 = 1'}"

# Installed into libcrypto's modulesdir, where OpenSSL finds the provider by name.
FILES:${PN} += "${libdir}/ossl-modules/pkcs11.so"
