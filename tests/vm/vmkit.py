"""A small test VM: the kernel built by .ci/vm/build-kernel (vcan, gpio-sim, the GPIO character
device, all built in), booted with virtme-ng on the host's own root over 9p, software CPU
(/dev/kvm here is PVM and boots no ordinary kernel), a command run inside as root with a hard
timeout, its output captured.

    kernel = ensure_kernel(log)            # builds it once (~10-17 min) when the cache is empty
    vm = Vm(kernel, log=log)
    run = vm.run("ip link add dev vcan0 type vcan", timeout=120, rwdirs=[tmp_path])
    run.check()                            # AssertionError with the output unless it exited 0
    print(run.timings())                   # boot to user space, the command, total

The guest sees the host's files read-only, except ``rwdirs`` (read-write, same path): the
project's venv, mosquitto and can-utils are the host's.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD_KERNEL = REPO / ".ci" / "vm" / "build-kernel"
# Where the guest keeps what must not go to the (read-only, 9p) host tree: a tmpfs of its own.
GUEST_TMP = "/run/vmkit"
KERNEL_BUILD_TIMEOUT_S = 3 * 3600
_UP = "@@vmkit-up"
_RC = "@@vmkit-rc"

Log = Callable[[str], None]


class QemuUnavailable(RuntimeError):
    """QEMU cannot start a machine at all here: the only reason VM tests may skip."""


@dataclass
class VmRun:
    name: str
    command: str
    returncode: int | None
    """The command's exit status in the guest; None when it never finished (timeout, crash)."""
    output: str
    timed_out: bool
    total_s: float
    boot_s: float | None
    """QEMU started → the command started in the guest (host clock)."""
    test_s: float | None
    """The command itself (host clock)."""
    guest_uptime_s: float | None
    """The guest kernel's uptime when the command started: the kernel's share of the boot."""
    qemu_rc: int | None = None

    def timings(self) -> str:
        def s(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f} s"

        up = "" if self.guest_uptime_s is None else f" (guest kernel uptime {self.guest_uptime_s:.1f} s)"
        end = "TIMED OUT" if self.timed_out else f"exit {self.returncode}"
        return (f"VM {self.name}: boot to user space {s(self.boot_s)}{up}, command {s(self.test_s)}, "
                f"total {s(self.total_s)}; {end}")

    def check(self) -> VmRun:
        if self.timed_out or self.returncode != 0:
            raise AssertionError(f"{self.timings()}\n--- guest output (last 6000 chars) ---\n{self.output[-6000:]}")
        return self


def _build_kernel_path() -> tuple[Path | None, str]:
    r = subprocess.run([str(BUILD_KERNEL), "--print-path"], capture_output=True, text=True, timeout=120)
    lines = r.stdout.strip().splitlines()
    return (Path(lines[-1]) if r.returncode == 0 and lines else None), r.stderr


def ensure_kernel(log: Log) -> Path:
    """The cached bzImage; built by .ci/vm/build-kernel when the cache has none (what CI does
    with an empty cache). A build that fails is a test failure, not a skip."""
    path, _ = _build_kernel_path()
    tools = all(shutil.which(t) for t in ("qemu-system-x86_64", "cansend", "ip"))
    if path is not None and tools:
        return path
    if path is None:
        log(f"vmkit: no test kernel cached: building it with {BUILD_KERNEL.relative_to(REPO)} "
            "(Debian's linux-source-6.1; ~10-17 min on 2 cores, once per config)")
    else:
        log(f"vmkit: installing what the VM tests need with {BUILD_KERNEL.relative_to(REPO)} (kernel cached)")
    start = time.monotonic()
    proc = subprocess.Popen([str(BUILD_KERNEL)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line.rstrip("\n"))
        if line.startswith("build-kernel:"):
            log("vmkit: " + line.rstrip())
    try:
        rc = proc.wait(KERNEL_BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the kernel build did not finish in 3 h") from None
    if rc != 0:
        raise AssertionError(f".ci/vm/build-kernel failed (exit {rc}):\n" + "\n".join(out[-60:]))
    log(f"vmkit: kernel built in {time.monotonic() - start:.0f} s")
    return Path(out[-1])


def qemu_problem() -> str | None:
    """Why QEMU cannot start a (software-CPU) machine here, or None if it can."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    try:
        r = subprocess.run(
            [qemu, "-accel", "tcg", "-machine", "microvm", "-nodefaults", "-display", "none", "-m", "64",
             "-S", "-monitor", "stdio"],
            input="quit\n", capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{qemu} could not be started: {e}"
    if r.returncode != 0:
        return f"{qemu} -accel tcg cannot start a machine (exit {r.returncode}): {r.stderr.strip()[-500:]}"
    return None


class Vm:
    """Boots ``kernel`` with virtme-ng for each ``run``: a fresh machine every time."""

    def __init__(self, kernel: Path, *, cpus: int = 2, memory: str = "1G", log: Log = print):
        self.kernel = kernel
        self.cpus = cpus
        self.memory = memory
        self.log = log
        self.vng = Path(sys.executable).parent / "vng"
        if not self.vng.exists():
            found = shutil.which("vng")
            if found is None:
                raise AssertionError("virtme-ng is not installed: .venv/bin/python -m pip install -e '.[test]'")
            self.vng = Path(found)
        self.runs: list[VmRun] = []

    def argv(self, script: str, rwdirs: Sequence[Path]) -> list[str]:
        argv = [str(self.vng), "--run", str(self.kernel), "--disable-kvm", "--skip-modules",
                "--cpus", str(self.cpus), "--memory", self.memory, "--user", "root", "--cwd", str(REPO)]
        for d in rwdirs:
            argv += ["--rwdir", str(d)]
        return argv + ["--exec", script]

    def run(self, command: str, *, timeout: float, rwdirs: Sequence[Path] = (), name: str = "") -> VmRun:
        """Boot, run ``command`` (sh) as root, power off. Killed at ``timeout`` (boot included)."""
        name = name or command.split()[0]
        # The markers time the guest's side; a private tmpfs for state that must not go to 9p.
        script = (
            f"echo {_UP} $(cut -d' ' -f1 /proc/uptime); "
            f"mkdir -p {GUEST_TMP} && mount -t tmpfs -o size=256m vmkit {GUEST_TMP}; "
            f"( {command} ); rc=$?; echo {_RC} $rc; exit $rc"
        )
        argv = self.argv(script, rwdirs)
        start = time.monotonic()
        lines: list[str] = []
        marks: dict[str, float] = {}
        uptime: list[float] = []
        rc_seen: list[int] = []
        # vng runs virtme-run, from the same venv, by name.
        env = {**os.environ, "PATH": f"{self.vng.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=REPO, env=env)

        def reader() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                lines.append(line)
                if line.startswith(_UP) and _UP not in marks:
                    marks[_UP] = time.monotonic()
                    try:
                        uptime.append(float(line.split()[1]))
                    except (IndexError, ValueError):
                        pass
                elif line.startswith(_RC) and _RC not in marks:
                    marks[_RC] = time.monotonic()
                    try:
                        rc_seen.append(int(line.split()[1]))
                    except (IndexError, ValueError):
                        pass

        t = threading.Thread(target=reader, name=f"vm-{name}", daemon=True)
        t.start()
        timed_out = False
        try:
            qemu_rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            self._kill(proc)
            qemu_rc = proc.returncode
        t.join(10)
        end = time.monotonic()
        up, done = marks.get(_UP), marks.get(_RC)
        run = VmRun(
            name=name, command=command, returncode=rc_seen[0] if rc_seen else None,
            output="\n".join(lines), timed_out=timed_out, total_s=end - start,
            boot_s=None if up is None else up - start,
            test_s=None if up is None else (done if done is not None else end) - up,
            guest_uptime_s=uptime[0] if uptime else None, qemu_rc=qemu_rc,
        )
        self.runs.append(run)
        self.log(run.timings())
        if up is None and not timed_out:
            # Nothing ran: find out whether QEMU itself cannot start here (the one skip).
            problem = qemu_problem()
            if problem is not None:
                raise QemuUnavailable(problem)
        return run

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        """vng → virtme-run → qemu share a process group (start_new_session): end them all."""
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def python(module_args: str) -> str:
    """A shell command running the project's Python in the guest (the host's venv, over 9p)."""
    return f"{shlex.quote(sys.executable)} {module_args}"
