"""J1939 transport protocol (listener) and diagnostics: frames built byte by byte from the
J1939-21 / J1939-73 layouts, so the tests check the rules, not our own encoder."""

from __future__ import annotations

import time

from hypothesis import event, given
from hypothesis import strategies as st

from drivers.can.j1939.diag import DM1_PGN, VIN_PGN, Dtc, DtcTracker, Lamps, parse_dm1, parse_vin
from drivers.can.j1939.tp import TransportReassembler

CM, DT, G = 0xEC00, 0xEB00, 0xFF
ENGINE, BRAKES, CAB = 0x00, 0x0B, 0x17
VIN = b"WDB9634031L123456"
Frame = tuple[int, int, int, bytes]

# -- frame builders (TP.CM data: control, 4 bytes, PGN 3 bytes little-endian) ---------------


def pgn3(pgn: int) -> bytes:
    return bytes([pgn & 0xFF, pgn >> 8 & 0xFF, pgn >> 16])


def bam(sa: int, pgn: int, size: int, packets: int | None = None) -> Frame:
    n = -(-size // 7) if packets is None else packets
    return CM, sa, G, bytes([32, size & 0xFF, size >> 8, n, 0xFF]) + pgn3(pgn)


def rts(sa: int, da: int, pgn: int, size: int) -> Frame:
    return CM, sa, da, bytes([16, size & 0xFF, size >> 8, -(-size // 7), 0xFF]) + pgn3(pgn)


def cts(sa: int, da: int, pgn: int, count: int, first: int) -> Frame:
    return CM, sa, da, bytes([17, count, first, 0xFF, 0xFF]) + pgn3(pgn)


def eoma(sa: int, da: int, pgn: int, size: int) -> Frame:
    return CM, sa, da, bytes([19, size & 0xFF, size >> 8, -(-size // 7), 0xFF]) + pgn3(pgn)


def abort(sa: int, da: int, pgn: int, reason: int = 3) -> Frame:
    return CM, sa, da, bytes([255, reason, 0xFF, 0xFF, 0xFF]) + pgn3(pgn)


def dt(sa: int, da: int, seq: int, payload: bytes) -> Frame:
    chunk = payload[7 * (seq - 1) : 7 * seq]
    return DT, sa, da, bytes([seq]) + chunk + b"\xff" * (7 - len(chunk))


def bam_frames(sa: int, pgn: int, payload: bytes) -> list[Frame]:
    n = -(-len(payload) // 7)
    return [bam(sa, pgn, len(payload))] + [dt(sa, G, i, payload) for i in range(1, n + 1)]


def run(r: TransportReassembler, frames: list[Frame], t0: float = 0.0, step: float = 0.05) -> list:
    """Feed frames ``step`` seconds apart (bus time); the completed messages."""
    out = [r.feed(t0 + i * step, *f) for i, f in enumerate(frames)]
    return [m for m in out if m is not None]


def dtc_bytes(spn: int, fmi: int, oc: int, cm: int = 0) -> bytes:
    return bytes([spn & 0xFF, spn >> 8 & 0xFF, (spn >> 16 & 0x7) << 5 | fmi, cm << 7 | oc])


# -- transport protocol -------------------------------------------------------------------


def test_vin_over_bam():
    payload = VIN + b"*"  # 18 bytes → 3 packets
    frames = bam_frames(ENGINE, VIN_PGN, payload)
    assert frames[0][3] == bytes.fromhex("20 12 00 03 FF EC FE 00")
    assert frames[3][3] == bytes.fromhex("03 34 35 36 2A FF FF FF")  # bytes 15-18 "456*", padding
    r = TransportReassembler()
    assert run(r, frames) == [(VIN_PGN, ENGINE, G, payload)]
    assert parse_vin(payload) == VIN.decode()
    assert r.counters.completed_bam == 1 and len(r) == 0


def test_dm1_with_three_dtcs_over_bam():
    # Lamps: MIL off, red stop off, amber on, protect off (00 00 01 00); flash byte all n/a.
    payload = bytes([0b0000_0100, 0xFF]) + bytes.fromhex(
        "6E 00 00 03"  # SPN 110 FMI 0 OC 3
        "64 00 01 85"  # SPN 100 FMI 1 OC 5, conversion method bit set
        "F3 A0 A9 7F"  # SPN 0x5A0F3 = 368883 (bits 17-19 = 101 from byte 3) FMI 9, OC n/a
    )
    assert len(payload) == 14
    r = TransportReassembler()
    [(pgn, sa, da, got)] = run(r, bam_frames(ENGINE, DM1_PGN, payload))
    assert (pgn, sa, da, got) == (DM1_PGN, ENGINE, G, payload)
    lamps, dtcs = parse_dm1(got)
    assert lamps == Lamps(mil="off", red_stop="off", amber_warning="on", protect="off")
    assert dtcs == [Dtc(110, 0, 3, 0), Dtc(100, 1, 5, 1), Dtc(368883, 9, None, 0)]


def test_cmdt_listened_to_with_a_gap_then_retransmission():
    payload = bytes(range(1, 21))  # 20 bytes → 3 packets
    r = TransportReassembler()
    got = run(r, [
        rts(ENGINE, CAB, DM1_PGN, 20),
        cts(CAB, ENGINE, DM1_PGN, 3, 1),
        dt(ENGINE, CAB, 1, payload),
        dt(ENGINE, CAB, 3, payload),  # we did not see packet 2: keep 1 and 3, wait
        cts(CAB, ENGINE, DM1_PGN, 1, 2),
    ])
    assert got == [] and len(r) == 1 and r.counters.missing_packets == 0
    assert run(r, [dt(ENGINE, CAB, 2, payload), eoma(CAB, ENGINE, DM1_PGN, 20)], t0=1.0) == [
        (DM1_PGN, ENGINE, CAB, payload)]
    assert r.counters.completed_cmdt == 1 and r.counters.orphan_packets == 0 and len(r) == 0


def test_cmdt_retransmitted_packet_overwrites_its_slot():
    payload = bytes(range(100, 120))
    bad_first = (DT, ENGINE, CAB, bytes([1]) + b"garbage")
    r = TransportReassembler()
    got = run(r, [
        rts(ENGINE, CAB, VIN_PGN, 20),
        cts(CAB, ENGINE, VIN_PGN, 2, 1), bad_first, dt(ENGINE, CAB, 2, payload),
        cts(CAB, ENGINE, VIN_PGN, 2, 1), dt(ENGINE, CAB, 1, payload), dt(ENGINE, CAB, 2, payload),
        cts(CAB, ENGINE, VIN_PGN, 1, 3), dt(ENGINE, CAB, 3, payload),
    ])
    assert got == [(VIN_PGN, ENGINE, CAB, payload)]


def test_cmdt_abort_from_the_receiver_ends_the_session():
    r = TransportReassembler()
    payload = bytes(20)
    run(r, [rts(ENGINE, CAB, DM1_PGN, 20), cts(CAB, ENGINE, DM1_PGN, 3, 1), dt(ENGINE, CAB, 1, payload),
            abort(CAB, ENGINE, DM1_PGN)])
    assert r.counters.aborted == 1 and len(r) == 0
    assert run(r, [dt(ENGINE, CAB, 2, payload)], t0=0.3) == [] and r.counters.orphan_packets == 1


def test_missing_bam_packet_aborts_the_session():
    payload = bytes(range(30))  # 5 packets
    frames = bam_frames(BRAKES, DM1_PGN, payload)
    r = TransportReassembler()
    assert run(r, frames[:3] + frames[4:]) == []  # 1, 2, 4, 5
    assert r.counters.missing_packets == 1
    assert r.counters.orphan_packets == 1  # packet 5: its session is gone
    assert r.counters.completed_bam == 0 and len(r) == 0


def test_bam_timeout_on_frame_times():
    payload = VIN + b"*"
    frames = bam_frames(ENGINE, VIN_PGN, payload)
    r = TransportReassembler()
    assert r.feed(0.0, *frames[0]) is None
    assert r.feed(0.70, *frames[1]) is None  # within 0.75 s of the announcement
    assert r.feed(1.46, *frames[2]) is None  # 0.76 s after packet 1: too late
    assert r.counters.timeouts == 1 and r.counters.orphan_packets == 1


def test_cmdt_allows_longer_after_a_cts_than_between_packets():
    payload = bytes(20)
    r = TransportReassembler()
    r.feed(0.0, *rts(ENGINE, CAB, DM1_PGN, 20))
    r.feed(1.2, *cts(CAB, ENGINE, DM1_PGN, 2, 1))  # 1.25 s allowed after an RTS
    r.feed(2.4, *dt(ENGINE, CAB, 1, payload))  # and after a CTS
    r.feed(3.0, *dt(ENGINE, CAB, 2, payload))  # 0.6 s between packets: fine
    r.feed(4.2, *cts(CAB, ENGINE, DM1_PGN, 1, 3))  # end of the window: waiting for a CTS
    assert r.counters.timeouts == 0 and len(r) == 1
    r.feed(5.0, *rts(BRAKES, CAB, DM1_PGN, 20))  # another session's frame: the first expires
    assert r.counters.timeouts == 0
    r.feed(5.46, *rts(BRAKES, CAB, DM1_PGN, 20))
    assert r.counters.timeouts == 1 and r.counters.replaced == 1


def test_timeouts_follow_replay_time_not_the_wall_clock():
    """A capture replayed as fast as possible: seconds of bus time in microseconds of wall time."""
    r = TransportReassembler()
    payload = VIN + b"*"
    start = time.monotonic()
    for i in range(100):
        t = 10.0 * i
        r.feed(t, *bam(ENGINE, VIN_PGN, len(payload)))
        r.feed(t + 0.1, *dt(ENGINE, G, 1, payload))
        r.feed(t + 1.0, *dt(ENGINE, G, 2, payload))  # 0.9 s later in the capture: timed out
    assert time.monotonic() - start < 0.5
    assert r.counters.timeouts == 100 and r.counters.orphan_packets == 100
    # Slow replay (or a live bus): long wall-clock pauses, frames 0.05 s apart on the bus.
    r = TransportReassembler()
    frames = bam_frames(ENGINE, VIN_PGN, payload)
    for i, f in enumerate(frames):
        done = r.feed(0.05 * i, *f)
        time.sleep(0.3)
    assert done == (VIN_PGN, ENGINE, G, payload) and r.counters.timeouts == 0


def test_expire_when_idle():
    r = TransportReassembler()
    r.feed(100.0, *bam(ENGINE, VIN_PGN, 18))
    r.expire(100.7)
    assert len(r) == 1
    r.expire(100.8)
    assert len(r) == 0 and r.counters.timeouts == 1


def test_new_bam_replaces_an_unfinished_one():
    old, new = bytes(range(30)), VIN + b"*"
    r = TransportReassembler()
    frames = bam_frames(ENGINE, DM1_PGN, old)[:3] + bam_frames(ENGINE, VIN_PGN, new)
    assert run(r, frames) == [(VIN_PGN, ENGINE, G, new)]
    assert r.counters.replaced == 1 and r.counters.completed_bam == 1


def test_interleaved_bam_from_two_source_addresses():
    a, b = bam_frames(ENGINE, DM1_PGN, bytes(range(20))), bam_frames(BRAKES, VIN_PGN, VIN + b"*")
    frames = [f for pair in zip(a, b) for f in pair]
    got = run(TransportReassembler(), frames)
    assert got == [(DM1_PGN, ENGINE, G, bytes(range(20))), (VIN_PGN, BRAKES, G, VIN + b"*")]


def test_bad_announcements_and_frames_are_counted_and_ignored():
    r = TransportReassembler()
    run(r, [bam(ENGINE, DM1_PGN, 8), bam(ENGINE, DM1_PGN, 1786, 255), bam(ENGINE, DM1_PGN, 20, 4),
            rts(ENGINE, G, DM1_PGN, 20)])
    assert r.counters.bad_announcements == 4 and len(r) == 0
    run(r, [(CM, ENGINE, G, b""), (CM, ENGINE, G, b"\x20\x12"), (DT, ENGINE, G, b"\x01"), (0xFECA, 0, G, b"")])
    assert r.counters.bad_frames == 4
    run(r, [bam(ENGINE, VIN_PGN, 18), (DT, ENGINE, G, b"\x00" + bytes(7)), (DT, ENGINE, G, b"\x04" + bytes(7)),
            (DT, ENGINE, G, b"\x01abc")])  # sequence 0, beyond the last, a short non-final packet
    assert r.counters.bad_frames == 7 and len(r) == 1
    assert r.counters.orphan_packets == 0


def test_short_final_packet_is_enough_when_it_holds_the_rest():
    payload = VIN + b"*"
    frames = bam_frames(ENGINE, VIN_PGN, payload)
    frames[-1] = (DT, ENGINE, G, b"\x03456*")  # 4 bytes: no padding
    assert run(TransportReassembler(), frames) == [(VIN_PGN, ENGINE, G, payload)]


def test_session_count_is_bounded():
    r = TransportReassembler(max_sessions=64)
    run(r, [bam(sa, DM1_PGN, 20) for sa in range(70)], step=0.001)
    assert len(r) == 64 and r.counters.dropped_sessions == 6
    assert run(r, [dt(0, G, 1, bytes(20))], t0=0.1) == [] and r.counters.orphan_packets == 1


sas = st.sampled_from([ENGINE, CAB, G])
pgns = st.sampled_from([DM1_PGN, VIN_PGN])
raw_frames = st.tuples(st.sampled_from([CM, DT]), sas, sas, st.binary(max_size=8))
announcements = st.builds(  # sizes and packet counts both valid and not
    lambda control, sa, da, size, pgn: (CM, sa, da, bytes([control, size & 0xFF, 0, -(-size // 7), 255]) + pgn3(pgn)),
    st.sampled_from([16, 32]), sas, sas, st.integers(0, 40), pgns)
controls = st.builds(  # CTS, EOMA, abort and an unknown control byte
    lambda control, sa, da, a, b, pgn: (CM, sa, da, bytes([control, a, b, 255, 255]) + pgn3(pgn)),
    st.sampled_from([17, 19, 255, 7]), sas, sas, st.integers(0, 7), st.integers(0, 7), pgns)
packets = st.builds(lambda seq, sa, da, body: (DT, sa, da, bytes([seq]) + body),
                    st.integers(0, 7), sas, sas, st.binary(max_size=7))
noise = st.one_of(raw_frames, announcements, controls, packets)


@st.composite
def bus_traffic(draw) -> list[tuple[float, Frame]]:
    """Whole sessions (some packets dropped or repeated) interleaved with each other and noise."""
    queues = [draw(st.lists(noise, max_size=20))]
    for _ in range(draw(st.integers(0, 3))):
        sa, pgn, payload = draw(sas), draw(pgns), draw(st.binary(min_size=9, max_size=40))
        if draw(st.booleans()):
            frames = bam_frames(sa, pgn, payload)
        else:
            da, n = draw(sas), -(-len(payload) // 7)
            frames = [rts(sa, da, pgn, len(payload)), cts(da, sa, pgn, n, 1)]
            frames += [dt(sa, da, i, payload) for i in range(1, n + 1)]
        copies = draw(st.lists(st.sampled_from([1, 1, 1, 1, 0, 2]), min_size=len(frames), max_size=len(frames)))
        queues.append([f for f, k in zip(frames, copies) for _ in range(k)])
    out, t = [], 0.0
    while queues := [q for q in queues if q]:
        t += draw(st.one_of(st.floats(0.0, 0.3), st.floats(-1.0, 2.0)))
        out.append((t, queues[draw(st.integers(0, len(queues) - 1))].pop(0)))
    return out


@given(st.lists(st.tuples(st.floats(-1.0, 1.0), noise), max_size=80)
       .map(lambda steps: [(sum(d for d, _ in steps[: i + 1]), f) for i, (_, f) in enumerate(steps)]) | bus_traffic())
def test_tp_never_raises_and_completes_with_the_announced_size(steps):
    r = TransportReassembler(max_sessions=4)
    announced: dict[tuple[int, int], set[tuple[int, int]]] = {}
    for t, (pgn, sa, da, data) in steps:
        if pgn == CM and len(data) >= 8 and data[0] in (16, 32):
            announced.setdefault((sa, da), set()).add((int.from_bytes(data[5:8], "little"), data[1] | data[2] << 8))
        done = r.feed(t, pgn, sa, da, data)
        if done is not None:
            msg_pgn, msg_sa, msg_da, payload = done
            assert (msg_sa, msg_da) == (sa, da)
            assert (msg_pgn, len(payload)) in announced[(sa, da)]
            event("completed")
        r.expire(t)
    assert len(r) <= 4


# -- diagnostics ----------------------------------------------------------------------------


def test_single_frame_dm1_without_dtc():
    for frame in ("00 FF 00 00 00 00 FF FF", "00 00 00 00 00 00 00 00", "40 FF 00 00 00 00 FF FF"):
        lamps, dtcs = parse_dm1(bytes.fromhex(frame))
        assert dtcs == []
    assert lamps.mil == "on" and lamps.protect == "off"


def test_single_frame_dm1_with_one_dtc_and_lamp_states():
    lamps, dtcs = parse_dm1(bytes([0b01_10_11_00, 0xFF]) + dtc_bytes(190, 2, 1) + b"\xff\xff")
    assert lamps == Lamps(mil="on", red_stop="error", amber_warning="n/a", protect="off")
    assert dtcs == [Dtc(190, 2, 1, 0)]


def test_dm1_malformed():
    assert parse_dm1(b"") is None
    assert parse_dm1(bytes.fromhex("04 FF 6E 00 00")) is None  # shorter than one DTC
    assert parse_dm1(b"\xff" * 8) is None  # nothing known: must not clear anything
    _, dtcs = parse_dm1(bytes([0, 0xFF]) + b"\xff\xff\xff\x01" + dtc_bytes(524286, 31, 126) + b"\xff" * 4)
    assert dtcs == [Dtc(524286, 31, 126, 0)]  # SPN 0x7FFFF (n/a) and padding skipped


@given(st.lists(st.tuples(st.integers(1, 0x7FFFE), st.integers(0, 31), st.integers(0, 126), st.integers(0, 1)),
                max_size=20))
def test_dm1_round_trip(codes):
    payload = b"\x00\xff" + b"".join(dtc_bytes(*c) for c in codes)
    if len(payload) == 2:
        payload += bytes(4)
    assert parse_dm1(payload)[1] == [Dtc(spn, fmi, oc, cm) for spn, fmi, oc, cm in codes]


@given(st.binary(max_size=64))
def test_parse_dm1_and_vin_never_raise(data):
    parsed = parse_dm1(data)
    if parsed is not None:
        assert len(parsed[1]) <= (len(data) - 2) // 4
        assert all(0 <= d.spn < 0x7FFFF and 0 <= d.fmi < 32 for d in parsed[1])
    vin = parse_vin(data)
    assert vin is None or (vin and vin.isprintable() and vin.isascii())


def test_dtc_tracker_appear_clear_and_occurrence_count():
    t = DtcTracker()
    on = Lamps("off", "off", "on", "off")
    [e] = t.update(ENGINE, on, [Dtc(110, 0, 1, 0)])
    assert (e.state, e.spn, e.fmi, e.oc, e.source_address) == ("active", 110, 0, 1, ENGINE)
    assert e.lamps == {"mil": "off", "red_stop": "off", "amber_warning": "on", "protect": "off"}
    assert t.update(ENGINE, on, [Dtc(110, 0, 2, 0)]) == []  # occurrence count only
    assert t.active(ENGINE) == [Dtc(110, 0, 2, 0)]
    # Same SPN/FMI from another ECU is its own DTC; the engine's is untouched by the brakes' DM1.
    assert [e.state for e in t.update(BRAKES, on, [Dtc(110, 0, 1, 0), Dtc(110, 3, 1, 0)])] == ["active", "active"]
    assert t.update(BRAKES, on, [Dtc(110, 3, 1, 0)])[0].spn == 110
    assert len(t.active()) == 2 and t.active_with_sa() == [(ENGINE, Dtc(110, 0, 2, 0)), (BRAKES, Dtc(110, 3, 1, 0))]
    off = Lamps("off", "off", "off", "off")
    [e] = t.update(ENGINE, off, [])
    assert (e.state, e.spn, e.oc, e.source_address, e.lamps["amber_warning"]) == ("cleared", 110, 2, ENGINE, "off")
    assert t.active(ENGINE) == [] and t.active() == [Dtc(110, 3, 1, 0)]
    assert t.update(ENGINE, off, []) == []


def test_vin_edge_cases():
    assert parse_vin(VIN + b"*") == VIN.decode()
    assert parse_vin(VIN) == VIN.decode()  # no delimiter
    assert parse_vin(VIN + b"\0\0\0") == VIN.decode()
    assert parse_vin(VIN + b"*" + b"\xff" * 3) == VIN.decode()
    assert parse_vin(b"TRK42*\xff\xff") == "TRK42"  # a short id, as the vehicle sends it
    assert parse_vin(b" 1234 *") == "1234"
    assert parse_vin(b"*") is None and parse_vin(b"") is None and parse_vin(b"\xff" * 8) is None
    assert parse_vin(b"WDB\x019634*") is None
    assert parse_vin(bytes([0xC3, 0xA9]) + VIN) is None
