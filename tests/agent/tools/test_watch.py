"""``lorry-agent watch``: the Watcher core (gaps, duplicates, batches, bad payloads, state) and,
against a real mosquitto and a real agent, the MQTT plumbing, ``--json`` and the state screen."""

from __future__ import annotations

import argparse
import io
import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from agent import compact
from agent.demo import trip
from agent.demo.broker import Mosquitto
from agent.tools import watch
from agent.tools.watch import DecodeError, SeqSet, Watcher, decode
from support import REPO, AgentProcess, Backend, agent_config, wait_until, write_config

DEV = "CQ-HN-0042"
TS = "2026-11-21T08:42:10.000Z"


def reading(stream: str, seq: int, device: str = DEV, **data: Any) -> dict[str, Any]:
    return {"device": device, "stream": stream, "seq": seq, "ts": data.pop("ts", TS), **data}


def pos(seq: int, **data: Any) -> dict[str, Any]:
    return reading("position", seq, lat=23.9 + seq / 1e4, lon=108.1, speed_kmh=74.08, fix="gps", **data)


def send(w: Watcher, stream: str, obj: Any, device: str = DEV) -> list[dict[str, Any]]:
    payload = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return w.on_payload(f"lorry/{device}/{stream}", payload)


# -- decode -------------------------------------------------------------------------------------


def test_decode_json_object_and_batch() -> None:
    assert decode(b'{"seq":1}', None) == [{"seq": 1}]
    assert decode(b'[{"seq":1},{"seq":2}]', None) == [{"seq": 1}, {"seq": 2}]
    assert decode('{"c":"\u00b0"}'.encode(), "application/json; charset=utf-8") == [{"c": "\u00b0"}]


@pytest.mark.parametrize("payload,content_type,why", [
    (b"garbage{", None, "not JSON"),
    (b"\xff\xfe{}", None, "not UTF-8"),
    (b"42", None, "number"),
    (b'"online"', None, "string"),
    (b"[]", None, "empty batch"),
    (b'[{"seq":1},7]', None, "batch item 2"),
    (b'{"seq":1,"c":NaN}', None, "NaN"),
    (b'{"seq":1}', "application/cbor", "content type"),
    (b'{"seq":1}', "application/xml", "unsupported content type"),
    (b"\xd9\xd9\xf7\xa0", None, "version"),
    (b"\xd9\xd9\xf7garbage", "application/cbor", "content type"),
])
def test_decode_refuses_what_is_not_readings(payload: bytes, content_type: str | None, why: str) -> None:
    with pytest.raises(DecodeError, match=why):
        decode(payload, content_type)


def body(r: dict[str, Any]) -> str:
    """JSON as the agent writes it (and as --json prints it)."""
    return json.dumps(r, separators=(",", ":"), ensure_ascii=False)


def alarms() -> list[dict[str, Any]]:
    """Alarms of different kinds: different keys, different orders."""
    return [reading("alarm", 1, kind="dtc", state="active", spn=110, fmi=0, oc=3, source_address=0,
                    lamps={"mil": "off", "amber_warning": "on"}),
            reading("alarm", 2, kind="seal_opened", state="raised", severity="critical", seal="rear_door",
                    authorised=False, zones=[], position=None),
            reading("alarm", 3, kind="temperature", state="cleared", sensor="reefer_front", side="high", limit_c=8.0,
                    c=5.0, duration_s=3900, extreme_c=10.8, ts="2026-11-21T08:42:11.000Z")]


def test_decode_compact_batches_with_or_without_a_content_type() -> None:
    batch = [pos(s, ts=f"2026-11-21T08:42:{s:02d}.000Z") for s in range(1, 31)]
    payload = compact.encode([body(r) for r in batch])
    assert payload[:3] == b"\xd9\xd9\xf7"
    for content_type in (None, "application/cbor", "application/CBOR; x=1"):
        assert decode(payload, content_type) == batch
    assert decode(compact.encode([body(a) for a in alarms()]), None) == alarms()


def test_the_watcher_takes_compact_messages() -> None:
    w = Watcher()
    payload = compact.encode([body(pos(s)) for s in (1, 2, 3)])
    assert w.on_payload(f"lorry/{DEV}/position", payload, "application/cbor") == [pos(1), pos(2), pos(3)]
    assert w.on_payload(f"lorry/{DEV}/position", compact.encode([body(pos(4))])) == [pos(4)]
    assert w.on_payload(f"lorry/{DEV}/position", payload[:-5]) == []
    stats = w.state[DEV].streams["position"]
    assert (stats.readings, stats.batches, stats.malformed, stats.summary()) == (4, 1, 1, "position: 1..4, no gaps")
    assert stats.bytes == 2 * len(payload) - 5 + len(compact.encode([body(pos(4))]))
    assert "MALFORMED 1 messages" in w.render()


# -- seq bookkeeping ----------------------------------------------------------------------------


@given(st.lists(st.integers(1, 60), max_size=80))
def test_seqset_matches_a_plain_set(seqs: list[int]) -> None:
    s, model = SeqSet(), set()
    for x in seqs:
        assert s.add(x) == (x not in model)
        model.add(x)
    assert len(s) == len(model)
    assert all((x in s) == (x in model) for x in range(0, 62))
    if model:
        assert (s.lowest, s.highest) == (min(model), max(model))
        holes = {x for a, b in s.missing() for x in range(a, b + 1)}
        assert holes == set(range(min(model), max(model) + 1)) - model


def test_gaps_are_reported_and_filled_by_late_readings() -> None:
    w = Watcher()
    for seq in (1, 2, 5, 6, 9):
        send(w, "position", pos(seq))
    stats = w.state[DEV].streams["position"]
    assert stats.missing_ranges() == [(3, 4), (7, 8)]
    assert stats.missing == 4
    assert stats.summary() == "position: 1..9, missing 4 (3-4, 7-8)"
    assert "position: 1..9, missing 4 (3-4, 7-8)" in w.render()

    send(w, "position", [pos(3), pos(4), pos(7)])  # the backlog arrives
    assert stats.summary() == "position: 1..9, missing 1 (8)"
    send(w, "position", pos(8))
    assert stats.missing == 0 and stats.summary() == "position: 1..9, no gaps"
    assert w.state[DEV].position["seq"] == 9, "the last position is the highest seq, not the last to arrive"
    assert (stats.readings, stats.duplicates, stats.messages, stats.batches) == (9, 0, 7, 1)


def test_newest_first_then_backlog_oldest_first() -> None:
    w = Watcher()
    send(w, "position", pos(10))  # after a reconnect: the newest position first, alone
    stats = w.state[DEV].streams["position"]
    assert stats.summary() == "position: 10..10, no gaps"
    send(w, "position", [pos(s) for s in range(1, 6)])
    assert stats.missing_ranges() == [(6, 9)], "the rest of the backlog is still on the lorry"
    send(w, "position", [pos(s) for s in range(6, 10)])
    assert stats.missing == 0 and w.state[DEV].position["seq"] == 10


def test_many_gaps_are_listed_briefly() -> None:
    w = Watcher()
    send(w, "position", [pos(s) for s in range(1, 40, 2)])
    summary = w.state[DEV].streams["position"].summary()
    assert summary.startswith("position: 1..39, missing 19 (2, 4, 6, 8, 10, 12, 14, 16, ... +11 more)")


def test_duplicates_are_counted_and_change_nothing() -> None:
    w = Watcher()
    batch = [pos(1), pos(2), pos(3)]
    assert send(w, "position", batch) == batch
    got = send(w, "position", [pos(2), pos(3)])  # re-sent after a lost PUBACK
    assert got == [pos(2), pos(3)], "what arrived is returned, duplicates included"
    stats = w.state[DEV].streams["position"]
    assert (stats.readings, stats.duplicates, len(stats.seqs), stats.messages) == (5, 2, 3, 2)
    assert stats.missing == 0
    assert "5 readings, 2 dup, 2 msgs (2 batches)" in w.render()


def test_batches_are_flattened_in_order_and_bytes_counted() -> None:
    w = Watcher()
    payload = json.dumps([pos(1), pos(2)]).encode()
    assert w.on_payload(f"lorry/{DEV}/position", payload) == [pos(1), pos(2)]
    stats = w.state[DEV].streams["position"]
    assert (stats.batches, stats.bytes, w.state[DEV].bytes) == (1, len(payload), len(payload))


def test_malformed_payloads_are_counted_shown_and_never_crash() -> None:
    w = Watcher()
    send(w, "position", b"garbage{")
    send(w, "position", b"\xff")
    send(w, "position", b"[1,2]")
    send(w, "position", b'{"seq":1,"lat":NaN}')
    # One bad reading does not lose the good ones beside it.
    assert send(w, "position", [pos(1), {"device": DEV, "stream": "position", "ts": TS}, pos(2)]) == [pos(1), pos(2)]
    send(w, "position", reading("position", True))  # a bool is not a seq
    send(w, "position", reading("position", 0))
    send(w, "position", reading("seal", 3))  # the wrong stream for the topic
    send(w, "position", reading("position", 4, device="OTHER"))
    send(w, "position", {"device": DEV, "stream": "position", "seq": 5})  # no ts
    # Accepted, but with values of the wrong type: shown as they are.
    send(w, "position", pos(6) | {"lat": "north", "speed_kmh": [1], "ts": "yesterday"})
    dev = w.state[DEV]
    assert (dev.malformed_messages, dev.malformed_readings) == (4, 6)
    stats = dev.streams["position"]
    assert sorted(s for a, b in stats.seqs.ranges() for s in range(a, b + 1)) == [1, 2, 6]
    assert stats.malformed == 10 and stats.messages == 11
    screen = w.render()
    assert "MALFORMED 4 messages, 6 readings" in screen
    assert "no ts" in screen and len(dev.problems) == watch.RECENT_PROBLEMS
    assert "north" in screen and "age ?" in screen


def test_status_retained_live_and_cleared() -> None:
    w = Watcher()
    w.on_payload(f"lorry/{DEV}/status", b"online", retained=True)
    dev = w.state[DEV]
    assert (dev.status, dev.status_retained) == ("online", True)
    assert f"{DEV}  online (retained)" in w.render()
    w.on_payload(f"lorry/{DEV}/status", b"offline")
    assert (dev.status, dev.status_retained) == ("offline", False)
    assert f"{DEV}  offline since" in w.render()
    w.on_payload(f"lorry/{DEV}/status", b"", retained=True)  # the retained message was cleared
    assert dev.status is None and "status unknown" in w.render()
    assert dev.streams == {}, "status is not a stream of readings"


def test_foreign_and_non_reading_topics() -> None:
    w = Watcher()
    assert w.on_payload("fleet/X/position", json.dumps(pos(1)).encode()) == []
    assert w.on_payload("lorry/X", b"{}") == []
    assert w.on_payload(f"lorry/{DEV}/cmd", b'{"id":"c-1","cmd":"ping"}') == []
    assert w.on_payload(f"lorry/{DEV}/cmd/reply", b'{"id":"c-1","ok":true}') == []
    assert w.foreign == 2
    assert dict(w.state[DEV].other) == {"cmd": 1, "cmd/reply": 1}
    assert w.state[DEV].streams == {} and w.state[DEV].malformed_messages == 0
    assert "cmd 1 msgs, cmd/reply 1 msgs" in w.render()


def test_devices_are_kept_apart() -> None:
    w = Watcher()
    send(w, "position", pos(1), device=DEV)
    send(w, "position", reading("position", 7, device="GX-NN-0007", lat=22.8, lon=108.3, fix="gps"),
         device="GX-NN-0007")
    assert sorted(w.state) == [DEV, "GX-NN-0007"]
    assert w.state["GX-NN-0007"].streams["position"].summary() == "position: 7..7, no gaps"
    screen = w.render()
    assert screen.index(DEV) < screen.index("GX-NN-0007")


def test_seals_alarms_and_dtcs() -> None:
    w = Watcher()
    opened = reading("seal", 2, seal="rear_door", event="opened", seal_id="ES-001234", authorised=False, zones=[],
                     position={"lat": 21.66, "lon": 106.6, "ts": TS, "age_s": 3})
    send(w, "seal", opened)
    send(w, "seal", reading("seal", 3, seal="container_lock", event="sealed", authorised=True,
                            zones=["Youyiguan customs yard"], battery_pct=87))
    dev = w.state[DEV]
    assert dev.seals["rear_door"] == opened and dev.seals["container_lock"]["event"] == "sealed"
    screen = w.render()
    assert f"rear_door opened at {TS}  NOT AUTHORISED  zones: -  id ES-001234" in screen
    assert f"container_lock sealed at {TS}  zones: Youyiguan customs yard  battery 87%" in screen

    dtc = dict(kind="dtc", spn=110, fmi=0, oc=3, source_address=0,
               lamps={"mil": "off", "red_stop": "off", "amber_warning": "on", "protect": "off"})
    # Alarm seqs 1..13; seq 12 (the DTC clearing) arrives last, late.
    alarms = [reading("alarm", 1, state="active", **dtc),
              reading("alarm", 2, kind="seal_opened", state="raised", severity="critical", seal="rear_door",
                      authorised=False, zones=[])]
    alarms += [reading("alarm", s, kind="geofence", state="enter" if s % 2 else "exit", zone=f"z{s}",
                       zone_kind="border")
               for s in range(3, 12)]
    alarms.append(reading("alarm", 13, kind="temperature", state="active", sensor="reefer_front", side="high",
                          limit_c=8, c=9.5, duration_s=600))
    for a in alarms:
        send(w, "alarm", a)
    assert [a["spn"] for a in dev.active_dtcs] == [110]
    assert "dtc       SPN 110 FMI 0 SA 0 oc 3" in w.render() and "lamps amber_warning" in w.render()
    send(w, "alarm", reading("alarm", 12, state="cleared", **dtc))
    assert dev.active_dtcs == []
    assert [a["seq"] for a in dev.alarms] == list(range(4, 14)), "the last 10 by seq"
    screen = w.render()
    assert "temperature active  sensor=reefer_front side=high c=9.5 limit_c=8" in screen
    assert screen.index("(seq 13)") < screen.index("(seq 4)"), "newest alarm first"
    assert "(seq 3)" not in screen
    # An older seal event arriving late does not replace the newer one.
    send(w, "seal", reading("seal", 1, seal="rear_door", event="sealed", authorised=True, zones=["depot"]))
    assert dev.seals["rear_door"] == opened
    assert w.state[DEV].streams["seal"].summary() == "seal: 1..3, no gaps"


def test_announced_drops_explain_gaps() -> None:
    w = Watcher()
    send(w, "position", [pos(s) for s in (1, 2, 3, 50, 51)])
    send(w, "alarm", reading("alarm", 1, kind="data_dropped", state="raised", dropped_stream="position", count=40,
                             first_seq=4, last_seq=43, reason="store_full"))
    stats = w.state[DEV].streams["position"]
    assert stats.missing_ranges() == [(44, 49)]
    assert stats.summary() == "position: 1..51, missing 6 (44-49), dropped by the device 40 (4-43)"


def test_temperatures_can_health_and_ignition() -> None:
    w = Watcher()
    send(w, "temperature", [reading("temperature", 1, sensor="reefer_front", c=4.25, error=None),
                            reading("temperature", 2, sensor="reefer_rear", c=None, error="crc"),
                            reading("temperature", 3, sensor="reefer_rear", c=None, error="missing")])
    send(w, "can", reading("can", 1, values=[
        {"name": "engine_speed", "spn": 190, "value": 1234.5, "unit": "rpm", "sa": 0},
        {"name": "fuel_level", "spn": 96, "value": 62.4, "unit": "%", "sa": 23}]))
    send(w, "can", reading("can", 2, values=[
        {"name": "engine_speed", "spn": 190, "value": 800, "unit": "rpm", "sa": 0}]))
    send(w, "health", reading("health", 4, uptime_s=600, reporting="moving", buffer={"pending": 17, "time_pending": 0},
                              gps={"sats_used": 14, "satellites_in_view": {"GPS": 9, "BeiDou": 11}},
                              clock={"source": "gps", "system_error_s": -0.4},
                              vehicle={"vin": "LZZ5CLSB0KA123456", "active_dtcs": 0}))
    send(w, "health", reading("health", 3, buffer={"pending": 999}))  # older, arriving late
    send(w, "ignition", reading("ignition", 1, on=True, source="gpio"))
    dev = w.state[DEV]
    assert dev.temperatures["reefer_front"]["c"] == 4.25
    assert dev.temperatures["reefer_rear"]["error"] == "missing" and dev.temperature_errors["reefer_rear"] == 2
    assert dev.can[("engine_speed", 0)]["value"] == 800 and dev.can[("fuel_level", 23)]["value"] == 62.4
    assert (dev.buffer_pending, dev.vin) == (17, "LZZ5CLSB0KA123456")
    screen = w.render()
    assert "reefer_front 4.25 C" in screen and "reefer_rear no value (missing)" in screen and "errors 2" in screen
    assert "engine_speed=800 rpm, fuel_level=62.4 %" in screen
    assert "buffer 17 pending, sats 14 used / 20 in view, clock gps (system -0.4 s), VIN LZZ5CLSB0KA123456" in screen
    assert "ignition  on" in screen


def test_position_line_and_age() -> None:
    now = watch.parse_ts(TS) + 3 * 60
    w = Watcher(clock=lambda: now)
    send(w, "position", pos(1, event="stop"))
    screen = w.render()
    assert f"position  {TS}  23.9001000, 108.1000000  74.1 km/h  fix gps  age 3 min  seq 1  (stop)" in screen
    w2 = Watcher(clock=lambda: now - 3600)
    send(w2, "position", pos(1))
    assert "in the future (clock?)" in w2.render()


def test_random_arrival_order_ends_complete() -> None:
    rng = random.Random(7)
    seqs = list(range(1, 501)) + rng.sample(range(1, 501), 50)  # with duplicates
    rng.shuffle(seqs)
    w = Watcher()
    for i in range(0, len(seqs), 37):
        send(w, "position", [pos(s) for s in seqs[i:i + 37]])
    stats = w.state[DEV].streams["position"]
    assert (stats.missing, stats.duplicates, stats.readings, len(stats.seqs)) == (0, 50, 550, 500)
    assert stats.summary() == "position: 1..500, no gaps" and w.state[DEV].position["seq"] == 500


# -- options ------------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    watch.add_arguments(p)
    return p.parse_args(list(argv))


def test_defaults() -> None:
    o = watch.options(parse())
    assert (o.host, o.port, o.prefix, o.device, o.topic) == ("127.0.0.1", 1883, "lorry", "+", "lorry/+/#")
    assert o.tls_ca is None and o.username is None and not o.keep_session
    a = parse("--json", "--for", "2.5", "--once")
    assert (a.json, a.duration, a.once) == (True, 2.5, True)


def test_config_file_gives_broker_device_tls_and_credentials(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "password").write_text("s3cret\nignored\n")
    cfg = write_config(tmp_path / "agent.toml", {
        "device": {"id": "GX-NN-0007"},
        "mqtt": {"host": "broker.example", "port": 8883, "topic_prefix": "fleet", "username": "gx0007",
                 "password_file": "password", "client_id": "GX-NN-0007", "tls": {"ca_file": "ca.pem"}},
    })
    o = watch.options(parse("--config", str(cfg)))
    assert (o.host, o.port, o.prefix, o.device) == ("broker.example", 8883, "fleet", "GX-NN-0007")
    assert (o.username, o.password, o.tls_ca) == ("gx0007", "s3cret", tmp_path / "ca.pem")
    assert o.client_id is None, "never the agent's own client id: the broker would disconnect the agent"
    o = watch.options(parse("--config", str(cfg), "--host", "127.0.0.1", "--device", "+", "--port", "1883"))
    assert (o.host, o.port, o.device, o.prefix) == ("127.0.0.1", 1883, "+", "fleet"), "the command line wins"


@pytest.mark.parametrize("argv,message", [
    (["--device", "a/b"], "--device"),
    (["--prefix", "+"], "--prefix"),
    (["--keep-session"], "--client-id"),
    (["--password-file", "/nonexistent/pw", "--username", "u"], "password file"),
    (["--tls-ca", "/nonexistent/ca.pem"], "cannot read"),
    (["--config", "/nonexistent/agent.toml"], "file not found"),
])
def test_unusable_options_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert watch.main(parse(*argv)) == 2
    assert message in capsys.readouterr().err


# -- against a real broker ----------------------------------------------------------------------

WATCH_CLI = ("import sys, argparse; from agent.tools import watch; p = argparse.ArgumentParser(); "
             "watch.add_arguments(p); sys.exit(watch.main(p.parse_args(sys.argv[1:])))")


def watch_process(tmp: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """``lorry-agent watch ARGS`` (through add_arguments/main, as the CLI will call them)."""
    out, err = tmp / f"watch-{len(list(tmp.glob('watch-*')))}.out", tmp / f"watch-{len(list(tmp.glob('watch-*')))}.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([sys.executable, "-c", WATCH_CLI, *args], stdout=o, stderr=e, cwd=REPO)
    return proc, out, err


class InProcess:
    """watch.watch() in a thread, with the Watcher at hand to query."""

    def __init__(self, opts: watch.Options, **kwargs: Any) -> None:
        self.watcher = Watcher(opts.prefix)
        self.out, self.err = io.StringIO(), io.StringIO()
        self.stop = threading.Event()
        self.rc: list[int] = []
        self.thread = threading.Thread(target=lambda: self.rc.append(watch.watch(
            opts, out=self.out, err=self.err, stop=self.stop, watcher=self.watcher, reconnect=(0.1, 0.5), **kwargs)))
        self.thread.start()
        wait_until(lambda: "subscribed to" in self.err.getvalue(), 10, "in-process watch subscribed")

    def finish(self) -> int:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        return self.rc[0]


def last_screen(text: str) -> str:
    return text.rsplit("--- ", 1)[-1]


def test_end_to_end_every_reading_and_the_state(tmp_path: Path, broker: Mosquitto, backend: Backend) -> None:
    capture = tmp_path / "trip.nmea"
    truth = trip.write(capture, interval_s=5, max_hours=0.1)
    cfg = agent_config(tmp_path, broker.port, gps={"replay": str(capture), "replay_speed": 0})

    cli, cli_out, cli_err = watch_process(tmp_path, "--port", str(broker.port), "--json", "--for", "60")
    inproc = InProcess(watch.Options(port=broker.port), interval=0.3)
    try:
        wait_until(lambda: "subscribed to lorry/+/#" in cli_err.read_text(), 10, "watch --json subscribed")
        with AgentProcess(cfg, "--until-drained") as agent:
            assert agent.wait(60) == 0, agent.log()
        n = len(truth)
        wait_until(lambda: len(backend.readings()) >= n and backend.status_values()[-1][0] == "offline", 10, "backend")
        wait_until(lambda: DEV in inproc.watcher.state, 5, "device seen")
        dev = inproc.watcher.state[DEV]
        wait_until(lambda: len(dev.streams["position"].seqs) == n and dev.status == "offline", 10, "watcher state")
        wait_until(lambda: len(cli_out.read_text().splitlines()) >= len(backend.readings()), 10, "--json lines")
        time.sleep(0.3)  # a duplicate or a stray line would come right behind
        cli.send_signal(signal.SIGINT)  # Ctrl-C
        assert cli.wait(10) == 0, cli_err.read_text()
    finally:
        if cli.poll() is None:
            cli.kill()
        assert inproc.finish() == 0

    # --json: every reading exactly as published, in arrival order, nothing else on stdout.
    lines = cli_out.read_text().splitlines()
    assert [json.loads(line) for line in lines] == backend.readings()
    singles = {p.decode() for t, p, _r in backend.messages if not t.endswith("/status") and not p.startswith(b"[")}
    assert singles and singles <= set(lines), "a reading is printed byte for byte as the agent published it"
    positions = [r for r in map(json.loads, lines) if r["stream"] == "position"]
    assert sorted(r["seq"] for r in positions) == list(range(1, n + 1))
    assert all(r["device"] == DEV for r in positions)

    # The state: no gaps, no duplicates, the right last position, the status.
    stats = dev.streams["position"]
    assert (stats.missing, stats.duplicates, stats.readings) == (0, 0, n)
    assert dev.malformed_messages == dev.malformed_readings == 0
    last = next(r for r in backend.readings("position") if r["seq"] == n)
    assert dev.position == last
    assert last["lat"] == pytest.approx(truth[-1].lat, abs=3e-7)
    assert last["lon"] == pytest.approx(truth[-1].lon, abs=3e-7)
    assert all(s.missing == 0 and s.duplicates == 0 for s in dev.streams.values())
    screen = last_screen(inproc.out.getvalue())
    assert f"{DEV}  offline" in screen
    assert f"position: 1..{n}, no gaps;  {n} readings, 0 dup" in screen
    assert f"position  {last['ts']}  {last['lat']:.7f}, {last['lon']:.7f}" in screen
    assert "MALFORMED" not in screen and "missing" not in screen

    # Later, on the device itself: --config --once shows the retained status and exits.
    once = subprocess.run([sys.executable, "-c", WATCH_CLI, "--config", str(cfg), "--once", "--interval", "0.3"],
                          capture_output=True, text=True, cwd=REPO, timeout=20)
    assert once.returncode == 0, once.stderr
    assert once.stdout.count("--- ") == 1 and f"lorry/{DEV}/#" in once.stdout
    assert f"{DEV}  offline (retained)" in once.stdout


def test_reconnects_after_broker_loss_and_json_keeps_stdout_clean(broker: Mosquitto) -> None:
    w = InProcess(watch.Options(port=broker.port, device=DEV), as_json=True, interval=0.2)
    screens = InProcess(watch.Options(port=broker.port), interval=0.2)
    pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    pub.reconnect_delay_set(0.1, 0.5)
    try:
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        pub.publish(f"lorry/{DEV}/position", json.dumps([pos(1), pos(2)]), qos=1).wait_for_publish(5)
        pub.publish(f"lorry/{DEV}/position", b"not json", qos=1).wait_for_publish(5)
        pub.publish("lorry/OTHER-1/position", json.dumps(pos(1) | {"device": "OTHER-1"}), qos=1).wait_for_publish(5)
        wait_until(lambda: len(w.out.getvalue().splitlines()) == 2, 5, "first readings")
        broker.stop()
        wait_until(lambda: "lost" in w.err.getvalue(), 10, "the loss noticed")
        wait_until(lambda: "DISCONNECTED" in last_screen(screens.out.getvalue()), 10, "a screen saying so")
        broker.start()
        wait_until(lambda: w.err.getvalue().count("subscribed to") == 2, 15, "resubscribed")
        wait_until(lambda: pub.is_connected(), 10, "publisher back")
        pub.publish(f"lorry/{DEV}/position", json.dumps(pos(3)), qos=1).wait_for_publish(5)
        wait_until(lambda: len(w.out.getvalue().splitlines()) == 3, 5, "reading after the reconnect")
        wait_until(lambda: "malformed" in w.err.getvalue(), 5, "malformed reported on stderr")
    finally:
        pub.loop_stop()
        pub.disconnect()
        assert w.finish() == 0 and screens.finish() == 0
    assert [json.loads(line) for line in w.out.getvalue().splitlines()] == [pos(1), pos(2), pos(3)]
    assert "OTHER-1" not in w.watcher.state, "--device limits the subscription"
    assert w.watcher.state[DEV].streams["position"].summary() == "position: 1..3, no gaps"
    final = last_screen(screens.out.getvalue())
    assert final.startswith(f"{time.strftime('%Y')}") and "  final ---" in final
    assert "position: 1..3, no gaps" in final and "MALFORMED 1 messages" in final and "OTHER-1" in final


def test_json_prints_compact_messages_as_json_lines(tmp_path: Path, broker: Mosquitto) -> None:
    """``watch --json`` prints every reading as the JSON line the agent would have sent, whatever
    the encoding: compact with an MQTT 5 content type, compact without one (MQTT 3.1.1
    subscribers never see content types), JSON objects and batches."""
    from paho.mqtt.enums import MQTTProtocolVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    cli, cli_out, cli_err = watch_process(tmp_path, "--port", str(broker.port), "--json", "--for", "30")
    v5 = InProcess(watch.Options(port=broker.port, protocol="5"), as_json=True, interval=0.2)
    seen_types: list[str | None] = []
    on_payload = v5.watcher.on_payload

    def recording(topic: str, payload: bytes, content_type: str | None = None, retained: bool = False) -> Any:
        seen_types.append(content_type)
        return on_payload(topic, payload, content_type, retained)

    v5.watcher.on_payload = recording  # type: ignore[method-assign]
    pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    cbor = Properties(PacketTypes.PUBLISH)
    cbor.ContentType = compact.CONTENT_TYPE
    positions = [pos(s, ts=f"2026-11-21T08:4{s // 60}:{s % 60:02d}.000Z", hdop=round(0.6 + s % 7 / 10, 1))
                 for s in range(1, 201)]
    held = pos(201, ts="2026-11-21T08:43:21.000Z") | {"ts_trusted": False}
    sent = [  # (stream, readings, payload, MQTT 5 properties)
        ("position", positions, compact.encode([body(r) for r in positions]), cbor),
        ("alarm", alarms(), compact.encode([body(a) for a in alarms()]), None),
        ("position", [held], compact.encode([body(held)]), cbor),
        ("position", [pos(202)], body(pos(202)).encode(), None),
        ("position", [pos(203), pos(204)], json.dumps([pos(203), pos(204)]).encode(), None),
    ]
    try:
        wait_until(lambda: "subscribed to lorry/+/#" in cli_err.read_text(), 10, "watch --json subscribed")
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        for stream, _readings, payload, props in sent:
            pub.publish(f"lorry/{DEV}/{stream}", payload, qos=1, properties=props).wait_for_publish(5)
        expected = [body(r) for _s, readings, _p, _props in sent for r in readings]
        wait_until(lambda: len(cli_out.read_text().splitlines()) >= len(expected), 10, "CLI --json lines")
        wait_until(lambda: len(v5.out.getvalue().splitlines()) >= len(expected), 10, "MQTT 5 --json lines")
        time.sleep(0.3)  # a stray line would come right behind
        cli.send_signal(signal.SIGINT)
        assert cli.wait(10) == 0, cli_err.read_text()
    finally:
        pub.loop_stop()
        pub.disconnect()
        if cli.poll() is None:
            cli.kill()
        assert v5.finish() == 0
    assert cli_out.read_text().splitlines() == expected, "byte for byte what the agent would have sent as JSON"
    assert v5.out.getvalue().splitlines() == expected
    assert seen_types == ["application/cbor", None, "application/cbor", None, None], "both detection paths taken"
    assert "malformed" not in cli_err.read_text() and "malformed" not in v5.err.getvalue()
    assert v5.watcher.state[DEV].streams["position"].summary() == "position: 1..204, no gaps"


def test_never_connected_exits_1(tmp_path: Path) -> None:
    from agent.demo.broker import free_port

    r = subprocess.run([sys.executable, "-c", WATCH_CLI, "--port", str(free_port()), "--for", "1"],
                       capture_output=True, text=True, cwd=REPO, timeout=20)
    assert r.returncode == 1
    assert r.stdout == "" and "never subscribed" in r.stderr


def test_mutual_tls_and_a_wrong_ca(tmp_path: Path) -> None:
    import certs
    from agent.demo.broker import BrokerTls

    ca = certs.authority(tmp_path / "pki", "ca")
    other_ca = certs.authority(tmp_path / "pki", "other-ca")
    server, client = ca.server(tmp_path / "pki"), ca.client(tmp_path / "pki", common_name="watch")
    broker = Mosquitto(tmp_path / "broker", tls=BrokerTls(ca.cert, server.cert, server.key, require_certificate=True))
    broker.start()
    try:
        pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        pub.tls_set(ca_certs=str(ca.cert), certfile=str(client.cert), keyfile=str(client.key))
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        pub.publish(f"lorry/{DEV}/status", b"online", qos=1, retain=True).wait_for_publish(5)
        pub.loop_stop()
        pub.disconnect()
        tls = ["--port", str(broker.port), "--tls-cert", str(client.cert), "--tls-key", str(client.key)]
        ok = subprocess.run([sys.executable, "-c", WATCH_CLI, *tls, "--tls-ca", str(ca.cert), "--once",
                             "--interval", "0.3"], capture_output=True, text=True, cwd=REPO, timeout=20)
        assert ok.returncode == 0, ok.stderr
        assert f"{DEV}  online (retained)" in ok.stdout
        bad = subprocess.run([sys.executable, "-c", WATCH_CLI, *tls, "--tls-ca", str(other_ca.cert), "--for", "1.5"],
                             capture_output=True, text=True, cwd=REPO, timeout=20)
        assert bad.returncode == 1 and bad.stdout == ""
        assert "certificate verify failed" in bad.stderr, bad.stderr
    finally:
        broker.stop()


def test_device_credentials_under_the_fleet_acl_see_their_own_topics(tmp_path: Path) -> None:
    """docs/mosquitto.acl lets a device read its own topics, so an installer can run watch on the
    device with the device's own identity (`watch --config /etc/lorry-agent/agent.toml`)."""
    broker = Mosquitto(tmp_path / "broker", extra_conf=[f"acl_file {REPO / 'docs' / 'mosquitto.acl'}"])
    broker.start()
    try:
        pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=DEV)
        pub.username_pw_set(DEV)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        pub.publish(f"lorry/{DEV}/status", b"online", qos=1, retain=True).wait_for_publish(5)
        pub.loop_stop()
        pub.disconnect()
        results = {}
        for user in (DEV, "backend"):
            out = io.StringIO()
            assert watch.watch(watch.Options(port=broker.port, device=DEV, username=user), once=True, interval=0.3,
                               out=out, err=io.StringIO()) == 0
            results[user] = out.getvalue()
    finally:
        broker.stop()
    assert f"{DEV}  online (retained)" in results[DEV]
    assert f"{DEV}  online (retained)" in results["backend"]
