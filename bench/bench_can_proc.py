"""CAN driver process cost at a truck's rate: CPU (% of one core) and context switches per
second of a process that runs only the CAN driver on bench_can.py's truck mix (~1,450 frames/s,
~80 % of the frames PGNs nothing decodes), this version beside the previous one in the same run.

Sources:
- ``replay`` (default; any host): a candump -L capture of the mix replayed at
  ``replay_speed = 1`` (what a host without vcan can run; the frames are read and parsed from
  the file, so kernel filters cannot help here, batched pacing can).
- ``--vcan NAME`` (a vcan interface must exist: the VM, tests/vm/test_vm_hardware.py): a sender
  process sends the mix on NAME at its real rate (15 frames every 10 ms), the driver listens
  with ``interface = "socketcan"``: kernel filters and batched receive.

Every figure is a child process (``--child``) running the driver in a thread for WARM_S, then
measuring ``getrusage(RUSAGE_SELF)`` (all its threads: user + system CPU, voluntary and
involuntary context switches) over ``--seconds``. Variants, one after the other:
- ``new``: ``CanBus`` as it is (kernel filters, batched receive, batched pacing);
- ``old``: ``CanBus`` with the receive path of the previous version (one ``recv()`` per frame,
  no kernel filters, one wait per frame when pacing): its code kept below, verbatim;
- ``raw``: python-can alone, nothing decoded: ``bus.recv()`` per frame (socketcan) or
  ``can.MessageSync(can.LogReader(...))`` (replay), the floor of the old way of reading.
Goal (issue 14): the whole agent <= 2 % of one core and <= 100 context switches/s at
1,500 frames/s + 1 Hz GPS; this measures the CAN part of it.

    python bench/bench_can_proc.py [--seconds 20] [--vcan vcan0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import can
from _positions import REPO

sys.path.insert(0, str(REPO / "tests"))
from bench_can import RATE, bus_second  # noqa: E402

import canlog as cl  # noqa: E402
from agent.config import CanConfig  # noqa: E402
from drivers.can import candump  # noqa: E402
from drivers.can.bus import CanBus  # noqa: E402
from drivers.can.capture import CaptureError, frames, open_capture  # noqa: E402

WARM_S = 2.0
VARIANTS = ("new", "old", "raw")
GOAL_CPU, GOAL_CS = 2.0, 100.0


class OldCanBus(CanBus):
    """The previous version's receive path (before issue 14), verbatim: no kernel filters, one
    ``recv(0.5)`` per frame, one wait per frame when pacing a replay."""

    def _open(self) -> can.BusABC:
        return self._bus_factory()  # type: ignore[no-any-return]

    def _live(self, bus: can.BusABC, stop: threading.Event) -> Iterator[can.Message | None]:
        recv = bus.recv

        def received() -> Iterator[can.Message | None]:
            while not stop.is_set():
                yield recv(0.5)

        return self.times.frames(received())

    def _replay(self, stop: threading.Event) -> Iterator[can.Message | None]:
        try:
            capture = self.capture = open_capture(self.config.replay)
        except CaptureError as e:
            self._problem(str(e), e, loud=True)
            raise
        self.times = candump.Timeline(capture.clock, self.counters)
        speed = self.config.replay_speed
        self.connected = True
        start: tuple[float, float] | None = None
        for msg in self.times.frames(frames(capture, self._parser)):
            if stop.is_set():
                return
            if speed > 0 and msg is not None:
                ts = msg.timestamp
                now = time.monotonic()
                if start is None or ts < start[1]:
                    start = (now, ts)
                delay = start[0] + (ts - start[1]) / speed - now
                if delay > 10.0:
                    self.counters["pacing_capped"] += 1
                    delay = 10.0
                    start = (now + delay, ts)
                if delay > 0 and stop.wait(delay):
                    return
            yield msg


# -- a child: one variant, measured -------------------------------------------------------------------


def child(variant: str, source: str, seconds: float) -> dict[str, Any]:
    stop = threading.Event()
    count = [0]
    driver: CanBus | None = None
    if variant in ("new", "old"):
        cls = CanBus if variant == "new" else OldCanBus
        if source.startswith("vcan:"):
            config = CanConfig(interface="socketcan", channel=source[5:])
        else:
            config = CanConfig(interface="replay", replay=Path(source[7:]), replay_speed=1)
        driver = cls(config, lambda r: None)
        target: Any = driver.run
    elif source.startswith("vcan:"):
        def target(stop: threading.Event) -> None:
            bus = can.Bus(interface="socketcan", channel=source[5:], receive_own_messages=False)
            while not stop.is_set():
                if bus.recv(0.5) is not None:
                    count[0] += 1
            bus.shutdown()
    else:
        def target(stop: threading.Event) -> None:
            for _msg in can.MessageSync(can.LogReader(source[7:]), timestamps=True):
                count[0] += 1
                if stop.is_set():
                    return

    def frames_now() -> int:
        return driver.counters["frames"] if driver is not None else count[0]

    thread = threading.Thread(target=target, args=(stop,), name=f"can-{variant}")
    thread.start()
    time.sleep(WARM_S)
    f0, r0, w0 = frames_now(), resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    time.sleep(seconds)
    f1, r1, wall = frames_now(), resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - w0
    stop.set()
    thread.join(5)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    vol, invol = r1.ru_nvcsw - r0.ru_nvcsw, r1.ru_nivcsw - r0.ru_nivcsw
    out = {"variant": variant, "wall_s": wall, "cpu_pct": 100 * cpu / wall, "cs_per_s": (vol + invol) / wall,
           "voluntary_per_s": vol / wall, "frames_per_s": (f1 - f0) / wall}
    if driver is not None:
        st = driver.snapshot()
        out["unknown_frames"] = st["unknown_frames"]
        out["kernel"] = st["kernel"]
    return out


# -- the parent: inputs, children, the table ------------------------------------------------------------


def send_mix(channel: str, stop: Any) -> None:
    """The mix at its real rate on ``channel``, 15 frames every 10 ms (its own process)."""
    bus = can.Bus(interface="socketcan", channel=channel, receive_own_messages=False)
    msgs = list(cl.messages(f for s in range(10) for f in bus_second(s)))
    per_tick = RATE // 100
    nxt, i = time.monotonic(), 0
    while not stop.is_set():
        for _ in range(per_tick):
            try:
                bus.send(msgs[i % len(msgs)], timeout=0.1)
            except can.CanError:
                pass  # the queue is full for a moment: a frame lost to everyone, as on a bus
            i += 1
        nxt += 0.01
        delay = nxt - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    bus.shutdown()


def run_child(variant: str, source: str, seconds: float) -> dict[str, Any]:
    r = subprocess.run([sys.executable, __file__, "--child", variant, "--source", source, "--seconds", str(seconds)],
                       capture_output=True, text=True, timeout=seconds + 120)
    if r.returncode != 0:
        raise RuntimeError(f"{variant} child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def measure(seconds: float, vcan: str | None) -> tuple[str, list[dict[str, Any]]]:
    if vcan:
        stop = multiprocessing.Event()
        sender = multiprocessing.Process(target=send_mix, args=(vcan, stop), daemon=True)
        sender.start()
        try:
            time.sleep(1.0)
            return f"socketcan {vcan}, the mix sent at ~{RATE:,} frames/s by another process", [
                run_child(v, f"vcan:{vcan}", seconds) for v in VARIANTS]
        finally:
            stop.set()
            sender.join(10)
    with tempfile.TemporaryDirectory(prefix="bench-can-proc-") as tmp:
        total = int(WARM_S + seconds) + 5
        log = cl.write_log(Path(tmp) / "mix.log", [f for s in range(total) for f in bus_second(s)])
        return f"replay of a {total} s candump -L capture of the mix at replay_speed = 1", [
            run_child(v, f"replay:{log}", seconds) for v in VARIANTS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--vcan", help="a vcan interface to send the mix on (else: replay)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--source", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.source, args.seconds)))
        return
    what, rows = measure(args.seconds, args.vcan)
    names = {"new": "CanBus, this version", "old": "CanBus, previous receive path",
             "raw": "python-can alone, nothing decoded"}
    print(f"CAN driver process, {args.seconds:.0f} s after {WARM_S:.0f} s warm-up; {what}")
    print(f"  {'':36} {'CPU % core':>10} {'ctx sw/s':>9} {'(vol.)':>7} {'frames/s':>9}")
    for r in rows:
        print(f"  {names[r['variant']]:36} {r['cpu_pct']:>10.2f} {r['cs_per_s']:>9.1f} {r['voluntary_per_s']:>7.1f} "
              f"{r['frames_per_s']:>9,.0f}")
    new, old = rows[0], rows[1]
    print(f"  ratio this version / previous: CPU {new['cpu_pct'] / max(old['cpu_pct'], 1e-9):.2f}x, "
          f"context switches {new['cs_per_s'] / max(old['cs_per_s'], 1e-9):.2f}x")
    if "kernel" in new:
        print(f"  this version: kernel {new['kernel']}; frames that reached it and were ignored: "
              f"{new['unknown_frames']:,}")
    print(f"  goal (whole agent, with GPS) <= {GOAL_CPU} % and <= {GOAL_CS:.0f} switches/s: CAN part "
          f"{'within' if new['cpu_pct'] <= GOAL_CPU and new['cs_per_s'] <= GOAL_CS else 'NOT within'}")
    if args.json:
        args.json.write_text(json.dumps({"source": what, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
