"""The Debian package (issue 12, item 1), as a technician gets it.

Built once per session by ``.ci/build-deb``, then checked with Debian's own tools: ``dpkg-deb``
(files, modes, owners, conffiles, maintainer scripts, Depends) and ``lintian`` (no error or
warning but the overrides the package ships, each with its reason). Then the real proof: in a
throwaway Debian 12 chroot (debootstrap, cached outside the work tree), ``apt-get install`` of the
.deb as docs/install.md says, the user and groups, the permissions, the venv, ``check-config``
and a dry run of the demo trip as the service user, an upgrade to a second build (the
technician's config edit, the enable symlink and the store survive; systemd is asked to
restart the agent only if it runs), ``apt-get remove`` (config, store and user stay) and
``apt-get purge`` (all gone). systemd does not run in a chroot: a stand-in systemctl records
what the maintainer scripts ask of it.

Run with ``-s`` to see the timings.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import certs

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / ".ci" / "build-deb"
DEB_DIR = REPO / "systemd" / "deb"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
UPGRADE_VERSION = f"{VERSION}+upgrade.1"  # what a second build is called: sorts after VERSION
CACHE = Path(os.environ.get("LORRY_TEST_CACHE", "/var/cache/lorry-agent-test"))
MIRROR = os.environ.get("LORRY_DEBIAN_MIRROR", "http://deb.debian.org/debian")
TIMINGS: dict[str, float] = {}


def timed(what: str, started: float) -> None:
    TIMINGS[what] = time.monotonic() - started
    print(f"\n[test_deb] {what}: {TIMINGS[what]:.1f} s", flush=True)


def sh(*cmd: str | Path, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def build(out: Path, version: str | None = None) -> Path:
    args = ["--out", str(out)] + (["--version", version] if version else [])
    started = time.monotonic()
    r = sh(BUILD, *args, timeout=900)
    timed(f"build {version or VERSION}", started)
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("deb"))


@pytest.fixture(scope="module")
def python_version() -> str:
    return sh("/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])").stdout.strip()


# -- the archive, with dpkg-deb --------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    mode: str
    owner: str
    path: str
    target: str | None


def contents(deb: Path) -> list[Entry]:
    """``dpkg-deb --contents``, in archive order."""
    entries = []
    for line in sh("dpkg-deb", "--contents", deb).stdout.splitlines():
        mode, owner, _size, _date, _time, rest = line.split(None, 5)
        path, _, target = rest.partition(" -> ")
        entries.append(Entry(mode, owner, path.removeprefix("."), target or None))
    return entries


def data_tar(deb: Path) -> tarfile.TarFile:
    return tarfile.open(fileobj=io.BytesIO(sh_bytes("dpkg-deb", "--fsys-tarfile", deb)))


def control_tar(deb: Path) -> tarfile.TarFile:
    return tarfile.open(fileobj=io.BytesIO(sh_bytes("dpkg-deb", "--ctrl-tarfile", deb)))


def sh_bytes(*cmd: str | Path) -> bytes:
    return subprocess.run([str(c) for c in cmd], capture_output=True, check=True, timeout=120).stdout


def read(tar: tarfile.TarFile, path: str) -> bytes:
    f = tar.extractfile("./" + path.lstrip("/"))
    assert f is not None, path
    return f.read()


def test_name_and_control_fields(deb: Path, python_version: str) -> None:
    arch = sh("dpkg", "--print-architecture").stdout.strip()
    assert deb.name == f"lorry-agent_{VERSION}_{arch}.deb"
    info = sh("dpkg-deb", "--info", deb).stdout
    field = {k: sh("dpkg-deb", "--field", deb, k).stdout.strip()
             for k in ("Package", "Version", "Architecture", "Depends", "Recommends", "Installed-Size")}
    assert (field["Package"], field["Version"], field["Architecture"]) == ("lorry-agent", VERSION, arch)
    depends = [d.strip() for d in field["Depends"].split(",")]
    # The venv's interpreter is Debian's own, by its exact version; libc from the compiled wheels
    assert f"python{python_version}" in depends and "adduser" in depends, depends
    assert any(d.startswith("libc6 (>= ") for d in depends), depends
    assert field["Recommends"] == "systemd, udev"
    assert 5_000 < int(field["Installed-Size"]) < 100_000, field["Installed-Size"]
    for script in ("preinst", "postinst", "prerm", "postrm"):
        assert re.search(rf"^\s+\d+ bytes,\s+\d+ lines\s+\*\s+{script}\s+#!/bin/sh$", info, re.M), (script, info)
    print(f"\n[test_deb] {deb.name}: {deb.stat().st_size / 1e6:.1f} MB, "
          f"{int(field['Installed-Size']) / 1024:.1f} MiB installed; Depends: {field['Depends']}")


def test_files_modes_and_owners(deb: Path, python_version: str) -> None:
    entries = contents(deb)
    by_path = {e.path: e for e in entries}
    release = f"/opt/lorry-agent/releases/{VERSION}"

    assert {e.owner for e in entries} == {"root/root"}  # the group lorry-agent: dpkg-statoverride
    expected = {
        "/etc/lorry-agent/": "drwxr-x---",
        "/etc/lorry-agent/tls/": "drwxr-x---",
        "/etc/lorry-agent/agent.toml": "-rw-r-----",
        "/lib/systemd/system/lorry-agent.service": "-rw-r--r--",
        "/lib/udev/rules.d/60-lorry-agent.rules": "-rw-r--r--",
        f"{release}/bin/lorry-agent": "-rwxr-xr-x",
        f"{release}/pyvenv.cfg": "-rw-r--r--",
        "/usr/share/doc/lorry-agent/copyright": "-rw-r--r--",
        "/usr/share/doc/lorry-agent/changelog.gz": "-rw-r--r--",
        "/usr/share/lintian/overrides/lorry-agent": "-rw-r--r--",
    }
    assert {p: by_path[p].mode if p in by_path else None for p in expected} == expected
    assert by_path["/opt/lorry-agent/venv"].target == f"releases/{VERSION}"
    assert by_path["/usr/bin/lorry-agent"].target == "/opt/lorry-agent/venv/bin/lorry-agent"
    assert by_path[f"{release}/bin/python{python_version}"].target == f"/usr/bin/python{python_version}"
    writable = [e.path for e in entries if e.mode[0] != "l" and (e.mode[5] == "w" or e.mode[8] == "w")]
    assert writable == []

    # An upgrade switches the venv symlink only once the whole new release is in place: dpkg
    # renames files into place in archive order, and the symlink comes after every file of it.
    order = [e.path for e in entries]
    assert order.index("/opt/lorry-agent/venv") > max(i for i, p in enumerate(order) if p.startswith(release))

    paths = set(by_path)
    assert any(p.endswith("/site-packages/agent/cli/__init__.py") for p in paths)
    assert any(p.endswith("/site-packages/drivers/gps/receiver.py") for p in paths)
    assert any(p.endswith("/site-packages/agent/demo/data/trip.nmea.gz") for p in paths), "the demo trip ships"
    shipped_but_should_not = sorted(
        p for p in paths
        if "/__pycache__/" in p or p.endswith(".pyc")                       # postinst compiles
        or re.search(r"/site-packages/(tests|bench)/", p)                   # test and bench code
        or re.search(r"/site-packages/(pip|setuptools)[-/]", p)             # nothing installs there
        or p.endswith(("/bin/activate", "/bin/pip"))  # (the demo trip ships: `lorry-agent demo`)
    )
    assert shipped_but_should_not == []

    tar = data_tar(deb)
    assert read(tar, "/etc/lorry-agent/agent.toml") == (REPO / "config" / "agent.example.toml").read_bytes()
    assert read(tar, "/lib/systemd/system/lorry-agent.service") == \
        (REPO / "systemd" / "lorry-agent.service").read_bytes()
    assert read(tar, f"{release}/bin/lorry-agent").startswith(f"#!{release}/bin/python\n".encode())
    cfg = read(tar, f"{release}/pyvenv.cfg").decode()
    assert "home = /usr/bin\n" in cfg and f"-m venv {release}\n" in cfg, cfg


def test_no_trace_of_the_build_machine(deb: Path) -> None:
    """Scripts and pyvenv.cfg name /opt/lorry-agent, never the folder the venv was built in."""
    tar = data_tar(deb)
    needles = [b"/lorry-deb.", str(REPO).encode(), b"/root/.pyenv"]  # work folder, checkout, pyenv
    found = []
    for m in tar.getmembers():
        if m.isfile():
            data = tar.extractfile(m).read()  # type: ignore[union-attr]
            found += [f"{m.name}: {n.decode()}" for n in needles if n in data]
    assert found == []


def test_control_files(deb: Path, tmp_path: Path) -> None:
    tar = control_tar(deb)
    members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
    assert sorted(members) == ["conffiles", "control", "md5sums", "postinst", "postrm", "preinst", "prerm"]
    assert read(tar, "conffiles") == b"/etc/lorry-agent/agent.toml\n"
    for script in ("preinst", "postinst", "prerm", "postrm"):
        assert members[script].mode == 0o755, script
        text = read(tar, script)
        assert text == (DEB_DIR / script).read_bytes()
        (tmp_path / script).write_bytes(text)
        sh("sh", "-n", tmp_path / script)  # POSIX sh syntax (dash); lintian checks for bashisms
    # The unit is never enabled or started by the package: the technician edits the config first
    scripts = "\n".join(line for s in ("preinst", "postinst", "prerm", "postrm")
                         for line in read(tar, s).decode().splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"deb-systemd-invoke\s+(start|restart)|systemctl\s+(--system\s+)?(enable|start)", scripts)
    assert "deb-systemd-invoke try-restart 'lorry-agent.service'" in scripts

    # md5sums: every regular file but the conffile, which dpkg tracks itself
    summed = {line.split("  ", 1)[1] for line in read(tar, "md5sums").decode().splitlines()}
    files = {e.path.lstrip("/") for e in contents(deb) if e.mode.startswith("-")}
    assert summed == files - {"etc/lorry-agent/agent.toml"}


def test_example_config_as_shipped(deb: Path, tmp_path: Path) -> None:
    """The packaged venv runs (on this machine's Debian python), and the shipped example is
    complete but for the device's TLS material: check-config names exactly those three files,
    which docs/install.md tells the technician to install (with the device id and broker)."""
    root = tmp_path / "root"
    sh("dpkg-deb", "-x", deb, root)
    python = root / f"opt/lorry-agent/releases/{VERSION}/bin/python"
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
    where = sh(python, "-B", "-c", "import agent; print(agent.__file__)", cwd=tmp_path, env=env).stdout
    assert where.startswith(str(root / "opt/lorry-agent/releases")), where
    r = sh(python, "-B", "-m", "agent", "check-config", root / "etc/lorry-agent/agent.toml",
           check=False, cwd=tmp_path, env=env)
    assert r.returncode == 1, r
    problems = [line.strip() for line in r.stderr.splitlines()[1:]]
    assert [p.split(":")[0] for p in problems] == ["[mqtt.tls] ca_file", "[mqtt.tls] cert_file",
                                                  "[mqtt.tls] key_file"], r.stderr


def test_lintian(deb: Path) -> None:
    if shutil.which("lintian") is None:
        pytest.skip("lintian is not installed: .ci/setup --tests installs it")
    started = time.monotonic()
    r = sh("lintian", "--fail-on", "error,warning", "--info", deb, check=False, timeout=600)
    timed("lintian", started)
    lines = r.stdout.splitlines()
    assert [line for line in lines if line.startswith(("E:", "W:"))] == [], r.stdout[-5000:]
    assert [line for line in lines if re.search(r"\b(unused|mismatched)-override\b", line)] == []
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # Each accepted tag is written down with its reason
    overrides = (DEB_DIR / "lintian-overrides").read_text().splitlines()
    for i, line in enumerate(overrides):
        if line.startswith("lorry-agent:"):
            above = overrides[i - 1] if i else ""
            assert above.startswith("#") or overrides[i - 1].startswith("lorry-agent:"), f"no reason for: {line}"


# -- the real install, in a bookworm chroot ---------------------------------------------------------

CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SOURCES = f"""deb {MIRROR} bookworm main
deb {MIRROR} bookworm-updates main
deb {MIRROR.replace('/debian', '/debian-security')} bookworm-security main
"""
# Stands in for systemctl, with /run/systemd/system there as if systemd ran: records what the
# maintainer scripts ask of it (deb-systemd-invoke calls it too).
FAKE_SYSTEMCTL = """#!/bin/sh
echo "$*" >> /tmp/systemctl.log
exit 0
"""
SYSTEMCTL = "/usr/bin/systemctl"  # the real one, offline (--root=/), for what the technician does


def loud_skip(reason: str) -> None:
    print(f"\n[test_deb] SKIPPED: {reason}", file=sys.stderr, flush=True)
    pytest.skip(reason)


def remove_tree(path: Path) -> None:
    """rm -rf that never crosses into a mounted filesystem (a chroot's /proc)."""
    if path.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True, timeout=300)


def bookworm_base() -> Path:
    """A debootstrapped Debian 12 (minbase), cached per mirror and ISO week in CACHE."""
    if os.geteuid() != 0:
        loud_skip("the chroot install needs root (debootstrap, chroot, mount)")
    if shutil.which("debootstrap") is None and not Path("/usr/sbin/debootstrap").exists():
        loud_skip("debootstrap is not installed: .ci/setup --tests installs it")
    year, week, _ = dt.date.today().isocalendar()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", MIRROR.split("://", 1)[-1]).strip("-")
    key = f"bookworm-minbase-{slug}-{year}w{week:02d}"
    base = CACHE / key
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (base / "complete").exists():
            print(f"\n[test_deb] chroot base: cached {base}", flush=True)
            return base / "root"
        partial = CACHE / f".{key}.partial"
        remove_tree(partial)
        partial.mkdir()
        started = time.monotonic()
        with open(partial / "debootstrap.log", "w") as log:
            r = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(partial / "root"), MIRROR],
                               stdout=log, stderr=subprocess.STDOUT, timeout=1200)
        if r.returncode != 0:
            tail = (partial / "debootstrap.log").read_text()[-1500:]
            loud_skip(f"debootstrap cannot build a bookworm chroot here (exit {r.returncode}):\n{tail}")
        timed("chroot create (debootstrap)", started)
        (partial / "complete").write_text(f"{MIRROR} {dt.datetime.now().isoformat()}\n")
        partial.rename(base)
        for old in CACHE.glob("bookworm-minbase-*"):
            if old != base:
                remove_tree(old)  # last week's
        return base / "root"


class Chroot:
    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, *cmd: str, check: bool = True, timeout: float = 600,
                 input: str | None = None) -> subprocess.CompletedProcess[str]:
        env = ["env", "-i", f"PATH={CHROOT_PATH}", "LC_ALL=C.UTF-8", "DEBIAN_FRONTEND=noninteractive", "HOME=/root"]
        return sh("chroot", self.root, *env, *cmd, check=check, timeout=timeout, input=input)

    def path(self, p: str) -> Path:
        return self.root / p.lstrip("/")

    def as_agent(self, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """As the service user, as the unit's ExecStartPre= and ExecStart= run."""
        return self("runuser", "-u", "lorry-agent", "--", *cmd, check=check, timeout=timeout)

    def stat(self, p: str) -> str:
        return self("stat", "-c", "%a %U:%G", p).stdout.strip()

    def apt(self, *args: str, what: str) -> str:
        started = time.monotonic()
        # apt runs dpkg with its own PATH (DPkg::Path): this one lets the stand-in systemctl in
        r = self("apt-get", "-q", "-y", "-o", "Dpkg::Use-Pty=0", "-o", f"DPkg::Path={CHROOT_PATH}", *args,
                 timeout=900)
        timed(what, started)
        return r.stdout + r.stderr


@pytest.fixture
def chroot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chroot]:
    base = bookworm_base()
    started = time.monotonic()
    run = tmp_path_factory.mktemp("chroot")
    root = run / "root"
    sh("cp", "-a", base, root)
    mounts = []
    try:
        for fstype, where in (("proc", "proc"), ("tmpfs", "dev/shm")):
            (root / where).mkdir(parents=True, exist_ok=True)
            r = sh("mount", "-t", fstype, fstype, root / where, check=False)
            if r.returncode != 0:
                loud_skip(f"cannot mount {fstype} in the chroot: {r.stderr.strip()}")
            mounts.append(root / where)
        shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
        (root / "etc/apt/sources.list").write_text(SOURCES)
        # "systemd runs": maintainer scripts talk to the stand-in (no policy-rc.d: nothing is
        # really started, and deb-systemd-invoke must not be told to hold back)
        (root / "run/systemd/system").mkdir(parents=True)
        (root / "usr/local/sbin/systemctl").write_text(FAKE_SYSTEMCTL)
        (root / "usr/local/sbin/systemctl").chmod(0o755)
        timed("chroot copy", started)
        yield Chroot(root)
    finally:
        for m in reversed(mounts):
            if subprocess.run(["umount", str(m)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(m)], capture_output=True)
        remove_tree(run)


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.vm
def test_install_upgrade_remove_purge_in_a_bookworm_chroot(deb: Path, chroot: Chroot,
                                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    c = chroot
    release = f"/opt/lorry-agent/releases/{VERSION}"
    (c.path("/tmp/pkg")).mkdir(parents=True)
    shutil.copy(deb, c.path(f"/tmp/pkg/{deb.name}"))
    # A device installed by hand (docs/install.md, appendix) has a real venv folder there
    c.path("/opt/lorry-agent/venv/bin").mkdir(parents=True)
    c.path("/opt/lorry-agent/venv/bin/manual-marker").write_text("by hand\n")

    # -- apt install ./lorry-agent_….deb: the whole install, dependencies from the mirror --------
    c.apt("update", what="apt-get update")
    out = c.apt("install", f"/tmp/pkg/{deb.name}", what="apt-get install ./the.deb (with python3.11, systemd, udev)")
    assert f"Setting up lorry-agent ({VERSION})" in out
    systemctl_log = c.path("/tmp/systemctl.log")
    calls = systemctl_log.read_text().splitlines()
    assert "--system daemon-reload" in calls and [line for line in calls if "lorry-agent" in line] == [], calls

    groups = c("id", "-nG", "lorry-agent").stdout.split()
    assert set(groups) >= {"lorry-agent", "dialout", "gpio"}, groups
    passwd = c("getent", "passwd", "lorry-agent").stdout.strip().split(":")
    assert (passwd[5], passwd[6]) == ("/var/lib/lorry-agent", "/usr/sbin/nologin") and int(passwd[2]) < 1000, passwd
    assert c.stat("/etc/lorry-agent") == "750 root:lorry-agent"
    assert c.stat("/etc/lorry-agent/tls") == "750 root:lorry-agent"
    assert c.stat("/etc/lorry-agent/agent.toml") == "640 root:lorry-agent"
    assert c.stat("/var/lib/lorry-agent") == "750 lorry-agent:lorry-agent"
    assert os.readlink(c.path("/opt/lorry-agent/venv")) == f"releases/{VERSION}"
    aside = list(c.path("/opt/lorry-agent").glob("venv.manual.*"))
    assert len(aside) == 1 and (aside[0] / "bin/manual-marker").exists()  # kept aside, not mixed
    assert c.path("/lib/systemd/system/lorry-agent.service").read_bytes() == \
        (REPO / "systemd/lorry-agent.service").read_bytes()
    assert c.path("/lib/udev/rules.d/60-lorry-agent.rules").exists()
    assert len(list(c.path(release).rglob("*.pyc"))) > 300  # compiled by postinst
    # Installed but neither enabled nor started: the technician edits the config first
    assert c(SYSTEMCTL, "--root=/", "is-enabled", "lorry-agent.service", check=False).stdout.strip() == "disabled"
    assert c("dpkg", "--verify", "lorry-agent").stdout == ""  # every file as shipped (md5sums)
    assert c("sh", "-c", "command -v lorry-agent").stdout.strip() == "/usr/bin/lorry-agent"

    # -- as shipped, check-config asks for the device's TLS material, nothing else --------------
    r = c.as_agent("lorry-agent", "check-config", check=False)
    assert r.returncode == 1, r
    assert [p.strip().split(":")[0] for p in r.stderr.splitlines()[1:]] == \
        ["[mqtt.tls] ca_file", "[mqtt.tls] cert_file", "[mqtt.tls] key_file"], r.stderr

    # -- the technician: device id, broker, certificates; then check-config as the service does --
    tls = tmp_path_factory.mktemp("tls")
    ca = certs.authority(tls)
    device = ca.client(tls, "device", common_name="GX-NN-0815")
    shutil.copy(ca.cert, c.path("/etc/lorry-agent/tls/ca.pem"))
    shutil.copy(device.cert, c.path("/etc/lorry-agent/tls/device.pem"))
    shutil.copy(device.key, c.path("/etc/lorry-agent/tls/device.key"))
    c("chmod", "0644", "/etc/lorry-agent/tls/ca.pem", "/etc/lorry-agent/tls/device.pem")
    c("chown", "root:lorry-agent", "/etc/lorry-agent/tls/device.key")
    c("chmod", "0640", "/etc/lorry-agent/tls/device.key")
    config = c.path("/etc/lorry-agent/agent.toml")
    edited = config.read_text().replace('id = "CQ-HN-0042"', 'id = "GX-NN-0815"').replace(
        'host = "mqtt.example-fleet.net"', 'host = "mqtt.fleet.test"')
    assert edited != config.read_text()
    config.write_text(edited)
    r = c.as_agent("/opt/lorry-agent/venv/bin/lorry-agent", "check-config", "--config", "/etc/lorry-agent/agent.toml")
    assert "OK (device GX-NN-0815, broker mqtt.fleet.test:8883" in r.stdout, r
    c(SYSTEMCTL, "--root=/", "enable", "lorry-agent.service")  # what `systemctl enable --now` leaves on disk
    wants = c.path("/etc/systemd/system/multi-user.target.wants/lorry-agent.service")
    assert wants.is_symlink()

    # -- the demo trip, dry run, with the packaged venv as the service user ----------------------
    demo = c.path("/tmp/demo")
    demo.mkdir(parents=True)
    shutil.copy(REPO / "agent/demo/data/demo.toml", demo / "demo.toml")
    shutil.copy(REPO / "agent/demo/data/trip.nmea.gz", demo / "trip.nmea.gz")
    c("chown", "-R", "lorry-agent:lorry-agent", "/tmp/demo")
    started = time.monotonic()
    r = c.as_agent("lorry-agent", "run", "--config", "/tmp/demo/demo.toml", "--dry-run", timeout=300)
    timed("run --dry-run (demo trip) in the chroot", started)
    messages = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(messages) > 5 and all(m["topic"].startswith("lorry/CQ-HN-0042/") for m in messages), r.stdout[:2000]
    assert {m["topic"].rsplit("/", 1)[-1] for m in messages} == {"position", "seal", "temperature", "alarm"}

    # A store where the service keeps it: the demo trip recorded for real with no broker to take
    # it (connection refused), stopped by SIGTERM as systemd stops it
    (demo / "store.toml").write_text(
        (REPO / "agent/demo/data/demo.toml").read_text()
        .replace('path = "demo-state/buffer.db"', 'path = "/var/lib/lorry-agent/buffer.db"')
        .replace("port = 1883", "port = 1"))
    r = c.as_agent("timeout", "-s", "TERM", "10", "lorry-agent", "run", "--config", "/tmp/demo/store.toml", check=False)
    assert r.returncode == 124, r  # ran until stopped
    store = c.path("/var/lib/lorry-agent/buffer.db")
    buffered = json.loads(c("lorry-agent", "status", "--json").stdout)["buffer"]
    assert sum(b["depth"] for b in buffered.values()) > 100, buffered
    kept = {"config": sha256(config), "store": sha256(store), "key": sha256(c.path("/etc/lorry-agent/tls/device.key"))}

    # -- upgrade to a second build: the agent restarted if it runs (try-restart), nothing lost ---
    deb2 = build(tmp_path_factory.mktemp("deb2"), UPGRADE_VERSION)
    shutil.copy(deb2, c.path(f"/tmp/pkg/{deb2.name}"))
    systemctl_log.unlink()
    out = c.apt("install", f"/tmp/pkg/{deb2.name}", what="apt-get install (upgrade)")
    assert f"Unpacking lorry-agent ({UPGRADE_VERSION}) over ({VERSION})" in out, out
    calls = systemctl_log.read_text().splitlines()
    assert calls == ["--system daemon-reload", "try-restart lorry-agent.service"], calls
    new_release = f"/opt/lorry-agent/releases/{UPGRADE_VERSION}"
    assert os.readlink(c.path("/opt/lorry-agent/venv")) == f"releases/{UPGRADE_VERSION}"
    assert not c.path(release).exists() and c.path(new_release).is_dir()  # the old release is gone
    assert {"config": sha256(config), "store": sha256(store),
            "key": sha256(c.path("/etc/lorry-agent/tls/device.key"))} == kept
    assert c.stat("/etc/lorry-agent/agent.toml") == "640 root:lorry-agent"
    assert c.stat("/etc/lorry-agent") == "750 root:lorry-agent"
    assert not list(c.path("/etc/lorry-agent").glob("*.dpkg-*"))
    assert wants.is_symlink()  # still enabled
    assert json.loads(c("lorry-agent", "status", "--json").stdout)["buffer"] == buffered
    r = c.as_agent("lorry-agent", "check-config")
    assert "OK (device GX-NN-0815" in r.stdout
    verify = [line for line in c("dpkg", "--verify", "lorry-agent").stdout.splitlines()
              if not line.endswith(" c /etc/lorry-agent/agent.toml")]  # the technician's edit
    assert verify == []

    # -- apt remove: the program goes; config, store, user stay ----------------------------------
    systemctl_log.unlink()
    c.apt("remove", "lorry-agent", what="apt-get remove")
    calls = systemctl_log.read_text().splitlines()
    assert calls == ["stop lorry-agent.service", "--system daemon-reload"], calls
    for gone in ("/opt/lorry-agent/venv", "/opt/lorry-agent/releases", "/usr/bin/lorry-agent",
                 "/lib/systemd/system/lorry-agent.service", "/lib/udev/rules.d/60-lorry-agent.rules"):
        assert not c.path(gone).exists() and not c.path(gone).is_symlink(), gone
    assert sha256(config) == kept["config"] and sha256(store) == kept["store"]
    assert c.path("/etc/lorry-agent/tls/device.key").exists()
    assert c("getent", "passwd", "lorry-agent").returncode == 0
    assert c("dpkg-query", "-W", "-f", "${Status}", "lorry-agent").stdout == "deinstall ok config-files"

    # -- apt purge: configuration, store, user and their traces all go ---------------------------
    c.apt("purge", "lorry-agent", what="apt-get purge")
    for gone in ("/etc/lorry-agent", "/var/lib/lorry-agent"):
        assert not c.path(gone).exists(), gone
    assert not wants.is_symlink()  # the technician's enable symlink (deb-systemd-helper purge)
    assert c("getent", "passwd", "lorry-agent", check=False).returncode == 2
    assert c("getent", "group", "lorry-agent", check=False).returncode == 2
    assert c("getent", "group", "gpio").returncode == 0  # other software's group too: stays
    assert "lorry-agent" not in c("dpkg-statoverride", "--list").stdout
    assert c("dpkg-query", "-W", "lorry-agent", check=False).returncode == 1  # no such package
    assert [p.name for p in c.path("/opt/lorry-agent").iterdir()] == [aside[0].name]  # only the manual one

    print("\n[test_deb] timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in TIMINGS.items()), flush=True)
