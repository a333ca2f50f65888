"""The QEMU test image: a cached Debian root filesystem and per-run GPT disks.

The root filesystem (ci/qemu/build-rootfs) is cached as a .tar.zst keyed by a
hash of its inputs. Each test VM gets its own disk laid out like an LmP wic:
a GPT with an EFI system partition (systemd-boot, kernel, initrd) and an ext4
root, assembled from files without loop mounts (sfdisk, mkfs.vfat + mcopy,
mkfs.ext4 -d at an offset).

Image mode (``--image PATH`` or CERTROTATE_QEMU_IMAGE) boots a disk made
elsewhere, such as an LmP .wic from ``kas build``, through a qcow2 overlay so
the image itself is never written, and provisions the device over ssh
(``provision_over_ssh``) instead of into the filesystem.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from qemu_vm import Login

REPO = Path(__file__).resolve().parents[2]
BUILD_ROOTFS = REPO / "ci" / "qemu" / "build-rootfs"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# A mirror hiccup on a fresh machine (nothing cached) should not fail the whole QEMU stage.
ROOTFS_BUILD_ATTEMPTS = 2

MIB = 1024 * 1024
ESP_OFFSET = 1 * MIB
ESP_SIZE = 64 * MIB
ROOT_OFFSET = ESP_OFFSET + ESP_SIZE
ROOT_SIZE = 1536 * MIB
ROOT_LABEL = "certrotate-root"
# GPT partition type GUIDs: EFI system partition, Linux root (x86-64).
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
KERNEL_CMDLINE = f"root=LABEL={ROOT_LABEL} rw console=ttyS0 quiet"


def cache_dir() -> Path:
    """Where built root filesystems are kept between runs."""
    configured = os.environ.get("CERTROTATE_QEMU_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "certrotate" / "qemu"


def rootfs_key(mirror: str = DEFAULT_MIRROR) -> str:
    """Hash of everything the root filesystem is built from."""
    digest = hashlib.sha256()
    digest.update(BUILD_ROOTFS.read_bytes())
    digest.update(b"\0bookworm\0" + mirror.encode())
    return digest.hexdigest()[:16]


def rootfs_tarball(mirror: str = DEFAULT_MIRROR) -> tuple[Path, bool]:
    """The cached root filesystem tarball, built first if missing.

    Returns (path, built): built is False when the cache already had it.
    """
    tarball = cache_dir() / f"rootfs-{rootfs_key(mirror)}.tar.zst"
    if tarball.exists():
        return tarball, False
    tarball.parent.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_name(tarball.name + ".partial.tar.zst")
    for _attempt in range(ROOTFS_BUILD_ATTEMPTS):
        partial.unlink(missing_ok=True)
        result = subprocess.run([str(BUILD_ROOTFS), str(partial), mirror],
                                capture_output=True, text=True)
        if result.returncode == 0:
            break
    else:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"building the QEMU root filesystem failed {ROOTFS_BUILD_ATTEMPTS} times "
                           f"({BUILD_ROOTFS} exit {result.returncode}):\n{result.stderr[-4000:]}")
    partial.rename(tarball)
    return tarball, True


def unpack(tarball: Path, dest: Path) -> Path:
    """Unpack a root filesystem tarball with owners and modes kept."""
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-C", str(dest), "--zstd", "--numeric-owner", "-xpf", str(tarball)],
                   check=True)
    return dest


def clone_tree(base: Path, dest: Path) -> Path:
    """A copy of ``base`` sharing file data by hard links.

    Writers must replace files (``place_file``), never modify them in place,
    so the base stays untouched.
    """
    subprocess.run(["cp", "-al", str(base), str(dest)], check=True)
    return dest


def place_file(tree: Path, guest_path: str, data: bytes, mode: int, uid: int = 0, gid: int = 0) -> None:
    """Write ``data`` at ``guest_path`` inside ``tree``, replacing any hard link."""
    target = tree / guest_path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)


def copy_into(tree: Path, source_root: Path) -> None:
    """Copy every entry under ``source_root`` into ``tree`` at the same path,
    owned by root with the source's modes, replacing files rather than writing
    through hard links."""
    for source in sorted(source_root.rglob("*")):
        relative = source.relative_to(source_root)
        target = tree / relative
        info = source.lstat()
        if source.is_dir() and not source.is_symlink():
            # Directories the image already has (/etc, /var) keep their modes.
            if not target.is_dir():
                target.mkdir(parents=True)
                os.chmod(target, info.st_mode & 0o7777)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        if source.is_symlink():
            os.symlink(os.readlink(source), target)
        else:
            shutil.copy2(source, target)
            os.chown(target, 0, 0)


def kernel_and_initrd(tree: Path) -> tuple[Path, Path]:
    """The kernel and initrd the root filesystem carries in /boot."""
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise RuntimeError(f"expected one kernel in {tree}/boot, found {[k.name for k in kernels]}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    return kernels[0], tree / "boot" / f"initrd.img-{version}"


def _esp_image(tree: Path, workdir: Path) -> Path:
    """A FAT EFI system partition: systemd-boot as the removable-media loader,
    one boot entry, kernel and initrd."""
    kernel, initrd = kernel_and_initrd(tree)
    loader = tree / "usr/lib/systemd/boot/efi/systemd-bootx64.efi"
    staging = workdir / "esp"
    (staging / "EFI/BOOT").mkdir(parents=True)
    (staging / "loader/entries").mkdir(parents=True)
    shutil.copyfile(loader, staging / "EFI/BOOT/BOOTX64.EFI")
    shutil.copyfile(kernel, staging / "vmlinuz")
    shutil.copyfile(initrd, staging / "initrd.img")
    (staging / "loader/loader.conf").write_text("default certrotate.conf\ntimeout 0\n")
    (staging / "loader/entries/certrotate.conf").write_text(
        "title certrotate test image\nlinux /vmlinuz\ninitrd /initrd.img\n"
        f"options {KERNEL_CMDLINE}\n")
    esp = workdir / "esp.img"
    subprocess.run(["mkfs.vfat", "-F", "32", "-n", "ESP", "-C", str(esp), str(ESP_SIZE // 1024)],
                   check=True, capture_output=True)
    entries = [str(p) for p in sorted(staging.iterdir())]
    subprocess.run(["mcopy", "-s", "-i", str(esp), *entries, "::/"], check=True,
                   env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    shutil.rmtree(staging)
    return esp


def assemble_disk(tree: Path, disk: Path) -> Path:
    """Write a GPT disk image at ``disk``: ESP then an ext4 root made from ``tree``."""
    workdir = disk.parent / (disk.name + ".parts")
    workdir.mkdir()
    try:
        esp = _esp_image(tree, workdir)
        with open(disk, "wb") as out:
            out.truncate(ROOT_OFFSET + ROOT_SIZE + MIB)  # room for the backup GPT
        layout = (
            "label: gpt\n"
            f"start={ESP_OFFSET // 512}, size={ESP_SIZE // 512}, type={ESP_TYPE}, name=esp\n"
            f"start={ROOT_OFFSET // 512}, size={ROOT_SIZE // 512}, type={ROOT_TYPE}, name=root\n"
        )
        subprocess.run(["sfdisk", "--quiet", str(disk)], input=layout, text=True, check=True)
        subprocess.run(["dd", f"if={esp}", f"of={disk}", "bs=1M", f"seek={ESP_OFFSET // MIB}",
                        "conv=notrunc,sparse", "status=none"], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-d", str(tree),
                        "-E", f"offset={ROOT_OFFSET}", str(disk), f"{ROOT_SIZE // 1024}k"],
                       check=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return disk


# GPT type of a wic's (and so LmP's) ext4 root: Linux filesystem data.
LINUX_DATA_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


def root_partition_offset(raw_disk: Path) -> int:
    """Byte offset of the root filesystem in a raw GPT disk: the last
    partition typed Linux root (x86-64) or Linux filesystem data."""
    table = json.loads(subprocess.run(["sfdisk", "--json", str(raw_disk)], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    roots = [p for p in table["partitions"] if p["type"].upper() in (ROOT_TYPE, LINUX_DATA_TYPE)]
    if not roots:
        raise RuntimeError(f"{raw_disk} has no Linux root or Linux filesystem partition: {table['partitions']}")
    return roots[-1]["start"] * table.get("sectorsize", 512)


def fsck(disk: Path) -> subprocess.CompletedProcess:
    """Check the root filesystem read-only (the VM must be stopped). A qcow2
    overlay is checked through a raw copy of the disk it shows."""
    raw = disk
    if disk.suffix == ".qcow2":
        raw = disk.with_suffix(".fsck.raw")
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True, capture_output=True)
    try:
        return subprocess.run(["e2fsck", "-fn", f"{raw}?offset={root_partition_offset(raw)}"],
                              capture_output=True, text=True)
    finally:
        if raw != disk:
            raw.unlink()


STANDINS = REPO / "ci" / "qemu" / "standins"
STANDIN_UNITS = ("aktualizr-lite.service", "fioconfig.service")
# What Yocto's systemd class enables at rootfs time (SYSTEMD_SERVICE), plus the stand-ins.
ENABLED_UNITS = ("certrotate.timer", *STANDIN_UNITS)


def add_standins(tree: Path) -> Path:
    """The aktualizr-lite and fioconfig stand-ins at their guest paths under ``tree``."""
    place_file(tree, "/usr/local/bin/sota-client-standin",
               (STANDINS / "sota-client-standin").read_bytes(), 0o755)
    for unit in STANDIN_UNITS:
        place_file(tree, f"/etc/systemd/system/{unit}", (STANDINS / unit).read_bytes(), 0o644)
    return tree


def prepare_base_tree(tarball: Path, dest: Path, ssh_public_key: str, install_payload) -> Path:
    """The root filesystem every test disk starts from: the cached rootfs,
    the layer's payload (installed by ``install_payload(destdir)``, the
    recipe's own install step), the aktualizr-lite and fioconfig stand-ins,
    and root's ssh key."""
    unpack(tarball, dest)
    install_payload(dest)
    add_standins(dest)
    subprocess.run(["chroot", str(dest), "systemctl", "enable", "--quiet", *ENABLED_UNITS],
                   check=True, capture_output=True)
    (dest / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
    place_file(dest, "/root/.ssh/authorized_keys", ssh_public_key.encode(), 0o600)
    return dest


def plain_disk(base: Path, disk: Path) -> Path:
    """A disk of ``base`` alone, no device provisioned and no ssh key
    authorized: what image mode is handed, as it would be an LmP .wic."""
    tree = clone_tree(base, disk.parent / (disk.name + ".tree"))
    try:
        (tree / "root/.ssh/authorized_keys").unlink()
        return assemble_disk(tree, disk)
    finally:
        shutil.rmtree(tree)


def device_disk(base: Path, device_tree: Path, disk: Path) -> Path:
    """A disk for one device: ``base`` plus the provisioned device files."""
    tree = clone_tree(base, disk.parent / (disk.name + ".tree"))
    try:
        copy_into(tree, device_tree)
        return assemble_disk(tree, disk)
    finally:
        shutil.rmtree(tree)


def _debugfs(filesystem: str, commands: list[str]) -> str:
    """Run debugfs commands against a (stopped) guest's root filesystem."""
    result = subprocess.run(["debugfs", "-w", "-f", "-", filesystem],
                            input="\n".join(commands) + "\n", capture_output=True, text=True)
    # debugfs exits 0 even when a command fails; its complaints name the command.
    errors = [line for line in result.stderr.splitlines() if line and not line.startswith("debugfs ")]
    if result.returncode != 0 or errors:
        raise RuntimeError(f"debugfs on {filesystem} failed: {result.stderr[-3000:]}")
    return result.stdout


def replace_offline(disk: Path, remove: list[str], add: dict[str, Path], workdir: Path) -> None:
    """Remove the directories ``remove`` from the stopped guest's root
    filesystem and add ``add`` (guest directory -> host tree), as an OTA
    update of those files would.

    After a power cut the filesystem journal may hold unreplayed writes, so it
    is replayed first (what the kernel does at the next mount). e2fsprogs
    loses the partition offset when it reopens a filesystem after a replay,
    so the root partition is worked on as a file of its own and written back.
    """
    workdir.mkdir(parents=True)
    partition = workdir / "root.ext4"
    subprocess.run(["dd", f"if={disk}", f"of={partition}", "bs=1M", f"skip={ROOT_OFFSET // MIB}",
                    f"count={ROOT_SIZE // MIB}", "conv=sparse", "status=none"], check=True)
    replay = subprocess.run(["e2fsck", "-p", "-E", "journal_only", str(partition)], capture_output=True, text=True)
    if replay.returncode not in (0, 1):
        raise RuntimeError(f"journal replay on {disk} failed ({replay.returncode}): {replay.stdout}{replay.stderr}")
    commands = []
    for number, guest_dir in enumerate(remove):
        dump = workdir / f"old-{number}"
        dump.mkdir()
        subprocess.run(["debugfs", "-R", f"rdump {guest_dir} {dump}", str(partition)], check=True, capture_output=True)
        old_copy = dump / Path(guest_dir).name
        if not old_copy.is_dir():
            raise RuntimeError(f"{guest_dir} is not a directory in {disk}'s root filesystem")
        for path in sorted(old_copy.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            guest_path = f"{guest_dir}/{path.relative_to(old_copy)}"
            commands.append(f"rmdir {guest_path}" if path.is_dir() else f"rm {guest_path}")
        commands.append(f"rmdir {guest_dir}")
    for guest_dir, new_tree in add.items():
        commands.append(f"mkdir {guest_dir}")
        entries = sorted(new_tree.rglob("*"))
        for path in entries:
            guest_path = f"{guest_dir}/{path.relative_to(new_tree)}"
            commands.append(f"mkdir {guest_path}" if path.is_dir() else f"write {path} {guest_path}")
        for path in [new_tree, *entries]:
            guest_path = guest_dir if path == new_tree else f"{guest_dir}/{path.relative_to(new_tree)}"
            kind = 0o040000 if path.is_dir() else 0o100000
            commands += [f"sif {guest_path} mode 0{kind | (path.stat().st_mode & 0o7777):o}",
                         f"sif {guest_path} uid 0", f"sif {guest_path} gid 0"]
    _debugfs(str(partition), commands)
    # Not sparse: zero blocks of the partition must overwrite what the disk held there.
    subprocess.run(["dd", f"if={partition}", f"of={disk}", "bs=1M", f"seek={ROOT_OFFSET // MIB}",
                    "conv=notrunc", "status=none"], check=True)
    partition.unlink()


# -- image mode ----------------------------------------------------------------


@dataclass(frozen=True)
class ImageMode:
    """A disk image made elsewhere and how to log in to it."""

    path: Path
    login: Login


def image_mode_from(option: str | None, environ=os.environ) -> ImageMode | None:
    """Image mode as ``--image`` (or CERTROTATE_QEMU_IMAGE) selects it, with
    CERTROTATE_QEMU_LOGIN (default LmP's fio:fio) and CERTROTATE_QEMU_SUDO
    (default: 1 unless the login is root's); None for the default mode.
    Raises ValueError saying what to fix."""
    path = option or environ.get("CERTROTATE_QEMU_IMAGE")
    if not path:
        return None
    image = Path(path).resolve()
    if image.name.endswith((".gz", ".bz2", ".xz", ".zst")):
        raise ValueError(f"{image} is compressed; QEMU boots the raw disk: decompress it first "
                         f"(e.g. gunzip -k {image}) and pass the .wic")
    if not image.is_file():
        raise ValueError(f"disk image {image} does not exist (kas build puts LmP's in "
                         "build/tmp/deploy/images/intel-corei7-64/)")
    login = Login.parse(environ.get("CERTROTATE_QEMU_LOGIN", "fio:fio"))
    sudo = environ.get("CERTROTATE_QEMU_SUDO", "0" if login.user == "root" else "1")
    if sudo not in ("0", "1"):
        raise ValueError(f"CERTROTATE_QEMU_SUDO={sudo!r}: use 1 (the login user needs sudo, as LmP's fio) or 0")
    return ImageMode(image, replace(login, sudo=sudo == "1"))


def overlay_on(image: Path, overlay: Path) -> Path:
    """A qcow2 overlay backed by ``image``: the guest writes (and a power cut
    leaves its state) in the overlay, never in the image."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.resolve()), "-F", "raw",
                    str(overlay)], check=True, capture_output=True)
    return overlay


def install_script(tree: Path) -> str:
    """A shell script that puts every file of ``tree`` at the same path on the
    guest, with the tree's modes, owned by the user running it. Directories the
    guest already has (/etc, /var) keep their modes; files are replaced whole."""
    lines = ["set -e", "umask 077"]
    for source in sorted(tree.rglob("*")):
        target = shlex.quote("/" + str(source.relative_to(tree)))
        mode = f"{source.stat().st_mode & 0o7777:o}"
        if source.is_symlink() or not (source.is_dir() or source.is_file()):
            raise ValueError(f"{source}: only directories and regular files can be provisioned over ssh")
        if source.is_dir():
            lines.append(f"[ -d {target} ] || install -d -m {mode} {target}")
            continue
        lines += [f"base64 -d > {target}.new <<'END_OF_FILE'",
                  base64.encodebytes(source.read_bytes()).decode().rstrip("\n"),
                  "END_OF_FILE", f"chmod {mode} {target}.new", f"mv -f {target}.new {target}"]
    return "\n".join(lines) + "\n"


def provision_over_ssh(vm, device_tree: Path, test_dir: str, workdir: Path) -> None:
    """Provision a booted image-mode guest: the device tree (identity,
    sota.toml, certrotate.toml), the aktualizr-lite and fioconfig stand-ins
    (units in /etc/systemd/system, which on LmP take the place of the real
    clients, whose identity use the suite cannot observe) and the test's own
    directory; then restart the clients so they read the new identity. The
    agent and its units are the image's own."""
    staging = add_standins(workdir / "provision")
    (staging / test_dir.lstrip("/")).mkdir(parents=True)
    script = install_script(device_tree) + install_script(staging)
    vm.ssh("sh -s", input=script)
    shutil.rmtree(staging)
    vm.ssh(f"systemctl daemon-reload && systemctl enable --quiet {' '.join(STANDIN_UNITS)} && "
           f"systemctl reset-failed && systemctl restart {' '.join(STANDIN_UNITS)}")
