"""bench/bench_wear.py's view of a process from outside: what the kernel keeps about it
(``/proc/<pid>/io``, ``stat``, ``task/*/status``), the sync calls strace sees, ``-X importtime``.
Every process started here is killed on the way out (``kill_children``), by its own pid."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
SYNC_CALLS = ("fsync", "fdatasync", "sync_file_range", "msync", "syncfs", "sync")
BACKEND_TOOLS = ("agent.tools", "agent.demo", "agent.daemon.dropin", "agent.compact.decoder")
"""The backend's side (``watch``, ``verify-chain``, the compact decoder) and the command line's
other commands (``demo``, ``unit-dropin``): ``run`` needs none of them."""


# -- processes: every one started here is killed on the way out --------------------------------

_children: list[subprocess.Popen] = []


def spawn(cmd: list[str], **kw: Any) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, **kw)
    _children.append(proc)
    return proc


def kill_children() -> None:
    """Kill what is still running of what we started (by pid, each one), then reap it."""
    for proc in _children:
        if proc.poll() is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
    for proc in _children:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
    _children.clear()


def need_strace() -> str:
    """strace's path, once it is known to work here; SystemExit saying why not."""
    path = shutil.which("strace")
    if path is None:
        raise SystemExit("bench_wear: strace is not installed (apt-get install -y strace); it counts the "
                         "agent's fsync/fdatasync calls")
    probe = subprocess.run([path, "-f", "-qq", "-e", "trace=" + ",".join(SYNC_CALLS), "-o", os.devnull, "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        raise SystemExit(f"bench_wear: {path} does not work here: {probe.stderr.strip()} "
                         "(in a container it needs ptrace: CAP_SYS_PTRACE, kernel.yama.ptrace_scope)")
    return path


# -- what the kernel says about a process ------------------------------------------------------


@dataclass
class Sample:
    mono: float
    wall: float
    io: dict[str, int]
    cpu_s: float
    ctx: dict[int, int]
    """Per thread id: voluntary + nonvoluntary context switches."""
    rss_kb: int
    hwm_kb: int
    threads: int


def io_counters(pid: int) -> dict[str, int]:
    """``/proc/<pid>/io``: write_bytes, read_bytes, rchar… (the whole thread group)."""
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k.strip()] = int(v)
    return out


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: the whole thread group


def _ctx(pid: int) -> dict[int, int]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue  # a thread that just ended
        n = sum(int(line.split()[1]) for line in text.splitlines()
                if line.split(":")[0] in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"))
        out[int(tid)] = n
    return out


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "Threads"):
            out[k] = int(v.split()[0])
    return out


def sample(pid: int) -> Sample:
    st = _status_kb(pid)
    return Sample(time.monotonic(), time.time(), io_counters(pid), _cpu_s(pid), _ctx(pid), st.get("VmRSS", 0),
                  st.get("VmHWM", 0), st.get("Threads", 0))


def ctx_between(a: Sample, b: Sample) -> tuple[int, int]:
    """Context switches of every thread between two samples (a thread born in between counts
    from zero); and how many threads of ``a`` had ended by ``b`` (their switches are lost)."""
    total = sum(n - a.ctx.get(tid, 0) for tid, n in b.ctx.items())
    return total, len(set(a.ctx) - set(b.ctx))


def folder_sizes(folder: Path) -> dict[str, int]:
    """Apparent size of every file in the store's folder, by name."""
    out = {}
    for p in folder.iterdir():
        try:
            if p.is_file():
                out[p.name] = p.stat().st_size
        except OSError:
            pass
    return out


def evict(folder: Path) -> None:
    """Drop a folder's files from the page cache (only these files: the machine is shared),
    so that what the agent reads from them at start really comes from the disk."""
    for p in folder.iterdir():
        if p.is_file():
            evict_file(p)


def evict_file(path: Path) -> None:
    """Drop one file from the page cache, written back first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_bytes_check(folder: Path, python: str) -> tuple[int, int, int]:
    """What ``write_bytes`` counts on this filesystem, from a tiny child process: 64 appends of
    100 B each followed by fsync, then 64 appends of 100 B and one fsync. Returns (bytes
    counted for the first, for the second, bytes the second passed to write())."""
    code = (
        "import os\n"
        "def wb(): return {l.split(':')[0]: int(l.split(':')[1]) for l in open('/proc/self/io')}\n"
        f"d = {str(folder)!r}\n"
        "a = wb(); fd = os.open(d + '/synced', os.O_CREAT | os.O_WRONLY | os.O_APPEND)\n"
        "for _ in range(64): os.write(fd, b'x' * 100); os.fsync(fd)\n"
        "os.close(fd); b = wb(); fd = os.open(d + '/unsynced', os.O_CREAT | os.O_WRONLY | os.O_APPEND)\n"
        "for _ in range(64): os.write(fd, b'x' * 100)\n"
        "os.fsync(fd); os.close(fd); c = wb()\n"
        "print(b['write_bytes'] - a['write_bytes'], c['write_bytes'] - b['write_bytes'], c['wchar'] - b['wchar'])\n"
    )
    folder.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    for name in ("synced", "unsynced"):
        (folder / name).unlink(missing_ok=True)
    return int(out[0]), int(out[1]), int(out[2])


# -- the agent, and strace attached to it ------------------------------------------------------


@dataclass
class SyncCall:
    ts: float
    call: str
    path: str


def parse_strace(path: Path) -> list[SyncCall]:
    """Every sync call in strace's output (``-f -ttt -y``): a call cut in two by another
    thread is counted once, at its start."""
    out = []
    pat = re.compile(r"^(?:\[pid\s+)?\d+\]?\s+(\d+\.\d+)\s+(\w+)\((.*)$")
    fd_path = re.compile(r"^\d+<(.*?)>[,)\s]")
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        m = pat.match(line)
        if not m or m.group(2) not in SYNC_CALLS:
            continue
        args = m.group(3)
        p = fd_path.match(args)
        out.append(SyncCall(float(m.group(1)), m.group(2), p.group(1) if p else ""))
    return out



class StraceAttach:
    """``strace -f -ttt -y -e trace=<sync calls> -p PID``: attached to every thread of a running
    process (and those it starts) until ``detach``. Attached, strace stops the process on every
    system call, so nothing but the sync calls is measured while it is."""

    def __init__(self, strace: str, pid: int, out: Path):
        self.pid, self.out = pid, out
        self.proc = spawn([strace, "-f", "-qq", "-ttt", "-y", "-e", "trace=" + ",".join(SYNC_CALLS), "-o", str(out),
                           "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not self._attached():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
                self.detach()
                raise RuntimeError(f"strace could not attach to {pid}: {err.strip() or 'timed out'}")
            time.sleep(0.01)

    def _attached(self) -> bool:
        try:
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                text = Path(f"/proc/{self.pid}/task/{tid}/status").read_text()
                tracer = next(int(x.split()[1]) for x in text.splitlines() if x.startswith("TracerPid:"))
                if tracer != self.proc.pid:
                    return False
        except (OSError, StopIteration):
            return False
        return True

    def detach(self) -> list[SyncCall]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return parse_strace(self.out)


# -- python -X importtime ----------------------------------------------------------------------


@dataclass
class Imports:
    modules: int
    total_s: float
    backend_tools: list[str]
    heaviest: list[tuple[str, float]]


def parse_importtime(text: str) -> Imports:
    """``import time: self [us] | cumulative | imported package`` lines (stderr of
    ``python -X importtime``): one per module imported for the first time, nested ones indented
    by two spaces a level."""
    mods: list[tuple[str, int, int]] = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        self_us, cum_us, name = line.split(":", 1)[1].split("|", 2)
        mods.append((name[1:].rstrip(), int(self_us), int(cum_us)))
    top = [(name, cum) for name, _s, cum in mods if not name.startswith(" ")]
    names = [name.strip() for name, _s, _c in mods]
    tools = sorted({n for n in names if any(n == t or n.startswith(t + ".") for t in BACKEND_TOOLS)})
    heaviest = sorted(top, key=lambda x: -x[1])[:5]
    return Imports(len(mods), sum(c for _n, c in top) / 1e6, tools, [(n, c / 1e6) for n, c in heaviest])


def fmt_bytes(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.3g} MB" if n < 1e8 else f"{n / 1e6:.0f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.3g} kB"
    return f"{n:.0f} B"


def counter_text(c: Counter[str], limit: int = 4) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.most_common(limit))
