SUMMARY = "Crash-safe rotation of the device's TLS client key and certificate"
DESCRIPTION = "certrotate renews the device's aktualizr-lite/fioconfig client \
               identity by EST simple re-enrollment, speaking FoundriesFactory's \
               rotation protocol, so that a power cut at any moment leaves a \
               working identity."
HOMEPAGE = "https://github.com/certrotate/certrotate"
BUGTRACKER = "https://github.com/certrotate/certrotate/issues"
SECTION = "admin"
LICENSE = "MIT"
LIC_FILES_CHKSUM = "file://agent/LICENSE;md5=992c6683193134864c76716a34638229"
CVE_PRODUCT = "certrotate"

# The agent is built from agent/ of the repository this layer lives in,
# unpacked with the repository's layout below ${S}. Set CERTROTATE_REPO_DIR
# (e.g. in local.conf) to build another checkout.
CERTROTATE_REPO_DIR ?= "${@os.path.normpath(os.path.join(d.getVar('FILE_DIRNAME'), '..', '..', '..'))}"
FILESEXTRAPATHS:prepend := "${CERTROTATE_REPO_DIR}:"
SRC_URI = "file://agent;subdir=${BP} \
           file://tests/agent;subdir=${BP} \
           file://tests/pki.py;subdir=${BP} \
           file://tests/estfaults.py;subdir=${BP} \
           file://certrotate.service \
           file://certrotate.timer \
           file://certrotate.toml.in \
           file://fioconfig-handler \
           file://fioconfig-takeover.conf \
           file://run-ptest \
"
PEP517_SOURCE_PATH = "${S}/agent"

inherit python_setuptools_build_meta systemd ptest features_check

# The agent restarts aktualizr-lite and fioconfig through systemd.
REQUIRED_DISTRO_FEATURES = "systemd"

# Written to /etc/certrotate/certrotate.toml; see the layer's README.md.
CERTROTATE_EST_SERVER ??= ""
CERTROTATE_EST_LABEL ??= ""
CERTROTATE_LIFETIME_FRACTION ??= "0.667"
CERTROTATE_MAX_AGE_DAYS ??= "365"
CERTROTATE_RESTART_SERVICES ??= "aktualizr-lite.service fioconfig.service"
# "1": certrotate runs the rotations fioctl rotate-certs asks for. Its handler
# takes fioconfig's name, renew-client-cert (the fioconfig bbappend under
# dynamic-layers/ drops fioconfig's own), and fioconfig's units set aside a
# rotation of fioconfig's own instead of resuming it. "0": certrotate's
# handler is certrotate-renew-client-cert and fioconfig is left alone.
CERTROTATE_FIOCONFIG_TAKEOVER ??= "0"
# "1": the device's identity may live in a PKCS#11 token. certrotate then
# needs pkcs11-provider 0.4 or newer (it opens PEM-wrapped key URIs), which the
# layer's dynamic-layers/openembedded-layer recipe provides in place of
# meta-oe's 0.3; that recipe reads the variable too, so set it in global
# configuration (local.conf, distro), not in a bbappend. The PKCS#11 module
# itself (softhsm, tpm2-pkcs11, OP-TEE's libckteec, ...) is the product's to
# install. "0": no token support is pulled in.
CERTROTATE_PKCS11 ??= "0"

SYSTEMD_SERVICE:${PN} = "certrotate.timer"

# Plain POSIX sh with install and sed only: tests/recipe_install.py runs this
# body outside BitBake to build the test images from the same payload.
do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${WORKDIR}/certrotate.service ${D}${systemd_system_unitdir}/certrotate.service
    install -m 0644 ${WORKDIR}/certrotate.timer ${D}${systemd_system_unitdir}/certrotate.timer
    sed -i -e 's|@BINDIR@|${bindir}|g' ${D}${systemd_system_unitdir}/certrotate.service

    restart_units=""
    for unit in ${CERTROTATE_RESTART_SERVICES}; do
        restart_units="$restart_units${restart_units:+, }\"$unit\""
    done
    install -d ${D}${sysconfdir}/certrotate
    install -m 0644 ${WORKDIR}/certrotate.toml.in ${D}${sysconfdir}/certrotate/certrotate.toml
    sed -i -e 's|@EST_SERVER@|${CERTROTATE_EST_SERVER}|g' \
        -e 's|@EST_LABEL@|${CERTROTATE_EST_LABEL}|g' \
        -e 's|@LIFETIME_FRACTION@|${CERTROTATE_LIFETIME_FRACTION}|g' \
        -e 's|@MAX_AGE_DAYS@|${CERTROTATE_MAX_AGE_DAYS}|g' \
        -e "s|@RESTART_SERVICES@|$restart_units|g" \
        ${D}${sysconfdir}/certrotate/certrotate.toml
    if [ -z "${CERTROTATE_EST_SERVER}" ]; then
        # No built-in EST server: leave the key out (commented) rather than
        # write an empty URL; handler-started rotations carry ESTSERVER=.
        sed -i -e 's|^server = ""$|# server = "https://est.example.org/.well-known/est"|' \
            ${D}${sysconfdir}/certrotate/certrotate.toml
    fi

    handler=certrotate-renew-client-cert
    if [ "${CERTROTATE_FIOCONFIG_TAKEOVER}" = "1" ]; then
        handler=renew-client-cert
        for unit in fioconfig.service fioconfig-extract.service; do
            install -d ${D}${systemd_system_unitdir}/$unit.d
            install -m 0644 ${WORKDIR}/fioconfig-takeover.conf ${D}${systemd_system_unitdir}/$unit.d/certrotate.conf
            sed -i -e 's|@LOCALSTATEDIR@|${localstatedir}|g' ${D}${systemd_system_unitdir}/$unit.d/certrotate.conf
        done
    fi
    install -d ${D}${datadir}/fioconfig/handlers
    install -m 0755 ${WORKDIR}/fioconfig-handler ${D}${datadir}/fioconfig/handlers/$handler
    sed -i -e 's|@BINDIR@|${bindir}|g' ${D}${datadir}/fioconfig/handlers/$handler
}

# The agent's unit tests with the helper modules they import from tests/.
do_install_ptest() {
    install -d ${D}${PTEST_PATH}/tests/agent
    install -m 0644 ${S}/tests/pki.py ${S}/tests/estfaults.py ${D}${PTEST_PATH}/tests/
    install -m 0644 ${S}/tests/agent/*.py ${D}${PTEST_PATH}/tests/agent/
    install -d ${D}${PTEST_PATH}/tests/agent/fixtures
    install -m 0644 ${S}/tests/agent/fixtures/* ${D}${PTEST_PATH}/tests/agent/fixtures/
}

# systemd.bbclass packages the timer (SYSTEMD_SERVICE); the service it starts
# has no [Install] section and is listed here.
FILES:${PN} += "${systemd_system_unitdir}/certrotate.service \
                ${sysconfdir}/certrotate/certrotate.toml \
                ${datadir}/fioconfig/handlers \
                ${systemd_system_unitdir}/fioconfig.service.d \
                ${systemd_system_unitdir}/fioconfig-extract.service.d \
"
CONFFILES:${PN} = "${sysconfdir}/certrotate/certrotate.toml"

# Exactly what agent/certrotate imports (tests/layer checks both lists
# against the source); ptest.bbclass adds ${PN} to the ptest package.
RDEPENDS:${PN} = "python3-core \
                  python3-crypt \
                  python3-cryptography \
                  python3-ctypes \
                  python3-datetime \
                  python3-email \
                  python3-fcntl \
                  python3-io \
                  python3-json \
                  python3-logging \
                  python3-math \
                  python3-netclient \
                  python3-requests \
                  python3-tomllib \
                  python3-urllib3 \
"
# Not an import: the OpenSSL provider the agent loads by name for token-held
# keys. The version bound makes the image fail to assemble, rather than TLS on
# the device, should meta-oe's 0.3 be built after all.
RDEPENDS:${PN}:append = " ${@'pkcs11-provider (>= 0.4)' if d.getVar('CERTROTATE_PKCS11') == '1' else ''}"
RDEPENDS:${PN}-ptest += "python3-pytest"
