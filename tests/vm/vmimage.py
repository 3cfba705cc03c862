"""Debian 12 virtual machines for the systemd and power-cut tests (issue 12): Debian's stock
kernel (linux-image-amd64: its vmlinuz and initrd, its modules in the image), systemd as PID 1
or a minimal shell init, and the lorry-agent .deb installed with apt as a technician installs
it. QEMU runs them with a software CPU (``-accel tcg``: /dev/kvm here is PVM and boots no
ordinary kernel).

    base = base_image()                       # cached: debootstrap + kernel + packages (~1.5 min once)
    deb = package(tmp)                        # .ci/build-deb from the working tree, once per session
    image = build_image(base, deb, tmp / "root.img", files={"/etc/lorry-agent/agent.toml": text})
    vm = Vm(base, [Disk(image.path)], name="systemd", append="audit=1", log_dir=tmp).start()
    vm.wait_for("@@done", timeout=600)        # lines the guest prints on its serial console
    vm.power_cut()                            # SIGKILL of QEMU: a power cut for the guest
    read_files(image.path, ["/var/lib/lorry-agent"], tmp / "out")   # e2fsck a copy, debugfs rdump

What is where:

- **The base** (``$LORRY_VM_CACHE``, default /var/cache/lorry-agent-vm, ``image-<key>/``): a
  debootstrapped bookworm tree with systemd, udev, D-Bus, python3.11, iproute2 and the kernel,
  its ``vmlinuz`` and ``initrd.img`` beside it. ``<key>`` hashes the recipe below (suite,
  mirror, packages, files, commands), so changing the recipe builds a new base; nothing else
  does. Built under a lock, in a ``.partial`` folder renamed when complete; the base of another
  recipe is deleted once unused for 3 days.
- **Per test**: a copy of the base tree, the .deb installed into it with ``apt-get install`` in
  a chroot (offline: the base holds every dependency, and the install fails if apt would have
  to download anything), the test's files, then ``mkfs.ext4 -d`` makes the ext4 image: no loop
  device, no mount.
- **Booting**: QEMU's ``-kernel``/``-initrd`` with the base's kernel, the images as virtio-blk
  disks (``cache=writeback``, QEMU's default), user-mode networking (the guest reaches the
  host's loopback as 10.0.2.2; it has no DNS and nothing in it looks further), the serial
  console on QEMU's stdout (each line time-stamped on the host and kept in
  ``<name>.console.log``). ``init=`` may name :data:`MINIMAL_INIT` (installed in every image
  as /usr/local/sbin/lorry-vm-init): it mounts /tmp, brings up the network, runs
  ``/usr/local/lib/lorry-vm/<vm.mode>`` and powers off — far quicker under TCG than a
  systemd boot.
- **Getting results out**: lines on the serial console, and the image itself once QEMU has
  exited: :func:`read_files` replays the ext4 journal on a copy (``e2fsck -fy``), checks it is
  then clean (``e2fsck -fn``) and dumps files with ``debugfs``.

A power cut here is QEMU killed with SIGKILL: what the guest had written to its virtual disk
survives (QEMU writes it to the host file at once; the guest's flushes become fdatasync), what
was still in the guest's page cache is gone. QEMU has no volatile write cache of its own that
could lose written-but-unflushed sectors, as an SD card's controller can: that part of a real
power cut is not modelled.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_DEB = REPO / ".ci" / "build-deb"
CACHE = Path(os.environ.get("LORRY_VM_CACHE", "/var/cache/lorry-agent-vm"))
MIRROR = os.environ.get("LORRY_DEBIAN_MIRROR", "http://deb.debian.org/debian")
QEMU = "qemu-system-x86_64"
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BASE_BUILD_TIMEOUT_S = 1800
STALE_BASE_S = 3 * 86400
"""A base of another recipe unused this long is deleted (a concurrent run may still use a recent one)."""

Log = Callable[[str], None]


def say(line: str) -> None:
    print(f"[vm] {line}", flush=True)


# -- the base image's recipe: everything in here is hashed into the cache key ----------------------

RECIPE = {
    "revision": 1,
    "suite": "bookworm",
    "mirror": MIRROR,
    # systemd as PID 1 with udev and the D-Bus system bus (systemd-timedated answers the
    # agent's NTP question on it); python3 brings python3.11, the .deb's interpreter; adduser
    # and the rest of the .deb's Depends are in minbase.
    "packages": ["systemd", "systemd-sysv", "udev", "dbus", "kmod", "iproute2", "procps", "python3",
                 "adduser"],
    "files": {
        "/etc/apt/sources.list": (f"deb {MIRROR} bookworm main\n"
                                  f"deb {MIRROR} bookworm-updates main\n"
                                  f"deb {MIRROR.replace('/debian', '/debian-security')} bookworm-security main\n"),
        "/etc/hostname": "lorry-vm\n",
        "/etc/hosts": "127.0.0.1 localhost\n127.0.1.1 lorry-vm\n",
        "/etc/fstab": "/dev/vda / ext4 rw,errors=remount-ro 0 1\n",
        # A small initrd (MODULES=list): only what mounting the root disk needs.
        "/etc/initramfs-tools/conf.d/lorry-vm.conf": "MODULES=list\n",
        "/etc/initramfs-tools/modules": "virtio_pci\nvirtio_blk\next4\n",
        # QEMU's user-mode network: the guest is 10.0.2.15, the host's loopback is 10.0.2.2.
        "/etc/systemd/network/10-qemu-user.network": ("[Match]\nName=en* eth*\n\n[Network]\n"
                                                      "Address=10.0.2.15/24\nGateway=10.0.2.2\n"),
    },
    "commands": [
        "apt-get update -q",
        "apt-get -y -q upgrade",
        "apt-get -y -q install --no-install-recommends linux-image-amd64",
        "systemctl enable systemd-networkd.service",
        # Nobody logs in; nothing waits for a network that has no DHCP.
        "systemctl mask serial-getty@ttyS0.service getty@tty1.service systemd-networkd-wait-online.service",
        "apt-get clean",
        "rm -rf /var/lib/apt/lists/* /etc/resolv.conf",
    ],
}


def recipe_key() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:16]


# -- shell helpers ------------------------------------------------------------------------------------


def sh(*cmd: str | Path, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def chroot(root: Path, command: str, *, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = ["env", "-i", f"PATH={CHROOT_PATH}", "LC_ALL=C.UTF-8", "DEBIAN_FRONTEND=noninteractive", "HOME=/root"]
    return sh("chroot", root, *env, "sh", "-c", command, check=check, timeout=timeout)


def remove_tree(path: Path) -> None:
    """rm -rf that never crosses into a mounted filesystem (a chroot's /proc)."""
    if path.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True, timeout=600)


class _Proc:
    """/proc mounted in a chroot for the duration (initramfs-tools and dpkg want it)."""

    def __init__(self, root: Path) -> None:
        self.where = root / "proc"

    def __enter__(self) -> None:
        self.where.mkdir(exist_ok=True)
        sh("mount", "-t", "proc", "proc", self.where)

    def __exit__(self, *exc: object) -> None:
        if subprocess.run(["umount", str(self.where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(self.where)], capture_output=True)


# -- QEMU available? ------------------------------------------------------------------------------------


def qemu_problem() -> str | None:
    """Why QEMU cannot start a software-CPU machine here, or None if it can."""
    qemu = shutil.which(QEMU)
    if qemu is None:
        return f"{QEMU} is not installed (.ci/setup --tests installs qemu-system-x86)"
    try:
        r = subprocess.run([qemu, "-accel", "tcg", "-machine", "q35", "-nodefaults", "-display", "none",
                            "-m", "64", "-S", "-monitor", "stdio"],
                           input="quit\n", capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{qemu} could not be started: {e}"
    if r.returncode != 0:
        return f"{qemu} -accel tcg cannot start a machine (exit {r.returncode}): {r.stderr.strip()[-500:]}"
    return None


def require_qemu() -> None:
    """Skip, loudly, only when QEMU cannot start a machine at all; anything else must fail."""
    if os.geteuid() != 0:
        reason = "VM tests need root (debootstrap, chroot, mkfs of the guest's files)"
    else:
        reason = qemu_problem()
        if reason is None:
            return
        reason = f"QEMU cannot start a machine here: {reason}"
    bar = "!" * 100
    print(f"\n{bar}\nVM TESTS SKIPPED: {reason}\n{bar}", file=sys.stderr, flush=True)
    pytest.skip(f"VM TESTS SKIPPED: {reason}")


# -- the cached base --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Base:
    dir: Path

    @property
    def root(self) -> Path:
        return self.dir / "root"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def info(self) -> str:
        return (self.dir / "build.txt").read_text().strip()


def base_image(log: Log = say) -> Base:
    """The bookworm base for the guests' images: built once per recipe, then cached."""
    key = recipe_key()
    base = CACHE / f"image-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock-image", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for old in CACHE.glob("image-*"):
            used = old / "used" if (old / "used").exists() else old
            if old != base and time.time() - used.stat().st_mtime > STALE_BASE_S:
                remove_tree(old)
        if (base / "complete").exists():
            (base / "used").touch()
            log(f"base image: cached {base} ({Base(base).info})")
            return Base(base)
        for tool in ("debootstrap", "mkfs.ext4", "debugfs", "e2fsck"):
            if shutil.which(tool, path=CHROOT_PATH) is None:
                raise AssertionError(f"{tool} is not installed: .ci/setup --tests installs it")
        partial = CACHE / f".image-{key}.partial"
        remove_tree(partial)
        partial.mkdir()
        root = partial / "root"
        log(f"base image: building {base.name} (debootstrap {RECIPE['suite']} + kernel; a few minutes, once)")
        started = time.monotonic()
        with open(partial / "build.log", "w") as out:
            r = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(RECIPE['packages'])}",
                                RECIPE["suite"], str(root), MIRROR],
                               stdout=out, stderr=subprocess.STDOUT, timeout=BASE_BUILD_TIMEOUT_S)
        if r.returncode != 0:
            raise AssertionError(f"debootstrap failed (exit {r.returncode}):\n"
                                 + (partial / "build.log").read_text()[-3000:])
        debootstrap_s = time.monotonic() - started
        for path, text in RECIPE["files"].items():
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")  # for apt, removed at the end
        with _Proc(root), open(partial / "build.log", "a") as out:
            for command in RECIPE["commands"]:
                out.write(f"\n# {command}\n")
                out.flush()
                r = chroot(root, command, check=False)
                out.write(r.stdout + r.stderr)
                if r.returncode != 0:
                    raise AssertionError(f"base image: `{command}` failed (exit {r.returncode}):\n"
                                         f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        assert len(kernels) == 1, kernels
        version = kernels[0].name.removeprefix("vmlinuz-")
        shutil.copy(kernels[0], partial / "vmlinuz")
        shutil.copy(root / "boot" / f"initrd.img-{version}", partial / "initrd.img")
        size = sh("du", "-sh", root).stdout.split()[0]
        total_s = time.monotonic() - started
        (partial / "recipe.json").write_text(json.dumps(RECIPE, indent=2, sort_keys=True) + "\n")
        (partial / "build.txt").write_text(
            f"kernel {version}, {size}, built {time.strftime('%Y-%m-%d %H:%M')} in {total_s:.0f} s "
            f"(debootstrap {debootstrap_s:.0f} s)\n")
        (partial / "complete").touch()
        (partial / "used").touch()
        partial.rename(base)
        log(f"base image: built {base} in {total_s:.0f} s (debootstrap {debootstrap_s:.0f} s); "
            f"kernel {version}, {size}")
        return Base(base)


# -- the package and the per-test images ----------------------------------------------------------------

_packages: dict[str, Path] = {}


def package(out: Path, log: Log = say) -> Path:
    """The .deb, built by .ci/build-deb from the working tree once per session (or the one
    ``$LORRY_VM_DEB`` names: a throwaway build, to show what the tests catch)."""
    given = os.environ.get("LORRY_VM_DEB")
    if given:
        log(f"package: {given} (from LORRY_VM_DEB)")
        return Path(given)
    if "deb" not in _packages:
        started = time.monotonic()
        r = sh(BUILD_DEB, "--out", out, timeout=900)
        _packages["deb"] = Path(r.stdout.strip().splitlines()[-1])
        log(f"package: built {_packages['deb'].name} with .ci/build-deb in {time.monotonic() - started:.1f} s")
    return _packages["deb"]


@dataclass(frozen=True)
class File:
    content: str | bytes
    mode: int = 0o644
    owner: str = "root:root"


MINIMAL_INIT = r"""#!/bin/sh
# PID 1 for quick test boots (tests/vm/vmimage.py): no systemd, no udev. Mounts /tmp, brings up
# QEMU's user-mode network, runs /usr/local/lib/lorry-vm/<vm.mode> and powers off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mountpoint -q /run || mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
echo "@@vm-up $(cut -d' ' -f1 /proc/uptime)"
echo lorry-vm > /proc/sys/kernel/hostname
ip link set lo up
modprobe -q virtio_net
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
mode=
for arg in $(cat /proc/cmdline); do
  case "$arg" in vm.mode=*) mode=${arg#vm.mode=} ;; esac
done
/usr/local/lib/lorry-vm/"$mode"
echo "@@vm-rc $? $(cut -d' ' -f1 /proc/uptime)"
sync
umount -a -r -t ext4 2>/dev/null
poweroff -f
"""
MINIMAL_INIT_PATH = "/usr/local/sbin/lorry-vm-init"


@dataclass(frozen=True)
class Image:
    path: Path
    users: dict[str, tuple[int, int]]
    """uid and gid of the guest's users (for disks made outside it)."""


def build_image(base: Base, deb: Path, out: Path, *, files: Mapping[str, File | str | bytes] = {},
                enable: Sequence[str] = (), size: str = "2G", log: Log = say) -> Image:
    """A fresh root image: the base, the .deb installed with apt, ``files``, units enabled."""
    started = time.monotonic()
    tree = out.with_name(out.name + ".root")
    remove_tree(tree)
    try:
        sh("cp", "-a", base.root, tree, timeout=600)
        copied = time.monotonic()
        shutil.copy(deb, tree / "tmp" / deb.name)
        with _Proc(tree):
            r = chroot(tree, f"apt-get install -y -q -o Dpkg::Use-Pty=0 /tmp/{deb.name}", check=False)
        if r.returncode != 0:
            raise AssertionError(f"apt-get install ./{deb.name} failed in the image (the base lacks a dependency?):"
                                 f"\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        downloads = re.findall(r"^Get:\d+ (?!/tmp/).*$", r.stdout, re.M)
        assert not downloads, f"the base image lacks dependencies of the package (apt fetched {downloads})"
        (tree / "tmp" / deb.name).unlink()
        installed = time.monotonic()
        all_files: dict[str, File | str | bytes] = {MINIMAL_INIT_PATH: File(MINIMAL_INIT, 0o755), **files}
        for path, f in all_files.items():
            f = f if isinstance(f, File) else File(f)
            target = tree / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(f.content, bytes):
                target.write_bytes(f.content)
            else:
                target.write_text(f.content)
            chroot(tree, f"chown {f.owner} '{path}' && chmod {f.mode:o} '{path}'")
        if enable:
            chroot(tree, "systemctl enable " + " ".join(enable))
        users = {}
        for line in (tree / "etc/passwd").read_text().splitlines():
            name, _, uid, gid, *_ = line.split(":")
            users[name] = (int(uid), int(gid))
        out.unlink(missing_ok=True)
        sh("mkfs.ext4", "-q", "-F", "-L", "root", "-d", tree, out, size, timeout=600)
    finally:
        remove_tree(tree)
    done = time.monotonic()
    log(f"image {out.name}: base copied {copied - started:.1f} s, apt-get install ./{deb.name} "
        f"{installed - copied:.1f} s, files + mkfs.ext4 -d {done - installed:.1f} s; total {done - started:.1f} s")
    return Image(out, users)


def data_disk(out: Path, *, size: str, owner: tuple[int, int], mode: int = 0o750, label: str = "data") -> Path:
    """An empty ext4 disk whose root folder belongs to ``owner`` (uid, gid), with ``mode``."""
    out.unlink(missing_ok=True)
    sh("mkfs.ext4", "-q", "-F", "-L", label, "-E", f"root_owner={owner[0]}:{owner[1]}", out, size)
    sh("debugfs", "-w", "-R", f"set_inode_field / mode 040{mode:o}", out)
    return out


# -- reading a guest's disk after QEMU exited ------------------------------------------------------------


@dataclass
class FsCheck:
    fsck_rc: int
    """``e2fsck -fy`` on a copy: 0 clean, 1 fixed (a replayed journal counts), more: trouble."""
    fsck_output: str
    clean_after: bool
    """``e2fsck -fn`` after the first: nothing left to fix."""
    clean_after_output: str

    @property
    def ok(self) -> bool:
        return self.fsck_rc in (0, 1) and self.clean_after


def read_files(image: Path, paths: Sequence[str], dest: Path) -> FsCheck:
    """Replay the journal of a copy of ``image``, check the filesystem, and dump ``paths``
    (files or folders, recursively) into ``dest`` by their last name; ``/`` dumps everything
    into ``dest`` itself. No mount needed."""
    dest.mkdir(parents=True, exist_ok=True)
    copy = dest.parent / f".{dest.name}.{image.name}.fsck"
    sh("cp", "--sparse=always", image, copy, timeout=600)
    try:
        r1 = sh("e2fsck", "-fy", copy, check=False, timeout=600)
        r2 = sh("e2fsck", "-fn", copy, check=False, timeout=600)
        for p in paths:
            r = sh("debugfs", "-R", f"rdump {p} {dest}", copy, check=False, timeout=600)
            if r.returncode != 0 or "not found" in r.stderr:
                raise AssertionError(f"debugfs rdump {p} failed: {r.stderr[-2000:]}")
    finally:
        copy.unlink(missing_ok=True)
    return FsCheck(r1.returncode, r1.stdout + r1.stderr, r2.returncode == 0, r2.stdout + r2.stderr)


# -- running a machine --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Disk:
    path: Path
    readonly: bool = False


@dataclass
class Line:
    t: float
    """host monotonic time the line arrived"""
    text: str

    def after(self, marker: str) -> str:
        """What follows ``marker`` on the line."""
        return self.text.split(marker, 1)[1].strip()


class VmExited(AssertionError):
    """QEMU ended while the test waited for something."""


@dataclass
class Vm:
    """One boot of ``base``'s kernel with ``disks`` (the first is the root, /dev/vda)."""

    base: Base
    disks: Sequence[Disk]
    name: str
    log_dir: Path
    init: str | None = None
    """``init=``: None for systemd; :data:`MINIMAL_INIT_PATH` for the quick one."""
    append: str = ""
    cpus: int = 2
    memory: str = "1024M"
    log: Log = say
    lines: list[Line] = field(default_factory=list)
    started: float | None = None
    ended: float | None = None
    how_ended: str = ""
    proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        root = self.disks[0]
        cmdline = (f"root=/dev/vda {'ro' if root.readonly else 'rw'} console=ttyS0 panic=-1 "
                   + (f"init={self.init} " if self.init else "") + self.append)
        argv = [QEMU, "-accel", "tcg,thread=multi", "-machine", "q35", "-cpu", "max", "-smp", str(self.cpus),
                "-m", self.memory, "-nodefaults", "-display", "none", "-no-reboot",
                "-kernel", str(self.base.kernel), "-initrd", str(self.base.initrd), "-append", cmdline.strip()]
        for d in self.disks:
            argv += ["-drive", f"file={d.path},if=virtio,format=raw,cache=writeback"
                     + (",readonly=on" if d.readonly else "")]
        # romfile=: no network boot ROM (the kernel is given), one thing less for SeaBIOS to run
        return argv + ["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0,romfile=",
                       "-serial", "stdio"]

    @property
    def console_path(self) -> Path:
        return self.log_dir / f"{self.name}.console.log"

    def start(self) -> Vm:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"vm-{self.name}", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.console_path, "a", encoding="utf-8") as out:
            out.write(f"--- {self.name}: {' '.join(self.argv())}\n")
            for raw in self.proc.stdout:
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                now = time.monotonic()
                out.write(f"{now - (self.started or now):8.2f} {text}\n")
                out.flush()
                with self._changed:
                    self.lines.append(Line(now, text))
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def find(self, marker: str) -> Line | None:
        """The first console line with ``marker`` in it, if any yet (a service's output
        reaches the console through journald, behind a prefix)."""
        with self._changed:
            for line in self.lines:
                if marker in line.text:
                    return line
        return None

    def wait_for(self, marker: str, timeout: float) -> Line:
        """The first console line with ``marker``; VmExited if QEMU ends first, AssertionError
        (with the console's tail) at ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.find(marker)
            if line is not None:
                return line
            if not self.alive and not self._reader.is_alive():
                raise VmExited(f"VM {self.name} ended (QEMU exit {self.proc.returncode if self.proc else None}) "
                               f"before {marker!r}:\n{self.tail()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"VM {self.name}: no {marker!r} within {timeout:.0f} s:\n{self.tail()}")
            with self._changed:
                self._changed.wait(min(left, 0.5))

    def tail(self, n: int = 60) -> str:
        with self._changed:
            return "\n".join(line.text for line in self.lines[-n:])

    def text(self) -> str:
        with self._changed:
            return "\n".join(line.text for line in self.lines)

    def power_cut(self) -> float:
        """SIGKILL QEMU: the guest loses power. Returns the host time of the cut."""
        t = self._kill()
        self._end("power cut")
        return t

    def wait_exit(self, timeout: float) -> int:
        """Wait for the guest to power off; at ``timeout`` QEMU is killed and AssertionError."""
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill()
            self._end(f"TIMED OUT after {timeout:.0f} s: killed")
            raise AssertionError(f"VM {self.name} did not power off within {timeout:.0f} s:\n{self.tail()}") from None
        self._end(f"powered off (QEMU exit {rc})")
        return rc

    def close(self) -> None:
        """Kill QEMU if it still runs (a test that failed half-way)."""
        if self.proc is not None and self.ended is None:
            self._kill()
            self._end("killed at the end of the test")

    def _kill(self) -> float:
        assert self.proc is not None
        t = time.monotonic()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: QEMU alone
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        return t

    def _end(self, how: str) -> None:
        if self.ended is not None:
            return
        self._reader.join(10)
        self.ended = time.monotonic()
        self.how_ended = how
        self.log(self.timings())

    @property
    def boot_s(self) -> float | None:
        up = self.find("@@vm-up")
        return None if up is None or self.started is None else up.t - self.started

    @property
    def guest_uptime_at_up(self) -> float | None:
        up = self.find("@@vm-up")
        try:
            return float(up.after("@@vm-up").split()[0]) if up else None
        except (IndexError, ValueError):
            return None

    @property
    def total_s(self) -> float | None:
        return None if self.started is None or self.ended is None else self.ended - self.started

    def timings(self) -> str:
        def s(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f} s"

        boot, total = self.boot_s, self.total_s
        test = None if boot is None or total is None else total - boot
        up = self.guest_uptime_at_up
        kernel = "" if up is None else f" (guest uptime {up:.1f} s)"
        return f"VM {self.name}: boot {s(boot)}{kernel}, test {s(test)}, total {s(total)}; {self.how_ended}"

    def __enter__(self) -> Vm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

