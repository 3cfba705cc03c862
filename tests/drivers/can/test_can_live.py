"""The live bus, gently (drivers/can/live.py): the kernel filters computed from the config pass
exactly the identifiers the driver would use (the kernel's matching rule applied to the bytes
python-can hands it), and batched receive gives the same readings from the same frames while
waking ~20 times a second. The filters on a real kernel: tests/vm/test_vm_hardware.py."""

from __future__ import annotations

import struct
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import can
import pytest
from can.interfaces.socketcan.utils import pack_filters
from hypothesis import given, settings
from hypothesis import strategies as st

import canlog as cl
from conftest import SHARED_DATA
from drivers.can import handlers, live
from drivers.can.bus import CanBus
from drivers.can.config import CanConfig, SignalConfig
from drivers.can.j1939 import dbc as dbcmod
from drivers.can.j1939 import spn
from drivers.can.j1939.ids import parse_id
from support import Collector, Running, wait_until

CAN_EFF_FLAG, CAN_RTR_FLAG = 0x80000000, 0x40000000
DEMO_DBC = SHARED_DATA / "can" / "CSS-Electronics-SAE-J1939-DEMO.dbc"


def kernel_passes(filters: list[Any] | None, can_id: int, *, extended: bool = True, remote: bool = False) -> bool:
    """linux/net/can/af_can.c for a non-error frame: some (id, mask) pair of the CAN_RAW_FILTER
    option python-can sets has ``frame_id & mask == id & mask`` (frame_id with its EFF and RTR
    flags). None: no filter set, everything passes."""
    if filters is None:
        return True
    raw = pack_filters(filters)
    pairs = struct.unpack(f"={len(raw) // 4}I", raw)
    frame_id = can_id | (CAN_EFF_FLAG if extended else 0) | (CAN_RTR_FLAG if remote else 0)
    return any(frame_id & mask == fid & mask for fid, mask in zip(pairs[::2], pairs[1::2]))


# -- the filters ------------------------------------------------------------------------------------

pgn18 = st.integers(0, 0x3FFFF)
known_pgns = st.sampled_from(sorted(handlers.ALWAYS | set(spn.BY_PGN) | {0xEA00, 0xEE00, 0xFF00, 0xEF00, 0}))
any_pgn = known_pgns | pgn18 | pgn18.map(lambda p: p & 0x3FF00)  # PDU1 PGNs as parse_id gives them
id_bits = st.tuples(st.integers(0, 7), any_pgn, st.integers(0, 255), st.integers(0, 255))


def j1939(prio: int, pgn: int, da: int, sa: int) -> int:
    """Any 29-bit identifier carrying ``pgn`` (PDU1: the low byte is replaced by ``da``)."""
    if (pgn >> 8) & 0xFF < 240:
        pgn = (pgn & 0x3FF00) | da
    return prio << 26 | pgn << 8 | sa


@settings(max_examples=300)
@given(st.frozensets(any_pgn, max_size=40), st.lists(id_bits, min_size=1, max_size=30),
       st.lists(st.integers(0, 0x1FFFFFFF), max_size=10))
def test_kernel_filters_pass_exactly_the_identifiers_of_the_pgns(pgns: frozenset[int], ids: list, raw: list) -> None:
    filters = live.kernel_filters(pgns)
    assert filters is not None
    for can_id in [j1939(*b) for b in ids] + raw:
        want = parse_id(can_id).pgn in pgns
        assert kernel_passes(filters, can_id) is want, (hex(can_id), hex(parse_id(can_id).pgn))
        assert not kernel_passes(filters, can_id, remote=True), "remote frames never"
        assert not kernel_passes(filters, can_id & 0x7FF, extended=False), "11-bit frames never"


def test_pdu1_filters_ignore_the_destination_and_pdu2_filters_keep_the_group_extension() -> None:
    filters = live.kernel_filters({0xEC00, 0xFECA})
    for da in (0x00, 0x17, 0xFF):
        assert kernel_passes(filters, j1939(7, 0xEC00, da, 0x00)), f"TP.CM to {da:#x}"
    assert not kernel_passes(filters, j1939(7, 0xEB00, 0xFF, 0x00)), "TP.DT is another PGN"
    assert kernel_passes(filters, j1939(6, 0xFECA, 0, 0x0B))
    assert not kernel_passes(filters, j1939(6, 0xFECB, 0, 0x0B)), "DM2: the PS byte is part of a PDU2 PGN"
    assert live.kernel_filters({0xEC05}) == [], "no identifier has a PDU1 PGN with a low byte"
    assert live.kernel_filters(set(range(0xF000, 0xF000 + live.CAN_RAW_FILTER_MAX + 1))) is None, "over the limit"


signal_names = sorted(spn.BY_NAME)
configs = st.builds(
    lambda off, dbc, ignition: (CanConfig(interface="virtual", channel="x", ignition=ignition,
                                          signals={n: SignalConfig(enabled=False) for n in off}), dbc),
    st.frozensets(st.sampled_from(signal_names)), st.booleans(), st.booleans())


@settings(max_examples=150, deadline=None)
@given(configs, st.lists(id_bits, min_size=1, max_size=40))
def test_the_kernel_passes_an_identifier_iff_the_driver_uses_it(config_dbc: tuple[CanConfig, bool], ids: list) -> None:
    config, with_dbc = config_dbc
    if with_dbc and not DEMO_DBC.is_file():
        pytest.skip(f"{DEMO_DBC} not found (set LORRY_SHARED_DATA)")
    if with_dbc:
        config = config.model_copy(update={"dbc": [DEMO_DBC]})
    dbc = dbcmod.load(config.dbc)
    filters = live.kernel_filters(live.kernel_pgns(config, dbc))
    extra = live.IGNITION_PGNS if config.ignition else frozenset()
    for can_id in (j1939(*b) for b in ids):
        jid = parse_id(can_id)
        used = handlers.handler(config, dbc, jid.pgn, jid.sa, jid.da) is not handlers.IGNORED
        assert kernel_passes(filters, can_id) is (used or jid.pgn in extra), (hex(can_id), jid)


def test_dm1_tp_and_vin_always_pass_even_with_every_signal_disabled() -> None:
    config = CanConfig(interface="virtual", channel="x", signals={n: SignalConfig(enabled=False) for n in signal_names})
    assert live.kernel_pgns(config, {}) == handlers.ALWAYS == {0xEC00, 0xEB00, 0xFECA, 0xFEEC}
    with_ignition = live.kernel_pgns(config.model_copy(update={"ignition": True}), {})
    assert with_ignition == handlers.ALWAYS | {spn.EEC1, spn.CCVS1}


def test_only_a_socketcan_socket_gets_filters() -> None:
    bus = cl.virtual_bus(f"live-{uuid.uuid4().hex}")
    try:
        k = live.Kernel.attach(bus, handlers.ALWAYS)
        assert k.snapshot() == {"filters": None, "pgns": 4, "rcvbuf_bytes": None}
        k.poll()
        assert k.dropped == 0
    finally:
        bus.shutdown()


# -- batched receive --------------------------------------------------------------------------------


class Counting:
    """A bus that counts its blocking receives (each one at most one wake-up of the thread)."""

    def __init__(self, bus: can.BusABC):
        self.bus, self.blocking, self.polls = bus, 0, 0

    def recv(self, timeout: float | None = None) -> can.Message | None:
        if timeout:
            self.blocking += 1
        else:
            self.polls += 1
        return self.bus.recv(timeout)

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        self.bus.send(msg, timeout)

    def shutdown(self) -> None:
        self.bus.shutdown()


def values_and_alarms(got: Collector) -> tuple[list[Any], list[Any]]:
    rs = got.snapshot()
    return [r.data for r in rs if r.stream == "can"], [r.data for r in rs if r.stream == "alarm"]


def test_batched_receive_gives_the_readings_a_replay_of_the_same_frames_gives(tmp_path: Path) -> None:
    frames = [f for f in cl.truck(with_errors=False).frames if f.extended]
    sampling = {"min_interval_s": 2, "max_interval_s": 10}
    replayed = Collector()
    CanBus(CanConfig(interface="replay", replay=cl.write_log(tmp_path / "truck.log", frames), **sampling),
           replayed).run(threading.Event())

    ch = f"live-{uuid.uuid4().hex}"
    sender = cl.virtual_bus(ch, preserve_timestamps=True)  # the frames keep their bus times
    counting: list[Counting] = []
    got = Collector()
    driver = CanBus(CanConfig(interface="virtual", channel=ch, **sampling), got,
                    bus_factory=lambda: counting.append(Counting(cl.virtual_bus(ch))) or counting[-1])
    try:
        with Running(driver):
            wait_until(lambda: driver.connected, 5, "bus opened")
            cl.send(sender, frames)
            wait_until(lambda: driver.counters["frames"] == len(frames), 10, "every frame")
            time.sleep(live.RECV_TIMEOUT_S + 0.3)  # silence: the last reading is flushed
    finally:
        sender.shutdown()
    assert values_and_alarms(got) == values_and_alarms(replayed)
    assert len(values_and_alarms(got)[0]) > 20
    # All sent at once: taken in a few batches, not one wake-up per frame.
    assert counting[0].blocking < len(frames) / 50, (counting[0].blocking, len(frames))


def test_a_steady_bus_wakes_the_driver_about_20_times_a_second() -> None:
    ch = f"live-{uuid.uuid4().hex}"
    sender = cl.virtual_bus(ch)
    counting: list[Counting] = []
    driver = CanBus(CanConfig(interface="virtual", channel=ch), Collector(),
                    bus_factory=lambda: counting.append(Counting(cl.virtual_bus(ch))) or counting[-1])
    eec1 = cl.j1939_id(3, cl.EEC1, cl.ENGINE)
    seconds, rate = 2.0, 1_500
    frames = cl.periodic(0, int(seconds * cl.S), cl.S // rate, eec1, lambda t: cl.eec1_data(700 + 100 * t))
    try:
        with Running(driver):
            wait_until(lambda: driver.connected, 5, "bus opened")
            b0 = counting[0].blocking
            cl.send(sender, frames, pace=1.0)
            wait_until(lambda: driver.counters["frames"] == len(frames), 5, "every frame")
            blocking = counting[0].blocking - b0
    finally:
        sender.shutdown()
    # One blocking receive per batch, a batch every BATCH_S (+ its processing time).
    assert blocking <= 1.3 * seconds / live.BATCH_S + 3, (blocking, len(frames))
    assert counting[0].polls >= len(frames) - blocking


def test_a_paced_replay_is_read_in_batches_and_stays_in_real_time(tmp_path: Path) -> None:
    eec1 = cl.j1939_id(3, cl.EEC1, cl.ENGINE)
    frames = cl.periodic(0, 2 * cl.S, 1_000, eec1, lambda t: cl.eec1_data(700 + 1000 * t))
    got = Collector()
    driver = CanBus(CanConfig(interface="replay", replay=cl.write_log(tmp_path / "eec1.log", frames),
                              replay_speed=1, min_interval_s=0), got)
    waits: list[float] = []
    stop = threading.Event()
    real_wait = stop.wait

    def counted(timeout: float | None = None) -> bool:
        waits.append(timeout or 0.0)
        return real_wait(timeout)

    stop.wait = counted  # type: ignore[method-assign]
    start = time.monotonic()
    driver.run(stop)
    elapsed = time.monotonic() - start
    assert 1.9 <= elapsed < 3, elapsed
    assert len(waits) <= 2 / live.BATCH_S + 2, f"{len(waits)} waits for {len(frames)} frames"
    assert all(w >= live.BATCH_S for w in waits)
    assert driver.counters["frames"] == len(frames)
    assert len([v for r in got.snapshot() for v in r.data["values"] if v["name"] == "engine_speed"]) >= 2
