"""Install meta-certrotate's payload into a directory, exactly as the recipe does.

The QEMU test image and the layer tests use this so that the files they test
are the layer's files: the agent wheel is built from agent/ the way
python_pep517.bbclass builds it (``python -m build --no-isolation --wheel``)
and installed the way its do_install lays it out (package into the Python
site-packages directory, console script into bindir with a
``#!/usr/bin/env python3`` shebang); then the recipe's own ``do_install:append``
and ``do_install_ptest`` shell bodies, read from the .bb file, run in ``sh -e``
with BitBake's standard path variables and the recipe's CERTROTATE_* defaults
bound, against a work directory unpacked from the recipe's SRC_URI.

Usage: python tests/recipe_install.py DESTDIR [--python-sitelib DIR] [--no-ptest]
"""

from __future__ import annotations

import argparse
import configparser
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYER = REPO / "meta-certrotate"
RECIPE_DIR = LAYER / "recipes-support" / "certrotate"
DEFAULT_SITELIB = "/usr/lib/python3/dist-packages"

# scarthgap's bitbake.conf values for a usrmerge distro such as LmP.
PATH_VARIABLES = {
    "prefix": "/usr",
    "exec_prefix": "/usr",
    "base_prefix": "",
    "bindir": "/usr/bin",
    "sbindir": "/usr/sbin",
    "libdir": "/usr/lib",
    "libexecdir": "/usr/libexec",
    "datadir": "/usr/share",
    "sysconfdir": "/etc",
    "localstatedir": "/var",
    "nonarch_base_libdir": "/usr/lib",
    "systemd_unitdir": "/usr/lib/systemd",
    "systemd_system_unitdir": "/usr/lib/systemd/system",
}

# Build leftovers of a developer checkout that are not source.
NOT_SOURCE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".pytest_cache")

# What python_pep517's installer writes for a console entry point (pypa/installer's
# template; OE's patched installer keeps it and takes the interpreter as given).
SCRIPT_TEMPLATE = """\
#!/usr/bin/env python3
# -*- coding: utf-8 -*-
import re
import sys
from {module} import {import_name}
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit({func_path}())
"""


class RecipeError(Exception):
    """The recipe cannot be read or run outside BitBake as this script needs."""


@dataclass
class Recipe:
    """What this script needs from the .bb file, read as BitBake would read it."""

    path: Path
    pn: str
    pv: str
    variables: dict[str, str]  # every plain assignment, last one wins, unexpanded
    functions: dict[str, str]  # shell function name -> body

    @property
    def bp(self) -> str:
        return f"{self.pn}-{self.pv}"

    def certrotate_defaults(self) -> dict[str, str]:
        """CERTROTATE_* settings with their defaults (not the computed source location)."""
        return {name: value for name, value in self.variables.items()
                if name.startswith("CERTROTATE_") and "${@" not in value}

    def src_uri(self) -> list[tuple[str, dict[str, str]]]:
        """file:// entries of SRC_URI as (path, parameters)."""
        entries = []
        for item in self.variables.get("SRC_URI", "").split():
            if not item.startswith("file://"):
                raise RecipeError(f"{self.path.name}: SRC_URI entry {item!r} is not file://; "
                                  "recipe_install.py can only unpack local files")
            location, *params = item[len("file://"):].split(";")
            entries.append((location, dict(p.split("=", 1) for p in params)))
        return entries


_ASSIGNMENT = re.compile(r'^([A-Za-z0-9_:${}\-.]+)\s*(\?\?=|\?=|:=|=|\+=|\.=|=\+)\s*"(.*)"\s*$', re.S)
_FUNCTION = re.compile(r"^([A-Za-z0-9_:\-]+)\s*\(\)\s*\{\s*$")


def find_recipe() -> Path:
    recipes = sorted(RECIPE_DIR.glob("certrotate_*.bb"))
    if len(recipes) != 1:
        raise RecipeError(f"expected exactly one certrotate_<version>.bb in {RECIPE_DIR}, found {len(recipes)}")
    return recipes[0]


def parse_recipe(path: Path | None = None) -> Recipe:
    """Read assignments and shell functions from the recipe (BitBake syntax subset)."""
    path = path or find_recipe()
    pn, _, pv = path.stem.partition("_")
    variables: dict[str, str] = {}
    functions: dict[str, str] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        function = _FUNCTION.match(line)
        if function:
            body = []
            while index < len(lines) and lines[index] != "}":
                body.append(lines[index])
                index += 1
            if index == len(lines):
                raise RecipeError(f"{path.name}: function {function.group(1)} has no closing '}}' at column 0")
            index += 1
            functions[function.group(1)] = "\n".join(body) + "\n"
            continue
        while line.endswith("\\") and index < len(lines):
            line = line[:-1] + " " + lines[index]
            index += 1
        assignment = _ASSIGNMENT.match(line)
        if assignment:
            name, operator, value = assignment.groups()
            value = " ".join(value.split())
            if operator in ("+=", "=+", ".="):
                previous = variables.get(name, "")
                value = {"+=": f"{previous} {value}", "=+": f"{value} {previous}", ".=": previous + value}[operator].strip()
            elif operator in ("?=", "??=") and name in variables:
                continue
            variables[name] = value
    return Recipe(path=path, pn=pn, pv=pv, variables=variables, functions=functions)


def unpack(recipe: Recipe, workdir: Path) -> None:
    """Lay out the recipe's file:// sources in workdir as do_unpack does."""
    search = [REPO, RECIPE_DIR / recipe.bp, RECIPE_DIR / recipe.pn, RECIPE_DIR / "files"]
    for location, params in recipe.src_uri():
        found = next((base / location for base in search if (base / location).exists()), None)
        if found is None:
            raise RecipeError(f"{recipe.path.name}: SRC_URI file://{location} is in none of "
                              + ", ".join(str(base) for base in search))
        subdir = params.get("subdir", "").replace("${BP}", recipe.bp)
        target = workdir / subdir / location
        target.parent.mkdir(parents=True, exist_ok=True)
        if found.is_dir():
            shutil.copytree(found, target, ignore=NOT_SOURCE)
        else:
            shutil.copy2(found, target)


def build_wheel(source: Path, outdir: Path) -> Path:
    """python_pep517_do_compile: python -m build --no-isolation --wheel."""
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", str(outdir), str(source)],
        capture_output=True, text=True)
    if result.returncode != 0:
        raise RecipeError(f"building the agent wheel from {source} failed (needs the 'build' and "
                          f"'wheel' packages in this Python):\n{result.stdout}{result.stderr}")
    wheels = list(outdir.glob("*.whl"))
    if len(wheels) != 1:
        raise RecipeError(f"expected one wheel in {outdir}, found {[w.name for w in wheels]}")
    return wheels[0]


def install_wheel(wheel: Path, destdir: Path, sitelib: str, bindir: str) -> None:
    """python_pep517_do_install for a pure-Python wheel: files into sitelib, scripts into bindir."""
    site = destdir / sitelib.lstrip("/")
    with zipfile.ZipFile(wheel) as archive:
        dist_info = next(name.split("/")[0] for name in archive.namelist() if name.split("/")[0].endswith(".dist-info"))
        for member in archive.infolist():
            if member.filename.split("/")[0].endswith(".data"):
                raise RecipeError(f"{wheel.name} carries {member.filename}: .data is not handled here")
            archive.extract(member, site)
        entry_points = configparser.ConfigParser(delimiters=("=",))
        entry_points.optionxform = str
        entry_points.read_string(archive.read(f"{dist_info}/entry_points.txt").decode())
    scripts = destdir / bindir.lstrip("/")
    scripts.mkdir(parents=True, exist_ok=True)
    for name, target in entry_points.items("console_scripts") if entry_points.has_section("console_scripts") else []:
        module, _, attr = target.partition(":")
        script = scripts / name
        script.write_text(SCRIPT_TEMPLATE.format(module=module.strip(), import_name=attr.strip().split(".")[0],
                                                 func_path=attr.strip()))
        script.chmod(0o755)


def run_shell_function(recipe: Recipe, name: str, bindings: dict[str, str]) -> None:
    """Run one of the recipe's shell functions in sh -e, as BitBake runs shell tasks."""
    body = recipe.functions.get(name)
    if body is None:
        raise RecipeError(f"{recipe.path.name} has no {name}() function")
    unbound = sorted(set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", body)) - set(bindings))
    if unbound or "${@" in body:
        raise RecipeError(f"{recipe.path.name}: {name}() uses {unbound or 'inline Python'}, which "
                          "recipe_install.py does not bind; keep the body to plain variables")
    # BitBake expands ${VAR} references in the function text before sh sees it.
    script = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda ref: bindings[ref.group(1)], body)
    result = subprocess.run(["sh", "-e", "-c", script], env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RecipeError(f"{recipe.path.name}: {name}() failed with exit {result.returncode}:\n"
                          f"{result.stdout}{result.stderr}")


def installed_files(destdir: Path) -> list[str]:
    """Absolute on-device paths of every file and symlink under destdir."""
    return sorted("/" + str(path.relative_to(destdir)) for path in destdir.rglob("*")
                  if path.is_file() or path.is_symlink())


def install_payload(destdir: Path, *, python_sitelib: str = DEFAULT_SITELIB, ptest: bool = True,
                    overrides: dict[str, str] | None = None) -> list[str]:
    """Install what the certrotate package (and certrotate-ptest) holds into destdir.

    overrides sets CERTROTATE_* variables as local.conf would. Returns the
    installed files as absolute on-device paths, sorted.
    """
    destdir = Path(destdir).resolve()
    destdir.mkdir(parents=True, exist_ok=True)
    recipe = parse_recipe()
    variables = recipe.certrotate_defaults()
    for name, value in (overrides or {}).items():
        if name not in variables:
            raise RecipeError(f"{name} is not a CERTROTATE_* variable of {recipe.path.name}; "
                              f"known: {', '.join(sorted(variables))}")
        variables[name] = value
    with tempfile.TemporaryDirectory(prefix="certrotate-workdir-") as scratch:
        workdir = Path(scratch) / "work"
        source = workdir / recipe.bp
        workdir.mkdir()
        unpack(recipe, workdir)
        bindings = {
            **PATH_VARIABLES,
            **variables,
            "PN": recipe.pn, "BPN": recipe.pn, "PV": recipe.pv, "BP": recipe.bp,
            "D": str(destdir), "WORKDIR": str(workdir), "UNPACKDIR": str(workdir), "S": str(source),
            "B": str(source),
            "PYTHON_SITEPACKAGES_DIR": python_sitelib,
            "PTEST_PATH": f"{PATH_VARIABLES['libdir']}/{recipe.pn}/ptest",
        }
        pep517_source = recipe.variables.get("PEP517_SOURCE_PATH", "${S}").replace("${S}", str(source))
        wheel = build_wheel(Path(pep517_source), Path(scratch) / "dist")
        install_wheel(wheel, destdir, python_sitelib, PATH_VARIABLES["bindir"])
        run_shell_function(recipe, "do_install:append", bindings)
        if ptest:
            # ptest.bbclass's do_install_ptest_base: run-ptest first, then the recipe's part.
            run_ptest = workdir / "run-ptest"
            if run_ptest.exists():
                target = destdir / bindings["PTEST_PATH"].lstrip("/") / "run-ptest"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(run_ptest, target)
            run_shell_function(recipe, "do_install_ptest", bindings)
    return installed_files(destdir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("destdir", type=Path, help="directory to install into (the image's root)")
    parser.add_argument("--python-sitelib", default=DEFAULT_SITELIB,
                        help=f"on-device site-packages directory (default {DEFAULT_SITELIB})")
    parser.add_argument("--no-ptest", action="store_true", help="leave out the certrotate-ptest files")
    parser.add_argument("--set", action="append", default=[], metavar="CERTROTATE_VAR=VALUE",
                        help="override a recipe variable, as local.conf would (repeatable)")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected NAME=VALUE")
        overrides[name] = value
    try:
        files = install_payload(args.destdir, python_sitelib=args.python_sitelib, ptest=not args.no_ptest,
                                overrides=overrides)
    except RecipeError as error:
        print(f"recipe_install.py: {error}", file=sys.stderr)
        return 1
    print("\n".join(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
