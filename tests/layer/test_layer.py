"""Checks of meta-certrotate and kas/ that run without BitBake.

oelint-adv over the layer, the kas files against kas's JSON schema, the
recipe's payload (installed through tests/recipe_install.py, as the QEMU image
gets it) against the repository and against the packages' FILES, and the
recipe's RDEPENDS against what the agent and its tests really import.
"""

from __future__ import annotations

import ast
import configparser
import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import jsonschema
import kas
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

import recipe_install  # noqa: E402

# Every check runs tools in subprocesses (each with its own timeout); this
# bounds the whole module should one of them hang anyway.
pytestmark = pytest.mark.timeout(900)

LAYER = REPO / "meta-certrotate"
FILES_DIR = recipe_install.RECIPE_DIR / "files"
OELINT_CONFIG = REPO / ".oelint.cfg"
MANIFEST = json.loads((Path(__file__).parent / "python3_manifest_scarthgap.json").read_text())["modules"]
# scarthgap's python3 is 3.12; the recipe's real site-packages directory.
TARGET_SITELIB = "/usr/lib/python3.12/site-packages"

# Import name -> the recipe that provides it, for everything outside the
# standard library that the agent or its tests may import.
THIRD_PARTY = {
    "cryptography": "python3-cryptography",
    "requests": "python3-requests",
    "urllib3": "python3-urllib3",
    "pytest": "python3-pytest",
}

# scarthgap's bitbake.conf FILES defaults, in PACKAGES order (ptest.bbclass
# puts ${PN}-ptest first), before the classes' and the recipe's additions.
DEFAULT_FILES = {
    "${PN}-ptest": "",
    "${PN}-src": "",
    "${PN}-dbg": "/usr/lib/debug /usr/lib/debug-static /usr/src/debug",
    "${PN}-staticdev": "${libdir}/*.a ${base_libdir}/*.a ${libdir}/${BPN}/*.a",
    "${PN}-dev": "${includedir} ${base_libdir}/lib*.so ${libdir}/lib*.so ${libdir}/*.la ${libdir}/*.o "
                 "${libdir}/pkgconfig ${datadir}/pkgconfig ${datadir}/aclocal ${base_libdir}/*.o "
                 "${libdir}/${BPN}/*.la ${base_libdir}/*.la ${libdir}/cmake ${datadir}/cmake",
    "${PN}-doc": "${docdir} ${mandir} ${infodir} ${datadir}/gtk-doc ${datadir}/gnome/help",
    "${PN}-locale": "${datadir}/locale",
    "${PN}": "${bindir}/* ${sbindir}/* ${libexecdir}/* ${libdir}/lib*.so.* ${sysconfdir} ${sharedstatedir} "
             "${localstatedir} ${base_bindir}/* ${base_sbindir}/* ${base_libdir}/*.so.* ${base_prefix}/lib/udev "
             "${prefix}/lib/udev ${base_libdir}/udev ${libdir}/udev ${datadir}/${BPN} ${libdir}/${BPN}/* "
             "${datadir}/pixmaps ${datadir}/applications ${datadir}/idl ${datadir}/omf ${datadir}/sounds "
             "${libdir}/bonobo/servers",
}
# What the inherited classes add: setuptools3-base, ptest, and systemd for
# each unit in SYSTEMD_SERVICE.
CLASS_FILES = {
    "${PN}": "${PYTHON_SITEPACKAGES_DIR}",
    "${PN}-staticdev": "${PYTHON_SITEPACKAGES_DIR}/*.a",
    "${PN}-dev": "${PYTHON_SITEPACKAGES_DIR}/*.la",
    "${PN}-ptest": "${PTEST_PATH}",
}
MORE_PATHS = {"base_bindir": "/usr/bin", "base_sbindir": "/usr/sbin", "base_libdir": "/usr/lib",
              "includedir": "/usr/include", "docdir": "/usr/share/doc", "mandir": "/usr/share/man",
              "infodir": "/usr/share/info", "sharedstatedir": "/com"}


@pytest.fixture(scope="module")
def recipe() -> recipe_install.Recipe:
    return recipe_install.parse_recipe()


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> tuple[Path, list[str]]:
    destdir = tmp_path_factory.mktemp("image")
    return destdir, recipe_install.install_payload(destdir, python_sitelib=TARGET_SITELIB)


def expand(value: str, bindings: dict[str, str]) -> str:
    """Expand ${VAR} references as BitBake would, leaving unknown ones as they are."""
    for _ in range(10):
        expanded = re.sub(r"\$\{([A-Za-z0-9_:\-]+)\}", lambda m: bindings.get(m.group(1), m.group(0)), value)
        if expanded == value:
            return expanded
        value = expanded
    raise AssertionError(f"recursive expansion in {value!r}")


def bindings_for(recipe: recipe_install.Recipe) -> dict[str, str]:
    return {**recipe_install.PATH_VARIABLES, **MORE_PATHS, **recipe.certrotate_defaults(),
            "PN": recipe.pn, "BPN": recipe.pn, "PV": recipe.pv, "BP": recipe.bp,
            "PYTHON_SITEPACKAGES_DIR": TARGET_SITELIB,
            "PTEST_PATH": f"{recipe_install.PATH_VARIABLES['libdir']}/{recipe.pn}/ptest"}


def matches(path: str, pattern: str) -> bool:
    """BitBake's FILES semantics: a glob per path component; a matched directory takes its subtree."""
    parts, wanted = PurePosixPath(path).parts, PurePosixPath(pattern).parts
    return len(parts) >= len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted))


def package_files(recipe: recipe_install.Recipe) -> dict[str, list[str]]:
    """FILES of every package, expanded, in PACKAGES order."""
    bindings = bindings_for(recipe)
    files = {}
    for package, default in DEFAULT_FILES.items():
        value = " ".join([default, CLASS_FILES.get(package, ""),
                          recipe.variables.get(f"FILES:{package}", "")])
        for unit in recipe.variables.get(f"SYSTEMD_SERVICE:{package}", "").split():
            value += f" {recipe_install.PATH_VARIABLES['systemd_system_unitdir']}/{unit}"
        files[expand(package, bindings)] = [expand(item, bindings) for item in value.split()]
    return files


def owning_package(path: str, files: dict[str, list[str]]) -> str | None:
    return next((package for package, patterns in files.items()
                 if any(matches(path, pattern) for pattern in patterns)), None)


def test_oelint_reports_nothing_above_info():
    targets = sorted(str(p) for p in LAYER.rglob("*") if p.suffix in (".bb", ".bbappend", ".conf", ".inc"))
    assert any(t.endswith(".bb") for t in targets) and any(t.endswith("layer.conf") for t in targets)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "oelint-adv"), "--release", "scarthgap", "--mode", "all",
         "--quiet", "--relpaths", *targets],
        cwd=REPO, env={**os.environ, "OELINT_CONFIG": str(OELINT_CONFIG)}, capture_output=True, text=True,
        timeout=300)
    findings = [line for line in (result.stdout + result.stderr).splitlines() if re.search(r":(info|warning|error):", line)]
    above_info = [line for line in findings if ":info:" not in line]
    assert not above_info, "oelint-adv findings above info:\n" + "\n".join(above_info)
    assert result.returncode in (0, 1), result.stderr  # 1 = there were (info) findings


def test_every_oelint_suppression_states_its_reason():
    lines = OELINT_CONFIG.read_text().splitlines()
    config = configparser.ConfigParser()
    config.read(OELINT_CONFIG)
    rules = [rule for rule in config.get("oelint", "suppress").split() if rule]
    assert rules
    for rule in rules:
        index = next(i for i, line in enumerate(lines) if line.strip() == rule)
        above = lines[:index]
        # The nearest line above that is not another rule must be a comment.
        while above and above[-1].strip() in rules:
            above.pop()
        assert above and above[-1].strip().startswith("#"), f"suppression {rule} has no reason comment above it"


@pytest.mark.parametrize("kas_file", sorted(p.name for p in (REPO / "kas").glob("*.yml")))
def test_kas_file_is_valid_against_kas_schema(kas_file):
    schema = json.loads((Path(kas.__file__).parent / "schema-kas.json").read_text())
    config = yaml.safe_load((REPO / "kas" / kas_file).read_text())
    jsonschema.validate(config, schema)
    # Format 14 is the newest that kas 4.x reads.
    assert config["header"]["version"] == 14
    for name, repo in config.get("repos", {}).items():
        if repo and "url" in repo:
            assert re.fullmatch(r"[0-9a-f]{40}", repo.get("commit", "")), f"{kas_file}: repo {name} is not pinned"


def test_kas_base_files_build_this_layer_from_this_repository():
    for kas_file in ("lmp-intel-corei7-64.yml", "poky-qemux86-64.yml"):
        config = yaml.safe_load((REPO / "kas" / kas_file).read_text())
        layer_repos = [repo for repo in config["repos"].values() if repo and "meta-certrotate" in (repo.get("layers") or {})]
        assert layer_repos == [{"layers": {"meta-certrotate": None}}], kas_file  # no url, no path: this repository
        assert "certrotate" in config["local_conf_header"]["certrotate"]


def test_recipe_version_is_the_agents(recipe):
    project = tomllib.loads((REPO / "agent" / "pyproject.toml").read_text())["project"]
    assert recipe.pv == project["version"]


def test_license_checksum_covers_the_agents_license(recipe):
    (entry,) = recipe.variables["LIC_FILES_CHKSUM"].split()
    location, *params = entry[len("file://"):].split(";")
    params = dict(p.split("=", 1) for p in params)
    assert hashlib.md5((REPO / location).read_bytes()).hexdigest() == params["md5"], \
        f"{location} changed: update LIC_FILES_CHKSUM"
    project = tomllib.loads((REPO / "agent" / "pyproject.toml").read_text())["project"]
    assert project["license"]["text"] == recipe.variables["LICENSE"]


def test_every_source_file_is_in_the_repository_and_used(recipe):
    entries = recipe.src_uri()
    for location, _params in entries:
        assert (REPO / location).exists() or (FILES_DIR / location).exists(), location
    used = {location for location, _ in entries}
    unused = sorted(p.name for p in FILES_DIR.iterdir() if p.name not in used)
    assert not unused, f"files/ entries not in SRC_URI: {unused}"


def test_every_installed_file_lands_in_the_right_package(recipe, payload):
    _, installed = payload
    files = package_files(recipe)
    ptest_path = bindings_for(recipe)["PTEST_PATH"]
    for path in installed:
        wanted = "certrotate-ptest" if path.startswith(ptest_path + "/") else "certrotate"
        assert owning_package(path, files) == wanted, f"{path} is packaged in {owning_package(path, files)}"


def test_payload_holds_the_agent_units_settings_and_handler(recipe, payload):
    destdir, installed = payload
    handler = "/usr/share/fioconfig/handlers/certrotate-renew-client-cert"
    for path in ("/usr/bin/certrotate", f"{TARGET_SITELIB}/certrotate/__init__.py",
                 "/usr/lib/systemd/system/certrotate.service", "/usr/lib/systemd/system/certrotate.timer",
                 "/etc/certrotate/certrotate.toml", handler, "/usr/lib/certrotate/ptest/run-ptest"):
        assert path in installed
    agent_modules = sorted(p.name for p in (REPO / "agent" / "certrotate").glob("*.py"))
    assert agent_modules == sorted(p.name for p in (destdir / TARGET_SITELIB.lstrip("/") / "certrotate").glob("*.py"))
    script = (destdir / "usr/bin/certrotate").read_text()
    assert script.startswith("#!/usr/bin/env python3\n")
    for path in ("usr/bin/certrotate", handler.lstrip("/"), "usr/lib/certrotate/ptest/run-ptest"):
        assert os.access(destdir / path, os.X_OK), path
    assert (destdir / handler.lstrip("/")).read_text().splitlines()[-1] == 'exec /usr/bin/certrotate handler "$@"'
    assert "@" not in (destdir / "usr/lib/systemd/system/certrotate.service").read_text()


def test_installed_console_script_runs_the_installed_agent(payload):
    destdir, _ = payload
    site = destdir / TARGET_SITELIB.lstrip("/")
    result = subprocess.run([sys.executable, "-I", "-c",
                             f"import sys; sys.path.insert(0, {str(site)!r}); import certrotate; print(certrotate.__file__)"],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().startswith(str(site)), result.stderr
    result = subprocess.run([sys.executable, str(destdir / "usr/bin/certrotate"), "--help"],
                            env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("check", "handler", "rotate", "status"):
        assert command in result.stdout


def test_settings_default_to_the_contract_and_follow_the_variables(tmp_path):
    recipe_install.install_payload(tmp_path / "a", ptest=False)
    defaults = tomllib.loads((tmp_path / "a/etc/certrotate/certrotate.toml").read_text())
    assert defaults == {"est": {"label": ""},
                        "renewal": {"lifetime_fraction": 0.667, "max_age_days": 365},
                        "services": {"restart": ["aktualizr-lite.service", "fioconfig.service"]}}
    recipe_install.install_payload(tmp_path / "b", ptest=False, overrides={
        "CERTROTATE_EST_SERVER": "https://est.example.org:8443/.well-known/est",
        "CERTROTATE_EST_LABEL": "devices", "CERTROTATE_LIFETIME_FRACTION": "0.5",
        "CERTROTATE_MAX_AGE_DAYS": "90", "CERTROTATE_RESTART_SERVICES": "aktualizr-lite.service"})
    settings = tomllib.loads((tmp_path / "b/etc/certrotate/certrotate.toml").read_text())
    assert settings == {"est": {"server": "https://est.example.org:8443/.well-known/est", "label": "devices"},
                        "renewal": {"lifetime_fraction": 0.5, "max_age_days": 90},
                        "services": {"restart": ["aktualizr-lite.service"]}}


TAKEOVER_DROP_INS = [f"/usr/lib/systemd/system/{unit}.d/certrotate.conf"
                     for unit in ("fioconfig.service", "fioconfig-extract.service")]


def test_fioconfig_takeover_is_one_variable(recipe, payload, tmp_path):
    """Off: certrotate's handler keeps clear of fioconfig's name and its units.
    On: the handler is renew-client-cert and fioconfig's units get the drop-in."""
    _, installed = payload
    assert recipe.variables["CERTROTATE_FIOCONFIG_TAKEOVER"] == "0"
    assert "/usr/share/fioconfig/handlers/renew-client-cert" not in installed
    assert not set(TAKEOVER_DROP_INS) & set(installed)
    taken = recipe_install.install_payload(tmp_path / "on", ptest=False,
                                           overrides={"CERTROTATE_FIOCONFIG_TAKEOVER": "1"})
    assert "/usr/share/fioconfig/handlers/renew-client-cert" in taken
    assert "/usr/share/fioconfig/handlers/certrotate-renew-client-cert" not in taken
    assert set(TAKEOVER_DROP_INS) <= set(taken)
    files = package_files(recipe)
    for path in TAKEOVER_DROP_INS + ["/usr/share/fioconfig/handlers/renew-client-cert"]:
        assert owning_package(path, files) == "certrotate", path


def test_takeover_drop_in_sets_a_fioconfig_rotation_aside(tmp_path):
    """The ExecStartPre line, run as systemd would (after its $$ unescaping): fioconfig
    finds no cert-rotation.state to resume; nothing else moves; no state is no error."""
    recipe_install.install_payload(tmp_path / "on", ptest=False, overrides={"CERTROTATE_FIOCONFIG_TAKEOVER": "1"})
    text = (tmp_path / "on" / TAKEOVER_DROP_INS[0].lstrip("/")).read_text()
    [line] = [l for l in text.splitlines() if l.startswith("ExecStartPre=")]
    command = line.removeprefix("ExecStartPre=-").replace("$$", "$")
    assert "@" not in command and command.endswith(" sh /var/sota/cert-rotation.state")
    sota = tmp_path / "var/sota"
    sota.mkdir(parents=True)
    command = command.replace("/var/sota", str(sota))
    (sota / "cert-rotation.state.completed").write_text("{}")
    argv = shlex.split(command)
    assert subprocess.run(argv, timeout=30).returncode == 0
    (sota / "cert-rotation.state").write_text('{"RotationId": "certs-1"}')
    assert subprocess.run(argv, timeout=30).returncode == 0
    assert sorted(p.name for p in sota.iterdir()) == [
        "cert-rotation.state.completed", "cert-rotation.state.set-aside-by-certrotate"]


class Datastore(dict):
    """The d of a ${@...} expression: getVar of the configuration's variables (None when unset)."""

    def getVar(self, name):
        return self.get(name)


def inline_expression(value: str) -> str:
    """The Python expression of a value that is exactly one ${@...}."""
    match = re.fullmatch(r"\$\{@(.*)\}", value.strip())
    assert match, f"{value!r} is not one ${{@...}} expression"
    return match.group(1)


def test_fioconfig_bbappend_is_dynamic_and_follows_the_variable(tmp_path):
    """Only with meta-lmp-base in the build, and only with the takeover on, does
    fioconfig lose its handler; off, the append adds nothing to fioconfig."""
    layer_conf = (LAYER / "conf/layer.conf").read_text()
    assert 'BBFILES_DYNAMIC += "meta-lmp-base:${LAYERDIR}/dynamic-layers/meta-lmp-base/' in layer_conf
    [append] = (LAYER / "dynamic-layers/meta-lmp-base").rglob("*.bbappend")
    assert append.name == "fioconfig_%.bbappend"
    [expression] = re.findall(r"^require \$\{@(.*)\}$", append.read_text(), re.M)
    chosen = {value: eval(expression, {}, {"d": Datastore(CERTROTATE_FIOCONFIG_TAKEOVER=value)})
              for value in ("1", "0", None)}
    assert chosen["0"] == chosen[None] == ""
    include = append.parent / chosen["1"]
    # The included do_install:append, run against an installed fioconfig tree.
    [body] = re.findall(r"^do_install:append\(\) \{\n(.*?)^\}", include.read_text(), re.M | re.S)
    handlers = tmp_path / "usr/share/fioconfig/handlers"
    handlers.mkdir(parents=True)
    for name in ("renew-client-cert", "aktualizr-toml-update", "factory-config-vpn"):
        (handlers / name).write_text("#!/bin/sh\n")
    script = body.replace("${D}", str(tmp_path)).replace("${datadir}", "/usr/share")
    assert subprocess.run(["sh", "-e", "-c", script], timeout=30).returncode == 0
    assert sorted(p.name for p in handlers.iterdir()) == ["aktualizr-toml-update", "factory-config-vpn"]


# meta-oe scarthgap (meta-openembedded, branch scarthgap): the priority in
# meta-oe/conf/layer.conf and the version of its pkcs11-provider recipe.
META_OE_PRIORITY = 5
META_OE_PKCS11_PROVIDER = "0.3"
# The oldest pkcs11-provider that decodes PEM files holding a PKCS#11 URI.
PKCS11_PROVIDER_PEM_URI = "0.4"
PKCS11_PROVIDER_DIR = LAYER / "dynamic-layers/openembedded-layer/recipes-support/pkcs11-provider"


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def layer_conf_values(name: str) -> list[str]:
    return re.findall(rf'^{re.escape(name)}\s*\+?=\s*"(.*)"$', (LAYER / "conf/layer.conf").read_text(), re.M)


def pkcs11_provider_recipe() -> recipe_install.Recipe:
    [path] = PKCS11_PROVIDER_DIR.glob("*.bb")
    return recipe_install.parse_recipe(path)


def test_dynamic_layer_files_are_read_only_with_their_layer():
    """Every file under dynamic-layers/<collection>/ is matched by a BBFILES_DYNAMIC entry of
    that collection and by no plain BBFILES entry; the pkcs11-provider recipe is meta-oe's."""
    entries = [entry.split(":", 1) for value in layer_conf_values("BBFILES_DYNAMIC") for entry in value.split()]
    assert "openembedded-layer" in {collection for collection, _ in entries}

    def globbed(pattern: str) -> set[Path]:
        assert pattern.startswith("${LAYERDIR}/"), pattern
        return set(LAYER.glob(pattern.removeprefix("${LAYERDIR}/")))

    plain = set().union(*(globbed(p) for value in layer_conf_values("BBFILES") for p in value.split()))
    files = {p for p in (LAYER / "dynamic-layers").rglob("*") if p.suffix in (".bb", ".bbappend")}
    for path in files:
        collection = path.relative_to(LAYER / "dynamic-layers").parts[0]
        assert [c for c, pattern in entries if path in globbed(pattern)] == [collection], path
        assert path not in plain, path
    assert {p for p in files if p.parent == PKCS11_PROVIDER_DIR} == set(PKCS11_PROVIDER_DIR.glob("pkcs11-provider_*.bb"))


def test_token_support_is_one_variable_off_by_default(recipe, payload, tmp_path):
    """Off (the default, set nowhere but the recipe's weak default): no pkcs11-provider in
    RDEPENDS. On: pkcs11-provider, bound to a version that decodes PEM-wrapped URIs, which
    meta-oe's does not; the payload itself is the same either way."""
    assert recipe.variables["CERTROTATE_PKCS11"] == "0"
    assert "pkcs11-provider" not in agent_rdepends(recipe, None)
    assert "pkcs11-provider" not in agent_rdepends(recipe, "0")
    bound = agent_rdepends(recipe, "1")["pkcs11-provider"]
    operator, _, least = bound.partition(" ")
    assert operator == ">=" and version(least) == version(PKCS11_PROVIDER_PEM_URI), bound
    assert version(META_OE_PKCS11_PROVIDER) < version(least) <= version(pkcs11_provider_recipe().pv)
    # Nothing else sets it: not the layer's configuration, not the pkcs11-provider recipe, not kas.
    setting = re.compile(r"^\s*CERTROTATE_PKCS11\b\s*(\[[^]]*\])?\s*[?:+.=]*=", re.M)
    metadata = [p for p in LAYER.rglob("*") if p.suffix in (".bb", ".bbappend", ".bbclass", ".conf", ".inc")]
    elsewhere = [p for p in [*metadata, *(REPO / "kas").glob("*.yml")]
                 if p != recipe.path and setting.search(p.read_text())]
    assert not elsewhere, elsewhere
    _, installed = payload
    token = recipe_install.install_payload(tmp_path / "on", ptest=False, python_sitelib=TARGET_SITELIB,
                                           overrides={"CERTROTATE_PKCS11": "1"})
    ptest_path = bindings_for(recipe)["PTEST_PATH"]
    assert token == [path for path in installed if not path.startswith(ptest_path + "/")]


def test_every_variable_is_documented_with_its_default(recipe):
    readme = (LAYER / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(CERTROTATE_[A-Z0-9_]+)` \| (.*?) \|", readme, re.M))
    for name, default in recipe.certrotate_defaults().items():
        assert name in rows, f"{name} is not in meta-certrotate/README.md's list of variables"
        documented = f"`{default}`" if default else "empty"
        assert rows[name] == documented or rows[name].startswith(documented + " "), (name, rows[name])


def test_pkcs11_provider_recipe_is_built_only_with_token_support():
    """Off, the layer's pkcs11-provider skips itself, so meta-oe's stays the provider; on, it is
    not skipped and wins over meta-oe's: a higher (or equal) layer priority and a newer version.
    No DEFAULT_PREFERENCE or PREFERRED_VERSION anywhere changes that for other builds."""
    provider = pkcs11_provider_recipe()
    assert provider.pn == "pkcs11-provider"
    assert version(provider.pv) >= version(PKCS11_PROVIDER_PEM_URI) > version(META_OE_PKCS11_PROVIDER)
    [(flag, expression)] = re.findall(r'^SKIP_RECIPE\[([^]]+)\] \??= "(.*)"$', provider.path.read_text(), re.M)
    assert flag == provider.pn
    skip = {value: eval(inline_expression(expression), {}, {"d": Datastore(CERTROTATE_PKCS11=value)})
            for value in (None, "0", "1")}
    assert skip["1"] == "" and skip["0"] and skip[None] and "CERTROTATE_PKCS11" in skip[None], skip
    [priority] = layer_conf_values("BBFILE_PRIORITY_certrotate")
    assert int(priority) >= META_OE_PRIORITY
    for path in LAYER.rglob("*"):
        if path.is_file() and path.suffix in (".bb", ".bbappend", ".conf", ".inc"):
            assert not re.search(r"^\s*(DEFAULT_PREFERENCE|PREFERRED_VERSION_pkcs11-provider)\b",
                                 path.read_text(), re.M), path


def test_pkcs11_provider_recipe_is_a_meson_build_from_git_into_openssls_modules_directory():
    provider = pkcs11_provider_recipe()
    text = provider.path.read_text()
    variables = provider.variables
    [source] = variables["SRC_URI"].split()
    location, *params = source.split(";")
    params = dict(p.split("=", 1) for p in params)
    assert location == "git://github.com/latchset/pkcs11-provider.git" and params["protocol"] == "https"
    assert params["branch"] and "tag" not in params
    assert re.fullmatch(r"[0-9a-f]{40}", variables["SRCREV"])
    assert variables["S"] == "${WORKDIR}/git"  # scarthgap's git unpack directory
    assert variables["LICENSE"] == "Apache-2.0"
    assert re.fullmatch(r"file://COPYING;md5=[0-9a-f]{32}", variables["LIC_FILES_CHKSUM"])
    assert "openssl" in variables["DEPENDS"].split()
    [inherits] = re.findall(r"^inherit (.*)$", text, re.M)
    assert {"meson", "pkgconfig"} <= set(inherits.split())
    # The agent asks OpenSSL for the provider "pkcs11", which OpenSSL loads as pkcs11.so from its
    # modules directory; the package must hold that file.
    assert b'OSSL_PROVIDER_available(None, b"pkcs11")' in (REPO / "agent/certrotate/tlsprovider.py").read_bytes()
    assert "${libdir}/ossl-modules/pkcs11.so" in variables["FILES:${PN}"].split()


def test_unknown_override_is_refused_with_the_known_names(tmp_path):
    with pytest.raises(recipe_install.RecipeError, match="CERTROTATE_EST_SERVER"):
        recipe_install.install_payload(tmp_path, overrides={"CERTROTATE_EST_SERVR": "x"})


def unit_sections(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        elif "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            current.setdefault(key, []).append(value)
    return sections


def test_service_is_a_hardened_oneshot_started_only_by_the_timer(recipe, payload):
    destdir, _ = payload
    service = unit_sections(destdir / "usr/lib/systemd/system/certrotate.service")
    assert "Install" not in service
    assert service["Unit"]["ConditionPathExists"] == ["/var/sota/sota.toml"]
    assert service["Unit"]["After"] == ["network-online.target time-sync.target"]
    assert service["Unit"]["Wants"] == ["network-online.target"]
    hardening = service["Service"]
    # 3 locked, 4 EST pending, 5 clock not set: each retried by the next timer run.
    assert hardening["SuccessExitStatus"] == ["3 4 5"]
    assert hardening["Type"] == ["oneshot"] and hardening["ExecStart"] == ["/usr/bin/certrotate check"]
    assert hardening["ProtectSystem"] == ["strict"]
    assert hardening["ReadWritePaths"] == ["/var/sota -/etc/sota -/var/lib/softhsm -/etc/tpm2_pkcs11"]
    assert hardening["PrivateTmp"] == ["yes"] and hardening["NoNewPrivileges"] == ["yes"]
    assert "DynamicUser" not in hardening and "User" not in hardening  # root: LmP forbids useradd
    timer = unit_sections(destdir / "usr/lib/systemd/system/certrotate.timer")
    assert timer["Timer"]["OnCalendar"] == ["daily"] and timer["Timer"]["Persistent"] == ["true"]
    assert timer["Timer"]["RandomizedDelaySec"] and timer["Timer"]["OnBootSec"]
    assert timer["Install"]["WantedBy"] == ["timers.target"]
    assert recipe.variables["SYSTEMD_SERVICE:${PN}"] == "certrotate.timer"


def systemd_seconds(span: str) -> float:
    """A systemd time span ("90", "25min", "1h 30s") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}
    parts = re.findall(r"(\d+)\s*([a-z]*)", span)
    assert parts and "".join(n + u for n, u in parts) == span.replace(" ", ""), span
    return sum(int(number) * units[unit] for number, unit in parts)


@pytest.mark.bad_input("EST reply dribbled a byte at a time")
def test_service_start_timeout_outlasts_the_longest_run_of_the_agent(payload):
    # Without it a stalled run would block every later timer run; below the agent's
    # own bound, systemd would kill runs that are still within it.
    from certrotate import rotation

    destdir, _ = payload
    service = unit_sections(destdir / "usr/lib/systemd/system/certrotate.service")
    (timeout,) = service["Service"].get("TimeoutStartSec", ["(none)"])
    assert systemd_seconds(timeout) > rotation.LONGEST_RUN


def test_units_pass_systemd_analyze_verify(payload, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    destdir, _ = payload
    # Verify copies whose ExecStart names the installed script, which exists here.
    for unit in ("certrotate.service", "certrotate.timer"):
        text = (destdir / "usr/lib/systemd/system" / unit).read_text()
        (tmp_path / unit).write_text(text.replace("/usr/bin/certrotate", str(destdir / "usr/bin/certrotate")))
    result = subprocess.run([analyze, "verify", str(tmp_path / "certrotate.timer"), str(tmp_path / "certrotate.service")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_run_ptest_reports_each_test_for_ptest_runner(payload, tmp_path):
    destdir, _ = payload
    ptest = tmp_path / "ptest"
    shutil.copytree(destdir / "usr/lib/certrotate/ptest", ptest)
    shutil.rmtree(ptest / "tests/agent")
    (ptest / "tests/agent").mkdir()
    (ptest / "tests/agent/test_sample.py").write_text(
        "import pytest\nimport pki\n\n"
        "def test_good():\n    assert pki\n\n"
        "def test_bad():\n    assert False\n\n"
        "def test_skipped():\n    pytest.skip('not here')\n")
    result = subprocess.run(["sh", str(ptest / "run-ptest")], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    verdicts = [line for line in result.stdout.splitlines() if re.match(r"(PASS|FAIL|SKIP): ", line)]
    assert sorted(verdicts) == ["FAIL: tests/agent/test_sample.py::test_bad - assert False",
                                "PASS: tests/agent/test_sample.py::test_good",
                                "SKIP: tests/agent/test_sample.py:11: not here"], result.stdout
    assert result.returncode != 0


def test_ptest_collects_every_agent_test_from_the_installed_layout(payload, tmp_path):
    destdir, installed = payload
    ptest = destdir / "usr/lib/certrotate/ptest"
    repo_tests = sorted(str(p.relative_to(REPO / "tests/agent")) for p in (REPO / "tests/agent").rglob("*")
                        if p.is_file() and "__pycache__" not in p.parts)
    prefix = "/usr/lib/certrotate/ptest/tests/agent/"
    shipped = sorted(p[len(prefix):] for p in installed if p.startswith(prefix))
    assert repo_tests == shipped, "tests/agent files the ptest package does not ship (extend do_install_ptest)"
    site = destdir / TARGET_SITELIB.lstrip("/")
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", "tests/agent"],
                            cwd=ptest, env={**os.environ, "PYTHONPATH": f"{ptest / 'tests'}:{site}"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def imported_modules(paths: list[Path]) -> set[str]:
    """Dotted names of every absolute import in the files, wherever it sits."""
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def package_of_module(name: str) -> str | None:
    """The scarthgap package that ships a module, None if it is not the standard library's."""
    top = name.split(".")[0]
    if top not in sys.stdlib_module_names and top != "__future__":
        return None
    parts = name.split(".")
    for length in range(len(parts), 0, -1):
        package = MANIFEST.get(".".join(parts[:length]))
        if package:
            return package
    return "python3-core" if top in sys.builtin_module_names else "python3-misc"


def required_packages(paths: list[Path], local: set[str]) -> set[str]:
    packages = set()
    for name in imported_modules(paths):
        top = name.split(".")[0]
        if top in local:
            continue
        stdlib = package_of_module(name)
        if stdlib:
            packages.add(stdlib)
        else:
            assert top in THIRD_PARTY, f"{name} is imported but not mapped to a recipe: add it to THIRD_PARTY"
            packages.add(THIRD_PARTY[top])
    return packages


def explode_deps(value: str) -> dict[str, str | None]:
    """An RDEPENDS value as bb.utils.explode_dep_versions2 reads it: name -> version bound (or None)."""
    deps: dict[str, str | None] = {}
    for name, bound in re.findall(r"([^\s()]+)(?:\s*\(([^)]*)\))?", value):
        assert name not in deps, f"{name} listed twice in {value!r}"
        deps[name] = " ".join(bound.split()) or None
    return deps


def agent_rdepends(recipe: recipe_install.Recipe, pkcs11: str | None) -> dict[str, str | None]:
    """RDEPENDS:${PN} as BitBake ends up with it, CERTROTATE_PKCS11 set to pkcs11 (None: unset)."""
    # Nothing else may change the list (no +=, :remove, :prepend, per-override values).
    changes = sorted(name for name in recipe.variables
                     if name.startswith("RDEPENDS:${PN}") and not name.startswith("RDEPENDS:${PN}-"))
    assert changes == ["RDEPENDS:${PN}", "RDEPENDS:${PN}:append"], changes
    appended = eval(inline_expression(recipe.variables["RDEPENDS:${PN}:append"]), {},
                    {"d": Datastore(CERTROTATE_PKCS11=pkcs11)})
    return explode_deps(f"{recipe.variables['RDEPENDS:${PN}']} {appended}")


def test_rdepends_are_exactly_what_the_agent_imports(recipe):
    needed = required_packages(sorted((REPO / "agent" / "certrotate").rglob("*.py")), {"certrotate"})
    for pkcs11 in (None, "0"):
        deps = agent_rdepends(recipe, pkcs11)
        declared = set(deps)
        assert declared == needed, f"missing {sorted(needed - declared)}, not imported {sorted(declared - needed)}"
        assert not any(deps.values()), deps
    # With token support on, the provider the agent loads by name comes on top, and nothing else.
    with_token = agent_rdepends(recipe, "1")
    assert set(with_token) - needed == {"pkcs11-provider"} and needed <= set(with_token)


def test_ptest_rdepends_are_what_the_shipped_tests_import_beyond_the_agent(recipe, payload):
    destdir, _ = payload
    tests = sorted((destdir / "usr/lib/certrotate/ptest/tests").rglob("*.py"))
    local = {"certrotate"} | {p.stem for p in tests}
    needed = required_packages(tests, local) - set(recipe.variables["RDEPENDS:${PN}"].split())
    declared = set(recipe.variables["RDEPENDS:${PN}-ptest"].split())
    assert declared == needed, f"missing {sorted(needed - declared)}, not needed {sorted(declared - needed)}"
